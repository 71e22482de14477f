"""Parity of every family and variant flag against transformers, on tiny random models.

Each variant is a tiny random HF model saved as a safetensors folder by the test itself,
read back with our reader and converted by the family's key map, then compared with the
PyTorch model at the logits and at EVERY layer's residual stream.

Tolerance: 1e-5 absolute in float32.  Activations here are O(1), so one float32 rounding
is ~1e-7; a few layers of matmuls (summing tens of terms), norms and softmax accumulate to
~1e-6 (measured: at most a few 1e-6, on Gemma's larger residuals).  A real port error (a missing bias, a wrong scale, a transposed weight, a
mask off by one) shows up as 1e-2 or more.
"""

from __future__ import annotations

import chex
import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf

from lens import models
from hf_tiny import hf_forward, save_tiny
from lens.models.io.convert import CheckpointError
from lens.models.families import convert_hf
from lens.models.io.safetensors_reader import read_safetensors_folder

TOL = 1e-5
VOCAB, SEQ, PAD = 97, 16, 4
# Weights 5x transformers' default init: activations and logits become O(1) and attention
# patterns far from uniform, so a rotary, mask or scale bug moves the logits by >= 0.1
# rather than by 1e-4 (close to TOL) as it would with near-uniform attention.
INIT = 0.1


def _llama(**kw):
    base = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=INIT,
    )
    return tf.LlamaConfig(**{**base, **kw})


def _gpt2(**kw):
    base = dict(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                bos_token_id=0, eos_token_id=0, initializer_range=INIT)
    return tf.GPT2Config(**{**base, **kw})


def _neox(**kw):
    # d_head 16: partial_rotary_factor 0.5 rotates 8 channels, 0.25 rotates 4.
    base = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, intermediate_size=48,
                num_hidden_layers=2, max_position_embeddings=64, initializer_range=INIT)
    return tf.GPTNeoXConfig(**{**base, **kw})


def _gemma3(**kw):
    # Window 4 < SEQ, so the local layers really drop keys; distinct, small thetas so a
    # swapped theta shows up within 16 positions; query_pre_attn_scalar != d_head.
    base = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=4, query_pre_attn_scalar=24, initializer_range=INIT,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
        },
    )
    return tf.Gemma3TextConfig(**{**base, **kw})


