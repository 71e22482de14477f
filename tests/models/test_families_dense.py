"""Gemma 2, Mistral, Qwen3 and Phi-3 against transformers, on tiny random models.

Each variant is a tiny random transformers model saved with save_pretrained and read back
with `models.load(folder)`, with deliberately awkward settings: a sliding window (4 or 5)
shorter than the 16-token sequence, soft-caps small enough to bind (attention scores and
logits here reach several units; a cap of 2 bends them), head_dim != d_model / heads,
grouped-query attention.  Compared at the logits and at EVERY layer's residual, 1e-5
absolute in float32 (the tolerance of test_parity.py, same reasoning); greedy generation
over 32 new tokens, past the window, equals transformers' `generate`.  "Plain" variants
are what a tester writes: small sizes and transformers' defaults for everything else
(Gemma 2's head_dim 256, window 4096 and caps 50 / 30; Qwen3's head_dim 128; ...).
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

from hf_tiny import hf_forward, save_tiny
from lens import models
from lens.models.families import convert_hf
from lens.models.generation.generate import GenerationConfig, generate
from lens.models.io.convert import CheckpointError
from lens.models.io.safetensors_reader import read_safetensors_folder

TOL = 1e-5
VOCAB, SEQ, N_NEW = 97, 16, 32
INIT = 0.1  # 5x transformers' init: O(1) activations, far-from-uniform attention (test_parity.py)
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             initializer_range=INIT)
PLAIN = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)

VARIANTS = {
    # window 4 < 16, caps 2.0 that bind, head_dim 12 (d / heads = 8), query scalar 20
    "gemma2_window_softcaps": lambda: tf.Gemma2Config(
        **SMALL, head_dim=12, sliding_window=4, query_pre_attn_scalar=20,
        attn_logit_softcapping=2.0, final_logit_softcapping=2.0,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0}),
    "gemma2_untied_bias_layer_types": lambda: tf.Gemma2Config(
        **SMALL, head_dim=8, sliding_window=5, tie_word_embeddings=False, attention_bias=True,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        attn_logit_softcapping=3.0, final_logit_softcapping=None),
    "mistral_window_head_dim": lambda: tf.MistralConfig(
        **SMALL, head_dim=12, sliding_window=5, rope_parameters={"rope_type": "default", "rope_theta": 100.0}),
    "mistral_no_window_tied": lambda: tf.MistralConfig(**SMALL, sliding_window=None, tie_word_embeddings=True),
    "qwen3_head_dim_sliding_layers": lambda: tf.Qwen3Config(
        **SMALL, head_dim=12, use_sliding_window=True, sliding_window=4, max_window_layers=1,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0}),
    "qwen3_bias_tied": lambda: tf.Qwen3Config(**SMALL, head_dim=8, attention_bias=True, tie_word_embeddings=True),
    "phi3_window_gqa": lambda: tf.Phi3Config(**SMALL, sliding_window=5, pad_token_id=0, eos_token_id=1),
    "phi3_partial_rotary": lambda: tf.Phi3Config(
        **SMALL, pad_token_id=0, eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5}),
    # what a tester writes: small sizes, transformers' defaults for the rest
    "gemma2_plain": lambda: tf.Gemma2Config(**PLAIN),
    "mistral_plain": lambda: tf.MistralConfig(**PLAIN),
    "qwen3_plain": lambda: tf.Qwen3Config(**PLAIN),
    "phi3_plain": lambda: tf.Phi3Config(**PLAIN, pad_token_id=0, eos_token_id=1),  # default ids 32000 > vocab
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (hf model, our model, hf config dict, hf tensors), each built once."""
    cache = {}

    def get(name):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            hf = save_tiny(VARIANTS[name](), folder)
            model, _ = models.load(folder)
            config, tensors = read_safetensors_folder(folder)
            cache[name] = (hf, model, config, tensors)
        return cache[name]

    return get


@eqx.filter_jit
def _forward(model, tokens, mask=None):
    mask = jnp.ones(tokens.shape, bool) if mask is None else mask  # one compiled shape per model
    return model.forward(tokens, attention_mask=mask, capture=models.Capture(resid=True))


