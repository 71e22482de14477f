"""Phi-3 (mini / medium, 4k context): Llama's block with fused projections.

Quirks, and where they live:
  * `self_attn.qkv_proj.weight` [(heads + 2 kv_heads) * d_head, d_model] holds the rows of
    q, k and v in that order; `mlp.gate_up_proj.weight` [2 d_mlp, d_model] holds gate then
    up (transformers: `gate, up = gate_up_proj(x).chunk(2)`, out = down(up * act(gate))).
    `convert` splits them into Llama's names and hands over to Llama's key map, so the
    per-head weights are exactly Llama's layout.
  * `sliding_window` (Phi-3-mini-4k: 2047) makes every layer local, as in transformers'
    Phi3Model (and in generation: the cache masks keys by position).
  * RoPE: the default rope (with partial_rotary_factor, as transformers' default rope
    reads it).  "longrope" (and its old names "su" / "yarn": the 128k models) is REFUSED
    with an error naming it: its short/long factor switch is not implemented.

HF key map, per layer i (prefix `model.layers.{i}.`):
    self_attn.qkv_proj.weight   -> rows [0, h dh) q_proj, [h dh, (h + kv) dh) k_proj, rest v_proj
    mlp.gate_up_proj.weight     -> rows [0, m) gate_proj, [m, 2m) up_proj
    everything else             -> as Llama (input_layernorm, o_proj, post_attention_layernorm,
                                   down_proj; model.embed_tokens, model.norm, lm_head)
"""

from __future__ import annotations

import numpy as np

from ..core.config import GENERIC_HF_FIELDS, ModelConfig, refuse_unknown
from ..io.convert import CheckpointError
from . import llama
from .llama import llama_fields, window_fields

PHI3_FIELDS = GENERIC_HF_FIELDS | {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "original_max_position_embeddings", "rms_norm_eps",
    "rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor", "sliding_window",
    "resid_pdrop", "embd_pdrop", "attention_bias",  # dropout: training only
    "auto_map",  # the remote-code pointer of the original checkpoints; the forward is transformers'
}


def config_from_hf(hf: dict) -> ModelConfig:
    """Phi-3 `config.json` dict -> ModelConfig (refusing unknown fields and longrope)."""
    refuse_unknown(hf, PHI3_FIELDS, "phi3")
    if hf.get("attention_bias"):
        raise ValueError("phi3: attention_bias=true is not supported (Phi-3 has no attention biases)")
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("longrope", "su", "yarn"):
        raise ValueError(f"phi3: rope type {kind!r} (LongRoPE, the 128k models) is not supported")
    n = hf["num_hidden_layers"]
    return ModelConfig(**llama_fields(hf, "phi3", partial_rotary=True),
                       **window_fields("phi3", n, hf.get("sliding_window"), None))


def _split(tensors: dict, name: str, sizes: tuple[int, ...], parts: tuple[str, ...], d: int) -> dict:
    """Cut the fused `name` [sum(sizes), d] into `parts` by rows; errors name the tensor."""
    if name not in tensors:
        raise CheckpointError(f"missing tensor {name!r} in checkpoint")
    w = np.asarray(tensors[name])
    if w.shape != (sum(sizes), d):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(w.shape)}, expected {(sum(sizes), d)}")
    clash = [p for p in parts if p in tensors]
    if clash:
        raise CheckpointError(f"checkpoint has both the fused {name!r} and {clash}")
    cuts = np.cumsum(sizes)[:-1]
    return dict(zip(parts, np.split(w, cuts, axis=0)))


def convert(config: ModelConfig, tensors: dict[str, np.ndarray], dtype):
    """HF-named Phi-3 tensors -> Transformer: split the fused weights, then Llama's key map."""
    c = config
    d, dh = c.d_model, c.d_head
    split = dict(tensors)
    for i in range(c.n_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        split.update(_split(tensors, a + "qkv_proj.weight", (c.n_heads * dh, c.n_kv_heads * dh, c.n_kv_heads * dh),
                            (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), d))
        split.update(_split(tensors, m + "gate_up_proj.weight", (c.d_mlp, c.d_mlp),
                            (m + "gate_proj.weight", m + "up_proj.weight"), d))
        del split[a + "qkv_proj.weight"], split[m + "gate_up_proj.weight"]
    return llama.convert(c, split, dtype)
