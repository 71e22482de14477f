"""Attribution patching: first-order estimates of `lens.circuits.patching` grids, and how
well an estimate matches the true effects.

    atp = attribution.attribution_patching(model, clean, corrupted, metric, site="resid")   # the grid, estimated
    star = attribution.atp_star(model, clean, corrupted, metric, site="q_input")            # |effect| estimates
    stats = attribution.effect_stats(effect, atp, qk, star, topk=10)                        # each vs the truth (compare_estimate)

Attribution patching (Nanda 2022): AtP = d metric / d mix at mix = 0, which is exactly
grad_a metric(base run) . (a_source - a_base) for the site's activation a, for every site
at once from one forward and one backward.  AtP* (Kramar et al. 2024): the QK fix for the
q_input / k_input sites (the attention pattern recomputed exactly with the patched queries
/ keys, then linearised from the pattern on) and GradDrop (the gradient through each
layer's residual writes dropped in turn; 1/(L-1) sum_l |AtP_l|).
"""

from __future__ import annotations

from typing import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lens.circuits.patching import SITES, SOURCE_CAPTURE, check_inputs, mix_shape, site_edits, to_grid
from lens.core.capture import run_with_cache
from lens.core.sweep import chunk_size_for
from lens.models.core import layers as L
from lens.models.core.interventions import Capture, Edits
from lens.models.core.transformer import Transformer


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
            e = site_edits(model, site, mix, source)
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
    base, source, batched = check_inputs(model, clean, corrupted, metric, site, direction, per_position)
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
    _, src_cache = run_with_cache(model, source, SOURCE_CAPTURE)
    return site, getattr(src_cache, SITES[site].field), mix_shape(model, site, base.shape[1], per_position)


def _finish(model, g, site, per_position, qk_fix):
    """d metric / d mix [P, *mix shape] -> the site's grid [P, ...]."""
    c = model.config
    if qk_fix:
        g = g[:, :, 0]  # [P, L, H]
        if site == "k_input":  # a key patch changes every query head of its KV group
            g = g.reshape(g.shape[0], c.n_layers, c.n_kv_heads, -1).sum(-1)
        return g
    return to_grid(g, site, per_position)


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
    return L.attention_weights(q, k, allowed, c.scale, c.attn_logit_softcap)


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
    base, source, batched = check_inputs(model, clean, corrupted, metric, site, direction, per_position)
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


def compare_estimate(effect, estimate, k: int = 10, n_false_negatives: int = 5,
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


def effect_stats(effect: Float[np.ndarray, "P ..."], atp: Float[np.ndarray, "P ..."],
                 qk: Float[np.ndarray, "P ..."] | None, star: Float[np.ndarray, "P ..."], topk: int) -> dict:
    """`compare_estimate` of each estimate with the true effects, over pair means: AtP ("atp"), the
    QK-fixed AtP where given ("atp_qk_fix"), and AtP* ("atp_star", unsigned, so compared
    with the pair mean of |effect|).  All arrays [P, *grid]."""
    out = {"atp": compare_estimate(effect.mean(0), atp.mean(0), topk)}
    if qk is not None:
        out["atp_qk_fix"] = compare_estimate(effect.mean(0), qk.mean(0), topk)
    out["atp_star"] = compare_estimate(np.abs(effect).mean(0), star.mean(0), topk)
    return out
