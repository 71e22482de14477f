"""GPT-2: LayerNorm with bias, learned positions, fused Conv1D attention, gelu_new MLP.

transformers' `Conv1D` stores weights [in, out] (the transpose of `nn.Linear`), so the
fused `c_attn.weight` is [d_model, 3*d_model] with columns [q | k | v], each split into
heads as contiguous blocks of d_head.  HF key map (per layer i, prefix `transformer.h.{i}.`;
the original OpenAI checkpoints have no `transformer.` prefix, which is accepted too):

    ln_1.weight / ln_1.bias       -> ln1_w / ln1_b
    attn.c_attn.weight [d, 3d]    -> W_Q / W_K / W_V  [heads, d_model, d_head]
    attn.c_attn.bias   [3d]       -> b_Q / b_K / b_V  [heads, d_head]
    attn.c_proj.weight [d, d]     -> W_O [heads, d_head, d_model];  attn.c_proj.bias -> b_O
    ln_2.weight / ln_2.bias       -> ln2_w / ln2_b
    mlp.c_fc.weight [d, d_mlp]    -> W_in (already [in, out]);  mlp.c_fc.bias -> b_in
    mlp.c_proj.weight [d_mlp, d]  -> W_out;  mlp.c_proj.bias -> b_out
    attn.bias, attn.masked_bias   -> ignored (causal-mask buffers of old checkpoints)
top level: wte.weight -> embed, wpe.weight -> pos_embed, ln_f.{weight,bias} ->
           final_norm_w / final_norm_b, lm_head.weight -> unembed (absent when tied).
"""

from __future__ import annotations

import numpy as np

from ..core.config import GENERIC_HF_FIELDS, ModelConfig, eos_ids, refuse_unknown
from ..io.convert import TensorTaker, assemble, heads_bias

GPT2_FIELDS = GENERIC_HF_FIELDS | {
    "vocab_size", "n_positions", "n_ctx", "n_embd", "n_layer", "n_head", "n_inner",
    "activation_function", "resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon",
    "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
    # The sequence-classification head's settings; the LM never uses them.
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    "summary_first_dropout", "gradient_checkpointing",
}
ACTIVATIONS = {"gelu_new", "gelu", "gelu_pytorch_tanh", "relu", "silu"}


def config_from_hf(hf: dict) -> ModelConfig:
    """GPT-2 `config.json` dict -> ModelConfig (refusing unknown fields)."""
    refuse_unknown(hf, GPT2_FIELDS, "gpt2")
    # Both change the attention arithmetic per layer; refuse rather than approximate.
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("gpt2: scale_attn_by_inverse_layer_idx=true is not supported")
    if hf.get("reorder_and_upcast_attn"):
        raise ValueError("gpt2: reorder_and_upcast_attn=true is not supported")
    if hf.get("add_cross_attention"):
        raise ValueError("gpt2: add_cross_attention=true (an encoder-decoder GPT-2) is not supported")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ValueError(f"gpt2: activation_function={act!r} is not supported")
    d_model, n_heads = hf["n_embd"], hf["n_head"]
    if d_model % n_heads:
        raise ValueError(f"gpt2: n_embd={d_model} is not a multiple of n_head={n_heads}")
    d_head = d_model // n_heads
    return ModelConfig(
        architecture="gpt2",
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["n_layer"],
        n_heads=n_heads,
        n_kv_heads=n_heads,
        d_head=d_head,
        d_mlp=hf.get("n_inner") or 4 * d_model,
        max_seq_len=hf["n_positions"],
        norm_kind="layer",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        activation=act,
        gated_mlp=False,
        positional="learned",
        # scale_attn_weights=false means raw q.k scores (scale 1), not d_head**-0.5.
        query_scale=None if hf.get("scale_attn_weights", True) else 1.0,
        attn_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        norm_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
        pad_token_id=hf.get("pad_token_id"),
    )


def _is_buffer(name: str) -> bool:
    return name.endswith(("attn.bias", "attn.masked_bias"))


def convert(config: ModelConfig, tensors: dict[str, np.ndarray], dtype):
    """HF-named tensors -> Transformer, walking the key map above."""
    t = TensorTaker(tensors, ignore=_is_buffer)
    c = config
    d, h, dh, m = c.d_model, c.n_heads, c.d_head, c.d_mlp
    root = "transformer." if "transformer.wte.weight" in t else ""

    def qkv_heads(w):  # [d, h*dh] Conv1D columns -> [heads, d_model, d_head]
        return w.reshape(d, h, dh).transpose(1, 0, 2)

    layers = []
    for i in range(c.n_layers):
        p = f"{root}h.{i}."
        w_q, w_k, w_v = np.split(t.take(p + "attn.c_attn.weight", (d, 3 * d)), 3, axis=1)
        b_q, b_k, b_v = np.split(t.take(p + "attn.c_attn.bias", (3 * d,)), 3)
        layers.append({
            "ln1_w": t.take(p + "ln_1.weight", (d,)),
            "ln1_b": t.take(p + "ln_1.bias", (d,)),
            "W_Q": qkv_heads(w_q), "W_K": qkv_heads(w_k), "W_V": qkv_heads(w_v),
            "b_Q": heads_bias(b_q, h), "b_K": heads_bias(b_k, h), "b_V": heads_bias(b_v, h),
            # c_proj rows are the concatenated heads' d_head inputs.
            "W_O": t.take(p + "attn.c_proj.weight", (d, d)).reshape(h, dh, d),
            "b_O": t.take(p + "attn.c_proj.bias", (d,)),
            "ln2_w": t.take(p + "ln_2.weight", (d,)),
            "ln2_b": t.take(p + "ln_2.bias", (d,)),
            "W_in": t.take(p + "mlp.c_fc.weight", (d, m)),
            "b_in": t.take(p + "mlp.c_fc.bias", (m,)),
            "W_out": t.take(p + "mlp.c_proj.weight", (m, d)),
            "b_out": t.take(p + "mlp.c_proj.bias", (d,)),
        })
    top = {
        "embed": t.take(root + "wte.weight", (c.vocab_size, d)),
        "pos_embed": t.take(root + "wpe.weight", (c.max_seq_len, d)),
        "final_norm_w": t.take(root + "ln_f.weight", (d,)),
        "final_norm_b": t.take(root + "ln_f.bias", (d,)),
    }
    if not c.tie_embeddings:
        top["unembed"] = t.take("lm_head.weight", (c.vocab_size, d))
    elif "lm_head.weight" in t:
        if not np.array_equal(t.take("lm_head.weight"), top["embed"]):
            raise ValueError("gpt2: tie_word_embeddings is true but lm_head.weight differs from wte")
    t.finish()
    return assemble(c, top, layers, dtype)
