"""GPT-NeoX / Pythia: LayerNorm, parallel attention + MLP residual, partial rotary.

The fused `query_key_value` (an nn.Linear, [3*d_model, d_model]) is laid out PER HEAD:
its output rows are [heads, 3, d_head] (q, k, v of head 0, then of head 1, ...), unlike
GPT-2's [3, heads, d_head].  Rotary covers the first int(d_head * partial_rotary_factor)
channels of each head (rotary_pct in older configs, default 0.25).  With
use_parallel_residual (the default) a block computes x + attn(ln1 x) + mlp(ln2 x).

HF key map (per layer i, prefix `gpt_neox.layers.{i}.`):

    input_layernorm.{weight,bias}             -> ln1_w / ln1_b
    attention.query_key_value.weight [3d, d]  -> W_Q / W_K / W_V  [heads, d_model, d_head]
    attention.query_key_value.bias   [3d]     -> b_Q / b_K / b_V  (attention_bias)
    attention.dense.{weight,bias}             -> W_O [heads, d_head, d_model] / b_O
    post_attention_layernorm.{weight,bias}    -> ln2_w / ln2_b
    mlp.dense_h_to_4h.{weight,bias}           -> W_in / b_in
    mlp.dense_4h_to_h.{weight,bias}           -> W_out / b_out
    attention.bias, attention.masked_bias, attention.rotary_emb.inv_freq -> ignored (buffers)
top level: gpt_neox.embed_in.weight -> embed, gpt_neox.final_layer_norm.{weight,bias} ->
           final_norm_w / final_norm_b, embed_out.weight (original checkpoints) or
           lm_head.weight (transformers >= 5) -> unembed (absent when tied).
"""

from __future__ import annotations

import numpy as np

from ..core.config import GENERIC_HF_FIELDS, ModelConfig, eos_ids, refuse_unknown, rope_from_hf
from ..io.convert import CheckpointError, TensorTaker, assemble, heads_out

NEOX_FIELDS = GENERIC_HF_FIELDS | {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "hidden_act", "hidden_dropout", "classifier_dropout",
    "max_position_embeddings", "layer_norm_eps", "use_parallel_residual", "rope_parameters",
    "rope_scaling", "rope_theta", "partial_rotary_factor", "rotary_pct", "rotary_emb_base",
    "attention_bias",
    "attention_probs_dropout_prob", "hidden_dropout_prob",
}
ACTIVATIONS = {"gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"}


def config_from_hf(hf: dict) -> ModelConfig:
    """GPT-NeoX `config.json` dict -> ModelConfig (refusing unknown fields)."""
    refuse_unknown(hf, NEOX_FIELDS, "neox")
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"neox: hidden_act={act!r} is not supported")
    theta, scaling, partial = rope_from_hf(hf, "neox")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if d_model % n_heads:
        raise ValueError(f"neox: hidden_size={d_model} is not a multiple of heads={n_heads}")
    d_head = d_model // n_heads
    # transformers' default when neither rotary_pct nor partial_rotary_factor is given.
    partial = 0.25 if partial is None else float(partial)
    rotary_dim = int(d_head * partial)  # int() truncates, exactly as transformers does
    return ModelConfig(
        architecture="gpt_neox",
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_heads,
        d_head=d_head,
        d_mlp=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        norm_kind="layer",
        norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        activation=act,
        gated_mlp=False,
        positional="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        rotary_dim=rotary_dim,
        parallel_residual=bool(hf.get("use_parallel_residual", True)),
        attn_bias=bool(hf.get("attention_bias", True)),
        attn_out_bias=bool(hf.get("attention_bias", True)),
        mlp_bias=True,
        norm_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
        pad_token_id=hf.get("pad_token_id"),
    )


def _is_buffer(name: str) -> bool:
    return name.endswith(("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq"))


def convert(config: ModelConfig, tensors: dict[str, np.ndarray], dtype):
    """HF-named tensors -> Transformer, walking the key map above."""
    t = TensorTaker(tensors, ignore=_is_buffer)
    c = config
    d, h, dh, m = c.d_model, c.n_heads, c.d_head, c.d_mlp
    layers = []
    for i in range(c.n_layers):
        p = f"gpt_neox.layers.{i}."
        a = p + "attention."
        # Rows [heads, 3, d_head]: split q/k/v on axis 1, then [heads, d_head, d] -> [heads, d, d_head].
        qkv = t.take(a + "query_key_value.weight", (3 * d, d)).reshape(h, 3, dh, d)
        layer = {
            "ln1_w": t.take(p + "input_layernorm.weight", (d,)),
            "ln1_b": t.take(p + "input_layernorm.bias", (d,)),
            "W_Q": qkv[:, 0].transpose(0, 2, 1),
            "W_K": qkv[:, 1].transpose(0, 2, 1),
            "W_V": qkv[:, 2].transpose(0, 2, 1),
            "W_O": heads_out(t.take(a + "dense.weight", (d, d)), h),
            "ln2_w": t.take(p + "post_attention_layernorm.weight", (d,)),
            "ln2_b": t.take(p + "post_attention_layernorm.bias", (d,)),
            "W_in": t.take(p + "mlp.dense_h_to_4h.weight", (m, d)).T,
            "b_in": t.take(p + "mlp.dense_h_to_4h.bias", (m,)),
            "W_out": t.take(p + "mlp.dense_4h_to_h.weight", (d, m)).T,
            "b_out": t.take(p + "mlp.dense_4h_to_h.bias", (d,)),
        }
        if c.attn_bias:
            b = t.take(a + "query_key_value.bias", (3 * d,)).reshape(h, 3, dh)
            layer["b_Q"], layer["b_K"], layer["b_V"] = b[:, 0], b[:, 1], b[:, 2]
        if c.attn_out_bias:
            layer["b_O"] = t.take(a + "dense.bias", (d,))
        layers.append(layer)
    top = {
        "embed": t.take("gpt_neox.embed_in.weight", (c.vocab_size, d)),
        "final_norm_w": t.take("gpt_neox.final_layer_norm.weight", (d,)),
        "final_norm_b": t.take("gpt_neox.final_layer_norm.bias", (d,)),
    }
    heads = [n for n in ("embed_out.weight", "lm_head.weight") if n in t]
    if len(heads) > 1:
        raise CheckpointError("checkpoint has both embed_out.weight and lm_head.weight")
    if not c.tie_embeddings:
        if not heads:
            raise CheckpointError("missing tensor 'embed_out.weight' (or 'lm_head.weight') in checkpoint")
        top["unembed"] = t.take(heads[0], (c.vocab_size, d))
    elif heads and not np.array_equal(t.take(heads[0]), top["embed"]):
        raise ValueError(f"neox: tie_word_embeddings is true but {heads[0]} differs from embed_in")
    t.finish()
    return assemble(c, top, layers, dtype)
