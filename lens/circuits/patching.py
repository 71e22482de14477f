"""Activation patching on token-aligned clean / corrupted pairs: metrics, input checks, the grid.

    metric = patching.logit_diff_metric(correct, wrong, position=-1)
    metric = patching.normalized_metric(model, clean, corrupted, metric)   # (LD - LD_corr) / (LD_clean - LD_corr)
    grid = patching.activation_patching(model, clean, corrupted, metric, site="resid")   # [layers, seq]

Sites (what is patched; the grid's axes):
  "resid"     resid_pre[l] at position p                         [layers, seq]
  "attn_out"  what block l's attention writes, at position p     [layers, seq]
  "mlp_out"   what block l's MLP writes, at position p           [layers, seq]
  "heads"     head h's output z (before W_O) at every position   [layers, heads]
              (`per_position=True`: at position p only)           [layers, heads, seq]
  "q_input" / "k_input" / "v_input"  the residual that head h's query (key, value) reads,
              at every position (models/core/interventions.py; keys and values per KV head)
                                                                  [layers, heads or kv_heads]

direction "denoise" (default): run the corrupted input, patch in the clean run's activation;
"noise": run the clean input, patch in the corrupted one.  The base run is the one run;
the source run is the one activations come from.  A grid cell is the metric of the patched
run.  Every patch of a grid is one edit (`models.Edits`, a one-hot mix with the source
run's activations as the source), and the whole grid is ONE `jax.vmap` over patch sites
(and pairs), chunked by a memory budget (`lens.core.sweep.chunk_size_for`).  Sites are ordered
layer by layer, so a chunk starts at its first edited layer: the blocks before it are not
re-run (the base run's residual there is the entry; one compilation serves every start).

Estimates of the same grid: `lens.circuits.attribution` (AtP, AtP*); sender -> receiver
paths: `lens.circuits.path_patching`.

Metrics are callables `metric(logits [seq, vocab]) -> scalar`; the provided ones are
`eqx.Module`s whose arrays may carry a leading [P] axis to give each pair its own answer
tokens when clean / corrupted are batches [P, seq] (every grid then gets a leading [P]).
"""

from __future__ import annotations

import math
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from lens.core.capture import run_with_cache
from lens.core.stats import kl_divergence
from lens.core.sweep import chunk_size_for
from lens.models.core.block import block_forward
from lens.models.core.interventions import PATCH_SITES, Capture, Edits
from lens.models.core.transformer import Transformer

DIRECTIONS = ("denoise", "noise")


# The sites activation, attribution and path patching take (declared in
# models.core.interventions.PATCH_SITES, with their cache field, Edits base and unit axis).
SITES = {name: PATCH_SITES[name] for name in
         ("resid", "attn_out", "mlp_out", "heads", "q_input", "k_input", "v_input")}
SOURCE_CAPTURE = Capture(resid=True, sublayers=True, head_z=True)


# ------------------------------------------------------------------ metrics
class LogitDiff(eqx.Module):
    """logit[position, correct] - logit[position, wrong] (arrays: scalars, or [P] for pairs)."""

    correct: Int[Array, "*P"]
    wrong: Int[Array, "*P"]
    position: Int[Array, "*P"]

    def __call__(self, logits: Float[Array, "seq vocab"]) -> Float[Array, ""]:
        row = logits[self.position].astype(jnp.float32)
        return row[self.correct] - row[self.wrong]


class Normalized(eqx.Module):
    """(m - corrupted) / (clean - corrupted): 0 = the corrupted run's value, 1 = the clean's."""

    metric: Callable
    clean: Float[Array, "*P"]
    corrupted: Float[Array, "*P"]

    def __call__(self, logits: Float[Array, "seq vocab"]) -> Float[Array, ""]:
        return (self.metric(logits) - self.corrupted) / (self.clean - self.corrupted)


class KL(eqx.Module):
    """KL(reference || patched) at `position`, nats (the reference: a run's log-probs there)."""

    reference_logprobs: Float[Array, "*P vocab"]
    position: Int[Array, "*P"]

    def __call__(self, logits: Float[Array, "seq vocab"]) -> Float[Array, ""]:
        logp = jax.nn.log_softmax(logits[self.position].astype(jnp.float32))
        ref = self.reference_logprobs
        return kl_divergence(ref, logp)


