"""Sphere tools: distances, tangent spaces, geodesics and norm-preserving steering.

The model sees activations as points of the normalised sphere of radius sqrt(d) (for
LayerNorm: the great sphere inside the hyperplane orthogonal to the all-ones vector).  The
natural distance there is the angle between sphere points.  `exp_map`, `log_map`,
`tangent_project` and `geodesic_interpolate` work on any sphere centred at the origin: the
radius is read off the base point p as |p| (so pass `to_sphere` outputs, radius sqrt(d)).
For LayerNorm sphere points, p and q lie in the hyperplane and so does everything these
maps produce from them; `tangent_project(..., kind="layer")` also removes the all-ones
component of an arbitrary vector.

`rotate_towards` is the norm-preserving alternative to additive steering `x + c v`: it
turns x towards v by a chosen angle inside span(x, v), keeping |x| (and for "layer" the
mean of x, hence sigma(x)) fixed, so its sphere point turns by exactly that angle for any
eps.
"""

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from lens.geometry._common import (
    Scalar,
    centre_last,
    check_kind,
    compute_dtype,
    out_dtype,
    safe_inverse,
    safe_norm,
)


def _dot(a: Float[Array, "*#batch d"], b: Float[Array, "*#batch d"]) -> Float[Array, "..."]:
    return jnp.sum(a * b, axis=-1, keepdims=True)


def _unit(a: Float[Array, "*batch d"]) -> Float[Array, "*batch d"]:
    return a * safe_inverse(safe_norm(a))[..., None]


def _same(a: Float[Array, "*#batch d"], b: Float[Array, "*#batch d"]) -> Bool[Array, "..."]:
    """a == b in every coordinate.  Used to return exact zeros for identical inputs:
    XLA may fuse the two sides' reductions differently, so rounding alone would not."""
    return jnp.all(a == b, axis=-1, keepdims=True)


def _angle_between_units(
    u: Float[Array, "*#batch d"], w: Float[Array, "*#batch d"]
) -> Float[Array, "..."]:
    return 2.0 * jnp.arctan2(safe_norm(u - w), safe_norm(u + w))


def geodesic_angle(
    x: Float[Array, "*#batch d"], y: Float[Array, "*#batch d"], kind: str
) -> Float[Array, "*batch"]:
    """Angle in [0, pi] between `to_sphere(x)` and `to_sphere(y)` (eps-independent).

    `theta = angle(P x, P y)` ("layer") or `angle(x, y)` ("rms"); the geodesic distance on
    the sphere is `sqrt(d) * theta`.  Evaluated as `2 atan2(|u - w|, |u + w|)` on the unit
    vectors u, w (accurate near 0 and pi, unlike arccos of a cosine).  A degenerate side
    (P x = 0) has no direction: the angle is pi/2 against a proper point, 0 if both are
    degenerate.  Identical inputs give exactly 0.  Returned in float32 (float64 for
    float64 inputs).
    """
    check_kind(kind)
    cdt = compute_dtype(x, y)
    u, w = x.astype(cdt), y.astype(cdt)
    if kind == "layer":
        u, w = centre_last(u), centre_last(w)
    angle = _angle_between_units(_unit(u), _unit(w))
    return jnp.where(_same(x, y)[..., 0], 0.0, angle)


def tangent_project(
    p: Float[Array, "*#batch d"], v: Float[Array, "*#batch d"], kind: str | None = None
) -> Float[Array, "*batch d"]:
    """Component of v tangent to the sphere at p: `v - p (p.v) / |p|^2`.

    With kind="layer", v is centred first (`P v`), giving the tangent space of the sphere
    inside the hyperplane orthogonal to 1 (p is assumed centred, as `to_sphere` gives).
    kind=None or "rms" projects in the full space.  For p = 0 it returns (P) v.
    """
    if kind is not None:
        check_kind(kind)
    cdt = compute_dtype(p, v)
    pf, vf = p.astype(cdt), v.astype(cdt)
    if kind == "layer":
        vf = centre_last(vf)
    out = vf - pf * _dot(pf, vf) * safe_inverse(_dot(pf, pf))
    return out.astype(out_dtype(p, v))


def exp_map(p: Float[Array, "*#batch d"], v: Float[Array, "*#batch d"]) -> Float[Array, "*batch d"]:
    """Exponential map on the sphere of radius R = |p|: walk from p along tangent v.

    `exp_p(v) = cos(theta) p + sin(theta) R v / |v| = cos(theta) p + sinc(theta) v` with
    `theta = |v| / R`; exp_p(0) = p, and |exp_p(v)| = R.  The normal component of v (along p)
    is discarded first, so the result is always on the sphere.  Degenerate p = 0 returns v.
    """
    cdt = compute_dtype(p, v)
    pf = p.astype(cdt)
    vt = tangent_project(pf, v.astype(cdt))
    radius = safe_norm(pf)[..., None]
    theta = safe_norm(vt)[..., None] * safe_inverse(radius)
    out = jnp.cos(theta) * pf + jnp.sinc(theta / jnp.pi) * vt
    return out.astype(out_dtype(p, v))


