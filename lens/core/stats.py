"""Small statistics shared across lens: ranks, Spearman correlation, KL divergence.

  ranks(x, ties="average")   [..., n] -> [..., n]  rank 0 = smallest, along the last axis
  spearman(a, b)             [..., n], [..., n] -> [...]  rank correlation along the last axis
  kl_divergence(logp, logq)  [..., V], [..., V] -> [...]  KL(p || q) in nats from log-probs

All are pure JAX, jit- and vmap-able, and broadcast over leading axes.  Every Spearman,
rank helper and inline KL of lens, models, scripts and bench is one of these (the
exception: `lens.geometry.logits.spearman`, the all-pairs matrix form, built on `ranks`).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

TIES = ("average", "ordinal")


def _average_ranks(x: Float[Array, " n"]) -> Float[Array, " n"]:
    s = jnp.sort(x)
    lo = jnp.searchsorted(s, x, side="left")
    hi = jnp.searchsorted(s, x, side="right")
    return (lo + hi - 1).astype(jnp.float32) / 2.0


def _ordinal_ranks(x: Float[Array, " n"]) -> Float[Array, " n"]:
    order = jnp.argsort(x, stable=True)
    return jnp.zeros(x.shape, jnp.int32).at[order].set(jnp.arange(x.shape[0])).astype(jnp.float32)


@partial(jax.jit, static_argnames="ties")
def ranks(x: Float[Array, "*batch n"], ties: str = "average") -> Float[Array, "*batch n"]:
    """Ranks 0..n-1 along the last axis (0 = smallest), float32.

    ties="average": tied values share the mean of the ranks they span (scipy's `rankdata`
    minus one); "ordinal": ties broken by position (a stable argsort, `argsort(argsort(x))`).
    O(n log n): sort and binary search, so vocabulary-sized rows are fine."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}; got {ties!r}")
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError("ranks needs at least one axis")
    one = _average_ranks if ties == "average" else _ordinal_ranks
    return jnp.vectorize(one, signature="(n)->(n)")(x)


def _spearman(a: Float[Array, " n"], b: Float[Array, " n"]) -> Float[Array, ""]:
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = jnp.sqrt((ra * ra).sum() * (rb * rb).sum())
    return jnp.where(den > 0, (ra * rb).sum() / jnp.where(den > 0, den, 1.0), 0.0)


@jax.jit
def spearman(a: Float[Array, "*batch n"], b: Float[Array, "*batch n"]) -> Float[Array, "*batch"]:
    """Spearman rank correlation of a and b along the last axis: the Pearson correlation of
    their average ranks (ties share their mean rank).  0 where either side is constant
    (no ranking to correlate).  Leading axes broadcast."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape[-1:] != b.shape[-1:] or a.ndim == 0:
        raise ValueError(f"spearman: last axes differ or are missing: {a.shape} vs {b.shape}")
    return jnp.vectorize(_spearman, signature="(n),(n)->()")(a, b)


@jax.jit
def kl_divergence(logp: Float[Array, "*batch V"], logq: Float[Array, "*batch V"]) -> Float[Array, "*batch"]:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last axis, in nats, from
    log-probabilities (e.g. `jax.nn.log_softmax` of logits).  Leading axes broadcast."""
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
