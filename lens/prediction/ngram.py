"""Sparse n-gram tables (unigram, bigram, trigram) counted on token rows, as predictors.

    table = lens.prediction.ngram.count(train_rows, order=2, vocab=4096)
    logp = table.log_probs(rows)          # [B, T, V]: position t predicts rows[:, t + 1]
    rows_u = table.factored(rows)         # the same as rows of a [U, V] table + an index [B, T]
    pred = table.predictor()              # for lens.prediction.scoring.score (gives `factored`)

Counting: every n-gram INSIDE a row (rows[i, t - n + 1 : t + 1]) is counted; n-grams
across row boundaries are not.  Each n-gram is one int64 key (context * V + next, the
context itself a base-V number), and `np.unique(keys, return_counts=True)` counts them
all at once: a few seconds for millions of tokens, memory proportional to the number of
DISTINCT n-grams (a 49,152-token vocabulary is fine; the dense V x V table is never built).

Smoothing (stated, because it decides every number): the unigram is add-`alpha`
(default 0.1) over the whole vocabulary; each higher order is interpolated Witten-Bell,

    p(w | h) = (c(h, w) + N1+(h) * p_lower(w | h')) / (c(h) + N1+(h))

with N1+(h) the number of distinct tokens seen after context h and h' the context
shortened by one token; an unseen context falls back to p_lower.  Every token gets
probability > 0.  Positions whose context is not complete (t < n - 2 in the row) use the
highest order their row prefix allows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lens.prediction.scoring import Factored

DENSE_BIGRAM_VOCAB = 8192  # up to here a bigram's whole [V, V] float32 table (<= 256 MB) is cached


@dataclasses.dataclass(frozen=True)
class Level:
    """The counts of one order n >= 2 in CSR form: contexts sorted by their base-V key."""

    contexts: np.ndarray  # [C] int64 context keys, sorted
    start: np.ndarray  # [C + 1] offsets into next / count
    total: np.ndarray  # [C] c(h)
    distinct: np.ndarray  # [C] N1+(h)
    next: np.ndarray  # [E] int32 next tokens
    count: np.ndarray  # [E] float64 c(h, w)


@dataclasses.dataclass(frozen=True)
class NGram:
    """An n-gram model: `unigram` probabilities [V] and `levels[j]` the counts of order j + 2."""

    order: int
    vocab: int
    unigram: np.ndarray
    unigram_counts: np.ndarray
    levels: tuple[Level, ...]
    alpha: float
    # the [V, V] bigram log-table of `factored`, built on first use (not part of the value)
    _cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n_entries(self) -> int:
        return int(sum(len(lv.next) for lv in self.levels))

    def factored(self, rows: Int[np.ndarray, "B T"]) -> Factored:
        """The log-probabilities of `log_probs` as a `lens.prediction.scoring.Factored` (rows of
        [U, V] + an index [B, T]), decided by the table alone (never by which path
        lens.prediction.scoring runs).  A bigram over at most DENSE_BIGRAM_VOCAB tokens: the
        whole [V, V] table (built once, cached on this object, kept on the device) indexed by
        the context token, so nothing per context is rebuilt on the host per chunk.  Otherwise
        one float32 row per DISTINCT context in `rows` (`factored_by_context`).  Measured on
        the 2-core CPU (2,048-position chunks, V = 4,096, k = 10): with the native kernel the
        whole table is 3.7x faster per chunk (28 vs 104 ms: the per-chunk rows cost more than
        the metrics); on the pure-JAX CPU path between equal (bench/prediction.py, load 12:
        15.1 vs 15.5 s per 131,072 positions) and 1.5x slower (a chunk alone: 440 vs 290 ms;
        a top-k per position instead of per distinct context)."""
        rows = _check(rows, self.vocab)
        if self.order == 2 and self.vocab <= DENSE_BIGRAM_VOCAB:
            if "bigram" not in self._cache:
                self._cache["bigram"] = self._table(np.arange(self.vocab, dtype=np.int64)[:, None])
            return Factored(self._cache["bigram"], jnp.asarray(rows, jnp.int32))
        return self.factored_by_context(rows)

    def factored_by_context(self, rows: Int[np.ndarray, "B T"]) -> Factored:
        """`factored` as one float32 row per DISTINCT context in `rows` (what `factored` gives
        for trigrams and large vocabularies), the [U, V] table padded to a power of two rows
        so chunks share compilations."""
        rows = _check(rows, self.vocab)
        b, t = rows.shape
        if self.levels:  # the context of each position: its key at every order (the lower
            # orders matter where the row prefix is too short for the highest)
            keys = np.stack([_context_keys(rows, j + 2, self.vocab).ravel() for j in range(len(self.levels))], 1)
            uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        else:  # a unigram: one distribution for every position
            uniq, inverse = np.zeros((1, 0), np.int64), np.zeros(b * t, np.int64)
        n_rows = min(_bucket(len(uniq), 16), max(len(uniq), b * t))  # never more rows than positions
        uniq = np.concatenate([uniq, np.full((n_rows - len(uniq), uniq.shape[1]), -1, np.int64)])
        return Factored(self._table(uniq), jnp.asarray(inverse.reshape(b, t), jnp.int32))

    def _table(self, uniq: np.ndarray) -> Float[Array, "U V"]:
        """Log-probability rows [U, V] of the contexts `uniq` [U, n_levels] (each context's
        key at every order; -1: none)."""
        n_rows = len(uniq)
        coefs, pos, tok, val = [], [], [], []
        for j, lv in enumerate(self.levels):
            c, p, w, v = _level_entries(lv, uniq[:, j], self.vocab)
            coefs.append(c)
            pos.append(p)
            tok.append(w)
            val.append(v)
        size = _bucket(max([len(p) for p in pos], default=1))
        pad = lambda a, fill, dt: np.concatenate([a, np.full(size - len(a), fill, dt)]).astype(dt)  # noqa: E731
        coef = jnp.asarray(np.stack(coefs) if coefs else np.zeros((0, n_rows)), jnp.float32)
        pos = jnp.asarray(np.stack([pad(p, n_rows, np.int32) for p in pos]) if pos else np.zeros((0, size), np.int32))
        tok = jnp.asarray(np.stack([pad(w, 0, np.int32) for w in tok]) if tok else np.zeros((0, size), np.int32))
        val = jnp.asarray(np.stack([pad(v, 0, np.float32) for v in val]) if val else np.zeros((0, size), np.float32))
        return _dense_log_probs(jnp.asarray(self.unigram, jnp.float32), coef, pos, tok, val, n_rows)

    def log_probs(self, rows: Int[np.ndarray, "B T"]) -> Float[Array, "B T V"]:
        """Log-probabilities [B, T, V] (float32) of the token after each position of each row."""
        return self.factored(rows).dense()

    def predictor(self):
        """`rows -> factored(rows)` for lens.prediction.scoring.score."""
        return lambda rows: self.factored(np.asarray(rows))

    def dense_bigram(self) -> Float[np.ndarray, "V V"]:
        """The full [V, V] table p(next | previous) of a bigram model (small vocabularies
        only: the Goodhart training term of lens.prediction.gaming reads rows of it)."""
        if self.order != 2:
            raise ValueError(f"dense_bigram needs an order-2 table, this one has order {self.order}")
        if self.vocab > 8192:
            raise ValueError(f"a dense {self.vocab} x {self.vocab} table is too large; use log_probs")
        lv = self.levels[0]
        full = np.broadcast_to(self.unigram, (self.vocab, self.vocab)).astype(np.float64).copy()
        coef = np.ones(self.vocab)
        denom = lv.total + lv.distinct
        coef[lv.contexts] = lv.distinct / denom
        full *= coef[:, None]
        ctx = np.repeat(lv.contexts, np.diff(lv.start))
        full[ctx, lv.next] += lv.count / np.repeat(denom, np.diff(lv.start))
        return full


def _check(rows, vocab: int) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"rows must be integer token rows [N, T]; got {rows.dtype} {rows.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= vocab):
        raise ValueError(f"token ids out of range [0, {vocab}): min {rows.min()}, max {rows.max()}")
    return rows.astype(np.int64)


def _bucket(n: int, least: int = 1024) -> int:
    """The next power of two >= n (>= least), so chunks of similar size share one compilation."""
    return max(least, 1 << int(np.ceil(np.log2(max(n, 1)))))


def _context_keys(rows: np.ndarray, n: int, vocab: int) -> np.ndarray:
    """[B, T] base-V key of the n - 1 tokens ending at each position (-1 where the row
    prefix is shorter than n - 1)."""
    b, t = rows.shape
    keys = np.full((b, t), -1, np.int64)
    if t >= n - 1:
        k = np.zeros((b, t - n + 2), np.int64)
        for i in range(n - 1):
            k = k * vocab + rows[:, i:t - n + 2 + i]
        keys[:, n - 2:] = k
    return keys


def _level_entries(lv: Level, keys: np.ndarray, vocab: int):
    """(coef [P], pos [E], tok [E], val [E]) of one order at the context `keys` [P] (-1: no
    context of this order): the lower-order distribution is scaled by coef and the
    counts val added at (pos, tok)."""
    if len(lv.contexts) == 0:
        return np.ones(len(keys)), np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
    idx = np.searchsorted(lv.contexts, keys)
    idx_c = np.minimum(idx, len(lv.contexts) - 1)
    seen = (keys >= 0) & (lv.contexts[idx_c] == keys)
    denom = np.where(seen, lv.total[idx_c] + lv.distinct[idx_c], 1.0)
    coef = np.where(seen, lv.distinct[idx_c] / denom, 1.0)
    lens_ = np.where(seen, lv.start[idx_c + 1] - lv.start[idx_c], 0)
    pos = np.repeat(np.arange(len(keys)), lens_)
    first = np.repeat(np.cumsum(lens_) - lens_, lens_)
    entry = np.repeat(lv.start[idx_c], lens_) + (np.arange(len(pos)) - first)
    return coef, pos, lv.next[entry], (lv.count[entry] / denom[pos]).astype(np.float32)


@functools.partial(jax.jit, static_argnames="n_pos")
def _dense_log_probs(unigram, coef, pos, tok, val, n_pos: int):
    """Interpolate order by order: p <- coef * p + scatter(counts / denominator)."""
    p = jnp.broadcast_to(unigram, (n_pos, unigram.shape[0]))
    for j in range(coef.shape[0]):
        p = p * coef[j][:, None]
        p = p.at[pos[j], tok[j]].add(val[j], mode="drop")  # pos = n_pos marks padding
    return jnp.log(p)


def count(rows: Int[np.ndarray, "N T"], order: int, vocab: int, alpha: float = 0.1) -> NGram:
    """Count the n-grams of `order` (1, 2 or 3) inside `rows` (module docstring)."""
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 (every token needs probability > 0), got {alpha}")
    rows = _check(rows, vocab)
    uni_counts = np.bincount(rows.ravel(), minlength=vocab).astype(np.float64)
    unigram = (uni_counts + alpha) / (uni_counts.sum() + alpha * vocab)
    levels = []
    for n in range(2, order + 1):
        if rows.shape[1] < n:
            raise ValueError(f"rows of {rows.shape[1]} tokens hold no {n}-grams")
        ctx = _context_keys(rows[:, :-1], n, vocab)[:, n - 2:]
        keys = (ctx * vocab + rows[:, n - 1:]).ravel()
        uniq, cnt = np.unique(keys, return_counts=True)
        contexts, first, distinct = np.unique(uniq // vocab, return_index=True, return_counts=True)
        total = np.add.reduceat(cnt, first).astype(np.float64)
        start = np.append(first, len(uniq)).astype(np.int64)
        levels.append(Level(contexts, start, total, distinct.astype(np.float64),
                            (uniq % vocab).astype(np.int32), cnt.astype(np.float64)))
    return NGram(order, vocab, unigram, uni_counts, tuple(levels), alpha)