def _tokens(n, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, size=n).astype(np.int32)


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_and_every_residual_match_transformers(built, name):
    hf, model, _, _ = built(name)
    tokens = _tokens(SEQ)
    ref_logits, ref_hidden = hf_forward(hf, tokens)
    out = _forward(model, jnp.asarray(tokens))
    errs = [_err(out.activations.resid_pre[l], ref_hidden[l]) for l in range(model.config.n_layers)]
    logit_err = _err(out.logits, ref_logits)
    print(f"{name}: logits {logit_err:.2e}, residuals {max(errs):.2e}")
    for l, e in enumerate(errs):
        assert e < TOL, f"{name}: layer {l} residual differs by {e:.3g}"
    assert logit_err < TOL, f"{name}: logits differ by {logit_err:.3g}"


@pytest.mark.parametrize("name", ["gemma2_window_softcaps", "mistral_window_head_dim", "qwen3_head_dim_sliding_layers"])
def test_left_padding_with_a_window_matches_transformers(built, name):
    """4 pads then 12 real tokens (window 4-5 < 12): the window counts positions of real
    tokens only; transformers gets the same mask and position_ids = cumsum(mask) - 1."""
    hf, model, _, _ = built(name)
    pad = 4
    mask = np.arange(SEQ) >= pad
    tokens = np.concatenate([np.zeros(pad, np.int32), _tokens(SEQ - pad, seed=1)])
    ours = _forward(model, jnp.asarray(tokens), jnp.asarray(mask)).logits
    ref, _ = hf_forward(hf, tokens, mask.astype(np.int64), np.maximum(np.cumsum(mask) - 1, 0))
    alone, _ = hf_forward(hf, tokens[pad:])
    assert _err(ours[pad:], ref[pad:]) < TOL
    assert _err(ours[pad:], alone) < TOL


def test_awkward_settings_really_bind(built):
    """The window and the attention cap change the model: turning each off moves the
    logits by far more than TOL (so the parity above tests them); the final cap of 2
    bends transformers' uncapped logits (up to 2.15 here) by more than 0.1."""
    import dataclasses

    tokens = jnp.asarray(_tokens(SEQ))
    for name, change in [("gemma2_window_softcaps", dict(attn_logit_softcap=None)),
                         ("gemma2_window_softcaps", dict(local_layers=None, sliding_window=None)),
                         ("mistral_window_head_dim", dict(local_layers=None, sliding_window=None))]:
        _, model, _, _ = built(name)
        other = dataclasses.replace(model, config=dataclasses.replace(model.config, **change))
        assert _err(_forward(model, tokens).logits, _forward(other, tokens).logits) > 1e-2, (name, change)
    hf, _, _, _ = built("gemma2_window_softcaps")
    hf.config.final_logit_softcapping = None  # transformers' own uncapped logits
    try:
        uncapped, _ = hf_forward(hf, np.asarray(tokens))
    finally:
        hf.config.final_logit_softcapping = 2.0
    assert np.abs(uncapped - 2.0 * np.tanh(uncapped / 2.0)).max() > 0.1  # measured 0.57
    assert built("qwen3_head_dim_sliding_layers")[1].config.local_layers == (False, True, True)
    assert built("gemma2_window_softcaps")[1].config.local_layers == (True, False, True)
    assert built("phi3_window_gqa")[1].config.local_layers == (True,) * 3


@pytest.mark.parametrize("name", [
    "gemma2_window_softcaps", "mistral_window_head_dim",
    # ~13 s each (two compiled programs per model): the same cache path, run by `make test`
    pytest.param("qwen3_head_dim_sliding_layers", marks=pytest.mark.slow),
    pytest.param("phi3_window_gqa", marks=pytest.mark.slow)])
def test_greedy_generation_past_the_window_equals_transformers(built, name):
    """32 new tokens after a 6-token prompt: the cached decode runs ~30 positions past a
    window of 4-5, so keys that slid out must be ignored exactly as transformers does."""
    hf, model, _, _ = built(name)
    prompt = [int(t) for t in _tokens(6, seed=3)]
    ours = generate(model, [prompt], GenerationConfig(N_NEW, eos_token_ids=(), pad_token_id=0))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N_NEW,
                          eos_token_id=None, pad_token_id=0)
    assert ref[0, len(prompt):].tolist() == ours.tokens[0]


# ------------------------------------------------------------------ refusals
BREAK = {
    "gemma2_window_softcaps": "model.layers.1.post_feedforward_layernorm.weight",
    "mistral_window_head_dim": "model.layers.2.self_attn.k_proj.weight",
    "qwen3_head_dim_sliding_layers": "model.layers.1.self_attn.k_norm.weight",
    "phi3_window_gqa": "model.layers.1.self_attn.qkv_proj.weight",
}


