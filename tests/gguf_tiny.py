"""Tiny llama.cpp-style GGUF files written by the tests (names, Q/K row permutation for Llama,
norms stored as 1 + w for Gemma 3), from tiny random transformers models."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
tf = pytest.importorskip("transformers")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF half-split -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab_gpt2(n: int):
    from lens.models.io.gguf_vocab import bytes_to_unicode

    tokens = ["<|endoftext|>"] + list(bytes_to_unicode().values()) + ["\u0120t", "he"]
    tokens += [f"<extra_{i}>" for i in range(n - len(tokens))]
    types = [3] + [1] * (len(tokens) - 1)
    return tokens, ["\u0120 t", "h e"], types


def _vocab_spm(n: int):
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", "a", "\u2581a"]
    tokens += [f"<unused{i}>" for i in range(n - len(tokens))]
    types = [3, 3, 3, 2] + [6] * 256 + [1] * (n - 260)
    return tokens, types


def write_gguf(path, arch: str, meta: dict, tensors: dict[str, np.ndarray], tokenizer: dict) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        if isinstance(value, float):
            w.add_float32(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", value)
    w.add_tokenizer_model(tokenizer["model"])
    w.add_token_list(tokenizer["tokens"])
    w.add_token_types(tokenizer["types"])
    if tokenizer.get("merges"):
        w.add_token_merges(tokenizer["merges"])
    w.add_bos_token_id(tokenizer["bos"])
    w.add_eos_token_id(tokenizer["eos"])
    if tokenizer.get("pad") is not None:
        w.add_pad_token_id(tokenizer["pad"])
    for name, arr in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_llama(folder, gguf_path, tie: bool = False):
    """A tiny GQA Llama saved as safetensors in `folder` and as a llama.cpp-style GGUF."""
    from hf_tiny import save_tiny

    V, H, KV, D, L = 262, 4, 2, 8, 2
    cfg = tf.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=KV, head_dim=D, max_position_embeddings=64, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
        bos_token_id=0, eos_token_id=0, pad_token_id=None, initializer_range=0.1,
    )
    hf = save_tiny(cfg, folder)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    inv = {v: k for k, v in __import__("lens.models.families.llama", fromlist=["x"]).GGUF_LAYER_NAMES.items()}
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not tie:
        tensors["output.weight"] = sd["lm_head.weight"]
    for i in range(L):
        for short, hf_name in ((g, h) for h, g in inv.items()):
            key = f"model.layers.{i}.{hf_name}"
            if key not in sd:
                continue
            arr = sd[key]
            if short == "attn_q.weight":
                arr = llama_cpp_permute(arr, H)
            elif short == "attn_k.weight":
                arr = llama_cpp_permute(arr, KV)
            tensors[f"blk.{i}.{short}"] = arr
    tokens, merges, types = _vocab_gpt2(V)
    meta = {
        "context_length": 64, "embedding_length": 32, "block_count": L, "feed_forward_length": 48,
        "attention.head_count": H, "attention.head_count_kv": KV, "attention.key_length": D,
        "attention.value_length": D, "rope.dimension_count": D, "rope.freq_base": 1000.0,
        "attention.layer_norm_rms_epsilon": 1e-5, "vocab_size": V,
    }
    write_gguf(gguf_path, "llama", meta, tensors, {"model": "gpt2", "tokens": tokens, "merges": merges, "types": types, "bos": 0, "eos": 0})
    return hf


def tiny_gemma3(folder, gguf_path):
    """A tiny Gemma 3 (6 layers: llama.cpp's 5 local + 1 global pattern) in both formats."""
    from hf_tiny import save_tiny

    V, H, KV, D, L = 270, 4, 2, 8, 6
    cfg = tf.Gemma3TextConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=KV, head_dim=D, max_position_embeddings=64, rms_norm_eps=1e-6,
        query_pre_attn_scalar=D, sliding_window=4,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(L)],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        bos_token_id=2, eos_token_id=1, pad_token_id=0, initializer_range=0.1,
    )
    hf = save_tiny(cfg, folder)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    from lens.models.families import gemma3

    inv = {h: g for g, h in gemma3.GGUF_LAYER_NAMES.items()}
    plus1 = lambda name, a: a + 1.0 if name.endswith("norm.weight") else a  # noqa: E731
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"] + 1.0}
    for i in range(L):
        for hf_name, short in inv.items():
            tensors[f"blk.{i}.{short}"] = plus1(short, sd[f"model.layers.{i}.{hf_name}"])
    tokens, types = _vocab_spm(V)
    meta = {
        "context_length": 64, "embedding_length": 32, "block_count": L, "feed_forward_length": 48,
        "attention.head_count": H, "attention.head_count_kv": KV, "attention.key_length": D,
        "attention.value_length": D, "rope.freq_base": 1_000_000.0, "attention.sliding_window": 4,
        "attention.layer_norm_rms_epsilon": 1e-6,
    }
    write_gguf(gguf_path, "gemma3", meta, tensors, {"model": "llama", "tokens": tokens, "types": types, "bos": 2, "eos": 1, "pad": 0})
    return hf


