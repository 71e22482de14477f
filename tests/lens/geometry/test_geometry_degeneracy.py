"""lens.geometry.degeneracy: participation ratio, degeneracy factor, threshold clusters.

Tolerances: float32 eps = 2^-23 ~ 1.2e-7.  The participation ratio is a ratio of sums of
K^2 Gram entries, each a D-term dot product, so its relative rounding is ~(D + K^2) eps:
we use rtol = 4 (D + K^2) eps.  Clusters are integers and compared exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lens.geometry as g

EPS32 = float(np.finfo(np.float32).eps)
SETTINGS = settings(max_examples=25)  # on top of the derandomised profile of tests/conftest.py
K, DIM = 6, 24  # one shape for most tests: one compile each

_pr = jax.jit(g.participation_ratio, static_argnames="normalize")
_deg = jax.jit(g.degeneracy_factor, static_argnames="normalize")
_clusters = jax.jit(g.threshold_clusters, static_argnames="absolute")
RTOL = 4 * (DIM + K * K) * EPS32


def _orthonormal_rows(seed: int, k: int, dim: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, k)))[0].T


def _reference_clusters(
    cos: np.ndarray, threshold: float, absolute: bool
) -> tuple[int, np.ndarray]:
    """Union-find on the symmetrised threshold graph; labels by smallest member index."""
    k = cos.shape[0]
    parent = list(range(k))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    vals = np.abs(cos) if absolute else cos
    for i in range(k):
        for j in range(k):
            if vals[i, j] >= threshold:
                a, b = find(i), find(j)
                parent[max(a, b)] = min(a, b)
    roots = [find(i) for i in range(k)]
    order = {r: n for n, r in enumerate(sorted(set(roots)))}
    return len(order), np.asarray([order[r] for r in roots])


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-3, 3))
def test_orthogonal_equal_effects_give_k(seed, log_scale):
    effects = _orthonormal_rows(seed, K, DIM) * 10.0**log_scale
    pr = float(_pr(jnp.asarray(effects, jnp.float32), False))
    np.testing.assert_allclose(pr, K, rtol=RTOL)
    np.testing.assert_allclose(
        float(_deg(jnp.asarray(effects, jnp.float32), False)), 1.0, rtol=RTOL
    )


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    scales=st.lists(st.floats(-10, 10).filter(lambda s: abs(s) > 1e-3), min_size=K, max_size=K),
)
def test_parallel_effects_give_one(seed, scales):
    direction = np.random.default_rng(seed).standard_normal(DIM)
    effects = jnp.asarray(np.asarray(scales)[:, None] * direction, jnp.float32)
    np.testing.assert_allclose(float(_pr(effects, False)), 1.0, rtol=RTOL)
    np.testing.assert_allclose(float(_deg(effects, False)), K, rtol=RTOL)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), rank=st.integers(1, K))
def test_matches_eigenvalue_definition_and_bounds(seed, rank):
    rng = np.random.default_rng(seed)
    effects = (rng.standard_normal((K, rank)) @ rng.standard_normal((rank, DIM))).astype(np.float32)
    lam = np.linalg.eigvalsh(effects.astype(np.float64) @ effects.T.astype(np.float64))
    want = lam.sum() ** 2 / (lam**2).sum()
    pr = float(_pr(jnp.asarray(effects), False))
    np.testing.assert_allclose(pr, want, rtol=RTOL)
    assert 1.0 - RTOL <= pr <= rank * (1.0 + RTOL)


def test_invariant_to_rotation_and_scale():
    rng = np.random.default_rng(1)
    effects = rng.standard_normal((K, DIM)).astype(np.float32)
    rotation = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0].astype(np.float32)
    base = float(_pr(jnp.asarray(effects), False))
    np.testing.assert_allclose(float(_pr(jnp.asarray(effects @ rotation), False)), base, rtol=RTOL)
    np.testing.assert_allclose(float(_pr(jnp.asarray(effects * 1e-20), False)), base, rtol=RTOL)
    # Fourth powers of 1e20 overflow float32; the max-norm rescaling avoids it.
    np.testing.assert_allclose(float(_pr(jnp.asarray(effects * 1e20), False)), base, rtol=RTOL)


def test_normalize_ignores_effect_sizes():
    effects = _orthonormal_rows(2, K, DIM) * np.arange(1, K + 1)[:, None]
    effects = jnp.asarray(effects, jnp.float32)
    assert float(_pr(effects, False)) < K - 1  # unequal sizes lower the plain count
    np.testing.assert_allclose(float(_pr(effects, True)), K, rtol=RTOL)


def test_zero_effects():
    zero = jnp.zeros((K, DIM), jnp.float32)
    assert float(_pr(zero, False)) == 0.0
    assert float(_pr(zero, True)) == 0.0
    assert float(_deg(zero, False)) == np.inf
    one_nonzero = zero.at[2, 3].set(5.0)  # zero rows add nothing
    assert float(_pr(one_nonzero, True)) == 1.0


def test_block_clusters():
    # Two tight groups {0, 1, 4} and {2, 5} plus a loner 3.
    groups = [0, 0, 1, 2, 0, 1]
    cos = np.where(np.equal.outer(groups, groups), 0.95, 0.1)
    np.fill_diagonal(cos, 1.0)
    n, labels = _clusters(jnp.asarray(cos, jnp.float32), 0.9, False)
    assert int(n) == 3
    np.testing.assert_array_equal(labels, [0, 0, 1, 2, 0, 1])
    # A chain 0-1, 1-2 links 0 and 2 (single linkage) even though cos[0, 2] is small.
    chain = np.eye(3) + np.diag([0.95, 0.95], 1) + np.diag([0.95, 0.95], -1)
    n, labels = _clusters(jnp.asarray(chain, jnp.float32), 0.9, False)
    assert int(n) == 1
    np.testing.assert_array_equal(labels, 0)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.sampled_from([1, 2, 9]),
    threshold=st.floats(-0.5, 0.99),
    absolute=st.booleans(),
)
def test_clusters_match_union_find(seed, k, threshold, absolute):
    rng = np.random.default_rng(seed)
    cos = rng.uniform(-1, 1, (k, k)).astype(np.float32)  # not even symmetric: symmetrised
    cos[rng.uniform(size=(k, k)) < 0.1] = np.nan  # NaN never links
    n, labels = _clusters(jnp.asarray(cos), threshold, absolute)
    want_n, want_labels = _reference_clusters(cos, np.float32(threshold), absolute)
    assert int(n) == want_n
    np.testing.assert_array_equal(labels, want_labels)


def test_clusters_absolute_merges_opposites_and_vmap():
    cos = jnp.asarray([[1.0, -0.99], [-0.99, 1.0]], jnp.float32)
    assert int(_clusters(cos, 0.9, False)[0]) == 2
    assert int(_clusters(cos, 0.9, True)[0]) == 1
    # vmap over thresholds: the count is non-increasing as the threshold drops.
    rng = np.random.default_rng(3)
    effects = rng.standard_normal((K, 4)).astype(np.float32)
    cos = g.cosine_matrix(jnp.asarray(effects))
    thresholds = jnp.linspace(1.0, -1.0, 9)
    counts, _ = jax.jit(jax.vmap(lambda t: g.threshold_clusters(cos, t)))(thresholds)
    assert int(counts[0]) == K and int(counts[-1]) == 1
    assert np.all(np.diff(np.asarray(counts)) <= 0)


@pytest.mark.parametrize("fn", [g.participation_ratio, g.degeneracy_factor])
def test_single_effect(fn):
    assert float(fn(jnp.ones((1, 3)))) == 1.0
