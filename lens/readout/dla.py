"""Direct logit attribution that is honest about the final norm.

    parts = lens.readout.dla.residual_parts(model, tokens)        # [n_parts, seq, d_model]
    names = lens.readout.dla.part_names(model.config)             # "embed", "pos_embed", "L3H5", "L3.attn_bias", "L3.mlp"
    res = lens.readout.dla.frozen_dla(model, parts, tokens, target, baseline)   # (a): parts sum exactly
    phi = lens.readout.dla.shapley_exact(model, group_vectors, scale_ref, u, ...)   # (b): norm-aware

The final residual is a sum of what was written into it: the token embedding (times
Gemma's sqrt(d) factor), the learned positions, every head's `z_h W_O[h]`, each
attention output bias, every MLP output.  The logit of token t (or the difference t - b)
is `u . (gamma * P x / s + beta) + b_U` with u = W_U[t] (- W_U[b]), P the LayerNorm
centring (identity for RMSNorm) and s the final norm's divisor, which depends on ALL of x.

(a) Frozen-scale DLA: hold s at its actual value; then the logit is linear in the parts:
    part_c = (u * gamma) . (P c) / s, and sum_c part_c = logit - constant, constant =
    u . beta + b_U[t] (- b_U[b]).  Exact (float32 rounding).  LayerNorm's centring is
    applied to each part (P is linear); RMSNorm has none.
(b) Norm-aware: the Shapley value of each part (or group of parts) for the game
    f(S) = u . norm(sum_{c in S} c) + b, where the norm recomputes its divisor from the
    partial sum.  Also complete (sums to logit - f(empty) = logit - constant, since the
    norm of 0 is beta), but it credits a part with what it does to the divisor: a part
    that grows |x| lowers every other part's share.  Exact over few groups (2^G
    evaluations of one norm each), sampled permutations (with a standard error) over many.
    With the divisor frozen, the game is linear and (b) equals (a) exactly.

Gemma's sandwich norms: a sub-block's write to the residual is AFTER its post-norm
(`post_attn_w`, `post_mlp_w`), so `mlp_out` is already the normed output; per-head parts
are `gamma_post * (z_h W_O[h]) / s_post` with that post-norm's actual divisor s_post
(frozen, the same choice as (a) makes for the final norm), which sum to the attention
output exactly.  Gemma's final logit soft-capping is not linear: attributions here are of
the logit BEFORE the cap (`pre_softcap_logits`).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from lens.core.stats import spearman
from lens.models.core import layers
from lens.models.core.config import ModelConfig
from lens.models.core.interventions import Capture
from lens.models.core.transformer import Transformer


def part_names(config: ModelConfig) -> list[str]:
    """Names of `residual_parts`'s rows, in order."""
    names = ["embed"] + (["pos_embed"] if config.positional == "learned" else [])
    for layer in range(config.n_layers):
        names += [f"L{layer}H{h}" for h in range(config.n_heads)]
        if config.attn_out_bias:
            names.append(f"L{layer}.attn_bias")
        if not config.attn_only:
            names.append(f"L{layer}.mlp")
    return names


def residual_parts(
    model: Transformer,
    tokens: Int[Array, " seq"],
    attention_mask: Bool[Array, " seq"] | None = None,
) -> Float[Array, "parts seq d_model"]:
    """Everything written into the final residual, one row per `part_names` entry; the
    rows sum to the final norm's input (float32).  One forward with captures."""
    c = model.config
    out = model.forward(tokens, attention_mask,
                        capture=Capture(resid=True, sublayers=True, head_z=True, norms=True))
    acts = out.activations
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    x0 = f32(acts.resid_pre[0])
    rows = []
    if c.positional == "learned":
        positions, _ = model.default_positions(jnp.asarray(tokens, jnp.int32), attention_mask, None, None)
        pos = f32(model.pos_embed[positions])
        rows += [x0 - pos, pos]  # the embedding row is what entered minus the positions: exact
    else:
        rows.append(x0)
    b = model.blocks
    heads = jnp.einsum("lshk,lhkd->lshd", f32(acts.head_z), f32(b.W_O))  # [L, seq, H, d]
    bias = None if b.b_O is None else jnp.broadcast_to(f32(b.b_O)[:, None, None, :], heads[:, :, :1].shape)
    if c.sandwich_norms:
        heads, bias = _through_post_norm(c, heads, bias, b)
    per_layer = [heads]  # [L, seq, k, d] blocks, concatenated on k
    if bias is not None:
        per_layer.append(bias)
    if not c.attn_only:
        per_layer.append(f32(acts.mlp_out)[:, :, None])
    blocks = jnp.concatenate(per_layer, axis=2)  # [L, seq, parts_per_layer, d]
    blocks = jnp.moveaxis(blocks, 2, 1).reshape(-1, blocks.shape[1], blocks.shape[3])
    return jnp.concatenate([jnp.stack(rows), blocks], axis=0)


