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


def _equicorrelated_rows(k: int, c: float, dim: int, seed: int = 0) -> np.ndarray:
    """k unit rows in R^dim with every pairwise cosine exactly c (float64): the Cholesky
    factor of C = (1 - c) I + c 11^T, rotated by a random orthonormal basis."""
    cmat = (1 - c) * np.eye(k) + c * np.ones((k, k))
    basis = _orthonormal_rows(seed, k, dim)  # [k, dim]
    return np.linalg.cholesky(cmat) @ basis


@pytest.mark.parametrize("k,c", [(2, 0.3), (7, 0.1), (16, 0.107), (33, 0.5), (5, 0.0), (9, 1.0 - 1e-9)])
def test_equicorrelated_pr_equals_the_pr_of_an_equicorrelated_gram(k, c):
    """The closed form = (tr C)^2 / ||C||_F^2 of the synthetic Gram (numpy float64), and =
    `participation_ratio` of real vectors with that Gram (normalised; float32, rtol as above)."""
    cmat = (1 - c) * np.eye(k) + c * np.ones((k, k))
    by_gram = np.trace(cmat) ** 2 / np.sum(cmat * cmat)
    closed = float(g.equicorrelated_participation_ratio(k, c))
    assert closed == pytest.approx(by_gram, rel=1e-6)
    rows = _equicorrelated_rows(k, c, 48)
    np.testing.assert_allclose(rows @ rows.T, cmat, atol=1e-12)
    assert float(_pr(jnp.asarray(rows, jnp.float32), normalize=True)) == pytest.approx(by_gram, rel=4 * (48 + k * k) * EPS32)


def test_equicorrelated_pr_jitted_and_vmapped_over_k_and_c():
    """A grid of (K, c), jitted and vmapped, against the numpy formula; the limits K (c = 0),
    1 (c = 1) and 1 / c^2 (K -> inf)."""
    ks = np.array([2, 3, 16, 257, 800, 1558], np.float32)
    cs = np.array([0.0, 0.05, 0.107, 0.3, 0.9, 1.0], np.float32)
    got = np.asarray(jax.jit(jax.vmap(g.equicorrelated_participation_ratio))(ks, cs))
    k64, c64 = ks.astype(np.float64), cs.astype(np.float64)
    want = k64 ** 2 / ((1 + (k64 - 1) * c64) ** 2 + (k64 - 1) * (1 - c64) ** 2)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] == pytest.approx(2.0) and got[-1] == pytest.approx(1.0)
    assert float(g.equicorrelated_participation_ratio(10**7, 0.1)) == pytest.approx(100.0, rel=1e-4)


def test_k_at_degeneracy_is_the_first_k_past_the_factor():
    for c in (0.05, 0.107, 0.3):
        k = g.k_at_degeneracy(c, 10.0)
        deg = lambda kk: ((1 + (kk - 1) * c) ** 2 + (kk - 1) * (1 - c) ** 2) / kk  # noqa: E731
        assert deg(k) >= 10.0 > deg(k - 1)
    assert g.k_at_degeneracy(0.001, 10.0, k_max=1000) is None
    with pytest.raises(ValueError, match="0 < cos < 1"):
        g.k_at_degeneracy(0.0, 10.0)
