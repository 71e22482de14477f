"""lens.geometry.diagnostics: residual-norm statistics and |v|/|x| ratios.

Tolerances: float32 eps = 2^-23 ~ 1.2e-7; norms are d-term reductions (relative error
~d eps), and the statistics of them add a few roundings: rtol = 8 d eps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lens.geometry as g

EPS32 = float(np.finfo(np.float32).eps)
LAYERS, SEQ, D = 3, 7, 16
RTOL = 8 * D * EPS32

_stats = jax.jit(g.norm_ratio_stats, static_argnames=("kind", "skip_first", "n_top"))


def _resid(seed=0):
    """Residual stream with a huge first token and one outlier coordinate (dim 5)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((LAYERS, SEQ, D)) * (1 + np.arange(LAYERS))[:, None, None]
    x[:, 0] *= 40.0  # the BOS outlier
    x[:, :, 5] *= 30.0  # the outlier dimension
    return x.astype(np.float32)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_stats_match_numpy(kind):
    x = _resid()
    mask = np.ones(SEQ, bool)
    mask[-2:] = False  # padding
    got = _stats(jnp.asarray(x), kind, jnp.asarray(mask), 1, 6.0, 3)
    x64 = x.astype(np.float64)
    if kind == "layer":
        x64 = x64 - x64.mean(-1, keepdims=True)
    norms = np.linalg.norm(x64, axis=-1)
    valid = norms[:, 1 : SEQ - 2]
    np.testing.assert_allclose(got.norms, norms, rtol=RTOL)
    np.testing.assert_allclose(got.mean_norm, valid.mean(1), rtol=RTOL)
    np.testing.assert_allclose(got.median_norm, np.median(valid, 1), rtol=RTOL)
    np.testing.assert_allclose(got.min_norm, valid.min(1), rtol=RTOL)
    np.testing.assert_allclose(got.max_norm, valid.max(1), rtol=RTOL)
    np.testing.assert_allclose(got.first_norm, norms[:, 0], rtol=RTOL)
    np.testing.assert_allclose(got.first_ratio, norms[:, 0] / np.median(valid, 1), rtol=2 * RTOL)
    dim_rms = np.sqrt((x64[:, 1 : SEQ - 2] ** 2).mean(1))
    np.testing.assert_allclose(got.dim_rms, dim_rms, rtol=RTOL)
    np.testing.assert_allclose(
        got.dim_ratio, dim_rms / np.median(dim_rms, -1, keepdims=True), rtol=2 * RTOL
    )


def test_bos_and_outlier_dimension_are_flagged():
    got = _stats(jnp.asarray(_resid(1)), "rms", None, 1, 6.0, 3)
    assert np.all(np.asarray(got.first_ratio) > 10.0)
    np.testing.assert_array_equal(got.top_dims[:, 0], 5)
    want = np.zeros((LAYERS, D), bool)
    want[:, 5] = True
    np.testing.assert_array_equal(got.outlier_dims, want)
    assert np.all(np.asarray(got.top_dim_ratio[:, 0]) > 10.0)
    # Without skipping position 0 the BOS token dominates the maximum.
    with_bos = _stats(jnp.asarray(_resid(1)), "rms", None, 0, 6.0, 3)
    np.testing.assert_allclose(with_bos.max_norm, with_bos.first_norm, rtol=RTOL)


def test_empty_position_set_gives_nan():
    got = _stats(jnp.asarray(_resid()), "rms", jnp.zeros(SEQ, bool), 1, 6.0, 3)
    assert np.all(np.isnan(np.asarray(got.median_norm)))
    assert np.all(np.isnan(np.asarray(got.dim_rms)))
    assert np.all(np.isfinite(np.asarray(got.first_norm)))


def test_n_top_and_kind_validation():
    with pytest.raises(ValueError, match="n_top"):
        g.norm_ratio_stats(jnp.ones((1, 2, 3)), n_top=4)
    with pytest.raises(ValueError, match="unknown norm kind"):
        g.norm_ratio_stats(jnp.ones((1, 2, 3)), kind="batch")
    with pytest.raises(ValueError, match="unknown norm kind"):
        g.norm_ratio(jnp.ones(3), jnp.ones((2, 3)), kind="batch")


def test_norm_ratio():
    x = _resid()
    v = np.random.default_rng(2).standard_normal(D).astype(np.float32)
    rho = np.asarray(
        jax.jit(g.norm_ratio, static_argnames="kind")(jnp.asarray(v), jnp.asarray(x), "rms")
    )
    np.testing.assert_allclose(
        rho, np.linalg.norm(v) / np.linalg.norm(x.astype(np.float64), axis=-1), rtol=RTOL
    )
    # LayerNorm: the parts the norm sees; a constant added to v changes nothing.
    rho_l = g.norm_ratio(jnp.asarray(v + 3.0), jnp.asarray(x[0]), "layer")
    pv, px = v - v.mean(), x[0] - x[0].mean(-1, keepdims=True)
    np.testing.assert_allclose(
        rho_l, np.linalg.norm(pv) / np.linalg.norm(px, axis=-1), rtol=RTOL * 4
    )
    assert float(g.norm_ratio(jnp.ones(3), jnp.zeros(3))) == np.inf
