"""Activation, path and attribution patching on token-aligned clean / corrupted pairs.

    metric = patching.logit_diff_metric(correct, wrong, position=-1)
    metric = patching.normalized_metric(model, clean, corrupted, metric)   # (LD - LD_corr) / (LD_clean - LD_corr)
    grid = patching.activation_patching(model, clean, corrupted, metric, site="resid")   # [layers, seq]
    atp = patching.attribution_patching(model, clean, corrupted, metric, site="resid")   # same grid, estimated
    star = patching.atp_star(model, clean, corrupted, metric, site="q_input")            # |effect| estimates

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

Attribution patching (Nanda 2022): AtP = d metric / d mix at mix = 0, which is exactly
grad_a metric(base run) . (a_source - a_base) for the site's activation a, for every site
at once from one forward and one backward.  AtP* (Kramar et al. 2024): the QK fix for the
q_input / k_input sites (the attention pattern recomputed exactly with the patched queries
/ keys, then linearised from the pattern on) and GradDrop (the gradient through each
layer's residual writes dropped in turn; 1/(L-1) sum_l |AtP_l|).

Metrics are callables `metric(logits [seq, vocab]) -> scalar`; the provided ones are
`eqx.Module`s whose arrays may carry a leading [P] axis to give each pair its own answer
tokens when clean / corrupted are batches [P, seq] (every grid then gets a leading [P]).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from lens.core.capture import run_with_cache
from lens.core.sweep import chunk_size_for
from models.core import layers as L
from models.core.block import block_forward
from models.core.interventions import Capture, Edits
from models.core.transformer import Transformer

DIRECTIONS = ("denoise", "noise")


class SiteSpec(NamedTuple):
    """How a patch site maps to an Edits field: the cache field the source comes from, the
    Edits field base (`{base}_mix` / `{base}_source`) and the mix's unit axis (None: none)."""

    field: str
    base: str
    unit: str | None


SITES = {
    "resid": SiteSpec("resid_pre", "resid", None),
    "attn_out": SiteSpec("attn_out", "attn_out", None),
    "mlp_out": SiteSpec("mlp_out", "mlp_out", None),
    "heads": SiteSpec("head_z", "head", "heads"),
    "q_input": SiteSpec("resid_pre", "q_input", "heads"),
    "k_input": SiteSpec("resid_pre", "k_input", "kv_heads"),
    "v_input": SiteSpec("resid_pre", "v_input", "kv_heads"),
}
_CAPTURE = Capture(resid=True, sublayers=True, head_z=True)


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
        return jnp.sum(jnp.exp(ref) * (ref - logp))


def logit_diff_metric(correct, wrong, position=-1) -> LogitDiff:
    """The logit difference correct - wrong at `position` (ints, or [P] arrays for pairs)."""
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


def _check_metric(metric, P: int, batched: bool):
    if not callable(metric):
        raise TypeError(f"metric must be a callable logits [seq, vocab] -> scalar; got {type(metric)}")
    for a in jax.tree.leaves(eqx.filter(metric, eqx.is_array)):
        if batched and a.ndim > 0 and a.shape[0] != P:
            raise ValueError(f"metric array of shape {a.shape} does not have one entry per pair ({P})")
        if not batched and a.ndim > 0 and not isinstance(metric, KL):
            raise ValueError(f"metric array of shape {a.shape} for one pair: pass scalars "
                             "(or batch the tokens [P, seq])")


def _check(model, clean, corrupted, metric, site, direction, per_position):
    if site not in SITES:
        raise ValueError(f"site must be one of {sorted(SITES)}; got {site!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'denoise' or 'noise'; got {direction!r}")
    if per_position and site != "heads":
        raise ValueError("per_position=True applies to site 'heads' only (resid, attn_out and "
                         "mlp_out grids are per position already)")
    c, x, batched = check_pair(model, clean, corrupted)
    _check_metric(metric, c.shape[0], batched)
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


def _to_grid(values: Array, site: str, per_position: bool) -> Array:
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


def _edits(model, site, mix, source) -> Edits:
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
        logits = run_from(model, entry[start], tokens, start, _edits(model, site, mix, source))
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
    base, source, batched = _check(model, clean, corrupted, metric, site, direction, per_position)
    P, seq = base.shape
    shape = mix_shape(model, site, seq, per_position)
    spec = SITES[site]
    _, base_cache = run_with_cache(model, base, _CAPTURE)
    _, src_cache = run_with_cache(model, source, _CAPTURE)
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
    grid = _to_grid(grid, site, per_position)
    return grid if batched else grid[0]


