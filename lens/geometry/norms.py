"""LayerNorm and RMSNorm as geometry: centring, the sphere map, its Jacobian, displacements.

LayerNorm computes `gamma * (P x) / sigma(x) + beta` with the centring projector
`P = I - 11^T/d` and `sigma(x) = sqrt(|P x|^2/d + eps)`.  Centring deletes one direction
(the all-ones vector); dividing by sigma puts `P x / sigma` on the sphere of radius
sqrt(d) inside the hyperplane orthogonal to 1 (exactly on it when eps = 0, slightly inside
when eps > 0).  RMSNorm is the same map without the centring:
`x / rms(x)`, `rms(x) = sqrt(|x|^2/d + eps)`, a point of the full sphere of radius sqrt(d).
The vector the next layer "sees" is that point (then scaled per coordinate by gamma), so a
steering vector v added to x acts through `to_sphere(x + v) - to_sphere(x)`.

`d` below is the normalised axis (d_model for the residual stream, d_head for QK-norm).
Functions that map vectors to vectors accept any leading batch axes (`*batch d`) and
broadcast them; `norm_jacobian` takes one vector (vmap it for a batch).

Edge cases (all tested):
- x with `P x = 0` (x = 0, or for LayerNorm any constant vector) and eps = 0: the sphere
  map is undefined (0/0).  We return 0 for `to_sphere` (so `apply_norm` returns beta) and
  a zero Jacobian; autodiff through `to_sphere` there also gives 0, not NaN.  The model
  itself would produce NaN at such a point.
- eps > 0: everything is smooth; at x = 0, `to_sphere` = 0 and the Jacobian is P/sqrt(eps)
  (LayerNorm) or I/sqrt(eps) (RMSNorm).
- d = 1: LayerNorm's output is identically 0 (P = 0), and so is its Jacobian.
- Low-precision inputs (bf16/f16) are computed in float32 and cast back at the end.
"""

import jax.numpy as jnp
from jaxtyping import Array, Float

from lens.geometry._common import Scalar, centre_last, check_kind, compute_dtype, out_dtype


def _sphere_parts(x: Float[Array, "*batch d"], kind: str, eps: Scalar):
    """(y, 1/sigma, sigma) in the compute dtype; y = P x / sigma (or x / rms).

    Mirrors `models.core.layers.apply_norm` operation for operation (mean of squares, then
    sqrt, then divide), so that `apply_norm` here equals the model's bit for bit.  Where
    sigma = 0 (only possible with eps = 0) y, 1/sigma and sigma are all set to 0; the
    double `where` keeps the gradient finite there.
    """
    check_kind(kind)
    c = centre_last(x) if kind == "layer" else x
    ms = jnp.mean(c * c, axis=-1, keepdims=True) + jnp.asarray(eps, x.dtype)
    ok = ms > 0
    sigma = jnp.sqrt(jnp.where(ok, ms, 1.0))
    y = jnp.where(ok, c / sigma, 0.0)
    inv_sigma = jnp.where(ok, 1.0 / sigma, 0.0)
    return y, inv_sigma, jnp.where(ok, sigma, 0.0)


def centering_projector(d: int) -> Float[Array, "d d"]:
    """The centring projector `P = I - 11^T/d` (float32): symmetric, idempotent, P 1 = 0.

    For d = 1, P = 0: LayerNorm of a scalar is identically 0.
    """
    return jnp.eye(d, dtype=jnp.float32) - jnp.full((d, d), 1.0 / d, dtype=jnp.float32)


def center(x: Float[Array, "*batch d"]) -> Float[Array, "*batch d"]:
    """`P x = x - mean(x) 1` along the last axis (computed in float32, cast back)."""
    xf = x.astype(compute_dtype(x))
    return centre_last(xf).astype(out_dtype(x))


def norm_divisor(
    x: Float[Array, "*batch d"], kind: str, eps: Scalar = 0.0
) -> Float[Array, "*batch"]:
    """What the norm divides by: `sigma(x) = sqrt(|P x|^2/d + eps)` ("layer") or
    `rms(x) = sqrt(|x|^2/d + eps)` ("rms").  Always in the compute dtype (float32 for
    float32/bf16 inputs), since it is a diagnostic, not an activation."""
    _, _, sigma = _sphere_parts(x.astype(compute_dtype(x)), kind, eps)
    return sigma[..., 0]


def to_sphere(
    x: Float[Array, "*batch d"], kind: str, eps: Scalar = 0.0
) -> Float[Array, "*batch d"]:
    """The normalised vector before the gain.

    kind="layer": `P x / sigma(x)`, `sigma = sqrt(|P x|^2/d + eps)`, `P = I - 11^T/d`.
    kind="rms":   `x / rms(x)`,     `rms = sqrt(|x|^2/d + eps)`.

    With eps = 0 the result has norm sqrt(d) (and mean 0 for "layer").  Where the divisor
    is 0 (`P x = 0` with eps = 0) the result is defined as 0.  Computed in float32 and
    cast back to x's dtype.
    """
    y, _, _ = _sphere_parts(x.astype(compute_dtype(x)), kind, eps)
    return y.astype(out_dtype(x))