@pytest.mark.parametrize("name", list(BREAK))
def test_unknown_config_field_is_refused(built, name):
    _, _, config, tensors = built(name)
    with pytest.raises(ValueError, match="surprise_field"):
        convert_hf({**config, "surprise_field": 1}, tensors, jnp.float32)


@pytest.mark.parametrize("name", list(BREAK))
def test_missing_and_misshaped_tensors_are_refused(built, name):
    _, _, config, tensors = built(name)
    key = BREAK[name].replace(".", r"\.")
    with pytest.raises(CheckpointError, match=key):
        convert_hf(config, {k: v for k, v in tensors.items() if k != BREAK[name]}, jnp.float32)
    w = tensors[BREAK[name]]
    with pytest.raises(CheckpointError, match=key):
        convert_hf(config, {**tensors, BREAK[name]: np.concatenate([w, w[:1]], 0)}, jnp.float32)
    with pytest.raises(CheckpointError, match="extra_proj"):
        convert_hf(config, {**tensors, "model.layers.0.mlp.extra_proj.weight": w}, jnp.float32)


@pytest.mark.parametrize("name, field, value", [
    ("phi3_window_gqa", "rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4,
                                            "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}),
    ("phi3_window_gqa", "rope_scaling", {"type": "su", "short_factor": [1.0], "long_factor": [1.0]}),
    ("mistral_window_head_dim", "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
    ("qwen3_head_dim_sliding_layers", "rope_parameters", {"rope_type": "dynamic", "rope_theta": 1e4,
                                                          "factor": 2.0}),
    ("gemma2_window_softcaps", "use_bidirectional_attention", True),
    ("gemma2_window_softcaps", "layer_types", ["sliding_attention", "chunked_attention", "full_attention"]),
    ("gemma2_window_softcaps", "attn_logit_softcapping", -1.0),
    ("qwen3_head_dim_sliding_layers", "sliding_window", None),
    ("phi3_window_gqa", "attention_bias", True),
])
def test_unsupported_values_are_refused_naming_them(built, name, field, value):
    _, _, config, tensors = built(name)
    config = {**config, field: value}
    if field == "rope_scaling":
        config.pop("rope_parameters")
    pattern = {"rope_parameters": value.get("rope_type") if isinstance(value, dict) else None,
               "rope_scaling": "su"}.get(field) or field
    with pytest.raises(ValueError, match=pattern):
        convert_hf(config, tensors, jnp.float32)


def test_mistral_layer_types_follow_transformers(built):
    """MistralConfig saves layer_types but MistralModel ignores it (every layer sliding when
    a window is set): we compute what transformers computes and warn, naming the field."""
    _, model, config, tensors = built("mistral_window_head_dim")
    with pytest.warns(UserWarning, match="layer_types"):
        other = convert_hf({**config, "layer_types": ["full_attention", "sliding_attention", "full_attention"]},
                           tensors, jnp.float32)
    assert other.config == model.config


def test_phi3_fused_weights_are_split_in_order(built):
    """Rows of qkv_proj are q | k | v, of gate_up_proj gate | up (checked against the
    per-head layout directly, independently of the forward)."""
    _, model, config, tensors = built("phi3_window_gqa")
    c = model.config
    qkv = tensors["model.layers.2.self_attn.qkv_proj.weight"]
    k_rows = qkv[c.n_heads * c.d_head:(c.n_heads + c.n_kv_heads) * c.d_head]
    np.testing.assert_array_equal(np.asarray(model.blocks.W_K[2]),
                                  k_rows.reshape(c.n_kv_heads, c.d_head, c.d_model).transpose(0, 2, 1))
    gate_up = tensors["model.layers.0.mlp.gate_up_proj.weight"]
    np.testing.assert_array_equal(np.asarray(model.blocks.W_gate[0]), gate_up[: c.d_mlp].T)
    np.testing.assert_array_equal(np.asarray(model.blocks.W_in[0]), gate_up[c.d_mlp:].T)


# Field sets of the published config.json files (sizes shrunk): each must convert, not be
# refused for a field it legitimately carries.
REAL_STYLE = {
    "gemma-2-2b": dict(
        architectures=["Gemma2ForCausalLM"], attention_bias=False, attention_dropout=0.0,
        attn_logit_softcapping=50.0, bos_token_id=2, cache_implementation="hybrid", eos_token_id=[1, 107],
        final_logit_softcapping=30.0, head_dim=16, hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh", hidden_size=32, initializer_range=0.02, intermediate_size=48,
        max_position_embeddings=64, model_type="gemma2", num_attention_heads=4, num_hidden_layers=2,
        num_key_value_heads=2, pad_token_id=0, query_pre_attn_scalar=16, rms_norm_eps=1e-6,
        rope_theta=10000.0, sliding_window=4096, torch_dtype="float32", transformers_version="4.42.4",
        use_cache=True, vocab_size=VOCAB),
    "Mistral-7B-v0.1": dict(
        architectures=["MistralForCausalLM"], bos_token_id=1, eos_token_id=2, hidden_act="silu",
        hidden_size=32, initializer_range=0.02, intermediate_size=48, max_position_embeddings=64,
        model_type="mistral", num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=2,
        rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False,
        torch_dtype="bfloat16", transformers_version="4.34.0.dev0", use_cache=True, vocab_size=VOCAB),
    "Qwen3-0.6B": dict(
        architectures=["Qwen3ForCausalLM"], attention_bias=False, attention_dropout=0.0, bos_token_id=1,
        eos_token_id=2, head_dim=16, hidden_act="silu", hidden_size=32, initializer_range=0.02,
        intermediate_size=48, max_position_embeddings=64, max_window_layers=28, model_type="qwen3",
        num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_scaling=None, rope_theta=1000000, sliding_window=None, tie_word_embeddings=True,
        torch_dtype="bfloat16", transformers_version="4.51.0", use_cache=True, use_sliding_window=False,
        vocab_size=VOCAB),
    "Phi-3-mini-4k-instruct": dict(
        architectures=["Phi3ForCausalLM"], attention_bias=False, attention_dropout=0.0,
        auto_map={"AutoConfig": "configuration_phi3.Phi3Config"}, bos_token_id=1, embd_pdrop=0.0,
        eos_token_id=32000, hidden_act="silu", hidden_size=32, initializer_range=0.02, intermediate_size=48,
        max_position_embeddings=64, model_type="phi3", num_attention_heads=4, num_hidden_layers=2,
        num_key_value_heads=4, original_max_position_embeddings=64, pad_token_id=32000, resid_pdrop=0.0,
        rms_norm_eps=1e-5, rope_scaling=None, rope_theta=10000.0, sliding_window=2047,
        tie_word_embeddings=False, torch_dtype="bfloat16", transformers_version="4.40.2", use_cache=True,
        vocab_size=VOCAB),
}


@pytest.mark.parametrize("name", list(REAL_STYLE))
def test_published_config_field_sets_convert(name):
    from lens.models.families import family_module

    hf = REAL_STYLE[name]
    c = family_module(hf).config_from_hf(hf)
    assert (c.d_model, c.n_layers, c.vocab_size) == (32, 2, VOCAB)
    window = {"gemma-2-2b": 4096, "Mistral-7B-v0.1": 4096, "Qwen3-0.6B": None, "Phi-3-mini-4k-instruct": 2047}
    assert c.sliding_window == window[name]
    if name == "gemma-2-2b":
        assert (c.attn_logit_softcap, c.final_logit_softcap, c.local_layers) == (50.0, 30.0, (True, False))
        assert c.eos_token_ids == (1, 107) and c.scale == 16**-0.5


def test_attribution_attention_pattern_is_the_capped_windowed_pattern(built):
    """lens.circuits.attribution recomputes a block's pattern outside the forward: for
    Gemma 2 it must apply the same soft-cap and window (layer 0 local, layer 1 global)."""
    from lens.circuits import attribution

    _, model, _, _ = built("gemma2_window_softcaps")
    tokens = jnp.asarray(_tokens(SEQ))
    out = eqx.filter_jit(lambda m, t: m.forward(t, capture=models.Capture(resid=True, attn_pattern=True)))(
        model, tokens)
    qpos, valid = jnp.arange(SEQ), jnp.ones(SEQ, bool)
    for layer in (0, 1):
        resid = out.activations.resid_pre[layer]
        mine = attribution.attention_pattern(model, layer, resid, resid, qpos, valid)
        np.testing.assert_allclose(mine, out.activations.attn_pattern[layer], atol=1e-6, rtol=0)