VARIANTS = {
    "llama_mha_untied": lambda: _llama(),
    "llama_gqa_tied_rope_linear": lambda: _llama(
        num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ),
    "llama_mqa_head_dim_rope_llama3": lambda: _llama(
        num_key_value_heads=1, head_dim=12,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16},
    ),
    "llama_attn_mlp_bias": lambda: _llama(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "qwen2": lambda: tf.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, initializer_range=INIT,
    ),
    "gpt2": lambda: _gpt2(),
    "gpt2_untied_n_inner_gelu": lambda: _gpt2(tie_word_embeddings=False, n_inner=40,
                                              activation_function="gelu"),
    "neox_parallel": lambda: _neox(rotary_pct=0.5),
    "neox_sequential_tied_nobias": lambda: _neox(
        rotary_pct=0.25, use_parallel_residual=False, attention_bias=False,
        tie_word_embeddings=True,
    ),
    # d_head 12 x 0.25 = 3: transformers takes 2 frequencies (arange(0, 3, 2) / 3) and so
    # rotates 4 channels; a port that rounds down to 2, or refuses, fails here.
    "neox_odd_rotary_dim": lambda: _neox(hidden_size=36, num_attention_heads=3, rotary_pct=0.25),
    "neox_zero_rotary_dim": lambda: _neox(hidden_size=36, num_attention_heads=3, rotary_pct=0.05),
    "gemma3_local_global_softcap": lambda: _gemma3(final_logit_softcapping=2.0),
    "gemma3_untied_bias": lambda: _gemma3(tie_word_embeddings=False, attention_bias=True,
                                          layer_types=["full_attention", "sliding_attention",
                                                       "sliding_attention"]),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (hf model, our model, hf config dict, hf tensors), each built once."""
    cache = {}

    def get(name):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            hf = save_tiny(VARIANTS[name](), folder)
            config, tensors = read_safetensors_folder(folder)
            cache[name] = (hf, convert_hf(config, tensors, jnp.float32), config, tensors)
        return cache[name]

    return get


@eqx.filter_jit
def _forward(model, tokens, mask):
    return model.forward(tokens, attention_mask=mask, capture=models.Capture(resid=True))


def _tokens(n, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, size=n).astype(np.int32)


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_and_every_residual_match_transformers(built, name):
    hf, model, _, _ = built(name)
    c = model.config
    tokens = _tokens(SEQ)
    ref_logits, ref_hidden = hf_forward(hf, tokens)
    out = _forward(model, jnp.asarray(tokens), jnp.ones(SEQ, bool))
    chex.assert_shape(out.logits, (SEQ, c.vocab_size))
    chex.assert_shape(out.activations.resid_pre, (c.n_layers, SEQ, c.d_model))
    chex.assert_type(out.logits, jnp.float32)
    errs = [_err(out.activations.resid_pre[l], ref_hidden[l]) for l in range(c.n_layers)]
    logit_err = _err(out.logits, ref_logits)
    print(f"{name}: logits {logit_err:.2e}, residuals {max(errs):.2e}")
    for l, e in enumerate(errs):
        assert e < TOL, f"{name}: layer {l} residual differs by {e:.3g}"
    assert logit_err < TOL, f"{name}: logits differ by {logit_err:.3g}"


@pytest.mark.parametrize(
    "name", ["llama_gqa_tied_rope_linear", "gpt2", "neox_parallel", "gemma3_local_global_softcap"]
)
def test_padding_matches_unpadded_and_transformers(built, name):
    """Left and right padding via attention_mask: real positions give the unpadded logits.

    The unpadded reference is transformers' forward on the 12 real tokens alone (equal to
    ours by the parity test above; using it keeps every call of ours at one compiled shape).
    transformers also runs the left-padded sequence with the same mask and
    position_ids = cumsum(mask) - 1, the positions our forward derives from the mask.  For
    Gemma the window (4) is shorter than the 12 real tokens, so the sliding mask is
    exercised under padding too.
    """
    hf, model, _, _ = built(name)
    real = _tokens(SEQ - PAD, seed=1)
    unpadded, _ = hf_forward(hf, real)
    pads = np.zeros(PAD, np.int32)

    left_mask = np.arange(SEQ) >= PAD
    left = _forward(model, jnp.asarray(np.concatenate([pads, real])), jnp.asarray(left_mask))
    right_mask = np.arange(SEQ) < SEQ - PAD
    right = _forward(model, jnp.asarray(np.concatenate([real, pads])), jnp.asarray(right_mask))
    assert _err(left.logits[PAD:], unpadded) < TOL
    assert _err(right.logits[: SEQ - PAD], unpadded) < TOL

    positions = np.maximum(np.cumsum(left_mask) - 1, 0)
    ref, _ = hf_forward(hf, np.concatenate([pads, real]), left_mask.astype(np.int64), positions)
    assert _err(left.logits[PAD:], ref[PAD:]) < TOL


# ------------------------------------------------------------------ refusals
# One representative checkpoint per family and a tensor of it to break.
BREAK = {
    "llama_mha_untied": "model.layers.1.self_attn.k_proj.weight",
    "qwen2": "model.layers.1.self_attn.q_proj.bias",
    "gpt2": "transformer.h.1.attn.c_attn.weight",
    "neox_parallel": "gpt_neox.layers.1.attention.query_key_value.weight",
    "gemma3_local_global_softcap": "model.layers.1.self_attn.q_norm.weight",
}
EXTRA = {
    "llama_mha_untied": "model.layers.0.mlp.extra_proj.weight",
    "qwen2": "model.layers.0.self_attn.extra.bias",
    "gpt2": "transformer.h.0.mlp.c_extra.weight",
    "neox_parallel": "gpt_neox.layers.0.attention.extra.weight",
    "gemma3_local_global_softcap": "model.layers.0.extra_layernorm.weight",
}


@pytest.mark.parametrize("name", list(BREAK))
def test_unknown_config_field_is_refused(built, name):
    _, _, config, tensors = built(name)
    with pytest.raises(ValueError, match="surprise_field"):
        convert_hf({**config, "surprise_field": 1}, tensors, jnp.float32)


@pytest.mark.parametrize("name", list(BREAK))
def test_missing_tensor_is_refused(built, name):
    _, _, config, tensors = built(name)
    broken = {k: v for k, v in tensors.items() if k != BREAK[name]}
    with pytest.raises(CheckpointError, match=BREAK[name].replace(".", r"\.")):
        convert_hf(config, broken, jnp.float32)


@pytest.mark.parametrize("name", list(BREAK))
def test_extra_tensor_is_refused(built, name):
    _, _, config, tensors = built(name)
    extra = {**tensors, EXTRA[name]: np.zeros((3,), np.float32)}
    with pytest.raises(CheckpointError, match=EXTRA[name].replace(".", r"\.")):
        convert_hf(config, extra, jnp.float32)


@pytest.mark.parametrize("name", list(BREAK))
def test_misshaped_tensor_is_refused(built, name):
    _, _, config, tensors = built(name)
    w = tensors[BREAK[name]]
    bad = {**tensors, BREAK[name]: np.concatenate([w, w[:1]], axis=0)}
    with pytest.raises(CheckpointError, match=BREAK[name].replace(".", r"\.")):
        convert_hf(config, bad, jnp.float32)


def test_unknown_model_type_is_refused():
    with pytest.raises(ValueError, match="mamba"):
        convert_hf({"model_type": "mamba"}, {}, jnp.float32)


@pytest.mark.parametrize(
    "name, field, value",
    [
        ("gpt2", "scale_attn_by_inverse_layer_idx", True),
        ("gpt2", "reorder_and_upcast_attn", True),
        ("gemma3_local_global_softcap", "attn_logit_softcapping", 50.0),
        ("gemma3_local_global_softcap", "use_bidirectional_attention", True),
        ("qwen2", "use_sliding_window", True),
    ],
)
def test_unsupported_variant_values_are_refused(built, name, field, value):
    _, _, config, tensors = built(name)
    with pytest.raises(ValueError, match=field):
        convert_hf({**config, field: value}, tensors, jnp.float32)


# ------------------------------------------------------- alternative spellings
def _arrays(model):
    return eqx.filter(model, eqx.is_array)


def test_gpt2_original_checkpoint_names_and_buffers(built):
    """OpenAI's GPT-2 files have no `transformer.` prefix and carry attn.bias buffers."""
    _, model, config, tensors = built("gpt2")
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    bare["h.0.attn.masked_bias"] = np.asarray(-1e4, np.float32)
    chex.assert_trees_all_equal(_arrays(convert_hf(config, bare, jnp.float32)), _arrays(model))


