"""Llama family (SmolLM2, Llama 2/3) and Qwen2 (Llama plus q/k/v biases); its key map and
config reading also serve Mistral, Qwen3 and Phi-3 (their own small files).

RMSNorm, RoPE (config theta and scaling), GQA/MQA, SwiGLU, tied or untied embeddings,
explicit head_dim.  HF key map (per layer i, prefix `model.layers.{i}.`):

    input_layernorm.weight            -> ln1_w
    self_attn.{q,k,v}_proj.weight     -> W_Q / W_K / W_V   [heads, d_model, d_head]
    self_attn.{q,k,v}_proj.bias       -> b_Q / b_K / b_V   (Qwen2, attention_bias)
    self_attn.o_proj.weight (+ bias)  -> W_O [heads, d_head, d_model] (b_O)
    self_attn.{q,k}_norm.weight       -> q_norm_w / k_norm_w [d_head]  (Qwen3, qk_norm)
    post_attention_layernorm.weight   -> ln2_w
    mlp.up_proj / gate_proj / down_proj (+ biases if mlp_bias) -> W_in / W_gate / W_out
                                         (b_in / b_gate / b_out)
top level: model.embed_tokens.weight -> embed, model.norm.weight -> final_norm_w,
           lm_head.weight -> unembed (absent when tied).
"""

from __future__ import annotations

import numpy as np

from ..core.config import GENERIC_HF_FIELDS, ModelConfig, eos_ids, refuse_unknown, rope_from_hf
from ..io.convert import TensorTaker, assemble, take_unembedding, heads_bias, heads_in, heads_out

LLAMA_FIELDS = GENERIC_HF_FIELDS | {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling", "attention_bias",
    "mlp_bias", "head_dim", "pretraining_tp",
}
QWEN2_FIELDS = LLAMA_FIELDS | {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}


def config_from_hf(hf: dict) -> ModelConfig:
    """Llama or Qwen2 `config.json` dict -> ModelConfig (refusing unknown fields)."""
    family = hf.get("model_type", "llama")
    refuse_unknown(hf, QWEN2_FIELDS if family == "qwen2" else LLAMA_FIELDS, family)
    if family == "qwen2":
        # Qwen2 checkpoints carry sliding-window fields; transformers only uses them when
        # use_sliding_window is true, which we refuse rather than half-implement.
        if hf.get("use_sliding_window"):
            raise ValueError("qwen2: use_sliding_window=true is not supported")
        if any(t != "full_attention" for t in hf.get("layer_types") or []):
            raise ValueError("qwen2: only full_attention layers are supported")
    qkv_bias = True if family == "qwen2" else bool(hf.get("attention_bias", False))
    return ModelConfig(**llama_fields(hf, family), attn_bias=qkv_bias,
                       attn_out_bias=family != "qwen2" and bool(hf.get("attention_bias", False)),
                       mlp_bias=bool(hf.get("mlp_bias", False)))


def llama_fields(hf: dict, family: str, partial_rotary: bool = False) -> dict:
    """The ModelConfig keyword arguments every Llama-like family (Llama, Qwen2/3, Mistral,
    Phi-3) reads the same way; biases and window flags are the caller's.  Refuses rope
    types `rope_from_hf` does not know, and partial rotary unless `partial_rotary`."""
    theta, scaling, partial = rope_from_hf(hf, family)
    n_heads = hf["num_attention_heads"]
    d_model = hf["hidden_size"]
    d_head = hf.get("head_dim") or d_model // n_heads
    rotary_dim = None
    if partial not in (None, 1.0):
        if not partial_rotary:
            raise ValueError(f"{family}: partial_rotary_factor={partial} is not supported")
        rotary_dim = int(d_head * partial)  # transformers' `dim` for the default rope
    return dict(
        architecture=family,
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_head=d_head,
        d_mlp=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        norm_kind="rms",
        norm_eps=float(hf["rms_norm_eps"]),
        activation=hf.get("hidden_act", "silu"),
        gated_mlp=True,
        positional="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        rotary_dim=rotary_dim,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
        pad_token_id=hf.get("pad_token_id"),
    )