# ------------------------------------------------------------------ attribution patching
@eqx.filter_jit
def _mix_grads(model, site, base_tokens, sources, metric, at, batched, extra):
    """(metric of the base run, d metric / d mix at `at`) per pair.  `at`: the mix at which
    to differentiate (zeros; GradDrop sets its frozen layer there); `extra`: edits added to
    every run (GradDrop's frozen writes, arrays with a leading [P] axis), or None."""
    arrays, rest = eqx.partition(metric, eqx.is_array)
    axes = jax.tree.map(lambda a: 0 if batched and a.ndim > 0 else None, arrays)

    def one(tokens, source, a, ex):
        met = eqx.combine(a, rest)

        def f(mix):
            e = _edits(model, site, mix, source)
            if ex is not None:
                e = eqx.combine(e, ex, is_leaf=lambda v: v is None)
            return met(model(tokens, edits=e))

        return jax.value_and_grad(f)(at)

    return jax.vmap(one, in_axes=(0, 0, axes, None if extra is None else 0))(
        base_tokens, sources, arrays, extra)


def attribution_patching(
    model: Transformer,
    clean: Int[Array, " seq"] | Int[Array, "P seq"],
    corrupted: Int[Array, " seq"] | Int[Array, "P seq"],
    metric: Callable[[Float[Array, "seq vocab"]], Float[Array, ""]],
    site: str = "resid",
    direction: str = "denoise",
    per_position: bool = False,
    qk_fix: bool = False,
) -> Float[Array, "*P layers ..."]:
    """Attribution patching (AtP): the same grid as `activation_patching`, estimated to first
    order from one forward and one backward of the base run: cell = metric(base) +
    grad_a metric(base) . (a_source - a_base), computed as d metric / d mix at mix = 0 for
    all sites at once (the site's activation a; for q/k/v_input the residual the head reads).

    qk_fix (AtP*, Kramar et al. 2024; sites q_input / k_input only): the attention pattern
    of the patched head is recomputed exactly (softmax of the patched queries / keys) and only
    the rest is linearised: cell = metric(base) + sum_{q,k} dmetric/dA[q,k] (A' - A)[q,k],
    computed as the derivative along head z' = A' v (z is linear in the pattern)."""
    base, source, batched = _check(model, clean, corrupted, metric, site, direction, per_position)
    if qk_fix and site not in ("q_input", "k_input"):
        raise ValueError(f"qk_fix applies to the q_input / k_input sites only; got {site!r}")
    P = base.shape[0]
    value, est = _estimate(model, base, source, metric, site, per_position, qk_fix, batched)
    grid = value.reshape((P,) + (1,) * (est.ndim - 1)) + est
    return grid if batched else grid[0]


def _node(model, base, source, site, per_position, qk_fix):
    """(the Edits site differentiated, its sources [P, ...], its mix shape)."""
    c = model.config
    if qk_fix:
        z = _qk_fixed_z(model, base, source, "q" if site == "q_input" else "k")
        return "heads", z, (c.n_layers, 1, c.n_heads)
    _, src_cache = run_with_cache(model, source, _CAPTURE)
    return site, getattr(src_cache, SITES[site].field), mix_shape(model, site, base.shape[1], per_position)


def _finish(model, g, site, per_position, qk_fix):
    """d metric / d mix [P, *mix shape] -> the site's grid [P, ...]."""
    c = model.config
    if qk_fix:
        g = g[:, :, 0]  # [P, L, H]
        if site == "k_input":  # a key patch changes every query head of its KV group
            g = g.reshape(g.shape[0], c.n_layers, c.n_kv_heads, -1).sum(-1)
        return g
    return _to_grid(g, site, per_position)


def _estimate(model, base, source, metric, site, per_position, qk_fix, batched):
    """(metric of the base run [P], first-order estimate of each patch's effect [P, *grid])."""
    node, sources, shape = _node(model, base, source, site, per_position, qk_fix)
    value, g = _mix_grads(model, node, base, sources, metric, jnp.zeros(shape, jnp.float32),
                          batched, None)
    return value, _finish(model, g, site, per_position, qk_fix)


def _drop(model, node, sources, shape, b, layer, P):
    """GradDrop at `layer`: (sources, mix point, extra edits) with the layer's attention and
    MLP writes frozen to their base-run values (constants: no gradient through them).  When
    the node's own field is one of them it carries the drop (frozen at `layer`, its other
    layers differentiated at 0; the node's own layer-l estimate is zeroed by the caller)."""
    c = model.config
    one_layer = jnp.zeros((c.n_layers, 1), jnp.float32).at[layer].set(1.0)
    at = jnp.zeros(shape, jnp.float32)
    fields = {}
    for w in ("attn_out", "mlp_out"):
        if w == "mlp_out" and c.attn_only:
            continue
        frozen = jax.lax.stop_gradient(getattr(b, w))
        if w == node:
            at = jnp.broadcast_to(one_layer, shape)
            sources = sources.at[:, layer].set(frozen[:, layer])
        else:
            fields[f"{w}_mix"] = jnp.broadcast_to(one_layer, (P, c.n_layers, 1))
            fields[f"{w}_source"] = frozen
    return sources, at, Edits(**fields)