def logit_diff_metric(correct, wrong, position=-1, tokenizer=None) -> LogitDiff:
    """The logit difference correct - wrong at `position`: token ids (ints, or [P] arrays for
    pairs), or with `tokenizer` one-token strings too, e.g.
    `logit_diff_metric(" Paris", " Rome", tokenizer=tok)` (each string must be one token)."""
    if tokenizer is not None:
        correct, wrong = tokenizer.token_ids(correct), tokenizer.token_ids(wrong)
    elif any(isinstance(x, str) or (isinstance(x, (list, tuple)) and any(isinstance(v, str) for v in x))
             for x in (correct, wrong)):
        raise TypeError("logit_diff_metric got token strings without a tokenizer: pass "
                        "tokenizer=tok, or ids (tok.token_id(' Paris'))")
    c, w, p = (jnp.asarray(a, jnp.int32) for a in (correct, wrong, position))
    p = jnp.broadcast_to(p, c.shape)
    if c.shape != w.shape:
        raise ValueError(f"correct {c.shape} and wrong {w.shape} differ in shape")
    return LogitDiff(c, w, p)


def metric_values(model: Transformer, tokens, metric) -> Float[Array, "*P"]:
    """The metric on the unpatched run of `tokens` ([seq] or [P, seq])."""
    tokens, batched = _tokens(model, tokens)
    logits = _logits(model, tokens)
    return _vmap_metric(metric, batched)(logits) if batched else metric(logits[0])


def normalized_metric(model: Transformer, clean, corrupted, metric) -> Normalized:
    """`metric` normalised to (m - m_corrupted) / (m_clean - m_corrupted), the two values
    measured on the unpatched runs.  A pair where they are equal is refused (the ratio would
    be 0/0)."""
    hi = metric_values(model, clean, metric)
    lo = metric_values(model, corrupted, metric)
    gap = np.atleast_1d(np.abs(np.asarray(hi - lo)))
    if (gap < 1e-6).any():
        raise ValueError(f"the metric is the same on clean and corrupted runs for pair(s) "
                         f"{np.nonzero(gap < 1e-6)[0].tolist()}: nothing to normalise by")
    return Normalized(metric, hi, lo)


def kl_metric(model: Transformer, reference_tokens, position=-1) -> KL:
    """KL(reference run || patched run) at `position` (for denoising, the clean run)."""
    tokens, batched = _tokens(model, reference_tokens)
    logits = _logits(model, tokens)
    pos = jnp.broadcast_to(jnp.asarray(position, jnp.int32), (tokens.shape[0],))
    ref = jax.nn.log_softmax(logits[jnp.arange(tokens.shape[0]), pos].astype(jnp.float32), -1)
    return KL(ref, pos) if batched else KL(ref[0], pos[0])


@eqx.filter_jit
def _logits(model, tokens):
    return jax.vmap(model)(tokens)


def _vmap_metric(metric, batched: bool):
    """metric applied per pair: its array leaves carry the [P] axis when batched."""
    if not batched:
        return metric
    arrays, rest = eqx.partition(metric, eqx.is_array)
    axes = jax.tree.map(lambda a: 0 if a.ndim > 0 else None, arrays)

    def one(arrays, logits):
        return eqx.combine(arrays, rest)(logits)

    return lambda logits: jax.vmap(one, in_axes=(axes, 0))(arrays, logits)


# ------------------------------------------------------------------ validation
def _tokens(model: Transformer, tokens) -> tuple[Array, bool]:
    t = np.asarray(tokens)
    if t.ndim not in (1, 2) or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"tokens must be integer ids [seq] or [P, seq]; got {t.dtype} {t.shape}")
    if t.size == 0:
        raise ValueError("tokens is empty")
    v = model.config.vocab_size
    if t.min() < 0 or t.max() >= v:
        raise ValueError(f"token id out of range [0, {v}): min {t.min()}, max {t.max()}")
    return jnp.asarray(t.reshape((-1, t.shape[-1])), jnp.int32), t.ndim == 2


