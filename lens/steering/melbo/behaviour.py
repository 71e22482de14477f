"""Do vectors whose effects are close also BEHAVE alike?

The effect readings (`lens.steering.melbo.decompose`) say how many distinct directions K steering
vectors move the model in; behaviour (does the steered model write code: the code score)
is what a researcher judges a vector by.  This module connects the two for one stage:

  1. the specific (centred) parts of the effects, `s_k = e_k - mean_k e_k`, from the
     pooled Gram matrix (`G = sum_u E_u E_u^T`, as in decompose): `Gc = H G H`;
  2. cosines between specific parts, `Gc_ij / sqrt(Gc_ii Gc_jj)`, and an average-linkage
     clustering on the distance `1 - cos` cut into `n_clusters` groups (deterministic);
  3. the mean |score_i - score_j| over pairs within a cluster vs across clusters, and the
     rank correlation between pairwise specific cosine and -|score_i - score_j|, each
     beside a permutation null (the scores shuffled over vectors): if close effects
     behave alike, within < across and the correlation is positive beyond the null.

Centred effects are used because the shared component is common to every vector: it
cannot tell vectors apart (it would make every pair look close).
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float, Int

from lens.core.stats import spearman


def specific_cosines(gram: Float[np.ndarray, "K K"]) -> Float[np.ndarray, "K K"]:
    """Cosines between the specific parts `e_k - mean(e)` of K effects with Gram `gram`
    (float64; a zero specific part has cosine 0 with everything)."""
    g = np.asarray(gram, np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] < 2:
        raise ValueError(f"gram must be a square [K, K] matrix with K >= 2; got shape {g.shape}")
    k = g.shape[0]
    h = np.eye(k) - 1.0 / k
    gc = h @ g @ h
    d = np.sqrt(np.clip(np.diag(gc), 0.0, None))
    inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0)
    return np.clip(gc * inv[:, None] * inv[None, :], -1.0, 1.0)


def average_linkage(distance: Float[np.ndarray, "K K"], n_clusters: int) -> Int[np.ndarray, " K"]:
    """Agglomerative clustering with average linkage (UPGMA) on a symmetric distance matrix,
    merged until `n_clusters` remain.  Labels 0..n_clusters-1 in order of each cluster's
    smallest member; ties broken by the lowest index pair (deterministic)."""
    d = np.asarray(distance, np.float64)
    k = d.shape[0]
    if d.shape != (k, k):
        raise ValueError(f"distance must be square; got shape {d.shape}")
    if not 1 <= n_clusters <= k:
        raise ValueError(f"n_clusters must be in [1, {k}]; got {n_clusters}")
    clusters = {i: [i] for i in range(k)}
    dist = d.copy()
    np.fill_diagonal(dist, np.inf)
    alive = list(range(k))
    while len(alive) > n_clusters:
        sub = dist[np.ix_(alive, alive)]
        a, b = np.unravel_index(np.argmin(sub), sub.shape)
        i, j = sorted((alive[a], alive[b]))
        ni, nj = len(clusters[i]), len(clusters[j])
        # UPGMA: the merged cluster's distance to c is the size-weighted mean.
        dist[i, :] = (ni * dist[i, :] + nj * dist[j, :]) / (ni + nj)
        dist[:, i] = dist[i, :]
        dist[i, i] = np.inf
        clusters[i] += clusters.pop(j)
        alive.remove(j)
    labels = np.empty(k, np.int64)
    for new, root in enumerate(sorted(alive, key=lambda r: min(clusters[r]))):
        labels[clusters[root]] = new
    return labels


def _pair_stats(cos: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[float, float, float]:
    iu = np.triu_indices(len(scores), 1)
    diff = np.abs(scores[:, None] - scores[None, :])[iu]
    same = (labels[:, None] == labels[None, :])[iu]
    within = float(diff[same].mean()) if same.any() else float("nan")
    across = float(diff[~same].mean()) if (~same).any() else float("nan")
    return within, across, float(spearman(cos[iu], -diff))


def behaviour_vs_effect(
    gram: Float[np.ndarray, "K K"], scores: Float[np.ndarray, " K"], n_clusters: int,
    n_perm: int = 1000, seed: int = 0,
) -> dict:
    """Cluster K vectors by the cosine of their specific effects and compare their scores.

    Returns JSON-able numbers: `labels`, `cluster_sizes`, `cluster_mean_score`,
    `within_abs_diff` / `across_abs_diff` (mean |score_i - score_j| over pairs in the same /
    different clusters), `spearman_cos_vs_similarity` (pairwise specific cosine vs
    -|score difference|), and for each of the last three a permutation null over `n_perm`
    shuffles of the scores (`null_mean`, `null_lo` / `null_hi` = 5% / 95%, and `p`: the
    fraction of shuffles at least as extreme in the "close effects behave alike" direction).
    """
    s = np.asarray(scores, np.float64)
    cos = specific_cosines(gram)
    if s.shape != (cos.shape[0],) or not np.isfinite(s).all():
        raise ValueError(f"scores must be {cos.shape[0]} finite numbers; got shape {s.shape}")
    labels = average_linkage(1.0 - cos, n_clusters)
    within, across, rho = _pair_stats(cos, labels, s)
    rs = np.random.RandomState(seed)
    null = np.array([_pair_stats(cos, labels, s[rs.permutation(len(s))]) for _ in range(n_perm)])

    def vs_null(value, column, smaller_is_alike):
        col = null[:, column]
        col = col[np.isfinite(col)]
        extreme = col <= value if smaller_is_alike else col >= value
        return {"value": value, "null_mean": float(col.mean()) if col.size else float("nan"),
                "null_lo": float(np.quantile(col, 0.05)) if col.size else float("nan"),
                "null_hi": float(np.quantile(col, 0.95)) if col.size else float("nan"),
                "p": float((extreme.sum() + 1) / (col.size + 1))}

    return {
        "n_clusters": int(n_clusters), "labels": labels.tolist(),
        "cluster_sizes": np.bincount(labels, minlength=n_clusters).tolist(),
        "cluster_mean_score": [float(s[labels == c].mean()) for c in range(n_clusters)],
        "within_abs_diff": vs_null(within, 0, True),
        "across_abs_diff": vs_null(across, 1, False),
        "spearman_cos_vs_similarity": vs_null(rho, 2, False),
        "n_perm": int(n_perm), "scores_mean": float(s.mean()), "scores_std": float(s.std()),
    }