@eqx.filter_jit
def _drop_grads(model, node, base, sources, metric, at, batched, extra):
    """`_mix_grads` for D GradDrop layers at once (sources, at and extra stacked on [D])."""
    return jax.vmap(lambda s, a, e: _mix_grads(model, node, base, s, metric, a, batched, e)[1])(
        sources, at, extra)


def _qk_fixed_z(model, base, source, which):
    """Head outputs z' [P, L, seq, H, d_head] of the base run with every head's pattern
    recomputed from the source run's queries (which="q") or keys ("k"), base values."""
    cap = Capture(resid=True, qkv=True)
    _, b = run_with_cache(model, base, cap)
    _, s = run_with_cache(model, source, cap)
    return _fixed_z(model, base, b.resid_pre, s.resid_pre, b.v, which)


@eqx.filter_jit
def _fixed_z(model, base, b_resid, s_resid, v, which):
    def one(tokens, b_r, s_r, v):
        qpos, valid = model.default_positions(tokens, None, None, None)

        def layer(l, b_l, s_l, v_l):
            q_r, k_r = (s_l, b_l) if which == "q" else (b_l, s_l)
            return L.attend(attention_pattern(model, l, q_r, k_r, qpos, valid), v_l)

        return jax.vmap(layer)(jnp.arange(model.config.n_layers), b_r, s_r, v)

    return jax.vmap(one)(base, b_resid, s_resid, v)


def attention_pattern(
    model: Transformer, layer: Int[Array, ""], q_resid: Float[Array, "seq d_model"],
    k_resid: Float[Array, "seq d_model"], query_pos: Int[Array, " seq"], valid,
) -> Float[Array, "heads seq seq"]:
    """Block `layer`'s attention pattern with queries read from `q_resid` and keys from
    `k_resid` (each through ln1 with its own divisor, as the q/k input sites do); with both
    the block's own resid_pre it is the model's pattern (checked in the tests)."""
    c = model.config
    blk = jax.tree.map(lambda w: w[layer], model.blocks)

    def proj(r, w, b, norm_w):
        h, _ = L.apply_norm(r, c.norm_kind, blk.ln1_w, blk.ln1_b, c.norm_eps)
        y = jnp.einsum("sd,hdk->shk", h, w)
        y = y if b is None else y + b.astype(y.dtype)
        if c.qk_norm:
            y, _ = L.apply_norm(y, "rms", norm_w, eps=c.norm_eps)
        return y

    q = proj(q_resid, blk.W_Q, blk.b_Q, blk.q_norm_w)
    k = proj(k_resid, blk.W_K, blk.b_K, blk.k_norm_w)
    rot = model.rotary(query_pos)
    is_local = None if c.local_layers is None else jnp.asarray(c.local_layers)[layer]
    if rot.cos is not None:
        cos, sin = rot.cos, rot.sin
        if rot.local_cos is not None:
            cos = jnp.where(is_local, rot.local_cos, cos)
            sin = jnp.where(is_local, rot.local_sin, sin)
        q, k = L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin)
    window = None
    if c.has_local_layers:
        window = jnp.where(is_local, c.sliding_window, jnp.iinfo(jnp.int32).max)
    allowed = L.attention_allowed(query_pos, jnp.where(valid, query_pos, -1), window)
    return L.attention_weights(q, k, allowed, c.scale)


