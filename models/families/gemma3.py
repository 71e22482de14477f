"""Gemma 3 (text): sandwich RMSNorms with (1 + w) gains, q/k norms, scaled embeddings,
local sliding-window layers interleaved with global ones, each kind with its own rope theta.

Quirks, and where they live:
  * Gemma's RMSNorm multiplies by (1 + w).  The +1 is FOLDED INTO THE STORED WEIGHT here,
    for all six norms (the four per block, q_norm/k_norm, the final norm), so the shared
    forward computes `w_eff * x / rms(x)` and the geometry code sees the gain actually
    applied.  (A GGUF stores 1 + w already; the GGUF reader subtracts 1 so its tensors
    arrive HF-style and this converter serves both.)
  * Embeddings are multiplied by sqrt(d_model), rounded to the weights' dtype exactly as
    transformers does (`config.embed_scale`, applied in `Transformer.embed_tokens`).
  * Softmax scale is query_pre_attn_scalar ** -0.5, not d_head ** -0.5 (`query_scale`).
  * `layer_types[l] == "sliding_attention"` makes layer l local: it sees keys with
    query_pos - key_pos < sliding_window (transformers' `kv_idx > q_idx - sliding_window`)
    and uses rope_parameters["sliding_attention"]'s theta; global layers use
    rope_parameters["full_attention"] (theta and scaling).  Older configs say
    rope_local_base_freq / rope_theta / rope_scaling and sliding_window_pattern instead.

HF key map (per layer i, prefix `model.layers.{i}.`):

    input_layernorm.weight             -> ln1_w        (+1 folded)
    self_attn.{q,k,v}_proj.weight      -> W_Q / W_K / W_V  [heads, d_model, d_head]
    self_attn.{q,k,v,o}_proj.bias      -> b_Q / b_K / b_V / b_O  (attention_bias)
    self_attn.q_norm.weight / k_norm   -> q_norm_w / k_norm_w  (+1 folded)
    self_attn.o_proj.weight            -> W_O [heads, d_head, d_model]
    post_attention_layernorm.weight    -> post_attn_w  (+1; norms the attention OUTPUT)
    pre_feedforward_layernorm.weight   -> ln2_w        (+1)
    mlp.up_proj / gate_proj / down_proj -> W_in / W_gate / W_out  (GeGLU, gelu tanh)
    post_feedforward_layernorm.weight  -> post_mlp_w   (+1; norms the MLP output)
top level: model.embed_tokens.weight -> embed, model.norm.weight -> final_norm_w (+1),
           lm_head.weight -> unembed (absent when tied, the usual case).

GGUF (llama.cpp `gemma3` arch) names map onto these HF names through GGUF_LAYER_NAMES /
GGUF_TOP_NAMES below.  Unlike Llama, llama.cpp does NOT permute Gemma's Q/K rows.
"""

from __future__ import annotations

import numpy as np

from ..core.config import GENERIC_HF_FIELDS, ModelConfig, eos_ids, refuse_unknown, rope_from_hf
from ..io.convert import TensorTaker, assemble, take_unembedding, heads_bias, heads_in, heads_out

GEMMA3_FIELDS = GENERIC_HF_FIELDS | {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_activation",
    "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_theta",
    "rope_local_base_freq", "rope_scaling", "attention_bias", "query_pre_attn_scalar",
    "sliding_window", "layer_types", "sliding_window_pattern", "_sliding_window_pattern",
    "final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention",
    "cache_implementation",  # generation-time cache choice; the forward is unchanged
}
ACTIVATIONS = {"gelu_pytorch_tanh", "gelu_new", "gelu", "silu", "relu"}
LAYER_TYPES = ("sliding_attention", "full_attention")
# transformers' Gemma3TextConfig defaults, used when a config leaves them out.
DEFAULT_GLOBAL_THETA, DEFAULT_LOCAL_THETA = 1_000_000.0, 10_000.0


def _layer_types(hf: dict) -> list[str]:
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:
        # Older configs: every `pattern`-th layer is global, the rest local.
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if len(types) != n:
        raise ValueError(f"gemma3: layer_types has {len(types)} entries for {n} layers")
    bad = sorted(set(types) - set(LAYER_TYPES))
    if bad:
        raise ValueError(f"gemma3: layer_types {bad} are not supported (only {list(LAYER_TYPES)})")
    return list(types)


