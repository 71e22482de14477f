"""`models.save(model, folder)`: config.json + model.safetensors that `models.load` reads.

For GPT-2, Llama and GPT-NeoX the folder is a transformers checkpoint:
`AutoModelForCausalLM.from_pretrained(folder)` reads it with the same logits.  Each writer
below is the exact inverse of its family's key map (models/families/gpt2.py, llama.py, neox.py);
before anything is written, the HF config is converted back with the family's own
`config_from_hf` and must give the model's config again, so a config the HF format cannot
express (an attention-only model, an unembedding bias, ...) is never saved as a different
model: it goes to the native format of models/io/native.py instead (or, with
`format="hf"`, is an error naming the differences).  Weights are written in float32.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..families import gpt2, llama, neox

from . import native
from ..core.config import ModelConfig


def _common(c: ModelConfig) -> dict:
    eos = list(c.eos_token_ids)
    return {
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": c.pad_token_id,
        "initializer_range": 0.02,
    }


def _rope(c: ModelConfig, partial: float | None = None) -> dict:
    p = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        p.update(rope_type=s.kind, factor=s.factor)
        if s.kind == "llama3":
            p.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                     original_max_position_embeddings=s.original_max_position_embeddings)
    if partial is not None:
        p["partial_rotary_factor"] = partial
    return p


# --------------------------------------------------------------------- GPT-2
def gpt2_config(c: ModelConfig) -> dict:
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **_common(c),
        "n_positions": c.max_seq_len, "n_embd": c.d_model, "n_layer": c.n_layers,
        "n_head": c.n_heads, "n_inner": c.d_mlp, "activation_function": c.activation,
        "layer_norm_epsilon": c.norm_eps, "scale_attn_weights": c.query_scale is None,
        # Our models have no dropout; transformers' GPT-2 defaults to 0.1 in train mode.
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
    }


def gpt2_tensors(m) -> dict[str, np.ndarray]:
    """Inverse of models/families/gpt2.py: Conv1D weights are [in, out]; c_attn columns [q|k|v]."""
    c, b = m.config, m.blocks
    d = c.d_model
    cols = lambda w: w.transpose(1, 0, 2).reshape(d, -1)  # noqa: E731  [h, d, dh] -> [d, h*dh]
    out = {"transformer.wte.weight": m.embed, "transformer.wpe.weight": m.pos_embed,
           "transformer.ln_f.weight": m.final_norm_w, "transformer.ln_f.bias": m.final_norm_b}
    for i in range(c.n_layers):
        p = f"transformer.h.{i}."
        out |= {
            p + "ln_1.weight": b.ln1_w[i], p + "ln_1.bias": b.ln1_b[i],
            p + "attn.c_attn.weight": np.concatenate([cols(b.W_Q[i]), cols(b.W_K[i]), cols(b.W_V[i])], 1),
            p + "attn.c_attn.bias": np.concatenate([b.b_Q[i].reshape(-1), b.b_K[i].reshape(-1), b.b_V[i].reshape(-1)]),
            p + "attn.c_proj.weight": b.W_O[i].reshape(-1, d), p + "attn.c_proj.bias": b.b_O[i],
            p + "ln_2.weight": b.ln2_w[i], p + "ln_2.bias": b.ln2_b[i],
            p + "mlp.c_fc.weight": b.W_in[i], p + "mlp.c_fc.bias": b.b_in[i],
            p + "mlp.c_proj.weight": b.W_out[i], p + "mlp.c_proj.bias": b.b_out[i],
        }
    if m.unembed is not None:
        out["lm_head.weight"] = m.unembed
    return out


# --------------------------------------------------------------------- Llama
def llama_config(c: ModelConfig) -> dict:
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], **_common(c),
        "hidden_size": c.d_model, "intermediate_size": c.d_mlp, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.d_head,
        "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
        "hidden_act": c.activation, "rope_parameters": _rope(c), "attention_bias": c.attn_bias,
        "mlp_bias": c.mlp_bias,
    }


def llama_tensors(m) -> dict[str, np.ndarray]:
    """Inverse of models/families/llama.py: nn.Linear weights are [out, in]."""
    c, b = m.config, m.blocks
    rows = lambda w: w.transpose(0, 2, 1).reshape(-1, c.d_model)  # noqa: E731  [h, d, dh] -> [h*dh, d]
    out = {"model.embed_tokens.weight": m.embed, "model.norm.weight": m.final_norm_w}
    for i in range(c.n_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        out |= {
            p + "input_layernorm.weight": b.ln1_w[i],
            a + "q_proj.weight": rows(b.W_Q[i]), a + "k_proj.weight": rows(b.W_K[i]),
            a + "v_proj.weight": rows(b.W_V[i]), a + "o_proj.weight": b.W_O[i].reshape(-1, c.d_model).T,
            p + "post_attention_layernorm.weight": b.ln2_w[i],
            p + "mlp.up_proj.weight": b.W_in[i].T, p + "mlp.gate_proj.weight": b.W_gate[i].T,
            p + "mlp.down_proj.weight": b.W_out[i].T,
        }
        if c.attn_bias:
            out |= {a + "q_proj.bias": b.b_Q[i].reshape(-1), a + "k_proj.bias": b.b_K[i].reshape(-1),
                    a + "v_proj.bias": b.b_V[i].reshape(-1), a + "o_proj.bias": b.b_O[i]}
        if c.mlp_bias:
            out |= {p + "mlp.up_proj.bias": b.b_in[i], p + "mlp.gate_proj.bias": b.b_gate[i],
                    p + "mlp.down_proj.bias": b.b_out[i]}
    if m.unembed is not None:
        out["lm_head.weight"] = m.unembed
    return out


# -------------------------------------------------------------------- GPT-NeoX
def neox_config(c: ModelConfig) -> dict:
    rot = c.rotary_dim or c.d_head
    # transformers takes int(d_head * factor); nudge by half a channel when the plain ratio
    # would round down in floating point (e.g. 2/6 * 6 = 1.999...).
    factor = rot / c.d_head if int(c.d_head * (rot / c.d_head)) == rot else (rot + 0.5) / c.d_head
    return {
        "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], **_common(c),
        "hidden_size": c.d_model, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "intermediate_size": c.d_mlp, "hidden_act": c.activation,
        "max_position_embeddings": c.max_seq_len, "layer_norm_eps": c.norm_eps,
        "use_parallel_residual": c.parallel_residual, "rope_parameters": _rope(c, factor),
        "attention_bias": c.attn_bias,
    }


def neox_tensors(m) -> dict[str, np.ndarray]:
    """Inverse of models/families/neox.py: query_key_value rows are [heads, 3, d_head]."""
    c, b = m.config, m.blocks
    d = c.d_model
    out = {"gpt_neox.embed_in.weight": m.embed, "gpt_neox.final_layer_norm.weight": m.final_norm_w,
           "gpt_neox.final_layer_norm.bias": m.final_norm_b}
    for i in range(c.n_layers):
        p, a = f"gpt_neox.layers.{i}.", f"gpt_neox.layers.{i}.attention."
        qkv = np.stack([np.asarray(w[i]).transpose(0, 2, 1) for w in (b.W_Q, b.W_K, b.W_V)], 1)
        out |= {
            p + "input_layernorm.weight": b.ln1_w[i], p + "input_layernorm.bias": b.ln1_b[i],
            a + "query_key_value.weight": qkv.reshape(3 * d, d),
            a + "dense.weight": b.W_O[i].reshape(-1, d).T,
            p + "post_attention_layernorm.weight": b.ln2_w[i],
            p + "post_attention_layernorm.bias": b.ln2_b[i],
            p + "mlp.dense_h_to_4h.weight": b.W_in[i].T, p + "mlp.dense_h_to_4h.bias": b.b_in[i],
            p + "mlp.dense_4h_to_h.weight": b.W_out[i].T, p + "mlp.dense_4h_to_h.bias": b.b_out[i],
        }
        if c.attn_bias:
            out[a + "query_key_value.bias"] = np.stack([b.b_Q[i], b.b_K[i], b.b_V[i]], 1).reshape(3 * d)
            out[a + "dense.bias"] = b.b_O[i]
    if m.unembed is not None:
        out["embed_out.weight"] = m.unembed
    return out


# architecture -> (family module, HF config writer, tensor writer)
HF_WRITERS = {
    "gpt2": (gpt2, gpt2_config, gpt2_tensors),
    "llama": (llama, llama_config, llama_tensors),
    "gpt_neox": (neox, neox_config, neox_tensors),
}


def _hf_mismatch(c: ModelConfig) -> str | None:
    """None if the family's HF format expresses `c` exactly; else the differing fields."""
    if c.architecture not in HF_WRITERS:
        return f"no HF writer for architecture {c.architecture!r} (have {sorted(HF_WRITERS)})"
    module, write_config, _ = HF_WRITERS[c.architecture]
    try:
        back = module.config_from_hf(write_config(c))
    except (ValueError, KeyError) as e:
        return str(e)
    diff = [f.name for f in dataclasses.fields(c) if getattr(back, f.name) != getattr(c, f.name)]
    return f"fields {diff} do not survive the HF config" if diff else None