LAYER_TYPES = ("sliding_attention", "full_attention")


def window_fields(family: str, n_layers: int, window, layer_types) -> dict:
    """`sliding_window` / `local_layers` for ModelConfig from an HF window and layer_types.

    layer_types None: every layer is local when `window` is set (Mistral, Phi-3), none
    otherwise.  Given: layer l is local iff layer_types[l] == "sliding_attention", which
    then needs a window.  Anything else is refused, naming the field."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"{family}: sliding_window={window!r} must be a positive int or null")
    if layer_types is None:
        local = (True,) * n_layers if window is not None else None
    else:
        if len(layer_types) != n_layers:
            raise ValueError(f"{family}: layer_types has {len(layer_types)} entries for {n_layers} layers")
        bad = sorted(set(layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"{family}: layer_types {bad} are not supported (only {list(LAYER_TYPES)})")
        local = tuple(t == "sliding_attention" for t in layer_types)
        if any(local) and window is None:
            raise ValueError(f"{family}: layer_types has sliding_attention layers but no sliding_window")
    if local is None or not any(local):
        return {"sliding_window": None, "local_layers": None}
    return {"sliding_window": int(window), "local_layers": local}


def convert(config: ModelConfig, tensors: dict[str, np.ndarray], dtype):
    """HF-named tensors -> Transformer, walking the key map above."""
    t = TensorTaker(tensors, ignore=lambda k: k.endswith("rotary_emb.inv_freq"))
    c = config
    d, h, kv, dh, m = c.d_model, c.n_heads, c.n_kv_heads, c.d_head, c.d_mlp
    layers = []
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        layer = {
            "ln1_w": t.take(p + "input_layernorm.weight", (d,)),
            "W_Q": heads_in(t.take(a + "q_proj.weight", (h * dh, d)), h),
            "W_K": heads_in(t.take(a + "k_proj.weight", (kv * dh, d)), kv),
            "W_V": heads_in(t.take(a + "v_proj.weight", (kv * dh, d)), kv),
            "W_O": heads_out(t.take(a + "o_proj.weight", (d, h * dh)), h),
            "ln2_w": t.take(p + "post_attention_layernorm.weight", (d,)),
            "W_in": t.take(p + "mlp.up_proj.weight", (m, d)).T,
            "W_gate": t.take(p + "mlp.gate_proj.weight", (m, d)).T,
            "W_out": t.take(p + "mlp.down_proj.weight", (d, m)).T,
        }
        if c.qk_norm:  # Qwen3: RMSNorm over each head's d_head channels, before RoPE
            layer["q_norm_w"] = t.take(a + "q_norm.weight", (dh,))
            layer["k_norm_w"] = t.take(a + "k_norm.weight", (dh,))
        if c.attn_bias:
            layer["b_Q"] = heads_bias(t.take(a + "q_proj.bias", (h * dh,)), h)
            layer["b_K"] = heads_bias(t.take(a + "k_proj.bias", (kv * dh,)), kv)
            layer["b_V"] = heads_bias(t.take(a + "v_proj.bias", (kv * dh,)), kv)
        if c.attn_out_bias:
            layer["b_O"] = t.take(a + "o_proj.bias", (d,))
        if c.mlp_bias:
            layer["b_in"] = t.take(p + "mlp.up_proj.bias", (m,))
            layer["b_gate"] = t.take(p + "mlp.gate_proj.bias", (m,))
            layer["b_out"] = t.take(p + "mlp.down_proj.bias", (d,))
        layers.append(layer)
    top = {
        "embed": t.take("model.embed_tokens.weight", (c.vocab_size, d)),
        "final_norm_w": t.take("model.norm.weight", (d,)),
    }
    top["unembed"] = take_unembedding(t, c, top["embed"])
    t.finish()
    return assemble(c, top, layers, dtype)


# llama.cpp's GGUF names for this family -> HF names (the GGUF reader applies this map,
# then un-permutes Q/K rows, so `convert` above serves both file formats).
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
