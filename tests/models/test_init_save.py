"""models.init and models.save: a random model of each HF family, saved, is read by
transformers with the same logits (1e-5) and by models.load with identical weights; the
attention-only variant goes through the native format; init follows transformers' stds."""

import math

import equinox as eqx

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens import models
from lens.models.core.config import ModelConfig

TOKENS = np.array([3, 17, 0, 42, 5, 9, 60, 11, 2, 33, 7], np.int32)


def tiny(arch: str, **kw) -> ModelConfig:
    base = dict(architecture=arch, vocab_size=61, d_model=24, n_layers=2, n_heads=4, n_kv_heads=4,
                d_head=6, d_mlp=40, max_seq_len=32, norm_eps=1e-5)
    if arch == "gpt2":
        base |= dict(norm_kind="layer", activation="gelu_new", gated_mlp=False, positional="learned",
                     attn_bias=True, attn_out_bias=True, mlp_bias=True, norm_bias=True, tie_embeddings=True)
    elif arch == "llama":
        base |= dict(norm_kind="rms", activation="silu", gated_mlp=True, positional="rope",
                     n_kv_heads=2, rope_theta=10000.0, tie_embeddings=False)
    elif arch == "gpt_neox":
        # d_head 8 with rotary 2: 2/8 is exact; rotary_dim 2 of d_head 6 is the nudged case below
        base |= dict(norm_kind="layer", activation="gelu", gated_mlp=False, positional="rope",
                     d_model=32, d_head=8, rotary_dim=2, parallel_residual=True, attn_bias=True,
                     attn_out_bias=True, mlp_bias=True, norm_bias=True, tie_embeddings=False)
    return ModelConfig(**(base | kw))


def perturbed(model, seed=1):
    """Init sets biases to 0 and gains to 1; perturb every leaf so a writer that swaps or
    drops a bias, a gain or a layer cannot pass by accident."""
    leaves, treedef = jax.tree.flatten(model)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, leaves)


CASES = {
    "gpt2": tiny("gpt2"),
    "gpt2-untied-unscaled": tiny("gpt2", tie_embeddings=False, query_scale=1.0),
    "llama": tiny("llama"),
    "llama-bias-tied": tiny("llama", attn_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True),
    "neox": tiny("gpt_neox"),
    "neox-sequential-nudged": tiny("gpt_neox", d_model=24, d_head=6, parallel_residual=False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_is_read_by_transformers_and_models_load(name, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    ours = perturbed(models.init(CASES[name], jax.random.key(0)))
    models.save(ours, tmp_path)
    assert "lens_config" not in (tmp_path / "config.json").read_text()  # the HF format, not native

    back, tok = models.load(tmp_path)
    assert tok is None and back.config == ours.config
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    if name == "gpt2":  # trained without dropout, so transformers' train mode must not add any
        assert (hf.config.resid_pdrop, hf.config.embd_pdrop, hf.config.attn_pdrop) == (0.0, 0.0, 0.0)
    with torch.no_grad():
        theirs = hf(torch.as_tensor(TOKENS[None], dtype=torch.long)).logits[0].numpy()
    mine = np.asarray(eqx.filter_jit(lambda m, t: m(t))(ours, jnp.asarray(TOKENS)))
    assert np.abs(mine).max() > 0.1  # a non-trivial comparison
    np.testing.assert_allclose(mine, theirs, atol=1e-5, rtol=0)


def test_attention_only_roundtrips_through_the_native_format(tmp_path):
    cfg = tiny("gpt2", attn_only=True)
    model = perturbed(models.init(cfg, jax.random.key(3)))
    assert model.blocks.W_in is None and model.blocks.ln2_w is None
    with pytest.raises(ValueError, match="HF format"):
        models.save(model, tmp_path / "hf", format="hf")
    models.save(model, tmp_path / "native")
    back, _ = models.load(tmp_path / "native")
    assert back.config == cfg
    np.testing.assert_array_equal(np.asarray(back(TOKENS)), np.asarray(model(TOKENS)))


def test_attention_only_forward_is_attention_alone():
    """Independent check of the variant: the same weights in a full model whose MLP
    output weights are zero give the same logits (the MLP then adds exactly b_out = 0)."""
    full = models.init(tiny("gpt2"), jax.random.key(4))
    full = eqx.tree_at(lambda m: m.blocks.W_out, full, jnp.zeros_like(full.blocks.W_out))
    attn = models.init(tiny("gpt2", attn_only=True), jax.random.key(4))
    attn = eqx.tree_at(lambda m: (m.blocks.W_Q, m.blocks.W_K, m.blocks.W_V, m.blocks.W_O, m.embed, m.pos_embed),
                       attn, (full.blocks.W_Q, full.blocks.W_K, full.blocks.W_V, full.blocks.W_O,
                              full.embed, full.pos_embed))
    np.testing.assert_allclose(np.asarray(attn(TOKENS)), np.asarray(full(TOKENS)), atol=1e-6)


def test_init_stds_follow_transformers():
    """Sample stds against transformers' conventions (tolerance: 5% relative, far above the
    ~1% sampling error of these ~20k-element matrices)."""
    cfg = tiny("gpt2", d_model=128, d_head=32, d_mlp=256, n_layers=8, vocab_size=200)
    m = models.init(cfg, jax.random.key(0))
    std = lambda x: float(np.std(np.asarray(x)))  # noqa: E731
    assert std(m.embed) == pytest.approx(0.02, rel=0.05)
    assert std(m.blocks.W_Q) == pytest.approx(0.02, rel=0.05)
    assert std(m.blocks.W_in) == pytest.approx(0.02, rel=0.05)
    assert std(m.blocks.W_O) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert std(m.blocks.W_out) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    np.testing.assert_array_equal(np.asarray(m.blocks.ln1_w), 1.0)
    np.testing.assert_array_equal(np.asarray(m.blocks.b_Q), 0.0)
    llama = models.init(tiny("llama", d_model=128, d_head=32, d_mlp=256, n_layers=8), jax.random.key(0))
    assert std(llama.blocks.W_O) == pytest.approx(0.02, rel=0.05)  # no residual scaling outside GPT-2
    # deterministic in the key, different across keys
    again = models.init(cfg, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(again.blocks.W_Q), np.asarray(m.blocks.W_Q))
    assert not np.array_equal(np.asarray(models.init(cfg, jax.random.key(1)).embed), np.asarray(m.embed))


def test_save_writes_a_tokenizer_models_load_reads(tmp_path):
    _, tok = models.load("smollm2-135m-instruct")
    models.save(models.init(tiny("gpt2"), jax.random.key(0)), tmp_path, tokenizer=tok)
    _, back = models.load(tmp_path)
    text = "def f(x):\n    return x  # héllo"
    assert back.encode(text) == tok.encode(text)
    assert back.eos_token_ids == tok.eos_token_ids and back.bos_token_id == tok.bos_token_id
