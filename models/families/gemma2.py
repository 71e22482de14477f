"""Gemma 2: Gemma 3's sandwich-normed block without q/k norms, with soft-capped attention.

Quirks, and where they live:
  * Attention-logit soft-capping: scores (after the query scale, before the mask) become
    cap * tanh(score / cap), cap = attn_logit_softcapping (`ModelConfig.attn_logit_softcap`,
    in models/core/layers.attention_weights).  Final-logit soft-capping likewise on the
    logits (`final_logit_softcap`).
  * Alternating local / global layers: layer_types (transformers 5; by default layer l is
    "sliding_attention" for even l) with window `sliding_window`; one rope theta for both.
  * Softmax scale query_pre_attn_scalar ** -0.5 (Gemma 2 27B: 144, not d_head = 128).
  * Sandwich norms: input_layernorm / post_attention_layernorm around attention,
    pre_feedforward_layernorm / post_feedforward_layernorm around the MLP; every RMSNorm
    multiplies by (1 + w), the +1 folded into the stored gain at load (as Gemma 3).
  * Embeddings times sqrt(d_model) rounded to the weight dtype; GeGLU (gelu tanh) MLP.

HF key map: Gemma 3's (models/families/gemma3.py) without q_norm / k_norm.
GGUF (llama.cpp arch "gemma2"): GGUF_LAYER_NAMES below; norms stored as 1 + w, Q/K rows
not permuted, no output.weight (always tied).
"""

from __future__ import annotations

import numpy as np

from ..core.config import GENERIC_HF_FIELDS, ModelConfig, eos_ids, refuse_unknown, rope_from_hf
from . import gemma3
from .gemma3 import convert  # noqa: F401  (the shared Gemma key map; qk_norm=False here)
from .llama import window_fields

GEMMA2_FIELDS = GENERIC_HF_FIELDS | {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_activation",
    "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_theta",
    "rope_scaling", "attention_bias", "query_pre_attn_scalar", "sliding_window",
    "sliding_window_size", "layer_types", "final_logit_softcapping", "attn_logit_softcapping",
    "use_bidirectional_attention",
    "cache_implementation",  # generation-time cache choice ("hybrid"); the forward is unchanged
}


def config_from_hf(hf: dict) -> ModelConfig:
    """Gemma 2 `config.json` dict -> ModelConfig (refusing unknown fields)."""
    refuse_unknown(hf, GEMMA2_FIELDS, "gemma2")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("gemma2: use_bidirectional_attention=true is not supported")
    # transformers' Gemma2MLP reads hidden_activation (hidden_act is a legacy duplicate).
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in gemma3.ACTIVATIONS:
        raise ValueError(f"gemma2: hidden_activation={act!r} is not supported")
    window = hf.get("sliding_window", 4096)
    if hf.get("sliding_window_size") not in (None, window):
        raise ValueError(f"gemma2: sliding_window_size={hf['sliding_window_size']} differs from "
                         f"sliding_window={window}")
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:  # Gemma2Config.__post_init__: even layers local, odd layers global
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    theta, scaling, partial = rope_from_hf(hf, "gemma2")
    if partial not in (None, 1.0):
        raise ValueError(f"gemma2: partial_rotary_factor={partial} is not supported")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    caps = {}
    for field, name in (("attn_logit_softcapping", "attn_logit_softcap"),
                        ("final_logit_softcapping", "final_logit_softcap")):
        cap = hf.get(field)
        if cap is not None and not (isinstance(cap, (int, float)) and cap > 0):
            raise ValueError(f"gemma2: {field}={cap!r} must be a positive number or null")
        caps[name] = None if cap is None else float(cap)
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        architecture="gemma2",
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=n,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_head=hf.get("head_dim") or d_model // n_heads,
        d_mlp=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        norm_kind="rms",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation=act,
        gated_mlp=True,
        positional="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        **window_fields("gemma2", n, window, types),
        qk_norm=False,
        sandwich_norms=True,
        embed_scale=float(np.float32(d_model**0.5)),  # as gemma3.py: transformers' float32 sqrt(d)
        query_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_bias=bias,
        attn_out_bias=bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
        pad_token_id=hf.get("pad_token_id"),
        **caps,
    )


# llama.cpp's GGUF names (arch "gemma2") -> HF names: Gemma 3's without the q/k norms.
GGUF_LAYER_NAMES = {k: v for k, v in gemma3.GGUF_LAYER_NAMES.items()
                    if k not in ("attn_q_norm.weight", "attn_k_norm.weight")}
GGUF_TOP_NAMES = gemma3.GGUF_TOP_NAMES
