"""Degeneracy of a set of effects: how many genuinely different things do K vectors do?

Given K effect vectors (rows of `effects [K, D]`, e.g. effective displacements pooled over a
batch, or logit changes), the uncentred Gram matrix `G = effects @ effects.T` has
eigenvalues lambda_i >= 0.  The participation ratio `(sum lambda)^2 / sum lambda^2` counts
the effective number of independent directions: K for K orthogonal equal-norm effects, 1 for
K identical (or parallel) ones.  `threshold_clusters` answers the discrete version: how many
groups of near-identical effect are there?
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from lens.geometry._common import (
    HIGHEST,
    Scalar,
    compute_dtype,
    safe_inverse,
    safe_norm,
    scaled_rows,
)


def _gram(effects: Float[Array, "K D"], normalize: bool) -> Float[Array, "K K"]:
    e = effects.astype(compute_dtype(effects))
    if normalize:
        e = scaled_rows(e)
        e = e * safe_inverse(safe_norm(e))[:, None]
    else:
        # The ratio is scale-invariant; dividing by the largest |entry| keeps the squares
        # and the fourth powers in ||G||_F^2 from under- or overflowing.
        e = e * safe_inverse(jnp.max(jnp.abs(e)))
    return jnp.einsum("kD,jD->kj", e, e, precision=HIGHEST)


def participation_ratio(effects: Float[Array, "K D"], normalize: bool = False) -> Float[Array, ""]:
    """`PR = (sum_i lambda_i)^2 / sum_i lambda_i^2` for the eigenvalues of `G = E E^T`.

    G is the UNCENTRED Gram matrix (no mean effect is subtracted: a shared component is
    part of the degeneracy we want to see).  Computed with the trace identities
    `sum lambda = tr G` and `sum lambda^2 = ||G||_F^2`, so no eigendecomposition is needed:
    `PR = (tr G)^2 / ||G||_F^2`.  1 <= PR <= rank(E) <= min(K, D); PR = K exactly for K
    orthogonal equal-norm effects and 1 for identical ones.  `normalize=True` first scales
    every effect to unit norm (G becomes the cosine matrix), so unequal effect sizes do not
    lower the count.  All-zero effects give 0 (no direction at all).
    """
    g = _gram(effects, normalize)
    tr = jnp.trace(g)
    fro2 = jnp.sum(g * g)
    return tr * tr * safe_inverse(fro2)


def degeneracy_factor(effects: Float[Array, "K D"], normalize: bool = False) -> Float[Array, ""]:
    """`K / participation_ratio(effects)`: 1 when the K effects are orthogonal and equal,
    K when they are all the same.  inf for all-zero effects."""
    k = effects.shape[0]
    pr = participation_ratio(effects, normalize)
    return jnp.where(pr > 0, k / jnp.where(pr > 0, pr, 1.0), jnp.inf)


def threshold_clusters(
    cos_matrix: Float[Array, "K K"],
    threshold: Scalar,
    absolute: bool = False,
) -> tuple[Int[Array, ""], Int[Array, " K"]]:
    """Groups of near-identical effect: connected components of a threshold graph.

    Vectors i and j are linked when `cos[i, j] >= threshold` (or `|cos[i, j]| >= threshold`
    with `absolute=True`, which also merges opposite effects); the link is symmetrised
    (i~j if either entry passes) and NaN entries never link.  Clusters are the connected
    components (single linkage), found as the transitive closure of the adjacency matrix
    by ceil(log2 K) boolean squarings: O(K^3 log K), jit/vmap-able, deterministic.

    Returns `(n_clusters, labels)`; labels are 0..n_clusters-1 in order of each cluster's
    smallest member index (vector 0 is always in cluster 0).
    """
    k = cos_matrix.shape[0]
    c = cos_matrix.astype(compute_dtype(cos_matrix))
    link: Bool[Array, "K K"] = (jnp.abs(c) if absolute else c) >= threshold
    link = link | link.T | jnp.eye(k, dtype=bool)
    n_iter = (k - 1).bit_length() if k > 1 else 0  # 2**n_iter >= k - 1, the longest path

    def square(_, reach):
        # 0/1 entries and counts <= K are exact in float32 at any matmul precision.
        r = reach.astype(jnp.float32)
        return jnp.einsum("ij,jk->ik", r, r, precision=HIGHEST) > 0

    reach = jax.lax.fori_loop(0, n_iter, square, link)
    root = jnp.argmax(reach, axis=1)  # smallest index reachable from i = its component's
    is_root = root == jnp.arange(k)
    rank = jnp.cumsum(is_root) - 1
    labels = rank[root].astype(jnp.int32)
    return jnp.sum(is_root).astype(jnp.int32), labels


def equicorrelated_participation_ratio(
    k: Int[Array, "*batch"] | Float[Array, "*batch"] | int,
    cos: Float[Array, "*batch"] | float,
) -> Float[Array, "*batch"]:
    """PR of K unit vectors whose every pairwise cosine is `cos` (an equicorrelated set).

    The cosine matrix `C = (1 - c) I + c 11^T` has one eigenvalue `1 + (K-1) c` (the shared,
    radial direction: the mean of the set) and K - 1 eigenvalues `1 - c`, so
    `PR = (tr C)^2 / ||C||_F^2 = K^2 / ((1 + (K-1) c)^2 + (K-1)(1-c)^2)`.
    K for c = 0, 1 for c = 1, and it saturates at `1 / c^2` as K grows: a fixed small
    cosine between every pair (such as normalisation puts between orthogonal steering
    vectors, `orthogonal_pair_cosine_closed_form`) costs little at small K and a factor
    `K c^2` (the degeneracy `K / PR`) at large K.  Valid for -1/(K-1) <= c <= 1 (C is then
    positive semi-definite); broadcasts over k and cos.
    """
    c = jnp.asarray(cos, dtype=compute_dtype(jnp.asarray(cos)))
    kk = jnp.asarray(k, dtype=c.dtype)
    return kk * kk / ((1.0 + (kk - 1.0) * c) ** 2 + (kk - 1.0) * (1.0 - c) ** 2)


def k_at_degeneracy(cos: float, factor: float, k_max: int = 10**7) -> int | None:
    """The smallest K at which K equicorrelated unit vectors with pairwise cosine `cos` reach
    the degeneracy `K / PR >= factor` (`equicorrelated_participation_ratio`); None when no
    K <= k_max does (host-side: a bisection over integers, the degeneracy is increasing
    in K for 0 < cos < 1)."""
    if not 0.0 < float(cos) < 1.0 or factor < 1:
        raise ValueError(f"need 0 < cos < 1 and factor >= 1; got cos={cos}, factor={factor}")

    def deg(k: int) -> float:
        c = float(cos)
        return ((1 + (k - 1) * c) ** 2 + (k - 1) * (1 - c) ** 2) / k

    if deg(k_max) < factor:
        return None
    lo, hi = 1, k_max
    while lo < hi:
        mid = (lo + hi) // 2
        if deg(mid) >= factor:
            hi = mid
        else:
            lo = mid + 1
    return lo
