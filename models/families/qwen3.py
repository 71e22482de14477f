"""Qwen3 (dense): Llama's block plus per-head q/k RMSNorm, an explicit head_dim.

Quirks, and where they live:
  * q_norm / k_norm: RMSNorm over each head's d_head channels (one gain of size d_head
    shared by all heads), applied to the projected queries and keys BEFORE RoPE
    (`ModelConfig.qk_norm`, the flag Gemma 3 uses; plain gains, no Gemma +1).
  * head_dim is its own field (Qwen3-0.6B: 16 heads x 128 = 2048 != hidden 1024).
  * Sliding windows: transformers makes layer l local when layer_types[l] ==
    "sliding_attention" (by default: use_sliding_window and l >= max_window_layers), with
    window `sliding_window` (which transformers nulls unless use_sliding_window).  Both are
    supported: local layers get the window in the forward and in the KV cache.
  * attention_bias: biases on q, k, v AND o (as in transformers' Qwen3Attention).

HF key map: Llama's (models/families/llama.py) plus, per layer i,
    model.layers.{i}.self_attn.q_norm.weight / k_norm.weight -> q_norm_w / k_norm_w [d_head]
GGUF (llama.cpp arch "qwen3"): GGUF_LAYER_NAMES below; llama.cpp does NOT permute Qwen's
Q/K rows (it runs them with NeoX-style rotary, HF's half-split layout).
"""

from __future__ import annotations

from ..core.config import GENERIC_HF_FIELDS, ModelConfig, refuse_unknown
from . import llama
from .llama import convert, llama_fields, window_fields  # noqa: F401  (convert: Llama's map + q/k norms)

QWEN3_FIELDS = GENERIC_HF_FIELDS | {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling",
    "attention_bias", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types",
}


def config_from_hf(hf: dict) -> ModelConfig:
    """Qwen3 `config.json` dict -> ModelConfig (refusing unknown fields)."""
    refuse_unknown(hf, QWEN3_FIELDS, "qwen3")
    n = hf["num_hidden_layers"]
    # As Qwen3Config.__post_init__: the window only counts with use_sliding_window.
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    types = hf.get("layer_types")
    if types is None:
        start = hf.get("max_window_layers", 28)
        types = ["sliding_attention" if window is not None and i >= start else "full_attention"
                 for i in range(n)]
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(**llama_fields(hf, "qwen3"), **window_fields("qwen3", n, window, types),
                       qk_norm=True, attn_bias=bias, attn_out_bias=bias)


GGUF_LAYER_NAMES = {
    **llama.GGUF_LAYER_NAMES,
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
GGUF_TOP_NAMES = llama.GGUF_TOP_NAMES
