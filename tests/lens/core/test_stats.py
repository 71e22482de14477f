"""lens.core.stats against scipy (an independent implementation).

Tolerances: ranks are exact (small integers and halves in float32); Spearman 1e-5 absolute
(float32 centred-rank sums of at most a few hundred terms); KL 1e-5 relative against a
float64 numpy sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sp

from lens.core.stats import kl_divergence, ranks, spearman


def _rows(seed, shape, ties):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    return np.round(x * 2) / 2 if ties else x  # rounding makes many ties


@pytest.mark.parametrize("ties", [False, True])
def test_average_ranks_are_scipy_rankdata(ties):
    x = _rows(0, (3, 4, 57), ties)
    got = np.asarray(jax.jit(ranks)(x))
    np.testing.assert_array_equal(got, sp.rankdata(x, axis=-1) - 1)


def test_ordinal_ranks_break_ties_by_position():
    x = _rows(1, (5, 40), True)
    got = np.asarray(ranks(x, ties="ordinal"))
    np.testing.assert_array_equal(got, sp.rankdata(x, method="ordinal", axis=-1) - 1)
    np.testing.assert_array_equal(got, np.argsort(np.argsort(x, -1, kind="stable"), -1))


@pytest.mark.parametrize("ties", [False, True])
def test_spearman_is_scipy_spearmanr_and_vmaps(ties):
    a, b = _rows(2, (6, 33), ties), _rows(3, (6, 33), ties)
    b[0] = a[0] * 3 + 1  # a monotone copy: rho = 1
    want = np.array([sp.spearmanr(x, y).statistic for x, y in zip(a, b)])
    np.testing.assert_allclose(np.asarray(jax.jit(spearman)(a, b)), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.vmap(spearman)(a, b)), want, atol=1e-5)
    assert abs(float(spearman(a[0], -a[0])) + 1.0) < 1e-6


def test_spearman_of_a_constant_row_is_zero_and_bad_shapes_are_refused():
    assert float(spearman(jnp.ones(5), jnp.arange(5.0))) == 0.0
    with pytest.raises(ValueError, match="last axes"):
        spearman(jnp.ones(5), jnp.ones(4))
    with pytest.raises(ValueError, match="ties"):
        ranks(jnp.ones(3), ties="dense")


def test_kl_divergence_is_scipy_entropy():
    rng = np.random.default_rng(4)
    lp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(4, 11)), jnp.float32))
    lq = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(4, 11)), jnp.float32))
    want = [sp.entropy(np.exp(np.float64(p)), np.exp(np.float64(q))) for p, q in zip(lp, lq)]
    np.testing.assert_allclose(np.asarray(jax.jit(kl_divergence)(lp, lq)), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(kl_divergence(lp, lp)), 0.0, atol=1e-7)
