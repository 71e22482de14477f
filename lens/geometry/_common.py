"""Small helpers shared by the geometry modules: kind checks, dtypes, guarded division.

Not public API.  Every public function computes in float32 (or float64 where the input is
float64) and casts its result back to the input's floating dtype: bf16 activations are
analysed with float32 arithmetic, exactly like the model's norms.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Real

KINDS = ("layer", "rms")

# A scalar argument: a Python number, or a 0-d array (what it becomes under jit/vmap).
Scalar = float | int | Real[Array, ""]

# Geometry results must be exact to float32 rounding on every backend, so matmuls here
# never drop to TF32/bf16 passes (the GPU default for float32 dots on recent hardware).
HIGHEST = jax.lax.Precision.HIGHEST


def check_kind(kind: str) -> None:
    """Raise a clear ValueError unless `kind` is one of the two supported norms."""
    if kind not in KINDS:
        raise ValueError(
            f"unknown norm kind {kind!r}: expected 'layer' (LayerNorm: centre, then divide "
            f"by sigma) or 'rms' (RMSNorm: divide by rms)"
        )


def compute_dtype(*xs) -> jnp.dtype:
    """float32 for half/bf16/float32/integer inputs; float64 only if an input is float64."""
    dtype = jnp.result_type(*xs)
    return jnp.promote_types(dtype, jnp.float32)


def out_dtype(*xs) -> jnp.dtype:
    """The input's floating dtype (the dtype results are cast back to)."""
    dtype = jnp.result_type(*xs)
    if jnp.issubdtype(dtype, jnp.floating):
        return dtype
    return jnp.promote_types(dtype, jnp.float32)


def safe_inverse(
    denom: Float[Array, "*batch"], positive: jnp.ndarray | None = None
) -> Float[Array, "*batch"]:
    """1/denom where denom > 0, else 0; gradient-safe (no inf * 0 = NaN under autodiff)."""
    ok = denom > 0 if positive is None else positive
    return jnp.where(ok, 1.0 / jnp.where(ok, denom, 1.0), 0.0)


def safe_norm(x: Float[Array, "*batch d"], axis: int = -1) -> Float[Array, "*batch"]:
    """Euclidean norm along `axis`, with a zero (not NaN) gradient at x = 0."""
    sq = jnp.sum(jnp.square(x), axis=axis)
    ok = sq > 0
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, sq, 1.0)), 0.0)


def centre_last(x: Float[Array, "*batch d"]) -> Float[Array, "*batch d"]:
    """x - mean(x) along the last axis (P x with P = I - 11^T/d), in x's dtype."""
    return x - jnp.mean(x, axis=-1, keepdims=True)


def scaled_rows(x: Float[Array, "K D"]) -> Float[Array, "K D"]:
    """Each row divided by its largest |entry| (zero rows stay 0): scale-free quantities
    (cosines, participation ratios) then never under- or overflow in the squares."""
    return x * safe_inverse(jnp.max(jnp.abs(x), axis=-1))[:, None]