def test_neox_embed_out_name(built):
    """Pythia checkpoints call the unembedding `embed_out`; transformers 5 saves `lm_head`."""
    _, model, config, tensors = built("neox_parallel")
    renamed = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in tensors.items()}
    assert "embed_out.weight" in renamed
    chex.assert_trees_all_equal(_arrays(convert_hf(config, renamed, jnp.float32)), _arrays(model))


def test_gemma3_old_and_new_config_styles_agree():
    """rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern (older
    configs) describe the same model as rope_parameters / layer_types."""
    from lens.models.families import gemma3

    common = dict(
        model_type="gemma3_text", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=64, rms_norm_eps=1e-6, sliding_window=4,
        query_pre_attn_scalar=8,
    )
    old = gemma3.config_from_hf({
        **common, "sliding_window_pattern": 2, "rope_theta": 1000.0,
        "rope_local_base_freq": 100.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    })
    new = gemma3.config_from_hf({
        **common,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000.0},
        },
    })
    assert old == new
    assert new.local_layers == (True, False, True, False)
    assert (new.rope_theta, new.rope_local_theta, new.rope_scaling.factor) == (1000.0, 100.0, 8.0)
    assert new.embed_scale == float(np.float32(32**0.5)) and new.scale == 8**-0.5


def test_gemma3_norms_are_folded(built):
    """The stored gain is 1 + w: the shared RMSNorm then computes Gemma's norm exactly."""
    _, model, _, tensors = built("gemma3_local_global_softcap")
    np.testing.assert_array_equal(
        np.asarray(model.blocks.post_attn_w[1]),
        tensors["model.layers.1.post_attention_layernorm.weight"] + 1.0,
    )
    np.testing.assert_array_equal(
        np.asarray(model.final_norm_w), tensors["model.norm.weight"] + 1.0
    )