def _ropes(hf: dict):
    """(global theta, global scaling, local theta) from either config style."""
    params = hf.get("rope_parameters")
    if params:
        unknown = sorted(set(params) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(
                f"gemma3: rope_parameters must be keyed by layer type {list(LAYER_TYPES)}; "
                f"got {unknown}"
            )
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full = dict(hf.get("rope_scaling") or {})
        local = {}
        if hf.get("rope_local_base_freq") is not None:
            local["rope_theta"] = hf["rope_local_base_freq"]
        if hf.get("rope_theta") is not None:
            full["rope_theta"] = hf["rope_theta"]
    full.setdefault("rope_theta", DEFAULT_GLOBAL_THETA)
    local.setdefault("rope_theta", DEFAULT_LOCAL_THETA)
    theta, scaling, partial = rope_from_hf({"rope_parameters": full}, "gemma3 full_attention")
    local_theta, local_scaling, local_partial = rope_from_hf(
        {"rope_parameters": local}, "gemma3 sliding_attention"
    )
    if partial not in (None, 1.0) or local_partial not in (None, 1.0):
        raise ValueError("gemma3: partial_rotary_factor is not supported")
    if local_scaling is not None:
        # The shared forward scales only the global layers' frequencies.
        raise ValueError("gemma3: rope scaling on sliding_attention layers is not supported")
    return theta, scaling, local_theta


def config_from_hf(hf: dict) -> ModelConfig:
    """Gemma 3 text `config.json` dict -> ModelConfig (refusing unknown fields)."""
    refuse_unknown(hf, GEMMA3_FIELDS, "gemma3")
    if hf.get("attn_logit_softcapping") is not None:
        raise ValueError("gemma3: attn_logit_softcapping is not supported (Gemma 3 has none)")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("gemma3: use_bidirectional_attention=true is not supported")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ACTIVATIONS:
        raise ValueError(f"gemma3: hidden_activation={act!r} is not supported")
    types = _layer_types(hf)
    local = tuple(t == "sliding_attention" for t in types)
    window = hf.get("sliding_window")
    if any(local) and not window:
        raise ValueError("gemma3: sliding_attention layers need a positive sliding_window")
    theta, scaling, local_theta = _ropes(hf)
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    d_head = hf.get("head_dim") or d_model // n_heads
    softcap = hf.get("final_logit_softcapping")
    return ModelConfig(
        architecture="gemma3_text",
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_head=d_head,
        d_mlp=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        norm_kind="rms",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation=act,
        gated_mlp=True,
        positional="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=local_theta,
        sliding_window=int(window) if any(local) else None,
        local_layers=local,
        qk_norm=True,
        sandwich_norms=True,
        # transformers keeps sqrt(d) as a float32 tensor and casts it to the weight dtype;
        # rounding to float32 here first makes our cast to any dtype give the same number.
        embed_scale=float(np.float32(d_model**0.5)),
        query_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_bias=bool(hf.get("attention_bias", False)),
        attn_out_bias=bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        final_logit_softcap=None if softcap is None else float(softcap),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
        pad_token_id=hf.get("pad_token_id"),
    )


def convert(config: ModelConfig, tensors: dict[str, np.ndarray], dtype):
    """HF-named tensors -> Transformer, walking the key map above (also Gemma 2's, whose
    config has qk_norm=False: then no q_norm / k_norm tensors are read)."""
    t = TensorTaker(tensors, ignore=lambda k: k.endswith("rotary_emb.inv_freq"))
    c = config
    d, h, kv, dh, m = c.d_model, c.n_heads, c.n_kv_heads, c.d_head, c.d_mlp

    def norm(name: str, size: int) -> np.ndarray:
        # Fold Gemma's (1 + w) into the stored gain, in float32 (as transformers computes it).
        return t.take(name, (size,)).astype(np.float32) + 1.0

    layers = []
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        layer = {
            "ln1_w": norm(p + "input_layernorm.weight", d),
            "W_Q": heads_in(t.take(a + "q_proj.weight", (h * dh, d)), h),
            "W_K": heads_in(t.take(a + "k_proj.weight", (kv * dh, d)), kv),
            "W_V": heads_in(t.take(a + "v_proj.weight", (kv * dh, d)), kv),
            "W_O": heads_out(t.take(a + "o_proj.weight", (d, h * dh)), h),
            "post_attn_w": norm(p + "post_attention_layernorm.weight", d),
            "ln2_w": norm(p + "pre_feedforward_layernorm.weight", d),
            "W_in": t.take(p + "mlp.up_proj.weight", (m, d)).T,
            "W_gate": t.take(p + "mlp.gate_proj.weight", (m, d)).T,
            "W_out": t.take(p + "mlp.down_proj.weight", (d, m)).T,
            "post_mlp_w": norm(p + "post_feedforward_layernorm.weight", d),
        }
        if c.qk_norm:  # Gemma 3 (Gemma 2, which shares this key map, has none)
            layer["q_norm_w"] = norm(a + "q_norm.weight", dh)
            layer["k_norm_w"] = norm(a + "k_norm.weight", dh)
        if c.attn_bias:
            layer["b_Q"] = heads_bias(t.take(a + "q_proj.bias", (h * dh,)), h)
            layer["b_K"] = heads_bias(t.take(a + "k_proj.bias", (kv * dh,)), kv)
            layer["b_V"] = heads_bias(t.take(a + "v_proj.bias", (kv * dh,)), kv)
        if c.attn_out_bias:
            layer["b_O"] = t.take(a + "o_proj.bias", (d,))
        layers.append(layer)
    top = {
        "embed": t.take("model.embed_tokens.weight", (c.vocab_size, d)),
        "final_norm_w": norm("model.norm.weight", d),
    }
    top["unembed"] = take_unembedding(t, c, top["embed"])
    t.finish()
    return assemble(c, top, layers, dtype)


# llama.cpp's GGUF names (arch "gemma3") -> HF names, per layer (after `blk.{i}.`, before
# `model.layers.{i}.`) and top level.  The GGUF reader subtracts 1 from every `*norm.weight`
# (llama.cpp stores Gemma's 1 + w) and must NOT un-permute Q/K for this family.
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
