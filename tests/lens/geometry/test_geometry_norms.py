"""lens.geometry.norms: the sphere map, its Jacobian and displacements vs autodiff / float64.

Tolerances: float32 eps = 2^-23 ~ 1.2e-7.  Sphere coordinates are O(1) (|y| = sqrt(d)), and
the mean / mean-of-squares reductions over d terms contribute at most ~d eps relative error,
so vector comparisons use `atol = 8 d eps` unless stated otherwise.  Jacobian entries scale
like 1/sigma, so Jacobian tolerances are relative to max|J|.
"""

import functools

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lens.geometry as g
from lens.models.core import layers  # a broken project import fails the suite, never skips

EPS32 = float(np.finfo(np.float32).eps)
KINDS = ("layer", "rms")
SETTINGS = settings(max_examples=25)  # on top of the derandomised profile of tests/conftest.py


def _ref_sphere(x: np.ndarray, kind: str, eps: float) -> np.ndarray:
    """float64 reference: P x / sqrt(|P x|^2/d + eps) or x / sqrt(|x|^2/d + eps)."""
    x = np.asarray(x, np.float64)
    c = x - x.mean(-1, keepdims=True) if kind == "layer" else x
    return c / np.sqrt(np.mean(c * c, -1, keepdims=True) + eps)


def _ref_divisor(x: np.ndarray, kind: str, eps: float) -> np.ndarray:
    x = np.asarray(x, np.float64)
    c = x - x.mean(-1, keepdims=True) if kind == "layer" else x
    return np.sqrt(np.mean(c * c, -1) + eps)


def _rand(seed: int, shape, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# Module-level jitted wrappers: one compile per (kind, shape, dtype), shared by all tests
# (jit compiles a whole function faster than eager mode compiles its primitives one by one).
D = 16
_sphere = jax.jit(g.to_sphere, static_argnames="kind")
_jac = jax.jit(g.norm_jacobian, static_argnames="kind")
_jvp = jax.jit(g.norm_jvp, static_argnames="kind")
_disp = jax.jit(g.effective_displacement, static_argnames="kind")
_first = jax.jit(g.first_order_displacement, static_argnames="kind")
_apply = jax.jit(g.apply_norm, static_argnames="kind")
_divisor = jax.jit(g.norm_divisor, static_argnames="kind")


@functools.partial(jax.jit, static_argnames="kind")
def _autodiff_jac(x, kind, eps, gamma):
    return jax.jacfwd(lambda z: gamma * g.to_sphere(z, kind, eps))(x)


@functools.partial(jax.jit, static_argnames="kind")
def _autodiff_jvp(x, v, kind, eps, gamma):
    return jax.jvp(lambda z: gamma * g.to_sphere(z, kind, eps), (x,), (v,))[1]


@functools.partial(jax.jit, static_argnames="kind")
def _grad_sum(x, kind, eps):
    return jax.grad(lambda z: g.to_sphere(z, kind, eps).sum())(x)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [2, D, 64])
def test_to_sphere_matches_float64_reference(kind, d):
    x = _rand(d, (4, d), 3.0)
    for eps in (0.0, 1e-5, 0.3):
        got = np.asarray(_sphere(jnp.asarray(x), kind, eps))
        np.testing.assert_allclose(got, _ref_sphere(x, kind, eps), rtol=0, atol=8 * d * EPS32)
        want = _ref_divisor(x, kind, eps)
        np.testing.assert_allclose(_divisor(jnp.asarray(x), kind, eps), want, rtol=8 * d * EPS32)


@pytest.mark.parametrize("kind", KINDS)
def test_sphere_point_has_norm_sqrt_d_and_layer_mean_zero(kind):
    y = np.asarray(_sphere(jnp.asarray(_rand(0, (4, D), 10.0)), kind, 0.0), np.float64)
    # |y|^2 = d up to the d-term reduction error (relative ~d eps).
    np.testing.assert_allclose((y * y).sum(-1), D, rtol=8 * D * EPS32)
    if kind == "layer":
        np.testing.assert_allclose(y.mean(-1), 0.0, atol=8 * D * EPS32)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-3, 3), kind=st.sampled_from(KINDS))