def save(model, folder: str | Path, tokenizer=None, format: str = "auto") -> Path:
    """Write `model` (and `tokenizer`, if given) to `folder`; returns the folder.

    format: "hf" (transformers-readable; an error if the config cannot be expressed),
    "native" (models/io/native.py), or "auto" (hf when possible, else native).
    """
    if format not in ("auto", "hf", "native"):
        raise ValueError(f"format must be 'auto', 'hf' or 'native', got {format!r}")
    c = model.config
    why = None if format == "native" else _hf_mismatch(c)
    if format == "hf" and why:
        raise ValueError(f"cannot save this model in HF format: {why}")
    if format == "native" or why:
        hf_config, tensors = native.config_to_hf(c), native.to_tensors(model)
    else:
        _, write_config, write_tensors = HF_WRITERS[c.architecture]
        hf_config, tensors = write_config(c), write_tensors(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # float32 on disk: exact for f32 models, and safetensors.numpy has no bfloat16.
    arrays = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}
    save_file(arrays, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)
    return folder


def save_tokenizer(tokenizer, folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json, the files `Tokenizer.from_folder` reads."""
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    special = {k: v for k, v in (tokenizer.special_tokens or {}).items()
               if k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tokenizer.add_bos_token, **special}
    if tokenizer.chat_template is not None:
        cfg["chat_template"] = tokenizer.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