def _through_post_norm(c: ModelConfig, heads, bias, b):
    """Per-head writes after a sandwich post-attention norm, its divisor frozen at the
    actual one: gamma * P(head) / s (+ beta on the bias row), summing to attn_out."""
    raw = heads.sum(2) + (0.0 if bias is None else bias[:, :, 0])
    _, s = jax.vmap(lambda r, w: layers.apply_norm(r, c.norm_kind, w, None, c.norm_eps))(raw, b.post_attn_w)
    gamma = b.post_attn_w.astype(jnp.float32)[:, None, None, :]
    center = (lambda v: v - v.mean(-1, keepdims=True)) if c.norm_kind == "layer" else (lambda v: v)
    heads = gamma * center(heads) / s[:, :, None, None]
    if bias is not None:
        bias = gamma * center(bias) / s[:, :, None, None]
    return heads, bias


def logit_direction(model: Transformer, target: int, baseline: int | None = None):
    """(u [d], bu []): W_U[target] (- W_U[baseline]) and the matching unembedding-bias
    difference (0 without an unembedding bias)."""
    v = model.config.vocab_size
    for t in (target, baseline):  # concrete ids are checked here; traced ones by the caller
        if t is not None and not isinstance(t, jax.core.Tracer) and not 0 <= int(t) < v:
            raise ValueError(f"token {t} out of range [0, {v})")
    w_u = model.W_U.astype(jnp.float32)
    u = w_u[target] - (0.0 if baseline is None else w_u[baseline])
    bu = 0.0
    if model.unembed_b is not None:
        ub = model.unembed_b.astype(jnp.float32)
        bu = ub[target] - (0.0 if baseline is None else ub[baseline])
    return u, jnp.asarray(bu, jnp.float32)


class Attribution(eqx.Module):
    """parts [n]: each part's share; constant: what no part writes (norm bias, unembedding
    bias); total: the model's (pre-softcap) logit or logit difference."""

    parts: Float[Array, " n"]
    constant: Float[Array, ""]
    total: Float[Array, ""]


def _norm_terms(model: Transformer):
    c = model.config
    gamma = model.final_norm_w.astype(jnp.float32)
    beta = None if model.final_norm_b is None else model.final_norm_b.astype(jnp.float32)
    return c, gamma, beta


def final_divisor(model: Transformer, x: Float[Array, "... d_model"]) -> Float[Array, "..."]:
    """The final norm's divisor of x (the model's own apply_norm)."""
    c, gamma, beta = _norm_terms(model)
    return layers.apply_norm(x.astype(jnp.float32), c.norm_kind, gamma, beta, c.norm_eps)[1]


def normed_logit(model: Transformer, x: Float[Array, "... d_model"], u: Float[Array, " d_model"],
                 bu: Float[Array, ""], scale: Float[Array, "..."] | None = None) -> Float[Array, "..."]:
    """u . final_norm(x) + bu, the divisor recomputed from x (or `scale` if given)."""
    c, gamma, beta = _norm_terms(model)
    edit = None if scale is None else (jnp.ones_like(scale), scale)
    y, _ = layers.apply_norm(x.astype(jnp.float32), c.norm_kind, gamma, beta, c.norm_eps, edit)
    return y @ u + bu


def frozen_dla(
    model: Transformer,
    parts: Float[Array, "n d_model"],
    u: Float[Array, " d_model"],
    bu: Float[Array, ""],
) -> Attribution:
    """(a) at one position: part_c = (u * gamma) . P c / s with s the final norm's actual
    divisor of sum(parts); exactly sum(parts) + constant = the logit (direction u)."""
    c, gamma, beta = _norm_terms(model)
    x = parts.sum(0)
    s = final_divisor(model, x)
    centred = parts - parts.mean(-1, keepdims=True) if c.norm_kind == "layer" else parts
    shares = centred @ (u * gamma) / s
    constant = bu + (0.0 if beta is None else beta @ u)
    return Attribution(shares, jnp.asarray(constant, jnp.float32), normed_logit(model, x, u, bu))


# ----------------------------------------------------------------------- (b) Shapley
def subset_masks(g: int) -> np.ndarray:
    """All 2^g subsets of g players as a bool array [2^g, g] (bit i of the row index)."""
    if not 1 <= g <= 20:
        raise ValueError(f"exact Shapley needs 1 <= groups <= 20; got {g}")
    idx = np.arange(2 ** g)
    return ((idx[:, None] >> np.arange(g)[None]) & 1).astype(bool)