def atp_star(
    model: Transformer,
    clean: Int[Array, " seq"] | Int[Array, "P seq"],
    corrupted: Int[Array, " seq"] | Int[Array, "P seq"],
    metric: Callable[[Float[Array, "seq vocab"]], Float[Array, ""]],
    site: str = "resid",
    direction: str = "denoise",
    per_position: bool = False,
    drop_chunk: int | None = None,
    memory_budget: float = 2**30,
) -> Float[Array, "*P layers ..."]:
    """AtP* (Kramar et al. 2024): UNSIGNED estimates |effect| of every patch of the grid,
    with the QK fix for q_input / k_input and GradDrop: for each layer l the gradient through
    l's residual writes (attention and MLP outputs) is dropped (each frozen to its base-run
    value as a constant source: the same forward, no gradient through it), giving AtP_l;
    the estimate is 1/(L-1) sum_l |AtP_l|.  A node of layer l gets AtP_l = 0 (its only way
    out is the dropped write), hence L - 1.  L forward + backward passes, `drop_chunk` of
    them vmapped at a time (default: what `memory_budget` bytes allow)."""
    base, source, batched = _check(model, clean, corrupted, metric, site, direction, per_position)
    c = model.config
    n, (P, seq) = c.n_layers, base.shape
    qk = site in ("q_input", "k_input")
    node, sources, shape = _node(model, base, source, site, per_position, qk)
    _, b = run_with_cache(model, base, Capture(sublayers=True))
    if drop_chunk is None:  # a backward holds every block's activations: ~n forwards' worth
        drop_chunk = max(1, chunk_size_for(model, 1, 1, P, seq, False, True, False, memory_budget) // n)
    # Never more drops per call than layers: a small model's budget allows thousands, and
    # the padding below would then run thousands of copies of the same drop.
    drop_chunk = min(drop_chunk, n)
    total = 0.0
    for start in range(0, n, drop_chunk):
        layers = list(range(start, min(n, start + drop_chunk)))
        layers += [layers[-1]] * (drop_chunk - len(layers))  # pad: one compilation
        parts = [_drop(model, node, sources, shape, b, layer, P) for layer in layers]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
        g = _drop_grads(model, node, base, *stacked[:1], metric, stacked[1], batched, stacked[2])
        for i, layer in enumerate(layers[: min(n, start + drop_chunk) - start]):
            est = np.abs(np.asarray(_finish(model, g[i], site, per_position, qk)))
            if site != "resid":  # resid_pre[l] also leaves by the skip connection
                est[:, layer] = 0.0
            total = total + est
    star = jnp.asarray(total / max(n - 1, 1))
    return star if batched else star[0]


# ------------------------------------------------------------------ path patching
def path_patching(
    model: Transformer,
    clean: Int[Array, " seq"] | Int[Array, "P seq"],
    corrupted: Int[Array, " seq"] | Int[Array, "P seq"],
    metric: Callable[[Float[Array, "seq vocab"]], Float[Array, ""]],
    receivers: Sequence[tuple[int, int]],
    receiver_input: str = "q",
    direction: str = "noise",
    chunk_size: int | None = None,
    memory_budget: float = 2**30,
) -> Float[Array, "*P layers heads"]:
    """Path patching (Wang et al. 2022, IOI, section 3.1 / appendix B), sender head -> the
    receivers' `receiver_input` ("q", "k" or "v"), for every sender head: grid [layers, heads].

    With base = the run whose behaviour is measured and source = the other input
    (direction "noise", Wang et al.'s: base = clean x_orig, source = corrupted x_new):
      1. cache every head's output z on base and source;
      2. run base with the SENDER's z taken from source and every other head frozen to its
         base z (MLPs and norms recomputed), and record the residual each receiver reads;
      3. run base with only the receivers' q (k, v) input replaced by that residual (each
         through ln1 with its own divisor: what the receiver would have read in run 2), and
         measure the metric.
    A cell is that metric; senders at or after the first receiver's layer cannot reach it
    (their cell is the unpatched base metric).  With grouped-query attention a key / value
    input is per KV head: a receiver (layer, h) patches h's KV head (shared by its group)."""
    if receiver_input not in ("q", "k", "v"):
        raise ValueError(f"receiver_input must be 'q', 'k' or 'v'; got {receiver_input!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'denoise' or 'noise'; got {direction!r}")
    c, x, batched = check_pair(model, clean, corrupted)
    _check_metric(metric, c.shape[0], batched)
    base, source = (x, c) if direction == "denoise" else (c, x)
    cfg = model.config
    P, seq = base.shape
    width = cfg.n_heads if receiver_input == "q" else cfg.n_kv_heads
    recv = np.zeros((cfg.n_layers, 1, width), np.float32)
    if len(receivers) == 0:
        raise ValueError("path_patching needs at least one receiver (layer, head)")
    for layer, head in receivers:
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise ValueError(f"receiver ({layer}, {head}) outside ({cfg.n_layers} layers, "
                             f"{cfg.n_heads} heads)")
        recv[layer, 0, head if receiver_input == "q" else head // (cfg.n_heads // cfg.n_kv_heads)] = 1
    _, b = run_with_cache(model, base, Capture(head_z=True))
    _, s = run_with_cache(model, source, Capture(head_z=True))
    K = cfg.n_layers * cfg.n_heads
    if chunk_size is None:
        chunk_size = max(1, chunk_size_for(model, 1, 1, P, seq, False, True, True, memory_budget) // 2)
    chunk = max(1, min(chunk_size, K))
    out = []
    for i in range(math.ceil(K / chunk)):
        idx = np.minimum(np.arange(i * chunk, (i + 1) * chunk), K - 1)
        used = min(chunk, K - i * chunk)
        vals = _path_chunk(model, base, b.head_z, s.head_z, metric, jnp.asarray(idx),
                           jnp.asarray(recv), receiver_input, batched)
        out.append(np.asarray(vals)[:used])
    grid = jnp.asarray(np.concatenate(out).T.reshape(P, cfg.n_layers, cfg.n_heads))
    return grid if batched else grid[0]


@eqx.filter_jit
def _path_chunk(model, base, base_z, src_z, metric, indices, recv, receiver_input, batched):
    cfg = model.config
    arrays, rest = eqx.partition(metric, eqx.is_array)
    axes = jax.tree.map(lambda a: 0 if batched and a.ndim > 0 else None, arrays)
    dt = model.embed.dtype

    def one(index, tokens, bz, sz, a):
        sender = jax.nn.one_hot(index, cfg.n_layers * cfg.n_heads).reshape(cfg.n_layers, 1, cfg.n_heads)
        z = bz + sender[..., None] * (sz - bz)  # [L, seq, H, d_head]: the sender from source
        frozen = Edits(head_mix=jnp.ones((cfg.n_layers, 1, cfg.n_heads), dt), head_source=z.astype(dt))
        run2 = model.forward(tokens, edits=frozen, capture=Capture(resid=True))
        reads = run2.activations.resid_pre  # what each receiver reads in run 2
        e = Edits(**{f"{receiver_input}_input_mix": recv.astype(dt),
                     f"{receiver_input}_input_source": reads.astype(dt)})
        return eqx.combine(a, rest)(model(tokens, edits=e))

    def per_sender(index):
        f = lambda t, bz, sz, a: one(index, t, bz, sz, a)  # noqa: E731
        return jax.vmap(f, in_axes=(0, 0, 0, axes))(base, base_z, src_z, arrays)

    return jax.vmap(per_sender)(indices)


# ------------------------------------------------------------------ comparing estimates
def compare(effect, estimate, k: int = 10, n_false_negatives: int = 5,
            labels: Sequence[str] | None = None) -> dict:
    """How well an estimate of patch effects matches the true ones (arrays of one shape,
    effects = patched metric - base metric): Pearson correlation of the values and of their
    magnitudes, the overlap of the top-k sites by |effect| (|top-k true ∩ top-k estimate| /
    k; `topk_overlap_ties`: estimate top-k sites within 5% of max |effect| of the true k-th
    count too) and the worst false negatives: the true top-k sites with the lowest |estimate| rank,
    each with its true effect, its estimate and that rank (0 = the largest)."""
    e = np.asarray(effect, np.float64).ravel()
    a = np.asarray(estimate, np.float64).ravel()
    if e.shape != a.shape:
        raise ValueError(f"effect {np.shape(effect)} and estimate {np.shape(estimate)} differ")
    k = min(k, e.size)
    names = labels if labels is not None else [
        str(tuple(int(j) for j in np.unravel_index(i, np.shape(effect)))) for i in range(e.size)]

    def corr(x, y):
        if x.std() == 0 or y.std() == 0:
            return float("nan")
        return float(np.corrcoef(x, y)[0, 1])

    true_top = np.argsort(-np.abs(e), kind="stable")[:k]
    est_rank = np.empty(e.size, np.int64)
    est_rank[np.argsort(-np.abs(a), kind="stable")] = np.arange(e.size)
    est_top = set(np.argsort(-np.abs(a), kind="stable")[:k].tolist())
    worst = sorted(true_top.tolist(), key=lambda i: -est_rank[i])[:n_false_negatives]
    # near-ties (a whole column of cells at ~1) make the plain overlap arbitrary: also count
    # an estimate top-k site whose |effect| is within 5% of max |effect| of the k-th largest
    kth = np.sort(np.abs(e))[::-1][k - 1]
    tol = 0.05 * np.abs(e).max()
    return {
        "pearson": corr(e, a), "pearson_abs": corr(np.abs(e), np.abs(a)),
        "topk": k, "topk_overlap": len(est_top & set(true_top.tolist())) / k,
        "topk_overlap_ties": float(np.mean([abs(e[i]) >= kth - tol for i in est_top])),
        "worst_false_negatives": [
            {"site": names[i], "effect": float(e[i]), "estimate": float(a[i]),
             "estimate_rank": int(est_rank[i])} for i in worst],
    }
