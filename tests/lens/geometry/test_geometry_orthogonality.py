"""lens.geometry.orthogonality: effective cosines vs the closed form and direct computation.

Tolerances: float32 eps = 2^-23 ~ 1.2e-7.  Measured effect vectors have size ~rho (in units
of the sphere radius) while each coordinate carries ~eps absolute rounding from the sphere
map, so a measured cosine is accurate to a few eps/rho: we use `atol = 2 eps (1 + 1/rho)`
(observed errors are ~0.15 eps/rho).
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

_cos = jax.jit(g.effective_cosine_matrix, static_argnames=("kind", "order"))
_disp = jax.jit(g.effective_displacement, static_argnames="kind")
_first = jax.jit(g.first_order_displacement, static_argnames="kind")
_closed = jax.jit(g.orthogonal_pair_cosine_closed_form)


def _literal_closed_form(rho: np.ndarray) -> np.ndarray:
    """The formula exactly as written in the issue, in float64."""
    a = 1.0 / np.sqrt(1.0 + rho**2) - 1.0
    return a**2 / (a**2 + rho**2 / (1.0 + rho**2))


def _orthonormal_frame(seed: int, d: int, n: int, avoid_ones: bool) -> np.ndarray:
    """n orthonormal vectors [n, d]; with avoid_ones they are also orthogonal to 1."""
    a = np.random.default_rng(seed).standard_normal((d, n + 1))
    if avoid_ones:
        a[:, 0] = 1.0
        return np.linalg.qr(a)[0][:, 1:].T
    return np.linalg.qr(a)[0][:, :n].T


def test_closed_form_matches_literal_formula_and_limits():
    rho = np.geomspace(1e-2, 1e3, 200)
    got = np.asarray(_closed(jnp.asarray(rho, jnp.float32)), np.float64)
    # Cancellation-free evaluation: float32 relative rounding of a few ops (16 eps). The
    # literal float64 formula loses ~log10(1/rho^2) digits, still < 1e-11 at rho = 1e-2.
    np.testing.assert_allclose(
        got, _literal_closed_form(rho.astype(np.float32).astype(np.float64)), rtol=16 * EPS32
    )
    assert np.all(np.diff(got) > 0)  # monotone increasing
    small = np.asarray(_closed(jnp.asarray([1e-4, 1e-3], jnp.float32)))
    np.testing.assert_allclose(
        small, [1e-8 / 4, 1e-6 / 4], rtol=1e-5
    )  # ~rho^2/4 (rel. error rho^2)
    assert float(_closed(0.0)) == 0.0  # the 0/0 limit
    np.testing.assert_allclose(
        _closed(jnp.asarray([1e8, 1e30, np.inf], jnp.float32)), 0.5, rtol=1e-7
    )  # 1/2 - 1/(2 rho)
    assert float(_closed(-2.0)) == float(_closed(2.0))
    grad = jax.jit(jax.vmap(jax.grad(g.orthogonal_pair_cosine_closed_form)))
    slopes = np.asarray(grad(jnp.asarray([1e-3, 0.5, 2.0, 1e30], jnp.float32)))
    assert np.all(np.isfinite(slopes))
    np.testing.assert_allclose(slopes[0], 1e-3 / 2, rtol=1e-5)  # d/drho rho^2/4


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(KINDS),
    log_rho=st.floats(-3, 2),
    log_s=st.floats(-2, 2),
)
def test_effective_cosine_of_orthogonal_pair_matches_closed_form(seed, kind, log_rho, log_s):
    # RMSNorm, eps = 0: exact.  LayerNorm: exact when x, v1, v2 are also orthogonal to 1
    # (P is then the identity on all of them).
    rho, s = 10.0**log_rho, 10.0**log_s
    x, v1, v2 = _orthonormal_frame(seed, D, 3, avoid_ones=kind == "layer")
    x, vs = (x * s).astype(np.float32), (np.stack([v1, v2]) * s * rho).astype(np.float32)
    cos = np.asarray(_cos(jnp.asarray(x), jnp.asarray(vs), kind, 0.0, "exact", None))
    expected = float(_literal_closed_form(np.float64(rho)))
    np.testing.assert_allclose(cos[0, 1], expected, atol=2 * EPS32 * (1 + 1 / rho))
    np.testing.assert_allclose(cos, cos.T)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    log_rho=st.floats(-1, 1),
    shifts=st.tuples(*[st.floats(-5, 5)] * 3),
)
def test_layer_closed_form_holds_for_any_mean_shifts(seed, log_rho, shifts):
    # Centring removes any multiple of 1 from x, v1, v2: only P x, P v1, P v2 matter, so the
    # closed form holds with rho = |P v| / |P x| whatever the means are.
    rho = 10.0**log_rho
    x, v1, v2 = _orthonormal_frame(seed, D, 3, avoid_ones=True)
    vecs = np.stack([x, rho * v1, rho * v2]) + np.asarray(shifts)[:, None]
    cos = _cos(
        jnp.asarray(vecs[0], jnp.float32),
        jnp.asarray(vecs[1:], jnp.float32),
        "layer",
        0.0,
        "exact",
        None,
    )
    # Shifts up to 5 on unit-scale vectors cost ~5x more rounding in P: 10 eps (1 + 1/rho).
    np.testing.assert_allclose(
        cos[0, 1], _literal_closed_form(np.float64(rho)), atol=10 * EPS32 * (1 + 1 / rho)
    )


@pytest.mark.parametrize("kind", KINDS)
def test_closed_form_fails_for_layer_norm_when_not_orthogonal_to_ones(kind):
    # Sanity check of the test above: for LayerNorm, vectors orthogonal to x but not after
    # centring do NOT follow the closed form; RMSNorm does not centre, so it still holds.
    x = np.zeros(D, np.float32)
    x[0] = 1.0
    v1, v2 = np.zeros(D, np.float32), np.zeros(D, np.float32)
    v1[1:8], v2[8:15] = 1.0, 1.0  # orthogonal to x and each other, equal norm, mean != 0
    rho = float(np.linalg.norm(v1))
    cos = float(
        _cos(jnp.asarray(x), jnp.asarray(np.stack([v1, v2])), kind, 0.0, "exact", None)[0, 1]
    )
    if kind == "rms":
        np.testing.assert_allclose(
            cos, _literal_closed_form(np.float64(rho)), atol=2 * EPS32 * (1 + 1 / rho)
        )
    else:
        assert abs(cos - _literal_closed_form(np.float64(rho))) > 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_first_order_effects_of_orthogonal_pair_are_orthogonal(kind):
    # J v = v / sigma for v orthogonal to x (and to 1): storage-orthogonal vectors stay
    # orthogonal to first order; the exact effect's cosine rho^2/4 is a second-order effect.
    x, v1, v2 = _orthonormal_frame(3, D, 3, avoid_ones=kind == "layer")
    vs = jnp.asarray(np.stack([v1, v2]) * 0.1, jnp.float32)
    first = _cos(jnp.asarray(x, jnp.float32), vs, kind, 0.0, "first", None)
    np.testing.assert_allclose(first, np.eye(2), atol=8 * EPS32)
    exact = _cos(jnp.asarray(x, jnp.float32), vs, kind, 0.0, "exact", None)
    np.testing.assert_allclose(exact[0, 1], 0.01 / 4, rtol=0.01)  # ~rho^2/4, rel. error ~rho^2


@pytest.mark.parametrize("order", ["exact", "first"])
def test_batch_concatenates_effects_before_cosine(order):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((3, D)), jnp.float32)
    vs = jnp.asarray(rng.standard_normal((4, D)), jnp.float32)
    gamma = jnp.asarray(rng.standard_normal(D), jnp.float32)
    got = np.asarray(_cos(x, vs, "layer", 1e-5, order, gamma))
    fn = _disp if order == "exact" else _first
    effects = np.stack(
        [np.asarray(fn(x, v[None], "layer", 1e-5, gamma), np.float64).ravel() for v in vs]
    )
    unit = effects / np.linalg.norm(effects, axis=1, keepdims=True)
    # Cosines of O(1)-relative effects: a few ulps times the d-term reductions.
    np.testing.assert_allclose(got, unit @ unit.T, atol=8 * D * EPS32)
    # A single activation [d] is the B = 1 case.
    single = _cos(x[0], vs, "layer", 1e-5, order, gamma)
    np.testing.assert_allclose(single, _cos(x[:1], vs, "layer", 1e-5, order, gamma), atol=0)


def test_cosine_matrix_zero_rows_and_diagonal():
    effects = jnp.asarray([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [-2.0, -4.0, 0.0]], jnp.float32)
    cos = np.asarray(g.cosine_matrix(effects))
    np.testing.assert_allclose(cos, [[1, 0, -1], [0, 0, 0], [-1, 0, 1]], atol=2 * EPS32)
    assert np.all(np.abs(cos) <= 1.0)


def test_zero_vector_has_no_effect():
    x = jnp.asarray(np.random.default_rng(6).standard_normal(D), jnp.float32)
    vs = jnp.zeros((2, D), jnp.float32).at[0, 1].set(1.0)
    cos = np.asarray(_cos(x, vs, "rms", 0.0, "exact", None))
    np.testing.assert_array_equal(cos[1], 0.0)
    np.testing.assert_array_equal(cos[:, 1], 0.0)


def test_bad_order_and_kind_raise():
    x, vs = jnp.ones(4), jnp.eye(4)
    with pytest.raises(ValueError, match="unknown order"):
        g.effective_cosine_matrix(x, vs, "rms", order="second")
    with pytest.raises(ValueError, match="unknown norm kind"):
        g.effective_cosine_matrix(x, vs, "batch")
