"""OLMo 2: norms AFTER attention and after the MLP (on the sub-layer outputs; no norm
before either), and q / k RMSNorms over the whole q / k projection (not per head).

    x = x + post_attention_layernorm(attn(x))     # attn's q = q_norm(q_proj x) [heads * d_head]
    x = x + post_feedforward_layernorm(mlp(x))

Flags: pre_norms=False, sandwich_norms=True (the post-norms), qk_norm=True with
qk_norm_over="all".  HF key map (per layer i, prefix `model.layers.{i}.`):

    self_attn.{q,k,v}_proj.weight (+ bias)  -> W_Q / W_K / W_V  [heads, d_model, d_head]
    self_attn.o_proj.weight (+ bias)        -> W_O [heads, d_head, d_model] (b_O)
    self_attn.q_norm.weight                 -> q_norm_w [heads * d_head]
    self_attn.k_norm.weight                 -> k_norm_w [kv_heads * d_head]
    post_attention_layernorm.weight         -> post_attn_w  (norms the attention OUTPUT)
    mlp.up_proj / gate_proj / down_proj     -> W_in / W_gate / W_out
    post_feedforward_layernorm.weight       -> post_mlp_w   (norms the MLP output)
top level: model.embed_tokens.weight -> embed, model.norm.weight -> final_norm_w,
           lm_head.weight -> unembed (absent when tied).
"""

from __future__ import annotations

import numpy as np

from ..core.config import GENERIC_HF_FIELDS, ModelConfig, eos_ids, refuse_unknown, rope_from_hf
from ..io.convert import TensorTaker, assemble, heads_bias, heads_in, heads_out, take_unembedding

OLMO2_FIELDS = GENERIC_HF_FIELDS | {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling", "attention_bias", "head_dim",
}


def rope_checked(hf: dict, family: str):
    """(theta, scaling) refusing partial rotary (none of these families has it)."""
    theta, scaling, partial = rope_from_hf(hf, family)
    if partial not in (None, 1.0):
        raise ValueError(f"{family}: partial_rotary_factor={partial} is not supported")
    return theta, scaling


def config_from_hf(hf: dict) -> ModelConfig:
    """OLMo 2 `config.json` dict -> ModelConfig (refusing unknown fields)."""
    refuse_unknown(hf, OLMO2_FIELDS, "olmo2")
    theta, scaling = rope_checked(hf, "olmo2")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        architecture="olmo2",
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_head=hf.get("head_dim") or d_model // n_heads,
        d_mlp=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        norm_kind="rms",
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        activation=hf.get("hidden_act", "silu"),
        gated_mlp=True,
        positional="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        qk_norm=True,
        qk_norm_over="all",
        sandwich_norms=True,
        pre_norms=False,
        attn_bias=bias,
        attn_out_bias=bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
        pad_token_id=hf.get("pad_token_id"),
    )


def take_attention(t: TensorTaker, c: ModelConfig, a: str) -> dict:
    """One layer's attention tensors under prefix `a` (`model.layers.{i}.self_attn.`),
    with q / k norms over the whole projection when the config has them (OLMo 2, OLMoE)."""
    d, h, kv, dh = c.d_model, c.n_heads, c.n_kv_heads, c.d_head
    layer = {
        "W_Q": heads_in(t.take(a + "q_proj.weight", (h * dh, d)), h),
        "W_K": heads_in(t.take(a + "k_proj.weight", (kv * dh, d)), kv),
        "W_V": heads_in(t.take(a + "v_proj.weight", (kv * dh, d)), kv),
        "W_O": heads_out(t.take(a + "o_proj.weight", (d, h * dh)), h),
    }
    if c.qk_norm:
        layer["q_norm_w"] = t.take(a + "q_norm.weight", (h * dh,))
        layer["k_norm_w"] = t.take(a + "k_norm.weight", (kv * dh,))
    if c.attn_bias:
        layer["b_Q"] = heads_bias(t.take(a + "q_proj.bias", (h * dh,)), h)
        layer["b_K"] = heads_bias(t.take(a + "k_proj.bias", (kv * dh,)), kv)
        layer["b_V"] = heads_bias(t.take(a + "v_proj.bias", (kv * dh,)), kv)
    if c.attn_out_bias:
        layer["b_O"] = t.take(a + "o_proj.bias", (d,))
    return layer


def take_top(t: TensorTaker, c: ModelConfig) -> dict:
    top = {
        "embed": t.take("model.embed_tokens.weight", (c.vocab_size, c.d_model)),
        "final_norm_w": t.take("model.norm.weight", (c.d_model,)),
    }
    top["unembed"] = take_unembedding(t, c, top["embed"])
    return top


def convert(config: ModelConfig, tensors: dict[str, np.ndarray], dtype):
    """HF-named tensors -> Transformer, walking the key map above."""
    t = TensorTaker(tensors, ignore=lambda k: k.endswith("rotary_emb.inv_freq"))
    c = config
    d, m = c.d_model, c.d_mlp
    layers = []
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        layer = take_attention(t, c, p + "self_attn.")
        layer |= {
            "post_attn_w": t.take(p + "post_attention_layernorm.weight", (d,)),
            "W_in": t.take(p + "mlp.up_proj.weight", (m, d)).T,
            "W_gate": t.take(p + "mlp.gate_proj.weight", (m, d)).T,
            "W_out": t.take(p + "mlp.down_proj.weight", (d, m)).T,
            "post_mlp_w": t.take(p + "post_feedforward_layernorm.weight", (d,)),
        }
        layers.append(layer)
    top = take_top(t, c)
    t.finish()
    return assemble(c, top, layers, dtype)
