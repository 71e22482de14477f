"""Capability-selective neuron statistics and pruning (Pochinkov & Schoots 2023, `taker`).

    scores = lens.modularity.pruning.neuron_scores(model, forget_rows, retain_rows)   # [layers, d_mlp]
    mask = top_unpruned(scores, n=..., pruned=np.zeros_like(scores, bool))
    pruned = prune(model, mask)            # W_out rows (HF: down-projection columns) zeroed

A neuron's activation `a` is the input of the MLP's down-projection: act(x W_in) for a
GELU MLP, act(x W_gate) * (x W_in) for a gated (SwiGLU / GeGLU) one, exactly what
`Capture(neurons=True)` returns.  A head's activation is its output z before W_O.
Statistics come from ONE compiled call per chunk of rows: a scan over the layers (only up
to the deepest layer asked for) with the rows vmapped inside, each layer reducing its |a|
to per-unit sums before the next starts, so nothing larger than one layer's activations
for one chunk is ever held.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Bool, Float, Int
from safetensors.numpy import load_file

from lens.modularity.neurons import check_neuron_rows, chunks
from lens.models.runtime import per_model_cache as per_model
from lens.models.core.block import bf16_matmul_blocks, block_forward
from lens.models.core.interventions import Capture, Edits
from lens.models.core.transformer import Transformer


# ------------------------------------------------------------------ statistics
class ActivationStats(NamedTuple):
    """Mean |activation| per unit over every token of the rows."""

    neurons: Float[np.ndarray, "layers d_mlp"]
    head_z: Float[np.ndarray, "layers heads d_head"]
    tokens: int


@eqx.filter_jit
def _abs_sums(model, rows, weights, stop: int):
    """Weighted |a| sums of blocks [0, stop) over a chunk of rows [B, T]: ([stop, d_mlp],
    [stop, heads, d_head]) float32.  The scan runs over layers with the rows inside (each
    layer's weights are read once per chunk) and each layer reduces its own activations
    before the next starts, so no [layers, tokens, d_mlp] array ever exists.  weights [B]:
    1 for real rows, 0 for the padding that keeps every chunk one shape (one compile)."""
    c = model.config
    # the blocks only: the statistics never need the final norm or the unembedding
    x = jax.vmap(lambda t: model.prefix(t, ids_checked=True)[0])(rows)
    # no attention mask: positions and key validity are the same for every row, so the
    # rotary tables are built once and shared (not once per row and layer)
    qpos, valid = model.default_positions(rows[0], None, None, None)
    rot = model.rotary(qpos)
    key_pos = jnp.where(valid, qpos, -1)
    # all layers: scan the weights as they are (a slice would copy every block's weights)
    blocks = model.blocks if stop == c.n_layers else jax.tree.map(lambda w: w[:stop], model.blocks)
    local = None if c.local_layers is None else jnp.asarray(c.local_layers[:stop])
    capture = Capture(neurons=True, head_z=True)
    w = weights.astype(jnp.float32)

    def step(h, xs):
        block, is_local = xs

        def one(h1):
            return block_forward(c, block, h1, qpos, key_pos=key_pos, rotary=rot, is_local=is_local, capture=capture)

        h, _, acts = jax.vmap(one)(h)
        # float32 sums: a bf16 model's per-token values are summed without bf16 rounding.
        n = jnp.einsum("b,bsm->m", w, jnp.abs(acts.neurons.astype(jnp.float32)))
        z = jnp.einsum("b,bshk->hk", w, jnp.abs(acts.head_z.astype(jnp.float32)))
        return h, (n, z)

    _, (n, z) = jax.lax.scan(step, x, (blocks, local))
    return n, z


COMPUTE_DTYPES = ("float32", "bfloat16")

# (id(model), "bfloat16") -> the model with bf16-compute block weights (a bf16 copy of them)
_BF16_MODELS: dict[tuple[int, str], Transformer] = {}


def _compute_model(model: Transformer, compute_dtype: str) -> Transformer:
    """The model whose forward computes the statistics: itself for "float32"; for "bfloat16"
    its block matrices as `models.core.block.Bf16Matmul`s (bf16 inputs, float32 products
    and sums, XLA's dot)."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}; got {compute_dtype!r}")
    if compute_dtype == "float32":
        return model

    def build():
        blocks = bf16_matmul_blocks(model.blocks)
        return jax.block_until_ready(eqx.tree_at(lambda m: m.blocks, model, blocks))

    # kept while the model lives: neuron_scores and repeated calls cast once
    return per_model.cached(_BF16_MODELS, model, compute_dtype, build)


def activation_stats(model: Transformer, rows, chunk: int = 8, layers=None,
                     compute_dtype: str = "float32") -> ActivationStats:
    """Mean |a| over every token of `rows` [N, T] for each MLP neuron ([layers, d_mlp]) and
    each component of each head's output before W_O ([layers, heads, d_head]).

    layers: None = every layer; else these layer indices (in this order; the result's
    leading axis follows it) and only blocks up to the deepest of them are run.  Every
    chunk of `chunk` rows is one call of the same compiled function (the last one padded
    with zero-weight rows) and the sums stay on the device until the end: no recompiles
    and no host round trip per chunk.

    compute_dtype: "float32" (the model's own weights and dots) or "bfloat16": every block
    matmul rounds its input and weight to bf16 and sums in float32 (XLA's dot: the bf16
    matrix units of a GPU/TPU; no faster than float32 on a CPU, where XLA widens to float32);
    norms, softmax, activations, residuals and the |a| sums stay float32.  The statistics
    then differ from float32 by bf16 rounding (docs and bench/README give the measured
    size); use it for many tokens where the ranking, not the last digit, matters."""
    rows = check_neuron_rows(model, rows)
    c = model.config
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    model = _compute_model(model, compute_dtype)
    chosen = list(range(c.n_layers)) if layers is None else [int(i) for i in np.atleast_1d(layers)]
    if not chosen or any(not 0 <= i < c.n_layers for i in chosen):
        raise ValueError(f"layers must be non-empty indices in [0, {c.n_layers}); got {layers}")
    stop = max(chosen) + 1
    chunk = min(chunk, len(rows))
    n_pad = -len(rows) % chunk
    padded = np.concatenate([rows, np.zeros((n_pad, rows.shape[1]), np.int32)]) if n_pad else rows
    weights = np.ones(len(padded), np.float32)
    weights[len(rows):] = 0.0
    parts = [_abs_sums(model, jnp.asarray(padded[i:i + chunk]), jnp.asarray(weights[i:i + chunk]), stop)
             for i in range(0, len(padded), chunk)]
    # float64 on the host at the end: many chunks of float32 sums without float32 drift
    n_sum = sum(np.asarray(n, np.float64) for n, _ in parts)
    z_sum = sum(np.asarray(z, np.float64) for _, z in parts)
    tokens = rows.size
    return ActivationStats((n_sum[chosen] / tokens).astype(np.float32),
                           (z_sum[chosen] / tokens).astype(np.float32), tokens)


def ratio(forget: np.ndarray, retain: np.ndarray, eps: float) -> np.ndarray:
    """taker's "abs" score: mean |a| on the forget set / (mean |a| on the retain set + eps)."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0; got {eps}")
    return (np.asarray(forget, np.float32) / (np.asarray(retain, np.float32) + np.float32(eps))).astype(np.float32)


def neuron_scores(model: Transformer, forget_tokens, retain_tokens, eps: float = 1e-3,
                  chunk: int = 8, compute_dtype: str = "float32") -> Float[np.ndarray, "layers d_mlp"]:
    """float32 [n_layers, d_mlp]: mean |a| over the forget tokens / (mean |a| over the
    retain tokens + eps), a = the input of the MLP's down-projection.  High = the neuron
    works on the forget text far more than on the retain text.  compute_dtype: as
    `activation_stats` ("bfloat16": bf16 block matmuls, float32 everything else)."""
    f = activation_stats(model, forget_tokens, chunk, compute_dtype=compute_dtype).neurons
    r = activation_stats(model, retain_tokens, chunk, compute_dtype=compute_dtype).neurons
    return ratio(f, r, eps)


def head_scores_from(forget: ActivationStats, retain: ActivationStats, eps: float) -> Float[np.ndarray, "layers heads"]:
    """Per head: the mean over its d_head output components of the component ratio (taker's
    pre-out attention scoring, heads chosen by the mean of their components)."""
    return ratio(forget.head_z, retain.head_z, eps).mean(-1)


def head_scores(model: Transformer, forget_tokens, retain_tokens, eps: float = 1e-3,
                chunk: int = 8, compute_dtype: str = "float32") -> Float[np.ndarray, "layers heads"]:
    """float32 [n_layers, heads]: `head_scores_from` on the two sets' statistics
    (compute_dtype: as `activation_stats`)."""
    return head_scores_from(activation_stats(model, forget_tokens, chunk, compute_dtype=compute_dtype),
                            activation_stats(model, retain_tokens, chunk, compute_dtype=compute_dtype), eps)


def top_unpruned(scores: np.ndarray, n: int, pruned: np.ndarray) -> Bool[np.ndarray, "..."]:
    """The `n` highest-scoring units not yet pruned, chosen globally over every layer
    (taker's get_top_frac, restricted to live units so each step removes n new ones)."""
    scores = np.asarray(scores, np.float64)
    live = ~np.asarray(pruned, bool)
    n = min(int(n), int(live.sum()))
    flat = np.where(live, scores, -np.inf).ravel()
    chosen = np.zeros(flat.shape, bool)
    if n > 0:
        chosen[np.argsort(-flat, kind="stable")[:n]] = True
    return chosen.reshape(scores.shape)


def random_unpruned(shape, n: int, pruned: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`n` units drawn uniformly from the live ones (the random-pruning control)."""
    live = np.flatnonzero(~np.asarray(pruned, bool).ravel())
    chosen = np.zeros(int(np.prod(shape)), bool)
    chosen[rng.choice(live, size=min(int(n), live.size), replace=False)] = True
    return chosen.reshape(shape)


# ------------------------------------------------------------------ pruning
def _check_mask(model: Transformer, mask, width: int, what: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.shape != (model.config.n_layers, width) or m.dtype != bool:
        raise ValueError(f"{what} mask must be bool [{model.config.n_layers}, {width}]; got {m.dtype} {m.shape}")
    return m


def prune(model: Transformer, neuron_mask, head_mask=None) -> Transformer:
    """A new model with each masked neuron's down-projection weights (our W_out row, HF's
    down_proj / c_proj column) and each masked head's W_O slice set to zero: the unit
    still computes, but writes nothing.  Biases are kept (taker deletes the same weights)."""
    c = model.config
    keep_n = ~_check_mask(model, neuron_mask, c.d_mlp, "neuron")
    w_out = model.blocks.W_out * jnp.asarray(keep_n, model.blocks.W_out.dtype)[:, :, None]
    model = eqx.tree_at(lambda m: m.blocks.W_out, model, w_out)
    if head_mask is not None:
        keep_h = ~_check_mask(model, head_mask, c.n_heads, "head")
        w_o = model.blocks.W_O * jnp.asarray(keep_h, model.blocks.W_O.dtype)[:, :, None, None]
        model = eqx.tree_at(lambda m: m.blocks.W_O, model, w_o)
    return model


def pruning_edits(model: Transformer, neuron_mask, head_mask=None) -> Edits:
    """The same pruning as data: neuron_mix (and head_mix) 1 at the pruned units, no source
    (zero-ablation of the activation), for every position.  Equals `prune` in the forward."""
    c = model.config
    n = _check_mask(model, neuron_mask, c.d_mlp, "neuron")
    fields = {"neuron_mix": jnp.asarray(n, jnp.float32)[:, None, :]}
    if head_mask is not None:
        fields["head_mix"] = jnp.asarray(_check_mask(model, head_mask, c.n_heads, "head"), jnp.float32)[:, None, :]
    return Edits(**fields)


def save_masks(path: str | Path, neuron_mask, head_mask=None, info: dict | None = None) -> Path:
    """Pruning masks as safetensors (uint8), `info` as JSON metadata; `load_masks` reads them."""
    arrays = {"neurons": np.asarray(neuron_mask, np.uint8)}
    if head_mask is not None:
        arrays["heads"] = np.asarray(head_mask, np.uint8)
    from lens.modularity.resume import write_atomic

    return write_atomic(path, arrays, info or {})


def load_masks(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(neuron mask, head mask or None, info) written by `save_masks`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no mask file at {path}")
    with safe_open(str(path), "numpy") as f:
        meta = f.metadata() or {}
    arrays = load_file(str(path))
    if "neurons" not in arrays:
        raise ValueError(f"{path} holds no 'neurons' mask")
    heads = arrays.get("heads")
    return arrays["neurons"].astype(bool), None if heads is None else heads.astype(bool), json.loads(meta.get("info", "{}"))


# ------------------------------------------------------------------ the metric
def common_tokens(rows, n: int = 50) -> Int[np.ndarray, " n"]:
    """The `n` most frequent token ids in `rows` (ties by lower id): taker skips these when
    it scores accuracy, so "the", "," and indentation do not dominate it."""
    counts = np.bincount(np.asarray(rows).ravel())
    order = np.lexsort((np.arange(counts.size), -counts))
    return order[:n].astype(np.int32)


@eqx.filter_jit
def _metric_sums(model, rows, skip, edits):
    """Per row: (nll sum, top-1 hits, top-10 hits, counted targets), each [B]."""
    def one(t):
        logits = model.forward(t[:-1], edits=edits).logits.astype(jnp.float32)
        target = t[1:]
        logp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(logp, target[:, None], -1)[:, 0]
        # rank of the target = how many logits beat it; top-k hit <=> rank < k
        rank = (logits > jnp.take_along_axis(logits, target[:, None], -1)).sum(-1)
        counted = ~jnp.isin(target, skip)
        return (nll.sum(), ((rank < 1) & counted).sum(), ((rank < 10) & counted).sum(), counted.sum())

    return jax.vmap(one)(rows)


def ratio_interval(num, den) -> tuple[float, float]:
    """A 95% normal interval for sum(num) / sum(den) with the rows as independent clusters
    (the tokens of one row are not independent): the ratio estimator's standard error
    sqrt(n / (n - 1) * sum((num_i - r den_i)^2)) / sum(den).  One row: (r, r)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    total = max(den.sum(), 1.0)
    r = num.sum() / total
    n = len(num)
    if n < 2:
        return (float(r), float(r))
    se = np.sqrt(n / (n - 1) * ((num - r * den) ** 2).sum()) / total
    return (float(r - 1.96 * se), float(r + 1.96 * se))


def next_token_metrics(model: Transformer, rows, skip_ids, chunk: int = 8, edits: Edits | None = None) -> dict:
    """loss (mean next-token cross-entropy over every predicted token), top1 / top10 (the
    share of predictions whose target is the top / in the top 10 logits, over targets not
    in `skip_ids`), each with a 95% interval over rows (`ratio_interval`: "loss_ci95",
    "top1_ci95", "top10_ci95"), and the token counts."""
    rows = check_neuron_rows(model, rows, "rows")
    if rows.shape[1] < 2:
        raise ValueError("rows need >= 2 tokens to predict a next token")
    skip = jnp.asarray(np.asarray(skip_ids, np.int32).reshape(-1))
    per_row = [np.concatenate(v) for v in zip(*(
        [np.asarray(x, np.float64) for x in _metric_sums(model, jnp.asarray(part), skip, edits)]
        for part in chunks(rows, chunk)))]
    nll, hit1, hit10, counted = per_row
    predicted = np.full(len(rows), rows.shape[1] - 1, np.float64)
    n_pred = rows.shape[0] * (rows.shape[1] - 1)
    c = max(counted.sum(), 1)
    return {"loss": nll.sum() / n_pred, "top1": hit1.sum() / c, "top10": hit10.sum() / c,
            "loss_ci95": ratio_interval(nll, predicted), "top1_ci95": ratio_interval(hit1, counted),
            "top10_ci95": ratio_interval(hit10, counted), "tokens": int(n_pred), "counted": int(counted.sum())}


def differential_drop(records: list[dict], forget: str, retain: str, metric: str = "top1") -> dict:
    """The paper's selectivity read-out per step: the forget set's drop in `metric` minus
    the retain set's, each drop relative to the unpruned model (record 0) in percent,
    `100 * (1 - value / value_0)`; "max" is the largest over the pruned steps.  Positive =
    the pruning hurt the forget text more than the retain text."""
    base_f, base_r = records[0][forget][metric], records[0][retain][metric]

    def drop(v, b):
        return 100.0 * (1.0 - v / b) if b > 0 else 0.0

    per_step = [drop(r[forget][metric], base_f) - drop(r[retain][metric], base_r) for r in records]
    return {"metric": metric, "per_step": per_step, "max": max(per_step[1:]) if len(per_step) > 1 else 0.0,
            "forget_drop_pct": [drop(r[forget][metric], base_f) for r in records],
            "retain_drop_pct": [drop(r[retain][metric], base_r) for r in records]}


# ------------------------------------------------------------------ selective pruning
METHODS = ("ratio", "forget", "random")


@dataclasses.dataclass(frozen=True)
class PruningConfig:
    """The settings of one `selective_pruning` run (checked at construction).

    steps: pruning steps (an int >= 1); each removes `neuron_frac` of all MLP neurons and
        `head_frac` of all heads (fractions in [0, 1]) among the live ones.
    method: "ratio" (forget / (retain + eps), the reference), "forget" (forget-set mean
        |a| alone, the control that ignores what the retain text needs), "random" (same
        counts drawn uniformly, with `seed`).
    eps: the ratio's denominator floor (> 0).
    chunk: rows per compiled call of the statistics and the evaluation (an int >= 1).
    compute_dtype: the statistics' matmuls, "float32" or "bfloat16" (`activation_stats`);
        the evaluation always runs the model as it is.
    """

    steps: int
    method: str = "ratio"
    neuron_frac: float = 0.02
    head_frac: float = 0.0
    eps: float = 1e-3
    seed: int = 0
    chunk: int = 8
    compute_dtype: str = "float32"

    def __post_init__(self):
        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        if not is_int(self.steps) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1; got {self.steps!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {self.method!r}")
        if not 0 <= self.neuron_frac <= 1 or not 0 <= self.head_frac <= 1:
            raise ValueError("neuron_frac and head_frac must be in [0, 1]")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0; got {self.eps!r}")
        if not is_int(self.seed):
            raise ValueError(f"seed must be an int; got {self.seed!r}")
        if not is_int(self.chunk) or self.chunk < 1:
            raise ValueError(f"chunk must be an int >= 1; got {self.chunk!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}; got {self.compute_dtype!r}")


def selective_pruning(model: Transformer, forget_rows, retain_rows, eval_sets: dict, skip_ids,
                      config: PruningConfig, *, on_step: Callable[[dict], None] | None = None,
                      unpruned_record: dict | None = None):
    """Iterative pruning as in taker: each step collects the statistics on the CURRENT
    pruned model, scores, removes `config.neuron_frac` of all MLP neurons (and
    `config.head_frac` of all heads) chosen globally across layers among the live ones,
    and evaluates (`PruningConfig` for the method and the rest).

    eval_sets: name -> rows.  on_step(record) is called after every step.  Returns
    (records, neuron mask, head mask); record 0 is the unpruned model (`unpruned_record`:
    record 0 of an earlier run on the same model and eval_sets, reused instead of
    evaluated again: the baselines' draws share it)."""
    if not isinstance(config, PruningConfig):
        raise TypeError(f"config must be a PruningConfig; got {type(config).__name__}")
    steps, method, eps, chunk = config.steps, config.method, config.eps, config.chunk
    neuron_frac, head_frac, seed = config.neuron_frac, config.head_frac, config.seed
    c = model.config
    n_mask = np.zeros((c.n_layers, c.d_mlp), bool)
    h_mask = np.zeros((c.n_layers, c.n_heads), bool)
    n_step, h_step = int(neuron_frac * n_mask.size), int(head_frac * h_mask.size)
    rng = np.random.default_rng(seed)
    current = model

    def evaluate(step):
        rec = {"step": step, "neurons_pruned": int(n_mask.sum()), "heads_pruned": int(h_mask.sum())}
        for name, rows in eval_sets.items():
            rec[name] = next_token_metrics(current, rows, skip_ids, chunk)
        return rec

    if unpruned_record is not None and set(eval_sets) - set(unpruned_record):
        raise ValueError(f"unpruned_record lacks eval sets {sorted(set(eval_sets) - set(unpruned_record))}")
    records = [evaluate(0) if unpruned_record is None else dict(unpruned_record)]
    for step in range(1, steps + 1):
        if method == "random":
            new_n = random_unpruned(n_mask.shape, n_step, n_mask, rng)
            new_h = random_unpruned(h_mask.shape, h_step, h_mask, rng)
        else:
            f = activation_stats(current, forget_rows, chunk, compute_dtype=config.compute_dtype)
            if method == "ratio":
                r = activation_stats(current, retain_rows, chunk, compute_dtype=config.compute_dtype)
                sn, sh = ratio(f.neurons, r.neurons, eps), head_scores_from(f, r, eps)
            else:
                sn, sh = f.neurons, f.head_z.mean(-1)
            new_n, new_h = top_unpruned(sn, n_step, n_mask), top_unpruned(sh, h_step, h_mask)
        n_mask |= new_n
        h_mask |= new_h
        current = prune(model, n_mask, h_mask)
        records.append(evaluate(step))
        if on_step is not None:
            on_step(records[-1])
    return records, n_mask, h_mask
