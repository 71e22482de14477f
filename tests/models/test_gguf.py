"""GGUF reader: tiny GGUFs written here the way llama.cpp writes them.

A tiny random HF model is saved as safetensors AND written as a GGUF with llama.cpp's
conventions (names, Q/K row permutation for Llama, norms stored as 1 + w for Gemma 3).
Then:
  * transformers' own GGUF loader reads our GGUF back to the original weights, so the
    GGUF really follows llama.cpp's conventions (the next check is not circular);
  * `models.load(gguf)` and `models.load(folder)` give identical parameters and config.
The real files are checked the same way in test_real_models.py.
"""

from __future__ import annotations

import dataclasses
import re

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens import models
from lens.models.io import gguf_reader

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from gguf_tiny import (  # noqa: E402,F401
    llama_cpp_permute, tiny_gemma2, tiny_gemma3, tiny_llama, tiny_mistral, tiny_qwen3, write_gguf)


def assert_same_config(from_gguf, from_folder) -> None:
    # GGUF stores the norm epsilon as float32: equal up to that rounding, the rest exactly.
    assert np.float32(from_gguf.norm_eps) == np.float32(from_folder.norm_eps)
    assert dataclasses.replace(from_gguf, norm_eps=from_folder.norm_eps) == from_folder


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for heads, d_head, d_in in [(4, 8, 6), (1, 16, 3), (3, 64, 5)]:
        w = rng.normal(size=(heads * d_head, d_in)).astype(np.float32)
        permuted = llama_cpp_permute(w, heads)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(gguf_reader._unpermute(permuted, heads), w)


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_llama_gguf_equals_safetensors(tmp_path, tie):
    folder, path = tmp_path / "hf", tmp_path / "tiny.gguf"
    hf = tiny_llama(folder, path, tie=tie)
    # transformers' own loader recovers the original weights from our GGUF: it follows
    # llama.cpp's conventions, Q/K permutation included.
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ref = hf.state_dict()
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), ref[k].numpy(), err_msg=k)
    from_gguf, tok = models.load(path)
    from_folder, _ = models.load(folder)
    assert_same_config(from_gguf.config, from_folder.config)
    chex.assert_trees_all_equal(jax.tree_util.tree_leaves(from_gguf), jax.tree_util.tree_leaves(from_folder))
    assert tok is not None and tok.encode(" the") == [257, 258]  # merges "Ġ t", then "h e"


def test_tiny_gemma3_gguf_equals_safetensors(tmp_path):
    folder, path = tmp_path / "hf", tmp_path / "tiny.gguf"
    hf = tiny_gemma3(folder, path)
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ref = hf.state_dict()
    for k, v in back.state_dict().items():
        np.testing.assert_allclose(v.numpy(), ref[k].numpy(), atol=1e-7, err_msg=k)
    hf_config, tensors = gguf_reader.read_gguf(path)
    for k, v in tensors.items():  # -1 after +1 in float32 may round: compare to 1 ulp of 1.0
        np.testing.assert_allclose(v, ref[k].numpy(), atol=2e-7, rtol=0, err_msg=k)
    from_gguf, tok = models.load(path)
    from_folder, _ = models.load(folder)
    assert_same_config(from_gguf.config, from_folder.config)
    chex.assert_trees_all_close(
        jax.tree_util.tree_leaves(from_gguf), jax.tree_util.tree_leaves(from_folder), atol=2e-7, rtol=0
    )
    assert tok.bos_token_id == 2 and tok.eos_token_ids == (1,)
    assert tok.encode("a a", add_special_tokens=True)[0] == 2


def test_dtype_bfloat16(tmp_path):
    tiny_llama(tmp_path / "hf", tmp_path / "tiny.gguf")
    f32, _ = models.load(tmp_path / "tiny.gguf")
    bf16, _ = models.load(tmp_path / "tiny.gguf", dtype=jnp.bfloat16)
    for a, b in zip(jax.tree_util.tree_leaves(f32), jax.tree_util.tree_leaves(bf16)):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16), np.float32), np.asarray(b, np.float32))


def test_header_metadata(tmp_path):
    tiny_llama(tmp_path / "hf", tmp_path / "tiny.gguf")
    meta = gguf_reader.read_metadata(tmp_path / "tiny.gguf")
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2
    assert meta["tokenizer.ggml.tokens"][0] == "<|endoftext|>"
    hf_config, _ = gguf_reader.read_gguf(tmp_path / "tiny.gguf")
    assert hf_config["tie_word_embeddings"] is False and hf_config["head_dim"] == 8