def shapley_exact(
    model: Transformer,
    groups: Float[Array, "g d_model"],
    u: Float[Array, " d_model"],
    bu: Float[Array, ""],
    frozen_scale: bool = False,
) -> Float[Array, " g"]:
    """Exact Shapley values of the g groups for f(S) = normed_logit(sum_{S} groups): 2^g
    norm evaluations.  frozen_scale: the divisor held at that of the full sum (then f is
    linear and the values equal `frozen_dla`'s, a check of the machinery)."""
    g = groups.shape[0]
    masks = subset_masks(g)
    scale = final_divisor(model, groups.sum(0)) if frozen_scale else None
    xs = jnp.asarray(masks, jnp.float32) @ groups  # [2^g, d]
    f = normed_logit(model, xs, u, bu, None if scale is None else jnp.broadcast_to(scale, xs.shape[:1]))
    idx = np.arange(2 ** g)
    sizes = masks.sum(1)
    phi = []
    for i in range(g):
        without = idx[~masks[:, i]]
        k = sizes[without]
        w = np.array([math.factorial(int(a)) * math.factorial(g - int(a) - 1) for a in k]) / math.factorial(g)
        phi.append(jnp.sum(jnp.asarray(w, jnp.float32) * (f[without | (1 << i)] - f[without])))
    return jnp.stack(phi)


def shapley_sampled(
    model: Transformer,
    parts: Float[Array, "n d_model"],
    u: Float[Array, " d_model"],
    bu: Float[Array, ""],
    key: Array,
    n_permutations: int = 256,
) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
    """(Shapley estimate [n], standard error [n]) from n_permutations random orders, each
    with its reverse (antithetic pairs, counted as one draw for the error).  Each order
    costs n + 1 norm evaluations; every estimate sums exactly to f(all) - f(empty)."""
    n = parts.shape[0]
    if n_permutations < 2:
        raise ValueError("n_permutations must be >= 2 (the standard error needs two draws)")

    def marginals(order):
        prefix = jnp.concatenate([jnp.zeros((1, parts.shape[1]), jnp.float32),
                                  jnp.cumsum(parts[order].astype(jnp.float32), axis=0)])
        f = normed_logit(model, prefix, u, bu)
        return jnp.zeros((n,), jnp.float32).at[order].set(jnp.diff(f))

    def pair(k):
        order = jax.random.permutation(k, n)
        return 0.5 * (marginals(order) + marginals(order[::-1]))

    draws = jax.lax.map(pair, jax.random.split(key, n_permutations))
    return draws.mean(0), draws.std(0, ddof=1) / jnp.sqrt(n_permutations)


# ------------------------------------------------------------------------ groupings
def layer_groups(config: ModelConfig) -> tuple[list[str], np.ndarray]:
    """(names, membership [groups, parts]): "embed" (token + positions), then per layer
    "L{l}.attn" (its heads and output bias) and "L{l}.mlp"."""
    names = part_names(config)
    groups = ["embed"] + [f"L{layer}.{k}" for layer in range(config.n_layers)
                          for k in (("attn",) if config.attn_only else ("attn", "mlp"))]
    member = np.zeros((len(groups), len(names)), bool)
    for j, name in enumerate(names):
        if name in ("embed", "pos_embed"):
            member[0, j] = True
            continue
        layer, rest = name[1:].split("H", 1) if "." not in name else name[1:].split(".", 1)
        kind = "mlp" if rest == "mlp" else "attn"
        member[groups.index(f"L{int(layer)}.{kind}"), j] = True
    return groups, member


def pre_softcap_logits(model: Transformer, logits: Float[Array, "... vocab"]) -> Float[Array, "... vocab"]:
    """Undo Gemma-style final soft-capping (identity when the config has none)."""
    cap = model.config.final_logit_softcap
    return logits if cap is None else cap * jnp.arctanh(logits / cap)


@jax.jit
def disagreement(a: Float[Array, " parts"], b: Float[Array, " parts"]) -> dict[str, Float[Array, ""]]:
    """How far attribution `b` is from the reference `a` over the same parts (jit/vmap-able):
    `rel_l1` sum|a - b| / sum|a|; `abs_ratio` sum|b| / sum|a|; `spearman` rank correlation
    (`lens.core.stats.spearman`); `top5_overlap` the share of the top-5 parts by |a| also
    in the top-5 by |b|; `top10_sign_flips` the share of the top-10 parts by |a| whose sign
    b flips (5 and 10 capped at the number of parts)."""
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"disagreement takes two attributions of the same parts; got {a.shape}, {b.shape}")
    n = a.shape[0]
    k5, k10 = min(5, n), min(10, n)
    top_a = jax.lax.top_k(jnp.abs(a), k10)[1]
    top_b = jax.lax.top_k(jnp.abs(b), k5)[1]
    shared = (top_a[:k5, None] == top_b[None, :]).any(-1).sum()
    abs_a = jnp.abs(a).sum()
    return {"rel_l1": jnp.abs(a - b).sum() / abs_a,
            "abs_ratio": jnp.abs(b).sum() / abs_a,
            "spearman": spearman(a, b),
            "top5_overlap": shared / k5,
            "top10_sign_flips": jnp.mean(jnp.sign(a[top_a]) != jnp.sign(b[top_a]))}
