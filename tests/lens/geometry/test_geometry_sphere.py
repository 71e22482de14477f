"""lens.geometry.sphere: angles, tangent spaces, exp/log maps, slerp, norm-preserving steering.

Tolerances: float32 eps = 2^-23 ~ 1.2e-7.  Points have norm R = sqrt(d) = 4; a few
trigonometric and d-term operations give absolute errors of ~d eps * R on coordinates, so
vector comparisons use `atol = 8 d eps R` and angle comparisons `atol = 8 d eps` (radians).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lens.geometry as g

EPS32 = float(np.finfo(np.float32).eps)
KINDS = ("layer", "rms")
SETTINGS = settings(max_examples=25)  # on top of the derandomised profile of tests/conftest.py
D = 16
R = float(np.sqrt(D))
VEC_TOL = 8 * D * EPS32 * R
ANGLE_TOL = 8 * D * EPS32

_angle = jax.jit(g.geodesic_angle, static_argnames="kind")
_tangent = jax.jit(g.tangent_project, static_argnames="kind")
_exp = jax.jit(g.exp_map)
_log = jax.jit(g.log_map)
_slerp = jax.jit(g.geodesic_interpolate)
_rotate = jax.jit(g.rotate_towards, static_argnames="kind")
_sphere = jax.jit(g.to_sphere, static_argnames="kind")


def _rand(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def _ref_angle(x, y, kind):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if kind == "layer":
        x, y = x - x.mean(-1, keepdims=True), y - y.mean(-1, keepdims=True)
    cos = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
    return np.arccos(np.clip(cos, -1, 1))


@pytest.mark.parametrize("kind", KINDS)
def test_geodesic_angle_matches_reference(kind):
    x, y = _rand(0, (8, D)), _rand(1, (8, D), 5.0)
    np.testing.assert_allclose(_angle(x, y, kind), _ref_angle(x, y, kind), atol=ANGLE_TOL)
    # It is the angle between the sphere points the model sees, whatever eps.
    np.testing.assert_allclose(
        _angle(x, y, kind),
        _angle(_sphere(x, kind, 0.3), _sphere(y, kind, 0.0), kind),
        atol=ANGLE_TOL,
    )
    np.testing.assert_allclose(_angle(x, -x, kind), np.pi, atol=ANGLE_TOL)
    if kind == "layer":  # blind to the mean
        np.testing.assert_allclose(
            _angle(x + 7.0, y, kind), _angle(x, y, kind), atol=ANGLE_TOL * 10
        )


def test_small_angles_are_accurate():
    # arccos(cos) would return 0 below ~3e-4 rad in float32; the atan2 form does not.
    x = _rand(2, (D,))
    t = _rand(3, (D,))
    t = t - x * jnp.dot(x, t) / jnp.dot(x, x)
    y = x + 1e-5 * jnp.linalg.norm(x) * t / jnp.linalg.norm(t)
    # measured: 5.8e-4 from arctan(1e-5), 3.6e-4 from the float64 angle of these float32 x, y
    # (y - x is only known to ~eps|x| / 1e-5|x| relatively): 1e-3 is float32's limit here.
    np.testing.assert_allclose(_angle(x, y, "rms"), np.arctan(1e-5), rtol=1e-3)


def test_degenerate_angle_conventions():
    x = _rand(4, (D,))
    zero = jnp.zeros(D)
    np.testing.assert_allclose(_angle(x, zero, "rms"), np.pi / 2, atol=ANGLE_TOL)
    assert float(_angle(zero, zero, "rms")) == 0.0
    np.testing.assert_allclose(_angle(jnp.full(D, 2.0), x, "layer"), np.pi / 2, atol=ANGLE_TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_tangent_project(kind):
    p = _sphere(_rand(5, (4, D)), kind, 0.0)
    v = _rand(6, (4, D), 3.0)
    t = _tangent(p, v, kind)
    tol = 8 * D * EPS32 * 3 * R  # |v| ~ 3 R: dot products of O(3 R^2) magnitude / R
    np.testing.assert_allclose(jnp.sum(t * p, -1), 0.0, atol=tol * R)
    np.testing.assert_allclose(_tangent(p, t, kind), t, atol=tol)  # idempotent
    if kind == "layer":
        np.testing.assert_allclose(jnp.sum(t, -1), 0.0, atol=tol)
    # The properties above hold for t = 0 too: the value itself against the float64 formula
    # `Pv - p (p.Pv) / |p|^2` (P = centring for "layer", identity for "rms").
    p64, v64 = np.asarray(p, np.float64), np.asarray(v, np.float64)
    if kind == "layer":
        v64 = v64 - v64.mean(-1, keepdims=True)
    want = v64 - p64 * (p64 * v64).sum(-1, keepdims=True) / (p64 * p64).sum(-1, keepdims=True)
    np.testing.assert_allclose(t, want, atol=tol)
    assert np.abs(want).max() > 1.0  # a nonzero tangent component to find


def _sphere_pair(seed, kind):
    return _sphere(_rand(seed, (D,)), kind, 0.0), _sphere(_rand(seed + 1, (D,)), kind, 0.0)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(KINDS))
def test_exp_of_log_returns_q(seed, kind):
    p, q = _sphere_pair(seed, kind)
    v = _log(p, q)
    np.testing.assert_allclose(jnp.dot(v, p), 0.0, atol=VEC_TOL * R)  # tangent
    np.testing.assert_allclose(jnp.linalg.norm(v), R * _angle(p, q, kind), rtol=8 * D * EPS32)
    np.testing.assert_allclose(_exp(p, v), q, atol=VEC_TOL)
    if kind == "layer":  # stays in the hyperplane orthogonal to 1
        np.testing.assert_allclose(jnp.sum(v), 0.0, atol=VEC_TOL)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), frac=st.floats(0.0, 0.95))
def test_log_of_exp_returns_v(seed, frac):
    p = _sphere(_rand(seed, (D,)), "rms", 0.0)
    v = _tangent(p, _rand(seed + 1, (D,)), None)
    v = v / jnp.linalg.norm(v) * (frac * np.pi * R)  # inside the injectivity radius pi R
    q = _exp(p, v)
    np.testing.assert_allclose(jnp.linalg.norm(q), R, rtol=8 * D * EPS32)
    # Near the antipode (frac -> 1) log is ill-conditioned ~1/sin(theta): scale the tolerance.
    tol = VEC_TOL * (1 + 1 / max(np.sin(frac * np.pi), 0.1))
    np.testing.assert_allclose(_log(p, q), v, atol=tol)


def test_exp_log_edge_cases():
    p = _sphere(_rand(7, (D,)), "rms", 0.0)
    np.testing.assert_array_equal(_exp(p, jnp.zeros(D)), p)
    np.testing.assert_array_equal(_log(p, p), 0.0)
    np.testing.assert_array_equal(_log(p, -p), 0.0)  # antipode: defined as 0
    # The normal component of v is discarded: exp stays on the sphere.
    np.testing.assert_allclose(_exp(p, 3.0 * p), p, atol=VEC_TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_geodesic_interpolation(kind):
    p, q = _sphere_pair(8, kind)
    total = float(_angle(p, q, kind))
    np.testing.assert_allclose(_slerp(p, q, 0.0), p, atol=VEC_TOL)
    np.testing.assert_allclose(_slerp(p, q, 1.0), q, atol=VEC_TOL)
    ts = jnp.linspace(0.0, 1.0, 5)
    path = jax.jit(jax.vmap(g.geodesic_interpolate, in_axes=(None, None, 0)))(p, q, ts)
    np.testing.assert_allclose(jnp.linalg.norm(path, axis=-1), R, rtol=8 * D * EPS32)
    np.testing.assert_allclose(_angle(p, path, kind), ts * total, atol=ANGLE_TOL)  # constant speed


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(KINDS),
    frac=st.floats(0.0, 1.0),
    log_scale=st.floats(-2, 2),
    mean_shift=st.floats(-3, 3),
    eps=st.sampled_from([0.0, 0.5]),
)
def test_rotate_towards_preserves_norm_and_turns_by_angle(
    seed, kind, frac, log_scale, mean_shift, eps
):
    scale = 10.0**log_scale
    x = _rand(seed, (D,), scale) + mean_shift * scale
    v = _rand(seed + 1, (D,), 2.0 * scale)
    start = float(_angle(x, v, kind))
    a = frac * start
    y = _rotate(x, v, a, kind)
    # |x| kept (and for layer the mean, hence |P x| and sigma): relative ~d eps.
    np.testing.assert_allclose(jnp.linalg.norm(y), jnp.linalg.norm(x), rtol=8 * D * EPS32)
    if kind == "layer":
        np.testing.assert_allclose(
            jnp.mean(y), jnp.mean(x), atol=8 * D * EPS32 * scale * (1 + abs(mean_shift))
        )
    # The sphere point turns by exactly `a`, towards v, for any eps.
    np.testing.assert_allclose(_angle(x, y, kind), a, atol=ANGLE_TOL)
    np.testing.assert_allclose(_angle(y, v, kind), start - a, atol=ANGLE_TOL)
    np.testing.assert_allclose(
        jnp.linalg.norm(_sphere(y, kind, eps)),
        jnp.linalg.norm(_sphere(x, kind, eps)),
        rtol=8 * D * EPS32,
    )


def test_rotate_towards_agrees_with_exp_map_on_the_sphere():
    x, v = _rand(9, (D,), 3.0), _rand(10, (D,))
    p = _sphere(x, "rms", 0.0)
    direction = _tangent(p, v, None)
    want = _exp(p, 0.7 * R * direction / jnp.linalg.norm(direction))
    np.testing.assert_allclose(_sphere(_rotate(x, v, 0.7, "rms"), "rms", 0.0), want, atol=VEC_TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_rotate_towards_without_direction_returns_x(kind):
    x = _rand(11, (D,)) + 1.0
    np.testing.assert_array_equal(_rotate(x, 2.5 * x, 0.3, kind), x)  # parallel
    np.testing.assert_array_equal(_rotate(x, jnp.zeros(D), 0.3, kind), x)
    np.testing.assert_array_equal(_rotate(jnp.zeros(D), x, 0.3, kind), 0.0)
    # Negative angles turn away.
    v = _rand(12, (D,))
    assert float(_angle(_rotate(x, v, -0.2, kind), v, kind)) > float(_angle(x, v, kind))


def test_add_steering_and_dtypes():
    x16 = _rand(13, (D,)).astype(jnp.bfloat16)
    v = _rand(14, (D,))
    out = g.add_steering(x16, v, 2.0)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, (x16.astype(jnp.float32) + 2.0 * v).astype(jnp.bfloat16))
    assert _rotate(x16, v, 0.1, "rms").dtype == jnp.float32  # promoted with the float32 v
    assert _rotate(x16, v.astype(jnp.bfloat16), 0.1, "rms").dtype == jnp.bfloat16


def test_unknown_kind_raises():
    x = jnp.ones(4)
    for call in (
        lambda: g.geodesic_angle(x, x, "l2"),
        lambda: g.rotate_towards(x, x, 0.1, "LayerNorm"),
        lambda: g.tangent_project(x, x, "sphere"),
    ):
        with pytest.raises(ValueError, match="unknown norm kind"):
            call()