def apply_norm(
    x: Float[Array, "*batch d"],
    kind: str,
    gamma: Float[Array, " d"] | None = None,
    beta: Float[Array, " d"] | None = None,
    eps: Scalar = 0.0,
) -> Float[Array, "*batch d"]:
    """The norm exactly as the model computes it: `gamma * to_sphere(x) + beta`.

    Everything (including the gain and bias) in float32, cast back to x's dtype once at
    the end, like `models.core.layers.apply_norm` (same arguments, same order; that one also
    returns the divisor).  Gemma's `(1 + w)` gain must be passed as
    `gamma = 1 + w` (the model folds it at load time).  At `P x = 0` with eps = 0 this
    returns `beta` (or 0) where the model would return NaN.
    """
    cdt = compute_dtype(x)
    y, _, _ = _sphere_parts(x.astype(cdt), kind, eps)
    if gamma is not None:
        y = y * gamma.astype(cdt)
    if beta is not None:
        y = y + beta.astype(cdt)
    return y.astype(out_dtype(x))


def norm_jacobian(
    x: Float[Array, " d"],
    kind: str,
    eps: Scalar = 0.0,
    gamma: Float[Array, " d"] | None = None,
) -> Float[Array, "d d"]:
    """Analytic Jacobian of `to_sphere` at x (times diag(gamma) on the left if given).

    With y = to_sphere(x) and sigma the divisor:
      kind="layer": `J = (P - y y^T / d) / sigma`
      kind="rms":   `J = (I - y y^T / d) / sigma`
    (derivation: dy = dc/sigma - c dsigma/sigma^2 with dc = P dx and
    dsigma = c.dc / (d sigma), and y^T P = y^T).  J is symmetric; with eps = 0 it is the
    orthogonal projector onto the complement of {1, y} (resp. {y}) divided by sigma, so
    J x = 0: the norm is blind to rescaling x.  With gamma: `diag(gamma) J`.
    At `P x = 0` with eps = 0 the Jacobian is defined as 0.
    """
    cdt = compute_dtype(x)
    y, inv_sigma, _ = _sphere_parts(x.astype(cdt), kind, eps)
    d = x.shape[-1]
    base = centering_projector(d).astype(cdt) if kind == "layer" else jnp.eye(d, dtype=cdt)
    jac = (base - jnp.outer(y, y) / d) * inv_sigma
    if gamma is not None:
        jac = gamma.astype(cdt)[:, None] * jac
    return jac.astype(out_dtype(x))


def norm_jvp(
    x: Float[Array, "*#batch d"],
    v: Float[Array, "*#batch d"],
    kind: str,
    eps: Scalar = 0.0,
    gamma: Float[Array, " d"] | None = None,
) -> Float[Array, "*batch d"]:
    """`J(x) v` without forming the [d, d] matrix.

    kind="layer": `(P v - y (y.v)/d) / sigma`;  kind="rms": `(v - y (y.v)/d) / sigma`;
    times gamma elementwise if given.  O(d) per vector; x and v broadcast over batch axes.
    """
    cdt = compute_dtype(x, v)
    y, inv_sigma, _ = _sphere_parts(x.astype(cdt), kind, eps)
    vf = v.astype(cdt)
    pv = centre_last(vf) if kind == "layer" else vf
    d = x.shape[-1]
    out = (pv - y * jnp.sum(y * vf, axis=-1, keepdims=True) / d) * inv_sigma
    if gamma is not None:
        out = out * gamma.astype(cdt)
    return out.astype(out_dtype(x, v))


def effective_displacement(
    x: Float[Array, "*#batch d"],
    v: Float[Array, "*#batch d"],
    kind: str,
    eps: Scalar = 0.0,
    gamma: Float[Array, " d"] | None = None,
) -> Float[Array, "*batch d"]:
    """Exactly `to_sphere(x + v) - to_sphere(x)` (times gamma if given): the change in
    what the next layer sees when steering vector v is added to activation x.

    `x + v` is formed in the promoted input dtype (as the model adds to its residual
    stream; cast v to the residual dtype first to reproduce its rounding); both sphere
    points and their difference are computed in float32 and the difference is cast back
    once, so bf16 inputs do not suffer bf16 cancellation in the subtraction.  Where
    `x + v == x` exactly the result is exactly 0.
    """
    cdt = compute_dtype(x, v)
    steered = x + v
    y1, _, _ = _sphere_parts(steered.astype(cdt), kind, eps)
    y0, _, _ = _sphere_parts(x.astype(cdt), kind, eps)
    # Where x + v == x (v = 0, or v below x's ulp) the effect is exactly 0.  Rounding alone
    # would not guarantee it (XLA may fuse the two reductions differently), and noise
    # would get a random direction in effective cosines.
    unchanged = jnp.all(steered == x, axis=-1, keepdims=True)
    out = jnp.where(unchanged, 0.0, y1 - y0)
    if gamma is not None:
        out = out * gamma.astype(cdt)
    return out.astype(out_dtype(x, v))


def first_order_displacement(
    x: Float[Array, "*#batch d"],
    v: Float[Array, "*#batch d"],
    kind: str,
    eps: Scalar = 0.0,
    gamma: Float[Array, " d"] | None = None,
) -> Float[Array, "*batch d"]:
    """The linearised displacement `J(x) v` (see `norm_jvp`).

    It differs from `effective_displacement` by a remainder of second order in v: the
    relative error is O(|v| / |P x|) (resp. O(|v| / |x|) for "rms").
    """
    return norm_jvp(x, v, kind, eps, gamma)
