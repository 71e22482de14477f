"""lens.steering.melbo.behaviour against independent computations: explicit centring, scipy's
average-linkage clustering (scipy is installed with the test references), a plain double
loop over pairs, and planted groups whose answer is known."""

import numpy as np
import pytest

from lens.steering.melbo import behaviour

scipy_hierarchy = pytest.importorskip("scipy.cluster.hierarchy")


def planted(k_per=(4, 5, 3), d=40, noise=0.05, seed=0):
    """Effects = a shared component + one of len(k_per) group directions + noise."""
    rs = np.random.RandomState(seed)
    shared = 3.0 * rs.randn(d)
    groups = rs.randn(len(k_per), d)
    labels = np.repeat(np.arange(len(k_per)), k_per)
    e = shared + groups[labels] + noise * rs.randn(len(labels), d)
    return e, labels


def test_specific_cosines_equal_explicit_centring():
    e = np.random.RandomState(1).randn(7, 13)
    s = e - e.mean(axis=0)
    u = s / np.linalg.norm(s, axis=1, keepdims=True)
    np.testing.assert_allclose(behaviour.specific_cosines(e @ e.T), u @ u.T, atol=1e-12)
    with pytest.raises(ValueError, match="square"):
        behaviour.specific_cosines(np.ones((3, 4)))


@pytest.mark.parametrize("n_clusters", [1, 2, 3, 5, 9])
def test_average_linkage_equals_scipy(n_clusters):
    x = np.random.RandomState(2).randn(9, 4)
    dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
    ours = behaviour.average_linkage(dist, n_clusters)
    z = scipy_hierarchy.linkage(x, method="average")
    theirs = scipy_hierarchy.fcluster(z, n_clusters, criterion="maxclust")
    # The same partition (labels may be named differently).
    same_ours = ours[:, None] == ours[None, :]
    same_theirs = theirs[:, None] == theirs[None, :]
    np.testing.assert_array_equal(same_ours, same_theirs)
    assert sorted(set(ours.tolist())) == list(range(n_clusters))


def test_planted_groups_are_found_and_behave_alike():
    e, truth = planted()
    scores = np.array([0.0, 0.5, 1.0])[truth]  # each group behaves alike
    out = behaviour.behaviour_vs_effect(e @ e.T, scores, n_clusters=3, n_perm=300)
    labels = np.asarray(out["labels"])
    np.testing.assert_array_equal(labels[:, None] == labels[None], truth[:, None] == truth[None])
    assert out["within_abs_diff"]["value"] == 0.0
    assert out["within_abs_diff"]["p"] < 0.01
    assert out["spearman_cos_vs_similarity"]["value"] > 0.3  # ties: 3 score levels
    assert out["spearman_cos_vs_similarity"]["p"] < 0.05


def test_pair_statistics_equal_a_double_loop():
    e, _ = planted(seed=3, noise=1.0)
    scores = np.random.RandomState(4).rand(len(e))
    out = behaviour.behaviour_vs_effect(e @ e.T, scores, n_clusters=4, n_perm=20)
    labels = out["labels"]
    within, across, xs, ys = [], [], [], []
    s = e - e.mean(axis=0)
    for i in range(len(e)):
        for j in range(i + 1, len(e)):
            diff = abs(scores[i] - scores[j])
            (within if labels[i] == labels[j] else across).append(diff)
            xs.append(s[i] @ s[j] / np.linalg.norm(s[i]) / np.linalg.norm(s[j]))
            ys.append(-diff)
    assert out["within_abs_diff"]["value"] == pytest.approx(np.mean(within), abs=1e-12)
    assert out["across_abs_diff"]["value"] == pytest.approx(np.mean(across), abs=1e-12)
    from scipy.stats import spearmanr

    # 1e-6: lens.core.stats.spearman runs in float32 (JAX), scipy in float64, over 0.5 K^2 pairs
    assert out["spearman_cos_vs_similarity"]["value"] == pytest.approx(spearmanr(xs, ys).statistic, abs=1e-6)
    assert out["cluster_sizes"] == np.bincount(labels).tolist()


def test_scores_unrelated_to_effects_are_not_significant():
    e, _ = planted(seed=5)
    ps = []
    for seed in range(5):
        scores = np.random.RandomState(100 + seed).rand(len(e))
        ps.append(behaviour.behaviour_vs_effect(e @ e.T, scores, 3, n_perm=200, seed=seed)["within_abs_diff"]["p"])
    assert np.median(ps) > 0.05  # random scores: no systematic "alike" signal


def test_bad_scores_are_refused():
    e, _ = planted()
    with pytest.raises(ValueError, match="finite"):
        behaviour.behaviour_vs_effect(e @ e.T, np.full(len(e), np.nan), 3)
    with pytest.raises(ValueError, match="n_clusters"):
        behaviour.behaviour_vs_effect(e @ e.T, np.zeros(len(e)), 0)