def check_pair(model: Transformer, clean, corrupted) -> tuple[Array, Array, bool]:
    """Validate a token-aligned pair (or batch of pairs): same shape, valid ids.  Returns
    (clean [P, seq], corrupted [P, seq], batched)."""
    c, batched = _tokens(model, clean)
    x, batched_x = _tokens(model, corrupted)
    if c.shape != x.shape or batched != batched_x:
        raise ValueError(
            f"clean {np.shape(clean)} and corrupted {np.shape(corrupted)} are not token-aligned: "
            "activation patching swaps activations position by position, so both must have the "
            "same number of tokens (pick names / words that are one token each)")
    return c, x, batched


def check_metric(metric, P: int, batched: bool) -> None:
    """Refuse a metric that is not callable or whose arrays do not carry one entry per pair."""
    if not callable(metric):
        raise TypeError(f"metric must be a callable logits [seq, vocab] -> scalar; got {type(metric)}")
    for a in jax.tree.leaves(eqx.filter(metric, eqx.is_array)):
        if batched and a.ndim > 0 and a.shape[0] != P:
            raise ValueError(f"metric array of shape {a.shape} does not have one entry per pair ({P})")
        if not batched and a.ndim > 0 and not isinstance(metric, KL):
            raise ValueError(f"metric array of shape {a.shape} for one pair: pass scalars "
                             "(or batch the tokens [P, seq])")


def check_inputs(model, clean, corrupted, metric, site, direction, per_position) -> tuple[Array, Array, bool]:
    """Validate a grid request; returns (base [P, seq], source [P, seq], batched): base is
    the run that is patched, source the run activations come from (`direction`)."""
    if site not in SITES:
        raise ValueError(f"site must be one of {sorted(SITES)}; got {site!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'denoise' or 'noise'; got {direction!r}")
    if per_position and site != "heads":
        raise ValueError("per_position=True applies to site 'heads' only (resid, attn_out and "
                         "mlp_out grids are per position already)")
    c, x, batched = check_pair(model, clean, corrupted)
    check_metric(metric, c.shape[0], batched)
    base, source = (x, c) if direction == "denoise" else (c, x)
    return base, source, batched


# ------------------------------------------------------------------ the grid layout
def mix_shape(model: Transformer, site: str, seq: int, per_position: bool = False) -> tuple[int, ...]:
    """The shape of the site's `{base}_mix` field ([layers, S(, units)]): one patch per entry."""
    c = model.config
    spec = SITES[site]
    if spec.unit is None:
        return (c.n_layers, seq)
    width = c.n_heads if spec.unit == "heads" else c.n_kv_heads
    return (c.n_layers, seq if per_position else 1, width)


def to_grid(values: Array, site: str, per_position: bool) -> Array:
    """[..., *mix_shape] -> the grid: [L, S] as is; [L, 1, H] -> [L, H]; [L, S, H] -> [L, H, S]."""
    if SITES[site].unit is None:
        return values
    if per_position:
        return jnp.swapaxes(values, -1, -2)
    return values[..., 0, :]


def grid_axes(site: str, per_position: bool = False) -> list[str]:
    """Names of the grid's axes."""
    if SITES[site].unit is None:
        return ["layer", "position"]
    unit = "head" if SITES[site].unit == "heads" else "kv_head"
    return ["layer", unit, "position"] if per_position else ["layer", unit]


def site_edits(model: Transformer, site: str, mix: Array, source: Array) -> Edits:
    """The Edits of one patch: `{base}_mix` and `{base}_source` of the site, in the model's dtype."""
    dt = model.embed.dtype
    base = SITES[site].base
    return Edits(**{f"{base}_mix": mix.astype(dt), f"{base}_source": source.astype(dt)})


# ------------------------------------------------------------------ activation patching
def run_from(model: Transformer, x: Float[Array, "seq d_model"], tokens: Int[Array, " seq"],
             start: Int[Array, ""], edits: Edits | None) -> Float[Array, "seq vocab"]:
    """Logits of the forward continued from `x` = resid_pre[start] with `edits` (which must do
    nothing before `start`).  `start` may be traced: the blocks are a `fori_loop` from it,
    each block the model's own `block_forward`, so one compilation serves every start."""
    c = model.config
    qpos, valid = model.default_positions(tokens, None, None, None)
    key_pos = jnp.where(valid, qpos, -1)
    rot = model.rotary(qpos)
    local = None if c.local_layers is None else jnp.asarray(c.local_layers)

    def body(i, h):
        block = jax.tree.map(lambda w: w[i], model.blocks)
        e = None if edits is None else jax.tree.map(lambda a: a[i], edits)
        h, _, _ = block_forward(c, block, h, qpos, key_pos=key_pos, rotary=rot,
                                is_local=None if local is None else local[i], edits=e)
        return h

    x = jax.lax.fori_loop(start, c.n_layers, body, x)
    return model.unembed_resid(x)[0]


