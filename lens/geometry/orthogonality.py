"""Effective orthogonality: are two steering vectors still orthogonal after the norm?

Orthogonal in storage is not orthogonal in effect.  A vector v added to x acts through
`e(v) = to_sphere(x + v) - to_sphere(x)`; every such displacement shares a component along
-x (the norm shrinks x back to the sphere), so two storage-orthogonal vectors have
positively correlated effects.  In the idealised case (x, v1, v2 mutually orthogonal,
|v1| = |v2| = r, |x| = s, rho = r/s, eps = 0; for LayerNorm additionally all three
orthogonal to the all-ones vector) the effects are `e_k = sqrt(d)/s * (a x^ + b v_k^)` with
`a = 1/sqrt(1+rho^2) - 1` and `b = rho/sqrt(1+rho^2)`, so their cosine is
`a^2 / (a^2 + b^2)`; see `orthogonal_pair_cosine_closed_form`.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lens.geometry._common import (
    HIGHEST,
    Scalar,
    compute_dtype,
    safe_inverse,
    safe_norm,
    scaled_rows,
)
from lens.geometry.norms import effective_displacement, first_order_displacement

_ORDERS = ("exact", "first")


def cosine_matrix(effects: Float[Array, "K D"]) -> Float[Array, "K K"]:
    """Pairwise cosines `C[i, j] = e_i . e_j / (|e_i| |e_j|)` (float32, clipped to [-1, 1]).

    A zero row has no direction: its row and column (diagonal included) are 0.
    """
    e = scaled_rows(effects.astype(compute_dtype(effects)))  # no under/overflow in |e|^2
    unit = e * safe_inverse(safe_norm(e))[:, None]
    cos = jnp.einsum("kD,jD->kj", unit, unit, precision=HIGHEST)
    return jnp.clip(cos, -1.0, 1.0)


def effective_cosine_matrix(
    x: Float[Array, " d"] | Float[Array, "B d"],
    vectors: Float[Array, "K d"],
    kind: str,
    eps: Scalar = 0.0,
    order: str = "exact",
    gamma: Float[Array, " d"] | None = None,
) -> Float[Array, "K K"]:
    """K x K cosines between the steering vectors' effective displacements.

    For vector k the effect at activation x_b is
      order="exact": `e_kb = to_sphere(x_b + v_k) - to_sphere(x_b)`
      order="first": `e_kb = J(x_b) v_k`  (the linearisation; see `norm_jacobian`)
    times gamma if given.  With a batch of B activations, each vector's effects are
    concatenated over the batch into one long effect vector `E_k = [e_k1, ..., e_kB]` of
    length B*d, and the result is `cosine_matrix(E)`: a batch-pooled cosine in which
    activations with larger displacements weigh more (not the mean of per-activation
    cosines).  A vector with no effect gets a zero row and column.
    """
    if order not in _ORDERS:
        raise ValueError(f"unknown order {order!r}: expected 'exact' or 'first'")
    displacement = effective_displacement if order == "exact" else first_order_displacement
    xb = x[None, :] if x.ndim == 1 else x

    def effect(v: Float[Array, " d"]) -> Float[Array, " Bd"]:
        return displacement(xb, v[None, :], kind, eps, gamma).astype(jnp.float32).reshape(-1)

    effects = jax.vmap(effect)(vectors)  # [K, B*d]
    return cosine_matrix(effects)


def orthogonal_pair_cosine_closed_form(
    rho: Float[Array, "*batch"] | float,
) -> Float[Array, "*batch"]:
    """Cosine between the effects of two orthogonal steering vectors, idealised case.

    Formula (x, v1, v2 mutually orthogonal, |v1| = |v2| = r, |x| = s, rho = r/s, eps = 0):
      `cos = (1/sqrt(1+rho^2) - 1)^2 / ((1/sqrt(1+rho^2) - 1)^2 + rho^2/(1+rho^2))`
    which simplifies (q = sqrt(1+rho^2)) to `(1 - 1/q)/2 = rho^2 / (2 q (q + 1))`.
    About rho^2/4 for small rho, rising monotonically to 1/2 as rho -> infinity.
    Exact for RMSNorm; exact for LayerNorm when x, v1, v2 are also orthogonal to the
    all-ones vector (then P acts as the identity on everything involved).  The literal
    formula is 0/0 at rho = 0; we return the limit 0.

    Evaluated in the cancellation-free forms: `rho^2 / (2 q (q+1))` for |rho| < 1 and
    `(1 - 1/q)/2` (q = hypot(1, rho), no overflow) beyond, both accurate to float32
    rounding in relative terms.
    """
    r = jnp.abs(jnp.asarray(rho, dtype=compute_dtype(jnp.asarray(rho))))
    q = jnp.hypot(jnp.ones_like(r), r)
    # Keep the unselected branch finite so gradients through `where` stay finite too.
    rs = jnp.where(r < 1.0, r, 0.0)
    qs = jnp.hypot(jnp.ones_like(rs), rs)
    small = rs * rs / (2.0 * qs * (qs + 1.0))
    large = 0.5 * (1.0 - 1.0 / q)
    return jnp.where(r < 1.0, small, large)


def orthogonal_pair_cosine_eps(rho: Float[Array, "*b"], t: Float[Array, "*b"]) -> Float[Array, "*b"]:
    """The idealised orthogonal-pair cosine with the norm's eps kept.

    With c = P x (or x), |c| = s, v_k orthogonal to c and each other, |P v_k| = rho s and
    t = eps d / s^2, each effect is `(A - 1) c / sigma0 + A u_k / sigma0` with
    `A = sigma(x) / sigma(x + v) = sqrt((1 + t) / (1 + rho^2 + t))`, so
      `cos = (A - 1)^2 / ((A - 1)^2 + A^2 rho^2)`.
    t = 0 gives `orthogonal_pair_cosine_closed_form`.  `1 - A` is evaluated
    cancellation-free as `(1 - A^2) / (1 + A)` with `1 - A^2 = rho^2 / (1 + rho^2 + t)`.
    """
    rho2 = jnp.square(rho)
    denom = 1.0 + rho2 + t
    a = jnp.sqrt((1.0 + t) / denom)
    one_minus_a = (rho2 / denom) / (1.0 + a)
    num = jnp.square(one_minus_a)
    return num / (num + jnp.square(a) * rho2)
