"""Weight folding preserves log-probs, for every family.

Tolerance 1e-5 on log-probs: folding reassociates float32 products (w * W instead of
(w * x) W) over a few tiny layers; rounding is ~1e-7 relative, amplified to ~1e-6 in the
logits.  A real folding bug (a missed gain or bias) moves log-probs by O(0.1).
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_tiny import save_tiny
from lens.core.folding import centre_unembed, centre_writers, fold_and_centre, fold_norms
from lens.models.families import convert_hf
from lens.models.io.safetensors_reader import read_safetensors_folder

TINY = dict(vocab_size=97, max_position_embeddings=32)


def _configs():
    import transformers as tf

    out = {
        "llama": tf.LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **TINY),
        "qwen2": tf.Qwen2Config(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, **TINY),
        "gpt2": tf.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=97, n_positions=32),
        "neox": tf.GPTNeoXConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, **TINY),
        "gemma3": tf.Gemma3TextConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                      sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                                      **TINY),
    }
    return out


FAMILY_MODULE = {"llama": "llama", "qwen2": "llama", "gpt2": "gpt2", "neox": "neox", "gemma3": "gemma3"}


@pytest.fixture(scope="module", params=sorted(FAMILY_MODULE))
def model(request, tmp_path_factory):
    importlib.import_module("lens.models.families." + FAMILY_MODULE[request.param])  # must import: never a skip
    folder = tmp_path_factory.mktemp(request.param)
    save_tiny(_configs()[request.param], folder)
    return convert_hf(*read_safetensors_folder(folder), jnp.float32)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 97, size=12), jnp.int32)


def _logprobs(m):
    return np.asarray(jax.nn.log_softmax(m(TOKENS), axis=-1))


def test_fold_norms_preserves_logprobs(model):
    folded = fold_norms(model)
    np.testing.assert_allclose(_logprobs(folded), _logprobs(model), atol=1e-5)
    assert np.all(np.asarray(folded.blocks.ln1_w) == 1) and folded.blocks.ln1_b is None
    assert np.all(np.asarray(folded.final_norm_w) == 1) and folded.final_norm_b is None


def test_fold_and_centre_preserves_logprobs(model):
    folded = fold_and_centre(model)
    np.testing.assert_allclose(_logprobs(folded), _logprobs(model), atol=1e-5)
    if model.config.norm_kind == "layer":
        # Writers now have no all-ones component; the unembedding is centred over vocab.
        np.testing.assert_allclose(np.asarray(folded.blocks.W_out).mean(-1), 0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(folded.embed).mean(-1), 0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(folded.W_U).mean(0), 0, atol=1e-6)


def test_centring_changes_logits_by_a_per_position_constant(model):
    if model.config.norm_kind != "layer":
        with pytest.raises(ValueError, match="LayerNorm"):
            centre_writers(model)
        return
    shifted = np.asarray(centre_unembed(model)(TOKENS)) - np.asarray(model(TOKENS))
    # Every token at a position moves by the same amount (1e-5: float32 rounding).
    np.testing.assert_allclose(shifted, shifted[:, :1] * np.ones_like(shifted), atol=1e-5)