def test_to_sphere_is_scale_invariant_without_eps(seed, log_scale, kind):
    x = jnp.asarray(_rand(seed, (4, D)))
    scaled = _sphere(x * np.float32(10.0**log_scale), kind, 0.0)
    # Scaling x scales c and sigma alike; only rounding differs (atol = 8 d eps).
    np.testing.assert_allclose(scaled, _sphere(x, kind, 0.0), atol=8 * D * EPS32)


@pytest.mark.parametrize("kind", KINDS)
def test_apply_norm_matches_equinox(kind):
    x = jnp.asarray(_rand(1, (D,), 4.0))
    gamma, beta = jnp.asarray(_rand(2, (D,))), jnp.asarray(_rand(3, (D,)))
    cls = eqx.nn.LayerNorm if kind == "layer" else eqx.nn.RMSNorm
    ref = cls(D, eps=1e-5)
    ref = eqx.tree_at(lambda m: (m.weight, m.bias), ref, (gamma, beta))
    want = np.asarray(ref(x))
    # Equinox multiplies by rsqrt instead of dividing by sqrt: a few ulps of O(|gamma|) values.
    np.testing.assert_allclose(
        _apply(x, kind, gamma, beta, 1e-5), want, atol=16 * EPS32 * np.abs(want).max()
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_apply_norm_equals_model_norm_bitwise(kind, dtype):
    x = jnp.asarray(_rand(4, (4, D), 5.0)).astype(dtype)
    gamma, beta = jnp.asarray(_rand(5, (D,))), jnp.asarray(_rand(6, (D,)))
    want, scale = layers.apply_norm(x, kind, gamma, beta, 1e-6)
    np.testing.assert_array_equal(g.apply_norm(x, kind, gamma, beta, eps=1e-6), want)
    np.testing.assert_array_equal(g.norm_divisor(x, kind, 1e-6), scale)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(KINDS),
    eps=st.sampled_from([0.0, 1e-5, 1e-1]),
    log_scale=st.floats(-2, 2),
)
def test_norm_jacobian_matches_autodiff(seed, kind, eps, log_scale):
    x = jnp.asarray(_rand(seed, (D,), 10.0**log_scale))
    gamma = jnp.asarray(_rand(seed + 1, (D,)))
    ones = jnp.ones(D, jnp.float32)
    for got, gam in ((_jac(x, kind, eps, gamma), gamma), (_jac(x, kind, eps, None), ones)):
        want = np.asarray(_autodiff_jac(x, kind, eps, gam))
        # Same formula reached by two routes; entries are O(max|J|), so 32 d eps relative.
        np.testing.assert_allclose(got, want, atol=32 * D * EPS32 * np.abs(want).max())


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(KINDS), eps=st.sampled_from([0.0, 1e-3])
)
def test_norm_jvp_matches_matrix_and_jax_jvp(seed, kind, eps):
    x, v = jnp.asarray(_rand(seed, (D,), 2.0)), jnp.asarray(_rand(seed + 7, (D,)))
    gamma = jnp.asarray(_rand(seed + 9, (D,)))
    jvp = np.asarray(_jvp(x, v, kind, eps, gamma))
    want = np.asarray(_autodiff_jvp(x, v, kind, eps, gamma))
    tol = 32 * D * EPS32 * np.abs(want).max()  # O(|Jv|) values, d-term reductions
    np.testing.assert_allclose(jvp, np.asarray(_jac(x, kind, eps, gamma)) @ np.asarray(v), atol=tol)
    np.testing.assert_allclose(jvp, want, atol=tol)
    np.testing.assert_array_equal(_first(x, v, kind, eps, gamma), jvp)


