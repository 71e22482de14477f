"""Mixtral: a Llama/Mistral block whose MLP is a mixture of experts (models/core/moe.py):
a router picks `num_experts_per_tok` of `num_local_experts` SwiGLU experts per token and
combines them with their softmax probabilities RENORMALISED over the chosen ones.
`sliding_window` (when set) makes every layer a sliding-window layer (local_layers all
True, one rope theta), as transformers' Mixtral masks every layer with it.

HF key map (per layer i, prefix `model.layers.{i}.`):

    input_layernorm.weight                   -> ln1_w
    self_attn.{q,k,v,o}_proj.weight          -> W_Q / W_K / W_V / W_O (per head)
    post_attention_layernorm.weight          -> ln2_w
    block_sparse_moe.gate.weight [E, d]      -> W_router [d, E]
    block_sparse_moe.experts.{e}.w1.weight   -> W_gate_experts[e] (gate)
    block_sparse_moe.experts.{e}.w3.weight   -> W_in_experts[e]   (up)
    block_sparse_moe.experts.{e}.w2.weight   -> W_out_experts[e]  (down)
  or the fused layout of transformers >= 5 in memory:
    mlp.gate.weight [E, d], mlp.experts.gate_up_proj [E, 2 d_mlp, d] (gate rows first),
    mlp.experts.down_proj [E, d, d_mlp]
top level: model.embed_tokens.weight, model.norm.weight, lm_head.weight (as Llama).

Refused: router_jitter_noise != 0 (a training-time perturbation of the router input; a
checkpoint trained with it is still read as an inference model would be, but a config
asking for it is not silently dropped).
"""

from __future__ import annotations

import numpy as np

from ..core.config import GENERIC_HF_FIELDS, ModelConfig, eos_ids, refuse_unknown
from ..io.convert import TensorTaker, assemble
from .olmo2 import rope_checked, take_attention, take_top

MIXTRAL_FIELDS = GENERIC_HF_FIELDS | {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling", "head_dim",
    "sliding_window", "num_experts_per_tok", "num_local_experts", "output_router_logits",
    "router_aux_loss_coef", "router_jitter_noise",
}


def experts_per_token(hf: dict, family: str, n_experts_key: str) -> tuple[int, int]:
    """(n_experts, experts_per_token), checked: 1 <= k <= n_experts."""
    n, k = hf.get(n_experts_key), hf.get("num_experts_per_tok")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{family}: {n_experts_key}={n!r} must be a positive int")
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"{family}: num_experts_per_tok={k!r} must be an int in [1, {n}]")
    return n, k


def config_from_hf(hf: dict) -> ModelConfig:
    """Mixtral `config.json` dict -> ModelConfig (refusing unknown fields and options)."""
    refuse_unknown(hf, MIXTRAL_FIELDS, "mixtral")
    jitter = hf.get("router_jitter_noise") or 0.0
    if jitter != 0.0:
        raise ValueError(f"mixtral: router_jitter_noise={jitter} is not supported (only 0)")
    n_experts, k = experts_per_token(hf, "mixtral", "num_local_experts")
    theta, scaling = rope_checked(hf, "mixtral")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    n_layers = hf["num_hidden_layers"]
    window = hf.get("sliding_window")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"mixtral: sliding_window={window!r} must be a positive int or null")
    return ModelConfig(
        architecture="mixtral",
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=n_layers,
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
        sliding_window=window,
        local_layers=None if window is None else (True,) * n_layers,
        n_experts=n_experts,
        experts_per_token=k,
        norm_topk_prob=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
        pad_token_id=hf.get("pad_token_id"),
    )


def take_experts(t: TensorTaker, c: ModelConfig, p: str, legacy: str, names: tuple[str, str, str]) -> dict:
    """One layer's router and experts under prefix `p` (`model.layers.{i}.`), from the
    per-expert layout `{p}{legacy}experts.{e}.{gate|up|down}.weight` with `names` =
    (gate, up, down) file names, or the fused `{p}mlp.experts.gate_up_proj` layout."""
    d, m, E = c.d_model, c.d_mlp, c.n_experts
    if p + "mlp.experts.gate_up_proj" in t:
        router = t.take(p + "mlp.gate.weight", (E, d))
        gate_up = t.take(p + "mlp.experts.gate_up_proj", (E, 2 * m, d))
        gate, up = gate_up[:, :m], gate_up[:, m:]
        down = t.take(p + "mlp.experts.down_proj", (E, d, m))
    else:
        router = t.take(p + legacy + "gate.weight", (E, d))
        x = p + legacy + "experts."
        gate = np.stack([t.take(f"{x}{e}.{names[0]}.weight", (m, d)) for e in range(E)])
        up = np.stack([t.take(f"{x}{e}.{names[1]}.weight", (m, d)) for e in range(E)])
        down = np.stack([t.take(f"{x}{e}.{names[2]}.weight", (d, m)) for e in range(E)])
    return {
        "W_router": router.T,
        "W_gate_experts": gate.transpose(0, 2, 1),
        "W_in_experts": up.transpose(0, 2, 1),
        "W_out_experts": down.transpose(0, 2, 1),
    }


def convert_moe(config: ModelConfig, tensors: dict[str, np.ndarray], dtype, legacy: str,
                names: tuple[str, str, str]):
    """HF-named tensors -> Transformer for a mixture of experts (Mixtral, OLMoE): attention and
    norms as OLMo 2's / Llama's layout, the experts under `legacy` with (gate, up, down) `names`."""
    t = TensorTaker(tensors, ignore=lambda k: k.endswith("rotary_emb.inv_freq"))
    c = config
    layers = []
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        layer = take_attention(t, c, p + "self_attn.")
        layer["ln1_w"] = t.take(p + "input_layernorm.weight", (c.d_model,))
        layer["ln2_w"] = t.take(p + "post_attention_layernorm.weight", (c.d_model,))
        layer |= take_experts(t, c, p, legacy, names)
        layers.append(layer)
    top = take_top(t, c)
    t.finish()
    return assemble(c, top, layers, dtype)


def convert(config: ModelConfig, tensors: dict[str, np.ndarray], dtype):
    """HF-named tensors -> Transformer, walking the key map above."""
    return convert_moe(config, tensors, dtype, "block_sparse_moe.", ("w1", "w3", "w2"))