# ------------------------------------------- Gemma 2, Qwen3, Mistral (llama.cpp conventions)
@pytest.mark.parametrize("family", ["gemma2", "qwen3", "mistral"])
def test_gemma2_qwen3_mistral_gguf_equal_safetensors(tmp_path, family):
    """Every tensor name is one gguf's own table lists for the arch; transformers' own GGUF
    loader recovers the original weights (Gemma 2's +1 norms, Mistral's Q/K permutation;
    it cannot read a Qwen3 head_dim other than 128, so Qwen3 skips that step); ours loads the
    same model as the safetensors folder, and its logits equal transformers' (1e-5).  A
    Mistral GGUF is arch "llama" (as llama.cpp writes it): the same weights, read as Llama."""
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

    folder, path = tmp_path / "hf", tmp_path / "tiny.gguf"
    hf = {"gemma2": tiny_gemma2, "qwen3": tiny_qwen3, "mistral": tiny_mistral}[family](folder, path)
    arch = {"gemma2": "gemma2", "qwen3": "qwen3", "mistral": "llama"}[family]
    arch_id = next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch)
    allowed = {TENSOR_NAMES[t] for t in MODEL_TENSORS[arch_id]}
    _, raw = gguf_reader.read_raw_tensors(path)
    for name in raw:
        assert re.sub(r"^blk\.\d+\.", "blk.{bid}.", name.rsplit(".", 1)[0]) in allowed, name
    if family != "qwen3":
        back = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
        ref = hf.state_dict()
        for k, v in back.state_dict().items():
            np.testing.assert_allclose(v.numpy(), ref[k].numpy(), atol=2e-7, rtol=0, err_msg=k)
    from_gguf, tok = models.load(path)
    from_folder, _ = models.load(folder)
    if family == "mistral":
        assert from_gguf.config.architecture == "llama"
        assert_same_config(from_gguf.config, dataclasses.replace(from_folder.config, architecture="llama"))
    else:
        assert_same_config(from_gguf.config, from_folder.config)
    chex.assert_trees_all_close(
        jax.tree_util.tree_leaves(from_gguf), jax.tree_util.tree_leaves(from_folder), atol=2e-7, rtol=0)
    tokens = np.random.RandomState(0).randint(0, 262, size=12)
    with torch.no_grad():
        want = hf(input_ids=torch.as_tensor(tokens[None])).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(eqx.filter_jit(lambda m, t: m(t))(from_gguf, jnp.asarray(tokens))), want, atol=1e-5, rtol=0)
    if family == "gemma2":
        c = from_gguf.config
        assert (c.attn_logit_softcap, c.final_logit_softcap, c.sliding_window) == (5.0, 3.0, 4)
        assert c.local_layers == (True, False, True, False)


def test_gguf_tensor_that_does_not_fit_is_named(tmp_path):
    """A misshaped Qwen3 q/k norm, a Gemma-3-only tensor in a Gemma 2 file, and an unknown
    metadata key: errors naming the GGUF tensor / key."""
    from lens.models.io.convert import CheckpointError

    def bad_norm(t):
        t["blk.1.attn_k_norm.weight"] = np.ones(13, np.float32)

    tiny_qwen3(tmp_path / "q", tmp_path / "q.gguf", tensor_fix=bad_norm)
    with pytest.raises(CheckpointError, match=r"blk\.1\.attn_k_norm\.weight.*shape|shape.*blk\.1\.attn_k_norm"):
        models.load(tmp_path / "q.gguf")

    def missing(t):
        del t["blk.0.attn_q_norm.weight"]

    tiny_qwen3(tmp_path / "m", tmp_path / "m.gguf", tensor_fix=missing)
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_q_norm\.weight"):
        models.load(tmp_path / "m.gguf")

    tiny_gemma2(tmp_path / "g", tmp_path / "g.gguf")
    meta, raw = gguf_reader.read_raw_tensors(tmp_path / "g.gguf")
    raw["blk.0.attn_q_norm.weight"] = np.ones(8, np.float32)  # a Gemma 3 tensor
    from gguf_tiny import _vocab_spm

    tokens, types = _vocab_spm(270)
    keys = {k.split("gemma2.", 1)[1]: (float(v) if isinstance(v, (float, np.floating)) else int(v))
            for k, v in meta.items() if k.startswith("gemma2.")}
    write_gguf(tmp_path / "g2.gguf", "gemma2", keys, raw,
               {"model": "llama", "tokens": tokens, "types": types, "bos": 2, "eos": 1, "pad": 0})
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_q_norm\.weight"):
        models.load(tmp_path / "g2.gguf")
    tiny_gemma2(tmp_path / "k", tmp_path / "k.gguf", meta_extra={"attention.surprise_key": 1})
    with pytest.raises(ValueError, match="surprise_key"):
        models.load(tmp_path / "k.gguf")