def _gguf_tensors(hf, module, n_layers: int, plus_one: bool = False, permute: tuple[int, int] | None = None):
    """llama.cpp-named tensors of a transformers model through `module`'s GGUF name maps
    (norm gains + 1 for Gemma; Q/K rows permuted for llama-arch files: (heads, kv_heads))."""
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    top = {h: g for g, h in module.GGUF_TOP_NAMES.items()}
    fix = lambda short, a: a + 1.0 if plus_one and short.endswith("norm.weight") else a  # noqa: E731
    tensors = {top[k]: fix(top[k], sd[k]) for k in top if k in sd}
    if getattr(hf.config, "tie_word_embeddings", False):
        tensors.pop("output.weight", None)
    for i in range(n_layers):
        for short, hf_name in module.GGUF_LAYER_NAMES.items():
            key = f"model.layers.{i}.{hf_name}"
            if key not in sd:
                continue
            arr = fix(short, sd[key])
            if permute and short == "attn_q.weight":
                arr = llama_cpp_permute(arr, permute[0])
            elif permute and short == "attn_k.weight":
                arr = llama_cpp_permute(arr, permute[1])
            tensors[f"blk.{i}.{short}"] = arr
    return tensors


def tiny_gemma2(folder, gguf_path, meta_extra: dict | None = None):
    """A tiny Gemma 2 (4 layers, llama.cpp's alternating local/global; caps 5 and 3) in both formats."""
    from hf_tiny import save_tiny
    from lens.models.families import gemma2

    V, H, KV, D, L = 270, 4, 2, 8, 4
    cfg = tf.Gemma2Config(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=KV, head_dim=D, max_position_embeddings=64, rms_norm_eps=1e-6,
        query_pre_attn_scalar=D, sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        bos_token_id=2, eos_token_id=1, pad_token_id=0, initializer_range=0.1,
    )
    hf = save_tiny(cfg, folder)
    tokens, types = _vocab_spm(V)
    meta = {
        "context_length": 64, "embedding_length": 32, "block_count": L, "feed_forward_length": 48,
        "attention.head_count": H, "attention.head_count_kv": KV, "attention.key_length": D,
        "attention.value_length": D, "rope.freq_base": 10000.0, "attention.sliding_window": 4,
        "attention.layer_norm_rms_epsilon": 1e-6, "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 3.0, **(meta_extra or {}),
    }
    write_gguf(gguf_path, "gemma2", meta, _gguf_tensors(hf, gemma2, L, plus_one=True),
               {"model": "llama", "tokens": tokens, "types": types, "bos": 2, "eos": 1, "pad": 0})
    return hf


def tiny_qwen3(folder, gguf_path, tensor_fix=None):
    """A tiny Qwen3 (head_dim 12 != 32 / 4, GQA, q/k norms) in both formats; `tensor_fix`
    edits the GGUF tensor dict before writing (to break it)."""
    from hf_tiny import save_tiny
    from lens.models.families import qwen3

    V, H, KV, D, L = 262, 4, 2, 12, 2
    cfg = tf.Qwen3Config(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=KV, head_dim=D, max_position_embeddings=64, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, initializer_range=0.1,
    )
    hf = save_tiny(cfg, folder)
    tensors = _gguf_tensors(hf, qwen3, L)
    if tensor_fix is not None:
        tensor_fix(tensors)
    tokens, merges, types = _vocab_gpt2(V)
    meta = {
        "context_length": 64, "embedding_length": 32, "block_count": L, "feed_forward_length": 48,
        "attention.head_count": H, "attention.head_count_kv": KV, "attention.key_length": D,
        "attention.value_length": D, "rope.dimension_count": D, "rope.freq_base": 1000.0,
        "attention.layer_norm_rms_epsilon": 1e-6, "vocab_size": V,
    }
    write_gguf(gguf_path, "qwen3", meta, tensors,
               {"model": "gpt2", "tokens": tokens, "merges": merges, "types": types, "bos": 0, "eos": 0})
    return hf


def tiny_mistral(folder, gguf_path):
    """A tiny Mistral (no window, as Mistral 7B v0.2+) and the llama-arch GGUF llama.cpp writes for it."""
    from hf_tiny import save_tiny
    from lens.models.families import llama

    V, H, KV, D, L = 262, 4, 2, 8, 2
    cfg = tf.MistralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=KV, head_dim=D, max_position_embeddings=64, rms_norm_eps=1e-5,
        sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
        bos_token_id=0, eos_token_id=0, initializer_range=0.1,
    )
    hf = save_tiny(cfg, folder)
    tokens, merges, types = _vocab_gpt2(V)
    meta = {
        "context_length": 64, "embedding_length": 32, "block_count": L, "feed_forward_length": 48,
        "attention.head_count": H, "attention.head_count_kv": KV, "attention.key_length": D,
        "attention.value_length": D, "rope.dimension_count": D, "rope.freq_base": 1000.0,
        "attention.layer_norm_rms_epsilon": 1e-5, "vocab_size": V,
    }
    write_gguf(gguf_path, "llama", meta, _gguf_tensors(hf, llama, L, permute=(H, KV)),
               {"model": "gpt2", "tokens": tokens, "merges": merges, "types": types, "bos": 0, "eos": 0})
    return hf
