"""OLMoE: a pre-norm block with q / k RMSNorms over the whole projection (as OLMo 2) and
a mixture-of-experts MLP (models/core/moe.py) whose top-k softmax probabilities are NOT
renormalised by default (`norm_topk_prob` false; true renormalises, both supported).

HF key map (per layer i, prefix `model.layers.{i}.`):

    input_layernorm.weight                    -> ln1_w
    self_attn.{q,k,v,o}_proj.weight (+ bias)  -> W_Q / W_K / W_V / W_O (per head)
    self_attn.q_norm.weight [heads * d_head]  -> q_norm_w
    self_attn.k_norm.weight [kv * d_head]     -> k_norm_w
    post_attention_layernorm.weight           -> ln2_w
    mlp.gate.weight [E, d]                    -> W_router [d, E]
    mlp.experts.{e}.gate_proj / up_proj / down_proj.weight -> W_gate / W_in / W_out_experts[e]
  (or the fused mlp.experts.gate_up_proj / down_proj layout; see mixtral.py)
top level: model.embed_tokens.weight, model.norm.weight, lm_head.weight.

Refused: clip_qkv (clamping q / k / v; no released OLMoE uses it), a head_dim other than
hidden_size / heads (transformers' OLMoE sizes q_norm by hidden_size, so no such
checkpoint exists).
"""

from __future__ import annotations

import numpy as np

from ..core.config import GENERIC_HF_FIELDS, ModelConfig, eos_ids, refuse_unknown
from .mixtral import convert_moe, experts_per_token
from .olmo2 import rope_checked

OLMOE_FIELDS = GENERIC_HF_FIELDS | {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling", "attention_bias",
    "head_dim", "clip_qkv", "num_experts_per_tok", "num_experts", "output_router_logits",
    "router_aux_loss_coef", "norm_topk_prob",
}


def config_from_hf(hf: dict) -> ModelConfig:
    """OLMoE `config.json` dict -> ModelConfig (refusing unknown fields and options)."""
    refuse_unknown(hf, OLMOE_FIELDS, "olmoe")
    if hf.get("clip_qkv") is not None:
        raise ValueError(f"olmoe: clip_qkv={hf['clip_qkv']} is not supported (only null)")
    norm_topk = hf.get("norm_topk_prob", False)
    if not isinstance(norm_topk, bool):
        raise ValueError(f"olmoe: norm_topk_prob={norm_topk!r} must be true or false")
    n_experts, k = experts_per_token(hf, "olmoe", "num_experts")
    theta, scaling = rope_checked(hf, "olmoe")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if d_model % n_heads:
        raise ValueError(f"olmoe: hidden_size={d_model} is not a multiple of heads={n_heads}")
    d_head = d_model // n_heads
    if hf.get("head_dim") not in (None, d_head):
        raise ValueError(f"olmoe: head_dim={hf['head_dim']} != hidden_size / heads = {d_head} "
                         "is not supported (transformers sizes OLMoE's q_norm by hidden_size)")
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        architecture="olmoe",
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_head=d_head,
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
        attn_bias=bias,
        attn_out_bias=bias,
        n_experts=n_experts,
        experts_per_token=k,
        norm_topk_prob=norm_topk,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
        pad_token_id=hf.get("pad_token_id"),
    )


def convert(config: ModelConfig, tensors: dict[str, np.ndarray], dtype):
    """HF-named tensors -> Transformer, walking the key map above."""
    return convert_moe(config, tensors, dtype, "mlp.", ("gate_proj", "up_proj", "down_proj"))
