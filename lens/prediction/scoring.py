"""The "predict the model" test: how well a cheap predictor reproduces a model's next-token
distributions, position by position.

    rows = lens.training.data.load_tokens("shakespeare", tok, 129, "validation")
    preds = {"bigram": lens.prediction.ngram.count(train_rows, 2, V).predictor(),
             "direct": lens.prediction.scoring.direct_path(model)}
    scores = lens.prediction.scoring.score(lens.prediction.scoring.model_predictor(model), preds, rows, k=10)
    summary = lens.prediction.scoring.summarize(scores["bigram"], tolerances=(0.25, 0.5, 1.0))

A predictor is any function `rows [B, T] int32 -> log-probs [B, T, V] float32`, where
position t is the distribution of token t + 1 given tokens[: t + 1] (the model's own
convention); it may return a `Factored` (one row per distinct context + an index, what
lens.prediction.ngram's predictors give) so nothing per-context is computed once per position.
Per position (one sequence: `position_metrics`; `batch_metrics` / `chunk_metrics` for
rows, jitted) with the model's top-k tokens K (sorted by the model's probability):

  test_err  mean over w in K of |log p_model(w) - log p_pred(w)|: the test as proposed
            (TurnTrout 2023); a position PASSES at tolerance tau when test_err <= tau
  top1      argmax p_pred == argmax p_model
  recall    |K ∩ top-k(p_pred)| / k (the model's top-k found in the predictor's top-k)
  jaccard   |K ∩ top-k(p_pred)| / |K ∪ top-k(p_pred)|
  spearman  rank correlation of p_model and p_pred over K (average ranks for ties; 0
            when either side is constant on K)
  order     the predictor's top-k equals the model's top-k in the same order (the
            "exact top-k order" defence)
  kl        KL(p_model || p_pred) over the whole vocabulary, in nats
  pred_top1 the predictor's top-1 token id (for "score only where the predictor is wrong")

The predictor's log-probs are floored at LOG_FLOOR (-100 nats) before any difference, so
a predictor giving a token zero probability costs a large, finite error instead of inf.
`score` streams the rows in chunks (the model's and every predictor's [B, T, V] live
for at most two chunks: one computing, the next being prepared), so a million positions
fit in memory; each chunk is one compiled program (`chunk_metrics`), results are read back
once at the end.  On the CPU backend the per-row work (the model's top-k, the predictor's
log-probs there, KL, the predictor's top-k per table row) is one native pass per row
(the optional `lens.kernels.prediction_rows_kernel`, k <= 64; LENS_KERNELS=0 selects the pure-JAX
path, which gives the same numbers: tests/lens/prediction/test_prediction_kernel.py).  `summarize` gives pass rates
per tolerance and means, optionally skipping positions whose next token is among the N
most frequent tokens (selective-pruning style), and breakdowns by the next token's
frequency bucket and by position in the row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

import lens.kernels
from lens.core.stats import spearman
from lens.models.core.interventions import Edits

LOG_FLOOR = -100.0
METRICS = ("test_err", "top1", "recall", "jaccard", "spearman", "order", "kl")
PER_POSITION = METRICS + ("pred_top1",)
DEFAULT_TOLERANCES = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)

Predictor = Callable[[Int[Array, "B T"]], "Float[Array, 'B T V'] | Factored"]


# ------------------------------------------------------------------ per position
def _block_size(v: int, k: int) -> int | None:
    """A power-of-two block dividing v, near sqrt(v) (so the block maxima and the k
    candidate blocks are both small); None when v is too small to gain (<= 32 k)."""
    if v <= 32 * k:
        return None
    block = 1 << max(0, int(round(np.log2(np.sqrt(v)))))
    while block > 1 and v % block:
        block //= 2
    return block if v // block >= k and block >= 8 else None


def _plus_zero(x):
    """-0.0 -> +0.0 (so signed zeros tie), every other value unchanged."""
    return jnp.where(x == 0, jnp.zeros_like(x), x)


def top_k(x: Float[Array, "P V"], k: int) -> tuple[Float[Array, "P k"], Int[Array, "P k"]]:
    """Exactly `jax.lax.top_k` of each row (descending; ties: lower index first), in one
    pass over the row: the maxima of blocks of ~sqrt(V) entries, the top-k blocks by
    maximum (each of the row's top-k entries lies in one of them: a block ranked above
    it holds an entry ranked above it), then top-k over those k blocks only.  Candidate
    blocks are taken in index order so ties still resolve to the lower index.  -0.0 counts
    as 0.0 (lax.top_k alone ranks +0 above -0; numpy and this module's tests call them tied)."""
    p, v = x.shape
    block = _block_size(v, k)
    if block is None:
        vals, idx = jax.lax.top_k(_plus_zero(x), k)
        return vals, idx.astype(jnp.int32)
    xb = x.reshape(p, v // block, block)
    _, bidx = jax.lax.top_k(_plus_zero(xb.max(-1)), k)
    bidx = jnp.sort(bidx, axis=-1)  # index order: ties between candidates go to the lower id
    cand = _plus_zero(jnp.take_along_axis(xb, bidx[:, :, None], axis=1).reshape(p, k * block))
    vals, pos = jax.lax.top_k(cand, k)
    idx = jnp.take_along_axis(bidx, pos // block, axis=-1) * block + pos % block
    return vals, idx.astype(jnp.int32)


class Factored(NamedTuple):
    """A predictor's log-probs stored once per distinct context: position (b, t) has the
    row `table[index[b, t]]` (an n-gram table needs one row per distinct context, not
    per position).  A predictor may return this instead of the dense [B, T, V]."""

    table: Float[Array, "U V"]
    index: Int[Array, "B T"]

    def dense(self) -> Float[Array, "B T V"]:
        return self.table[self.index]


def _model_side(model_logp: Float[Array, "P V"], k: int):
    """What every predictor's metrics share on the pure-JAX path: the model's float32
    log-probs, its top-k and its probabilities (one exp per chunk, however many predictors)."""
    m = model_logp.astype(jnp.float32)
    m_val, m_idx = top_k(m, k)  # [P, k], sorted descending
    return m, m_val, m_idx, jnp.exp(m)


def _from_top_k(m_val, m_idx, p_on_m, p_idx, kl, k: int) -> dict[str, Float[Array, " P"]]:
    """The metrics from the model's top-k (values, ids), the predictor's log-probs there,
    the predictor's own top-k ids and the KL sum (both paths end here)."""
    hits = (m_idx[:, :, None] == p_idx[:, None, :]).any(-1).sum(-1).astype(jnp.float32)
    return {
        "test_err": jnp.abs(m_val - p_on_m).mean(-1),
        "top1": (m_idx[:, 0] == p_idx[:, 0]).astype(jnp.float32),
        "recall": hits / k,
        "jaccard": hits / (2 * k - hits),
        "spearman": spearman(m_val, p_on_m),
        "order": (m_idx == p_idx).all(-1).astype(jnp.float32),
        "kl": jnp.maximum(kl, 0.0),  # float32 rounding can give -1e-7 for identical rows
        "pred_top1": p_idx[:, 0].astype(jnp.float32),  # ids < 2^24: exact in float32
    }


def _pred_metrics(model_side, table: Float[Array, "U V"], index: Int[Array, " P"] | None,
                  k: int) -> dict[str, Float[Array, " P"]]:
    """The metrics of one predictor whose position p has row table[index[p]] (index None:
    row p), pure JAX.  The predictor's top-k is computed once per row of `table`, or once
    per position when the table has more rows than there are positions (a whole bigram
    table indexed by the context token)."""
    m, m_val, m_idx, p_model = model_side
    table = jnp.maximum(table.astype(jnp.float32), LOG_FLOOR)
    if index is None:
        _, p_idx = top_k(table, k)
        p_on_m = jnp.take_along_axis(table, m_idx, axis=-1)
        kl = (p_model * (m - table)).sum(-1)
    else:
        if table.shape[0] > index.shape[0]:
            _, p_idx = top_k(table[index], k)
        else:
            _, p_idx = top_k(table, k)
            p_idx = p_idx[index]
        p_on_m = table[index[:, None], m_idx]
        kl = (p_model * (m - table[index])).sum(-1)  # the gather fuses into the reduction
    return _from_top_k(m_val, m_idx, p_on_m, p_idx, kl, k)


def _kernel_metrics(rows_fn, m: Float[Array, "P V"], table: Float[Array, "U V"], index: Int[Array, " P"] | None,
                    k: int) -> dict[str, Float[Array, " P"]]:
    """`_pred_metrics` through the native kernel `rows_fn` (`lens.kernels.prediction_rows_kernel`):
    one pass per row."""
    if index is None:
        index = jnp.arange(m.shape[0], dtype=jnp.int32)
    m_val, m_idx, p_on_m, kl, p_idx = rows_fn(m, table, index, k, LOG_FLOOR)
    return _from_top_k(m_val, m_idx, p_on_m, p_idx[index], kl, k)


def position_metrics(model_logp: Float[Array, "T V"], pred_logp: Float[Array, "T V"],
                     k: int) -> dict[str, Float[Array, " T"]]:
    """The per-position metrics (module docstring) of ONE sequence's log-probs.  Uses the
    native kernel when `lens.kernels.prediction_rows_kernel` gives one (same numbers; module
    docstring of lens/kernels/prediction_rows.py), the pure-JAX path otherwise."""
    rows_fn = _rows_kernel(k)
    if rows_fn is not None:
        return _kernel_metrics(rows_fn, model_logp, pred_logp, None, k)
    return _pred_metrics(_model_side(model_logp, k), pred_logp, None, k)


def _rows_kernel(k: int):
    """The native per-row kernel for this k on the default backend, or None (pure JAX)."""
    return lens.kernels.prediction_rows_kernel(jax.default_backend(), k).fn


@functools.partial(jax.jit, static_argnames=("k", "rows_fn"))
def _chunk_metrics(model_logp, preds: tuple, k: int, rows_fn) -> tuple:
    b, t, v = model_logp.shape
    m = model_logp.reshape(b * t, v)
    side = None if rows_fn is not None else _model_side(m, k)
    out = []
    for pred in preds:
        if isinstance(pred, Factored):
            table, index = pred.table, pred.index.reshape(b * t)
        else:
            table, index = pred.reshape(b * t, v), None
        got = _kernel_metrics(rows_fn, m, table, index, k) if rows_fn is not None else _pred_metrics(side, table, index, k)
        out.append({name: x.reshape(b, t) for name, x in got.items()})
    return tuple(out)


def chunk_metrics(model_logp: Float[Array, "B T V"], preds: tuple, k: int) -> tuple:
    """Every predictor's metrics on one chunk (what `score` runs per chunk), one compiled
    program: each predictor is a dense [B, T, V] or a `Factored`.  With the native kernel
    (`lens.kernels.prediction_rows_kernel`) each predictor is one pass over the model's rows;
    without it, the model's top-k and probabilities are computed once for all predictors.
    Returns one {metric: [B, T]} per predictor."""
    return _chunk_metrics(model_logp, tuple(preds), k, _rows_kernel(k))


def batch_metrics(model_logp: Float[Array, "B T V"], pred_logp: Float[Array, "B T V"],
                  k: int) -> dict[str, Float[Array, "B T"]]:
    """`position_metrics` of every row, jitted: `chunk_metrics` of one dense predictor (the
    rows flattened into one [B * T, V] sequence: the metrics are per position, and one long
    sequence is cheaper than a vmap)."""
    return chunk_metrics(model_logp, (pred_logp,), k)[0]


# ---------------------------------------------------------------- predictors
@eqx.filter_jit  # module level: every model of one structure shares the compilation
def _model_logp(model, rows):
    return jax.nn.log_softmax(jax.vmap(model)(rows).astype(jnp.float32), axis=-1)


def model_predictor(model) -> Predictor:
    """The model itself: log-softmax of its logits on each row (float32)."""
    return lambda rows: _model_logp(model, rows)


def direct_path_edits(config, through_first_mlp: bool = False) -> Edits:
    """Edits zeroing every block's output (attention and MLP; with `through_first_mlp`,
    all but block 0's MLP): the model reduced to embedding -> final norm -> unembedding
    (plus block 0's MLP)."""
    n = config.n_layers
    mlp = np.ones((n, 1), np.float32)
    if through_first_mlp:
        if config.attn_only:
            raise ValueError("the model has no MLPs: there is no direct path through the first MLP")
        mlp[0] = 0.0
    return Edits(attn_out_mix=jnp.ones((n, 1), jnp.float32), mlp_out_mix=jnp.asarray(mlp))


def direct_path_logits(model, tokens: Int[Array, " T"], through_first_mlp: bool = False) -> Float[Array, "T V"]:
    """Logits of the direct path of ONE sequence, computed without running the zeroed
    blocks: embedding (with learned positions) -> [block 0 with its attention output
    zeroed] -> final norm -> unembedding.  Equals `model(tokens, edits=direct_path_edits(...))`."""
    x, qpos, valid = model.prefix(tokens)
    if through_first_mlp:
        edits = direct_path_edits(model.config, True)
        x, _, _ = model.run_blocks(x, qpos, valid, start=0, stop=1, edits=edits)
    return model.unembed_resid(x)[0]


@eqx.filter_jit
def _direct_logp(model, rows, through_first_mlp: bool):
    logits = jax.vmap(lambda t: direct_path_logits(model, t, through_first_mlp))(rows)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def direct_path(model, through_first_mlp: bool = False) -> Predictor:
    """The direct path as a predictor (see `direct_path_logits`)."""
    return lambda rows: _direct_logp(model, rows, through_first_mlp)


def uniform_predictor(vocab: int) -> Predictor:
    """Every token equally likely (the chance baseline)."""
    return lambda rows: jnp.full(rows.shape + (vocab,), -np.log(vocab), jnp.float32)


# ------------------------------------------------------------------- streaming
@dataclasses.dataclass
class Scores:
    """Per-position metrics of one predictor over rows [N, T] (each array [N, T]) and the
    tokens they were computed on: `next_token[n, t]` = rows[n, t + 1] (-1 at the last
    position, whose next token is not in the row)."""

    metrics: dict[str, np.ndarray]
    next_token: np.ndarray
    k: int

    def __getitem__(self, name: str) -> np.ndarray:
        return self.metrics[name]


def chunk_rows_for(seq: int, vocab: int, n_predictors: int, budget_bytes: float = 1.5e9) -> int:
    """Rows per chunk so the model's and the predictors' float32 [B, T, V] of two chunks
    (`score` keeps one in flight while preparing the next) and the metric temporaries
    (~3 more) fit `budget_bytes`."""
    per_row = 4.0 * seq * vocab * (2 * (n_predictors + 1) + 3)
    return max(1, int(budget_bytes // per_row))


def check_rows(rows, vocab: int) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.integer) or rows.shape[1] < 1 or len(rows) < 1:
        raise ValueError(f"rows must be integer token rows [N >= 1, T >= 1]; got {rows.dtype} {rows.shape}")
    if rows.min() < 0 or rows.max() >= vocab:
        raise ValueError(f"token ids out of range [0, {vocab}): min {rows.min()}, max {rows.max()}")
    return rows.astype(np.int32)


def score(model: Predictor, predictors: dict[str, Predictor], rows: Int[np.ndarray, "N T"], k: int = 10,
          vocab: int | None = None, chunk_rows: int | None = None, progress: bool = False) -> dict[str, Scores]:
    """Per-position metrics of every predictor against `model` (both `Predictor`s) on
    `rows`, streamed `chunk_rows` rows at a time (default: `chunk_rows_for` a 1.5 GB budget).

    The model runs once per chunk; `vocab` (checked against the model's output) bounds the
    token ids.  Returns {name: Scores}."""
    if not predictors:
        raise ValueError("score: no predictors given")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rows = check_rows(rows, np.iinfo(np.int32).max)
    v = model(jnp.zeros((1, rows.shape[1]), jnp.int32)).shape[-1]  # the model's width
    if vocab is not None and vocab != v:
        raise ValueError(f"vocab {vocab} != the model's output width {v}")
    if k > v:
        raise ValueError(f"k = {k} exceeds the vocabulary ({v})")
    rows = check_rows(rows, v)
    n, t = rows.shape
    chunk = min(n, chunk_rows or chunk_rows_for(t, v, len(predictors)))
    out = {name: {m: np.empty((n, t), np.float32) for m in PER_POSITION} for name in predictors}
    names = list(predictors)
    pending = []  # device results: converted once at the end, no host sync per chunk
    for start in tqdm(range(0, n, chunk), disable=not progress, desc="score", dynamic_ncols=True):
        batch = rows[start:start + chunk]
        if len(batch) < chunk:  # pad to the chunk so every call reuses one compilation
            batch = np.concatenate([batch, np.repeat(batch[-1:], chunk - len(batch), 0)])
        b = jnp.asarray(batch)
        m_logp = model(b)
        outs = tuple(predictors[name](b) for name in names)
        for name, got in zip(names, outs):
            shape = got.index.shape + got.table.shape[-1:] if isinstance(got, Factored) else got.shape
            if tuple(shape) != tuple(m_logp.shape):
                raise ValueError(f"predictor {name!r} gave shape {tuple(shape)}, the model {m_logp.shape}")
            if isinstance(got, Factored):  # a gather outside the table would clamp silently
                index, rows_u = np.asarray(got.index), got.table.shape[0]
                if index.min() < 0 or index.max() >= rows_u:
                    raise ValueError(f"predictor {name!r} gave a Factored index out of range [0, {rows_u}) "
                                     f"(min {index.min()}, max {index.max()})")
        if pending:  # at most two chunks in flight: async dispatch must not queue every chunk's [B, T, V]
            jax.block_until_ready(pending[-1][2])
        pending.append((start, min(n, start + chunk), chunk_metrics(m_logp, outs, k)))
    for start, stop, got in pending:
        for name, g in zip(names, got):
            for m in PER_POSITION:
                out[name][m][start:stop] = np.asarray(g[m])[: stop - start]
    next_token = np.concatenate([rows[:, 1:], np.full((n, 1), -1, np.int32)], axis=1)
    return {name: Scores(out[name], next_token, k) for name in predictors}


# ------------------------------------------------------------------- summaries
def frequency_ranks(counts: np.ndarray) -> np.ndarray:
    """rank[token]: 0 for the most frequent token (ties broken by id)."""
    order = np.lexsort((np.arange(len(counts)), -np.asarray(counts)))
    rank = np.empty(len(counts), np.int64)
    rank[order] = np.arange(len(counts))
    return rank


def summarize(scores: Scores, tolerances=DEFAULT_TOLERANCES, token_counts: np.ndarray | None = None,
              skip_most_common: int = 0, buckets=(10, 100, 1000), position_bins: int = 4,
              mask: np.ndarray | None = None) -> dict:
    """Means and pass rates of one predictor's `Scores`, JSON-able.

    Positions scored: every position with a known next token, minus those whose next
    token is among the `skip_most_common` most frequent (by `token_counts`, the train
    split's counts), and only where `mask` [N, T] is True when given.  Keys: n_positions,
    pass_rate {tau: fraction with test_err <= tau}, the mean of each metric,
    by_frequency (next token's frequency rank in [0, 10), [10, 100), ...), by_position
    (`position_bins` equal spans of the row)."""
    nt = scores.next_token
    keep = nt >= 0
    if mask is not None:
        keep &= np.asarray(mask, bool)
    rank = None
    if token_counts is not None:
        ranks = frequency_ranks(token_counts)
        rank = np.where(nt >= 0, ranks[np.maximum(nt, 0)], -1)
    if skip_most_common:
        if rank is None:
            raise ValueError("skip_most_common needs token_counts")
        keep &= rank >= skip_most_common

    def block(sel):
        n = int(sel.sum())
        if n == 0:
            return {"n_positions": 0}
        err = scores["test_err"][sel]
        res = {"n_positions": n, "pass_rate": {str(t): float((err <= t).mean()) for t in tolerances}}
        res |= {m: float(scores[m][sel].mean()) for m in METRICS}
        return res

    out = block(keep)
    if rank is not None:
        edges = [0, *buckets, np.inf]
        out["by_frequency"] = {f"[{lo},{hi})": block(keep & (rank >= lo) & (rank < hi))
                               for lo, hi in zip(edges[:-1], edges[1:])}
    t = nt.shape[1]
    bins = np.linspace(0, t, position_bins + 1).astype(int)
    pos = np.broadcast_to(np.arange(t), nt.shape)
    out["by_position"] = {f"[{lo},{hi})": block(keep & (pos >= lo) & (pos < hi))
                          for lo, hi in zip(bins[:-1], bins[1:]) if hi > lo}
    return out