@pytest.mark.parametrize("kind", KINDS)
def test_jacobian_structure(kind):
    x = jnp.asarray(_rand(11, (D,), 3.0))
    jac = np.asarray(_jac(x, kind, 0.0, None), np.float64)
    tol = 16 * D * EPS32 * np.abs(jac).max()
    np.testing.assert_allclose(jac, jac.T, atol=tol)  # symmetric
    np.testing.assert_allclose(
        jac @ np.asarray(x), 0.0, atol=tol * float(jnp.abs(x).max())
    )  # blind to |x|
    if kind == "layer":
        np.testing.assert_allclose(jac @ np.ones(D), 0.0, atol=tol)  # blind to the mean


@pytest.mark.parametrize("kind", KINDS)
def test_effective_displacement_is_exact_difference(kind):
    x = jnp.asarray(_rand(12, (4, D), 2.0))
    v = jnp.asarray(_rand(13, (4, D)))
    got = np.asarray(_disp(x, v, kind, 1e-5, None))
    want = np.asarray(_sphere(x + v, kind, 1e-5)) - np.asarray(_sphere(x, kind, 1e-5))
    # The same float32 operations (fusion may contract differently): sphere-coordinate ulps.
    np.testing.assert_allclose(got, want, atol=4 * EPS32 * np.sqrt(D))
    # Both sphere points are rounded identically, so no steering means exactly no effect
    # (otherwise rounding noise would get a random direction in effective cosines).
    np.testing.assert_array_equal(_disp(x, jnp.zeros_like(v), kind, 1e-5, None), 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_first_order_error_is_second_order(kind):
    x = jnp.asarray(_rand(14, (4, D), 1.0))
    v = jnp.asarray(_rand(15, (4, D), 1.0))

    def rel_err(t):
        exact = _disp(x, t * v, kind, 0.0, None)
        first = _first(x, t * v, kind, 0.0, None)
        return float(jnp.linalg.norm(exact - first) / jnp.linalg.norm(first))

    # Relative remainder is O(t): shrinking t tenfold shrinks it ~tenfold (0.2 leaves room
    # for the O(t^2) term; at t = 1e-2 float32 noise ~1e-5 is far below the ~1e-2 signal).
    assert rel_err(1e-2) < 0.2 * rel_err(1e-1)
    assert rel_err(1e-2) < 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_zero_input_without_eps_is_zero_and_finite(kind):
    zero = jnp.zeros(D, jnp.float32)
    np.testing.assert_array_equal(_sphere(zero, kind, 0.0), 0.0)
    np.testing.assert_array_equal(_jac(zero, kind, 0.0, None), 0.0)
    np.testing.assert_array_equal(_autodiff_jac(zero, kind, 0.0, jnp.ones(D)), 0.0)
    np.testing.assert_array_equal(_grad_sum(zero, kind, 0.0), 0.0)
    beta = jnp.arange(D, dtype=jnp.float32)
    np.testing.assert_array_equal(_apply(zero, kind, jnp.ones(D), beta, 0.0), beta)
    np.testing.assert_array_equal(_divisor(zero, kind, 0.0), 0.0)
    if kind == "layer":  # any constant vector has P x = 0
        np.testing.assert_array_equal(_sphere(jnp.full(D, 3.0), kind, 0.0), 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_input_with_eps_is_smooth(kind):
    eps = 1e-2
    zero = jnp.zeros(D, jnp.float32)
    np.testing.assert_array_equal(_sphere(zero, kind, eps), 0.0)
    base = np.asarray(g.centering_projector(D)) if kind == "layer" else np.eye(D)
    # J(0) = P / sqrt(eps) (resp. I / sqrt(eps)); entries O(10), tolerance a few ulps.
    np.testing.assert_allclose(_jac(zero, kind, eps, None), base / np.sqrt(eps), atol=1e-5)
    np.testing.assert_allclose(
        _autodiff_jac(zero, kind, eps, jnp.ones(D)), base / np.sqrt(eps), atol=1e-5
    )


def test_d_equals_one():
    x = jnp.asarray([[2.5], [-0.1], [0.0]], jnp.float32)
    for eps in (0.0, 1e-5):
        # LayerNorm of a scalar is identically 0, and so is its Jacobian.
        np.testing.assert_array_equal(_sphere(x, "layer", eps), 0.0)
        np.testing.assert_array_equal(_jac(x[0], "layer", eps, None), 0.0)
        # RMSNorm of a scalar is x / sqrt(x^2 + eps): +-1 when eps = 0 (defined 0 at x = 0).
        want = _ref_sphere(np.asarray(x), "rms", eps) if eps else [[1.0], [-1.0], [0.0]]
        np.testing.assert_allclose(_sphere(x, "rms", eps), want, atol=4 * EPS32)
    np.testing.assert_array_equal(g.centering_projector(1), 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_is_computed_in_float32_and_cast_back(kind):
    x16 = jnp.asarray(_rand(16, (4, D), 3.0)).astype(jnp.bfloat16)
    v16 = jnp.asarray(_rand(17, (4, D))).astype(jnp.bfloat16)
    y16 = _sphere(x16, kind, 1e-5)
    assert y16.dtype == jnp.bfloat16
    assert _jac(x16[0], kind, 0.0, None).dtype == jnp.bfloat16
    assert _disp(x16, v16, kind, 0.0, None).dtype == jnp.bfloat16
    # Exactly the float32 result of the (exactly representable) bf16 inputs, rounded once.
    np.testing.assert_array_equal(
        y16, _sphere(x16.astype(jnp.float32), kind, 1e-5).astype(jnp.bfloat16)
    )
    # vs float64: one bf16 rounding of the output, relative error <= 2^-9 (half an ulp of
    # bf16's 8-bit significand); 2^-8 relative to max|y| leaves room for float32 noise.
    ref = _ref_sphere(np.asarray(x16.astype(jnp.float32)), kind, 1e-5)
    np.testing.assert_allclose(np.asarray(y16, np.float64), ref, atol=2.0**-8 * np.abs(ref).max())


def test_centering_projector_and_center():
    p = np.asarray(g.centering_projector(D), np.float64)
    np.testing.assert_allclose(p @ p, p, atol=8 * EPS32)
    np.testing.assert_allclose(p, p.T)
    np.testing.assert_allclose(p @ np.ones(D), 0.0, atol=8 * EPS32)
    x = jnp.asarray(_rand(18, (4, D), 5.0))
    np.testing.assert_allclose(g.center(x), np.asarray(x) @ p.T, atol=8 * D * EPS32 * 5)
    assert g.center(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "call",
    [
        lambda x: g.to_sphere(x, "batch"),
        lambda x: g.apply_norm(x, "LayerNorm"),
        lambda x: g.norm_jacobian(x, "RMS"),
        lambda x: g.norm_jvp(x, x, "l2"),
        lambda x: g.effective_displacement(x, x, ""),
        lambda x: g.first_order_displacement(x, x, "group"),
        lambda x: g.norm_divisor(x, "none"),
    ],
)
def test_unknown_kind_raises(call):
    with pytest.raises(ValueError, match="unknown norm kind"):
        call(jnp.ones(4))


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_agrees_with_loop_and_eps_can_be_traced(kind):
    x = jnp.asarray(_rand(19, (4, D), 2.0))
    v = jnp.asarray(_rand(20, (4, D)))
    jac_v = jax.jit(jax.vmap(lambda z: g.norm_jacobian(z, kind, 1e-5)))(x)
    jac_loop = jnp.stack([_jac(z, kind, 1e-5, None) for z in x])
    chex.assert_trees_all_close(jac_v, jac_loop, atol=1e-6)  # same ops, fusion may reorder
    jvp_v = jax.jit(jax.vmap(lambda a, b: g.norm_jvp(a, b, kind)))(x, v)
    chex.assert_trees_all_close(jvp_v, _jvp(x, v, kind, 0.0, None), atol=1e-6)
    # eps may be a traced array (e.g. swept under vmap).
    sweep = jax.jit(jax.vmap(lambda e: g.to_sphere(x[0], kind, e)))(jnp.asarray([0.0, 1e-3]))
    chex.assert_shape(sweep, (2, D))