def log_map(p: Float[Array, "*#batch d"], q: Float[Array, "*#batch d"]) -> Float[Array, "*batch d"]:
    """Logarithmic map on the sphere of radius R = |p|: the tangent vector at p pointing
    along the geodesic to q, with length the geodesic distance `R * angle(p, q)`.

    `log_p(q) = R theta u / |u|`, `u = q^ - p^ (p^ . q^)`, `theta = angle(p, q)`.  Only q's
    direction matters (q is radially projected onto p's sphere).  Inverse of `exp_map`
    for |v| < pi R.  q = p gives exactly 0; the antipode q = -p (every direction is a
    geodesic; in practice anything within ~64 eps of it) and degenerate p or q give 0.
    """
    cdt = compute_dtype(p, q)
    pf, qf = p.astype(cdt), q.astype(cdt)
    ph, qh = _unit(pf), _unit(qf)
    theta = _angle_between_units(ph, qh)
    u = qh - ph * _dot(ph, qh)
    u_norm = safe_norm(u)
    # Near the antipode u is rounding noise (|u| ~ eps) with a random direction: below
    # 64 eps there is no usable direction, so return 0 as for the exact antipode.  (Near
    # theta = 0 a noisy direction costs only ~R eps absolute, so no cut-off there.)
    usable = (u_norm > 64 * jnp.finfo(cdt).eps) | (theta < jnp.pi / 2)
    scale = safe_norm(pf) * theta * safe_inverse(u_norm, usable & (u_norm > 0))
    out = jnp.where(_same(pf, qf), 0.0, u * scale[..., None])
    return out.astype(out_dtype(p, q))


def geodesic_interpolate(
    p: Float[Array, "*#batch d"], q: Float[Array, "*#batch d"], t: Scalar
) -> Float[Array, "*batch d"]:
    """Point a fraction t of the way along the great circle from p to q (slerp).

    `exp_p(t log_p(q))`: t = 0 gives p, t = 1 gives q's direction at p's radius, constant
    speed in between; t outside [0, 1] extrapolates along the same great circle.
    """
    return exp_map(p, t * log_map(p, q))


def rotate_towards(
    x: Float[Array, "*#batch d"], v: Float[Array, "*#batch d"], angle: Scalar, kind: str
) -> Float[Array, "*batch d"]:
    """Norm-preserving steering: turn x towards v by `angle` radians.

    kind="rms":   `x' = cos(a) x + sin(a) |x| u^`, `u = v - x^ (x^ . v)`.
    kind="layer": the same applied to the centred part, keeping the mean:
                  `x' = mean(x) 1 + cos(a) P x + sin(a) |P x| u^`,
                  `u = P v - (P x)^ ((P x)^ . P v)`.
    |x'| = |x|, |P x'| = |P x| and mean(x') = mean(x), so sigma/rms is unchanged and
    `to_sphere(x')` is `to_sphere(x)` rotated by exactly `angle` towards v (any eps).
    A negative angle turns away; angles beyond pi continue round the great circle.  If v
    has no component orthogonal to x (v parallel to x up to a relative 64 eps, v = 0, or
    P x = 0) there is no direction to turn in and x is returned unchanged.
    """
    check_kind(kind)
    cdt = compute_dtype(x, v)
    xf, vf = x.astype(cdt), v.astype(cdt)
    if kind == "layer":
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        c, vf = xf - mean, centre_last(vf)
    else:
        mean, c = jnp.zeros_like(xf[..., :1]), xf
    radius = safe_norm(c)[..., None]
    ch = c * safe_inverse(radius)
    u = vf - ch * _dot(ch, vf)
    u_norm = safe_norm(u)[..., None]
    # For v parallel to x, u is pure rounding noise (~eps |v|) with a random direction:
    # treat an orthogonal part below 64 eps |v| (7.6e-6 |v| in float32) as none.
    has_dir = (u_norm > 64 * jnp.finfo(cdt).eps * safe_norm(vf)[..., None]) & (radius > 0)
    a = jnp.asarray(angle, cdt)
    turned = jnp.cos(a) * c + jnp.sin(a) * radius * u * safe_inverse(u_norm, has_dir)
    c_new = jnp.where(has_dir, turned, c)
    return (mean + c_new).astype(out_dtype(x, v))


def add_steering(
    x: Float[Array, "*#batch d"], v: Float[Array, "*#batch d"], coeff: Scalar = 1.0
) -> Float[Array, "*batch d"]:
    """Additive steering `x + coeff * v`, as the model applies it: computed in the promoted
    dtype and cast to x's dtype (the residual stream keeps its dtype)."""
    return (x + coeff * v).astype(x.dtype)
