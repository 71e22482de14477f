"""One transformer block, written once for every family.

Weights are kept in the per-head layout interpretability work wants (W_Q [heads,
d_model, d_head], W_O [heads, d_head, d_model], ...).  A `Block` instance inside a
`Transformer` holds every layer stacked on a leading [layers] axis, and the forward
`lax.scan`s `block_forward` over it, so the model compiles once however deep it is.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from . import layers, moe
from .config import ModelConfig
from .interventions import Activations, Capture, Edits


class Block(eqx.Module):
    ln1_w: Float[Array, "d_model"] | None  # None without pre-norms (OLMo 2)
    ln1_b: Float[Array, "d_model"] | None
    W_Q: Float[Array, "heads d_model d_head"]
    b_Q: Float[Array, "heads d_head"] | None
    W_K: Float[Array, "kv_heads d_model d_head"]
    b_K: Float[Array, "kv_heads d_head"] | None
    W_V: Float[Array, "kv_heads d_model d_head"]
    b_V: Float[Array, "kv_heads d_head"] | None
    W_O: Float[Array, "heads d_head d_model"]
    b_O: Float[Array, "d_model"] | None
    q_norm_w: Float[Array, "d_head"] | None  # [heads * d_head] with qk_norm_over="all"
    k_norm_w: Float[Array, "d_head"] | None  # [kv_heads * d_head] with qk_norm_over="all"
    post_attn_w: Float[Array, "d_model"] | None  # sandwich norm on the attention output
    ln2_w: Float[Array, "d_model"] | None  # None in attn_only models
    ln2_b: Float[Array, "d_model"] | None
    W_in: Float[Array, "d_model d_mlp"] | None
    b_in: Float[Array, "d_mlp"] | None
    W_gate: Float[Array, "d_model d_mlp"] | None
    b_gate: Float[Array, "d_mlp"] | None  # Llama with mlp_bias
    W_out: Float[Array, "d_mlp d_model"] | None
    b_out: Float[Array, "d_model"] | None
    post_mlp_w: Float[Array, "d_model"] | None  # sandwich norm on the MLP output
    # mixture of experts (models/core/moe.py), in place of W_in / W_gate / W_out
    W_router: Float[Array, "d_model experts"] | None = None
    W_in_experts: Float[Array, "experts d_model d_mlp"] | None = None
    W_gate_experts: Float[Array, "experts d_model d_mlp"] | None = None
    W_out_experts: Float[Array, "experts d_mlp d_model"] | None = None


BLOCK_FIELDS = tuple(f.name for f in dataclasses.fields(Block))
BLOCK_MATRICES = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_gate", "W_out")


class Bf16Matmul(eqx.Module):
    """A `Block` matrix whose products are computed in bf16 by XLA: the input is rounded to
    bf16 and multiplied by `w` (the weight in bf16, `Block`'s layout) with float32 products
    and sums, then cast to the input's dtype (on a GPU/TPU the bf16 matrix units; on a CPU
    XLA widens to float32, the same numbers).  See `bf16_matmul_blocks`."""

    w: Array

    @property
    def dtype(self):
        return self.w.dtype

    def apply(self, x: Array, spec: str) -> Array:
        """`jnp.einsum(spec, bf16(x), w)` summed in float32."""
        return jnp.einsum(spec, x.astype(jnp.bfloat16), self.w, preferred_element_type=jnp.float32)


def bf16_matmul_blocks(blocks: Block) -> Block:
    """`blocks` (one layer, or every layer stacked) with each matrix of BLOCK_MATRICES a
    `Bf16Matmul`: the forward then computes every block matmul in bf16 with float32 sums,
    while norms, softmax, activations and residuals stay in the model's dtype.  A bf16 copy
    of the block matrices (lens.modularity.pruning's compute_dtype="bfloat16")."""
    names = [n for n in BLOCK_MATRICES if getattr(blocks, n) is not None]
    return eqx.tree_at(lambda b: [getattr(b, n) for n in names], blocks,
                       [Bf16Matmul(getattr(blocks, n).astype(jnp.bfloat16)) for n in names])


@dataclasses.dataclass(frozen=True)
class Rotary:
    """Per-forward rotary tables: global ones, and Gemma's local ones where present."""

    cos: Array | None
    sin: Array | None
    local_cos: Array | None = None
    local_sin: Array | None = None


def _ablate(x: Float[Array, "seq d"], dirs: Float[Array, "n d"] | None) -> Float[Array, "seq d"]:
    if dirs is None:
        return x
    coeffs = jnp.einsum("sd,nd->sn", x, dirs.astype(x.dtype))
    return x - jnp.einsum("sn,nd->sd", coeffs, dirs.astype(x.dtype))


def edit_resid(x: Float[Array, "seq d_model"], edits: Edits | None) -> Float[Array, "seq d_model"]:
    """Steps 1-3b of the edit order (see models/core/interventions.py) for one layer."""
    if edits is None:
        return x
    x = edits.mixed(x, "resid")
    x = _ablate(x, edits.resid_ablate)
    if edits.resid_add is not None:
        x = x + edits.resid_add.astype(x.dtype)
    if edits.resid_fn is not None:  # 3b. the custom edit, bound to this block (ResidFn.at)
        x = edits.resid_fn(x)
    return x


def _scale_edit(edits: Edits | None, norm: str):
    """(mix, source) of a norm-divisor edit for `apply_norm`, or None."""
    if edits is None or getattr(edits, f"{norm}_scale_mix") is None:
        return None
    return getattr(edits, f"{norm}_scale_mix"), getattr(edits, f"{norm}_scale_source")


def _linear(x, w, b, spec):
    if isinstance(w, Bf16Matmul):  # bf16 compute (`bf16_matmul_blocks`)
        y = w.apply(x, spec).astype(jnp.result_type(x.dtype, w.dtype))
        return y if b is None else y + b.astype(y.dtype)
    y = jnp.einsum(spec, x, w)
    return y if b is None else y + b.astype(y.dtype)


def block_forward(
    config: ModelConfig,
    block: Block,
    x: Float[Array, "seq d_model"],
    query_pos: Int[Array, " seq"],
    *,
    key_pos: Int[Array, " keys"],
    rotary: Rotary,
    is_local: Bool[Array, ""] | None = None,
    edits: Edits | None = None,
    capture: Capture = Capture(),
    kv: tuple[Array, Array] | None = None,
    write_index: Int[Array, ""] | None = None,
) -> tuple[Float[Array, "seq d_model"], tuple[Array, Array] | None, Activations]:
    """Run one block on one sequence.

    kv: this layer's cache (k, v each [cache_len, kv_heads, d_head]) or None for a plain
    forward, in which case the keys are this sequence's own (key_pos = query positions,
    -1 at padding).  Returns (resid_post, updated kv, this layer's captures).
    """
    c = config
    x = edit_resid(x, edits)
    resid_pre = x

    def norm1(y, scale_edit=None):
        if not c.pre_norms:  # OLMo 2: the sub-layers read the stream itself
            return y, None
        return layers.apply_norm(y, c.norm_kind, block.ln1_w, block.ln1_b, c.norm_eps, scale_edit)

    h, ln1_scale = norm1(x, _scale_edit(edits, "ln1"))
    qkv = []
    for site, w, b in (("q", block.W_Q, block.b_Q), ("k", block.W_K, block.b_K),
                       ("v", block.W_V, block.b_V)):
        mix = None if edits is None else getattr(edits, f"{site}_input_mix")
        if mix is None:
            qkv.append(_linear(h, w, b, "sd,hdk->shk"))
        else:
            # Path patching: head j reads norm(x + mix_j * (source - x)) (its own divisor).
            source = getattr(edits, f"{site}_input_source")
            xs = x[:, None, :]
            source = jnp.zeros_like(xs) if source is None else source[:, None, :].astype(x.dtype)
            inputs, _ = norm1(xs + mix[..., None].astype(x.dtype) * (source - xs))
            qkv.append(_linear(inputs, w, b, "shd,hdk->shk"))
    q, k, v = qkv
    if c.qk_norm and c.qk_norm_over == "all":  # OLMo 2 / OLMoE: over the whole projection
        q = layers.apply_norm(q.reshape(*q.shape[:-2], -1), "rms", block.q_norm_w,
                              eps=c.norm_eps)[0].reshape(q.shape)
        k = layers.apply_norm(k.reshape(*k.shape[:-2], -1), "rms", block.k_norm_w,
                              eps=c.norm_eps)[0].reshape(k.shape)
    elif c.qk_norm:
        q, _ = layers.apply_norm(q, "rms", block.q_norm_w, eps=c.norm_eps)
        k, _ = layers.apply_norm(k, "rms", block.k_norm_w, eps=c.norm_eps)
    q_cap, k_cap, v_cap = (q, k, v) if capture.qkv else (None, None, None)
    if rotary.cos is not None:
        cos, sin = rotary.cos, rotary.sin
        if rotary.local_cos is not None:
            cos = jnp.where(is_local, rotary.local_cos, cos)
            sin = jnp.where(is_local, rotary.local_sin, sin)
        q = layers.apply_rope(q, cos, sin)
        k = layers.apply_rope(k, cos, sin)

    if kv is not None:
        cache_k = _write(kv[0], k, write_index)
        cache_v = _write(kv[1], v, write_index)
        kv, k, v = (cache_k, cache_v), cache_k, cache_v

    window = None
    if c.has_local_layers:
        big = jnp.iinfo(jnp.int32).max
        window = jnp.where(is_local, c.sliding_window, big)
    allowed = layers.attention_allowed(query_pos, key_pos, window)
    pattern = layers.attention_weights(q, k, allowed, c.scale, c.attn_logit_softcap)
    z = layers.attend(pattern, v)
    if edits is not None:
        z = edits.mixed(z, "head")
    attn_out = _linear(z, block.W_O, block.b_O, "shk,hkd->sd")
    if c.sandwich_norms:
        attn_out, _ = layers.apply_norm(attn_out, c.norm_kind, block.post_attn_w, eps=c.norm_eps)
    if edits is not None:
        attn_out = _ablate(edits.mixed(attn_out, "attn_out"), edits.writer_ablate)

    resid_mid = x + attn_out
    routed = (None,) * 4  # MoE: expert neurons, router logits, combining weights, chosen
    if c.attn_only:  # no MLP sub-block at all (TransformerLens attn_only)
        neurons = ln2_scale = None
        mlp_out = jnp.zeros_like(resid_mid)
    else:
        mlp_in = x if c.parallel_residual else resid_mid
        if c.pre_norms:
            h2, ln2_scale = layers.apply_norm(mlp_in, c.norm_kind, block.ln2_w, block.ln2_b,
                                              c.norm_eps, _scale_edit(edits, "ln2"))
        else:
            h2, ln2_scale = mlp_in, None
        if c.is_moe:
            mlp_out, *routed = moe.moe_mlp(c, block, h2, edits)
            neurons = None
        else:
            act = layers.activation_fn(c.activation)
            pre = _linear(h2, block.W_in, block.b_in, "sd,dm->sm")
            if c.gated_mlp:
                neurons = act(_linear(h2, block.W_gate, block.b_gate, "sd,dm->sm")) * pre
            else:
                neurons = act(pre)
            if edits is not None:
                neurons = edits.mixed(neurons, "neuron")
            mlp_out = _linear(neurons, block.W_out, block.b_out, "sm,md->sd")
        if c.sandwich_norms:
            mlp_out, _ = layers.apply_norm(mlp_out, c.norm_kind, block.post_mlp_w, eps=c.norm_eps)
        if edits is not None:
            mlp_out = _ablate(edits.mixed(mlp_out, "mlp_out"), edits.writer_ablate)
    resid_post = resid_mid + mlp_out

    acts = Activations(
        resid_pre=resid_pre if capture.resid else None,
        resid_mid=resid_mid if capture.resid else None,
        resid_post=resid_post if capture.resid else None,
        attn_out=attn_out if capture.sublayers else None,
        mlp_out=mlp_out if capture.sublayers else None,
        head_z=z if capture.head_z else None,
        neurons=neurons if capture.neurons else None,
        attn_pattern=pattern if capture.attn_pattern else None,
        ln1_scale=ln1_scale if capture.norms else None,
        ln2_scale=ln2_scale if capture.norms else None,
        q=q_cap, k=k_cap, v=v_cap,
        expert_neurons=routed[0] if capture.neurons else None,
        router_logits=routed[1] if capture.router else None,
        expert_weights=routed[2] if capture.router else None,
        chosen_experts=routed[3] if capture.router else None,
    )
    return resid_post, kv, acts


def _write(buffer: Array, new: Array, index: Array) -> Array:
    """Write `new` [seq, ...] into `buffer` [cache_len, ...] starting at slot `index`."""
    start = (index,) + (0,) * (buffer.ndim - 1)
    return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)