@eqx.filter_jit
def _grid_chunk(model, site, base_tokens, entries, sources, metric, indices, start, shape, batched):
    """Metric of each patched run: indices [k] (flat one-hot positions in `shape`) x pairs."""
    size = math.prod(shape)

    def one(index, tokens, entry, source, met):
        mix = jax.nn.one_hot(index, size, dtype=jnp.float32).reshape(shape)
        logits = run_from(model, entry[start], tokens, start, site_edits(model, site, mix, source))
        return met(logits)

    arrays, rest = eqx.partition(metric, eqx.is_array)
    axes = jax.tree.map(lambda a: 0 if batched and a.ndim > 0 else None, arrays)

    def per_pair(index):
        f = lambda t, e, s, a: one(index, t, e, s, eqx.combine(a, rest))  # noqa: E731
        return jax.vmap(f, in_axes=(0, 0, 0, axes))(base_tokens, entries, sources, arrays)

    return jax.vmap(per_pair)(indices)  # [k, P]


def activation_patching(
    model: Transformer,
    clean: Int[Array, " seq"] | Int[Array, "P seq"],
    corrupted: Int[Array, " seq"] | Int[Array, "P seq"],
    metric: Callable[[Float[Array, "seq vocab"]], Float[Array, ""]],
    site: str = "resid",
    direction: str = "denoise",
    per_position: bool = False,
    chunk_size: int | None = None,
    memory_budget: float = 2**30,
    progress: bool = False,
) -> Float[Array, "*P layers ..."]:
    """The metric of every single-site patch: grid [n_layers, seq] for "resid", "attn_out",
    "mlp_out"; [n_layers, heads] for "heads" ([n_layers, heads, seq] with per_position) and
    "q_input"; [n_layers, kv_heads] for "k_input" / "v_input".  A leading [P] axis when
    clean / corrupted are batches of pairs [P, seq].

    direction "denoise": the corrupted run with one clean activation patched in; "noise":
    the clean run with one corrupted activation.  All patches are one vmapped call (chunks
    of `chunk_size` sites, or as many as `memory_budget` bytes allow), each chunk starting
    at its first patched layer."""
    base, source, batched = check_inputs(model, clean, corrupted, metric, site, direction, per_position)
    P, seq = base.shape
    shape = mix_shape(model, site, seq, per_position)
    spec = SITES[site]
    _, base_cache = run_with_cache(model, base, SOURCE_CAPTURE)
    _, src_cache = run_with_cache(model, source, SOURCE_CAPTURE)
    sources = getattr(src_cache, spec.field)
    entries = base_cache.resid_pre  # [P, L, seq, d]
    K = math.prod(shape)
    per_layer = K // model.config.n_layers
    if chunk_size is None:
        chunk_size = chunk_size_for(model, 1, 1, P, seq, False, True, False, memory_budget)
    chunk = max(1, min(chunk_size, K))
    out = []
    for i in tqdm(range(math.ceil(K / chunk)), desc=f"patch {site}", disable=not progress):
        idx = np.arange(i * chunk, (i + 1) * chunk)
        used = int((idx < K).sum())
        idx = np.minimum(idx, K - 1)  # the last chunk padded with copies of the last site
        start = jnp.asarray(idx[0] // per_layer, jnp.int32)
        vals = _grid_chunk(model, site, base, entries, sources, metric, jnp.asarray(idx), start,
                           shape, batched)
        out.append(np.asarray(vals)[:used])
    grid = jnp.asarray(np.concatenate(out).T.reshape((P,) + shape))  # [P, *shape]
    grid = to_grid(grid, site, per_position)
    return grid if batched else grid[0]
