"""Tiny random transformers models shared by the lens tests, each built once per process."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import jax.numpy as jnp
import transformers as tf

from hf_tiny import save_tiny
from lens.models.families import convert_hf
from lens.models.io.safetensors_reader import read_safetensors_folder

VOCAB = 61
CONFIGS = {
    # GQA (6 query heads on 2 kv heads), untied, 3 layers: every edit site is exercised.
    "llama": lambda: tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=4, max_position_embeddings=32,
        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.1),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=24, n_layer=2,
                                  n_head=4, initializer_range=0.1),
    "neox": lambda: tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=24, num_attention_heads=2,
                                     intermediate_size=40, num_hidden_layers=2,
                                     max_position_embeddings=32, rotary_pct=0.5,
                                     initializer_range=0.1),
    "gemma3": lambda: tf.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
        layer_types=["sliding_attention", "full_attention"], sliding_window=4,
        initializer_range=0.1),
    # The dense families of issue 28, each with its awkward setting inside 8 tokens:
    # Gemma 2 window 4 and caps of 2 that bind; Mistral / Phi-3 windows of 5 in every layer;
    # Qwen3 head_dim 8 != 24 / 4 with q/k norms.
    "gemma2": lambda: tf.Gemma2Config(
        vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
        sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=2.0,
        query_pre_attn_scalar=6, initializer_range=0.1),
    "mistral": lambda: tf.MistralConfig(
        vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        sliding_window=5, initializer_range=0.1),
    "qwen3": lambda: tf.Qwen3Config(
        vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
        initializer_range=0.1),
    "phi3": lambda: tf.Phi3Config(
        vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        sliding_window=5, pad_token_id=0, eos_token_id=1, initializer_range=0.1),
}


@functools.lru_cache(maxsize=None)
def tiny(name: str = "llama"):
    """(hf torch model, our Transformer, folder with the safetensors checkpoint)."""
    folder = Path(tempfile.mkdtemp(prefix=f"lens_{name}_"))
    hf = save_tiny(CONFIGS[name](), folder)
    config, tensors = read_safetensors_folder(folder)
    return hf, convert_hf(config, tensors, jnp.float32), folder


def tiny_text_model(folder: Path) -> Path:
    """A tiny random GPT-2 (LayerNorm, 2 layers, d 16) with SmolLM2's tokenizer saved in
    `folder`: what the scripts' smoke tests load with --model (real corpora, tiny compute)."""
    import jax

    from lens import models
    from lens.models.core.config import ModelConfig
    from lens.models.io.embedded import fetch
    from lens.models.io.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(fetch("smollm2-135m-instruct"))  # the tokenizer only
    c = ModelConfig(architecture="gpt2", vocab_size=tok.vocab_size, d_model=16, n_layers=2, n_heads=2,
                    n_kv_heads=2, d_head=8, d_mlp=32, max_seq_len=32, norm_kind="layer", norm_eps=1e-5,
                    activation="gelu_new", gated_mlp=False, positional="learned", attn_bias=True,
                    attn_out_bias=True, mlp_bias=True, norm_bias=True, tie_embeddings=True,
                    eos_token_ids=tuple(tok.eos_token_ids))
    models.save(models.init(c, jax.random.key(0)), folder, tok)
    return folder
