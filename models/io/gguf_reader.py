"""Read a GGUF file into (HF config dict, {HF tensor name: float32 ndarray}).

The same family converter then serves GGUF and safetensors alike: both readers produce
{HF tensor name: ndarray}, so there is one name map per family, not one per format.
What this module owns is the translation from llama.cpp's conventions to HF's:

  * metadata `{arch}.*` keys -> an HF `config.json`-style dict, as transformers' own GGUF
    loader would build it; unknown `{arch}.*` keys are refused, not ignored;
  * tensor names `blk.{i}.attn_q.weight` -> `model.layers.{i}.self_attn.q_proj.weight`,
    through each family's GGUF_LAYER_NAMES / GGUF_TOP_NAMES map; unknown names are refused;
  * quantised blocks -> float32 via `gguf.quants.dequantize` (already [out, in]);
  * Llama: llama.cpp permutes the rows of Q and K (interleaved -> half-split rotary
    pairs); undo it per head so the weights equal the HF checkpoint's;
  * Gemma 2 / 3: llama.cpp stores every norm gain as (1 + w); subtract 1 (HF stores w).
  * Mistral: llama.cpp writes it as arch "llama" (and runs it without a sliding window),
    so a Mistral GGUF loads as the Llama model llama.cpp runs.
  * Qwen3: not permuted (llama.cpp runs Qwen's rotary NeoX-style, HF's layout).

The header is parsed here with `struct` on a memory map rather than `gguf.GGUFReader`,
which builds a numpy view per vocabulary string (seconds for a 262k vocabulary).
"""

from __future__ import annotations

import mmap
import re
import struct
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from .convert import CheckpointError

GGUF_MAGIC = b"GGUF"
# GGUF metadata value types: fixed-size scalars by struct format; 8 = string, 9 = array.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The file is not a readable GGUF (wrong magic, truncated, corrupt)."""


# ------------------------------------------------------------------------------ parsing
class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise GGUFFormatError(f"{self.path.name}: truncated GGUF header (ends at byte {len(self.buf)})")
        vals = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return vals if len(vals) > 1 else vals[0]

    def string(self) -> str:
        n = self.unpack("Q")
        if self.pos + n > len(self.buf):
            raise GGUFFormatError(f"{self.path.name}: truncated GGUF header (a string runs past the end)")
        s = self.buf[self.pos : self.pos + n].decode("utf-8", errors="strict")
        self.pos += n
        return s

    def _strings(self, count: int) -> list[str]:
        # The hot loop for vocabularies (262k strings for Gemma): no per-item method calls.
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                raise GGUFFormatError(f"{self.path.name}: truncated GGUF header (in a string array)")
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > end:
                raise GGUFFormatError(f"{self.path.name}: truncated GGUF header (in a string array)")
            out.append(buf[pos : pos + n].decode("utf-8"))
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("I"), self.unpack("Q")
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype])
                end = self.pos + count * dt.itemsize
                if end > len(self.buf):
                    raise GGUFFormatError(f"{self.path.name}: truncated GGUF header (an array runs past the end)")
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
                self.pos = end
                return arr
            if etype == _STRING:
                return self._strings(count)
            return [self.value(etype) for _ in range(count)]
        raise GGUFFormatError(f"{self.path.name}: unknown GGUF metadata value type {vtype} (corrupt file?)")


def read_header(path: str | Path) -> tuple[dict, dict[str, tuple[tuple[int, ...], int, int]], np.ndarray, int]:
    """(metadata, {name: (shape [out..., in], ggml type, offset)}, file bytes, data start).

    Shapes are in numpy/HF order (GGUF lists dimensions fastest-first; we reverse them).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (ValueError, OSError) as e:  # an empty file cannot be mapped
        raise GGUFFormatError(f"{path.name}: not a readable GGUF file ({e})") from None
    if mm[:4] != GGUF_MAGIC:
        raise GGUFFormatError(f"{path.name}: not a GGUF file (magic {mm[:4]!r}, expected b'GGUF')")
    cur = _Cursor(mm, path)
    cur.pos = 4
    try:
        version = cur.unpack("I")
        if version not in (2, 3):
            raise GGUFFormatError(f"{path.name}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise GGUFFormatError(f"{path.name}: implausible GGUF counts ({n_tensors} tensors, {n_kv} keys): corrupt")
        meta = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.unpack("I"))
        infos = {}
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("I")
            if n_dims > 8:
                raise GGUFFormatError(f"{path.name}: tensor {name!r} has {n_dims} dimensions: corrupt")
            dims = [cur.unpack("Q") for _ in range(n_dims)]
            ggml_type, offset = cur.unpack("I"), cur.unpack("Q")
            infos[name] = (tuple(reversed(dims)), ggml_type, offset)
    except UnicodeDecodeError as e:
        raise GGUFFormatError(f"{path.name}: corrupt GGUF header (bad UTF-8: {e})") from None
    align = int(meta.get("general.alignment", 32))
    data_start = (cur.pos + align - 1) // align * align
    return meta, infos, np.frombuffer(mm, dtype=np.uint8), data_start


def read_metadata(path: str | Path) -> dict:
    """Just the key/value metadata (tokenizer vocabularies included)."""
    return read_header(path)[0]


def _tensor_bytes(name: str, shape: tuple[int, ...], ggml_type: int, path: Path) -> tuple[GGMLQuantizationType, int, int]:
    """(type, row count, bytes per row) for a tensor whose last (fastest) axis is a row."""
    try:
        qtype = GGMLQuantizationType(ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise GGUFFormatError(f"{path.name}: tensor {name!r} has unknown ggml type {ggml_type}") from None
    if not shape or shape[-1] % block:
        raise GGUFFormatError(f"{path.name}: tensor {name!r} shape {shape} is not whole {qtype.name} blocks")
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return qtype, rows, shape[-1] // block * type_size


def read_raw_tensors(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, {GGUF tensor name: float32 array}) with no renaming or fix-ups."""
    path = Path(path)
    meta, infos, buf, data_start = read_header(path)
    tensors = {}
    for name, (shape, ggml_type, offset) in infos.items():
        qtype, rows, row_bytes = _tensor_bytes(name, shape, ggml_type, path)
        start, nbytes = data_start + offset, rows * row_bytes
        if start + nbytes > len(buf):
            raise GGUFFormatError(
                f"{path.name}: truncated GGUF file: tensor {name!r} needs bytes up to {start + nbytes}, "
                f"the file has {len(buf)}"
            )
        raw = buf[start : start + nbytes].reshape(rows, row_bytes)
        try:
            arr = dequantize(raw, qtype)
        except NotImplementedError:
            raise GGUFFormatError(f"{path.name}: tensor {name!r}: {qtype.name} dequantisation is not supported") from None
        if qtype == GGMLQuantizationType.F32:
            arr = arr.copy()  # a view of the read-only map otherwise
        tensors[name] = arr.astype(np.float32, copy=False).reshape(shape)
    return meta, tensors


# ------------------------------------------------------------------ config from metadata
def _get(meta: dict, key: str, default=None, required: bool = True):
    if key in meta:
        v = meta[key]
        return v.item() if isinstance(v, np.generic) else v
    if required and default is None:
        raise GGUFFormatError(f"GGUF metadata lacks {key!r}")
    return default


def _token_ids(meta: dict) -> dict:
    out = {}
    for gguf_key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("padding_token_id", "pad_token_id")):
        v = _get(meta, "tokenizer.ggml." + gguf_key, required=False)
        if v is not None:
            out[hf_key] = int(v)
    return out


def _rope(meta: dict, arch: str, theta_default: float) -> dict:
    params = {"rope_type": "default", "rope_theta": float(_get(meta, f"{arch}.rope.freq_base", theta_default))}
    kind = _get(meta, f"{arch}.rope.scaling.type", "none", required=False)
    if kind == "linear":
        params.update(rope_type="linear", factor=float(_get(meta, f"{arch}.rope.scaling.factor")))
    elif kind != "none":
        raise ValueError(f"GGUF {arch}: rope scaling type {kind!r} is not supported")
    return params


# `{arch}.*` metadata keys each builder understands; any other key is refused.
_COMMON_KEYS = {
    "context_length", "embedding_length", "block_count", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "rope.freq_base", "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor",
    "vocab_size", "attention.key_length", "attention.value_length",
}
_ARCH_KEYS = {
    "llama": _COMMON_KEYS,
    "qwen3": _COMMON_KEYS,
    "gemma2": _COMMON_KEYS | {"attention.sliding_window", "attn_logit_softcapping", "final_logit_softcapping"},
    "gemma3": _COMMON_KEYS | {"attention.sliding_window"},
}


def _check_arch_keys(meta: dict, arch: str) -> None:
    prefix = arch + "."
    unknown = sorted(k for k in meta if k.startswith(prefix) and k[len(prefix):] not in _ARCH_KEYS[arch])
    if unknown:
        raise ValueError(
            f"GGUF {arch}: metadata key(s) {unknown} are not understood; refusing to load a possibly "
            "different model"
        )


def _llama_config(meta: dict, tensors: dict, arch: str = "llama") -> dict:
    a = arch
    d = int(_get(meta, f"{a}.embedding_length"))
    heads = int(_get(meta, f"{a}.attention.head_count"))
    head_dim = int(_get(meta, f"{a}.attention.key_length", d // heads))
    rot = int(_get(meta, f"{a}.rope.dimension_count", head_dim))
    if rot != head_dim or int(_get(meta, f"{a}.attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"GGUF {a}: rope.dimension_count={rot} / value_length differ from head_dim={head_dim}")
    return {
        "model_type": "llama",
        "vocab_size": int(_get(meta, f"{a}.vocab_size", len(meta.get("tokenizer.ggml.tokens", [])) or None)),
        "hidden_size": d,
        "intermediate_size": int(_get(meta, f"{a}.feed_forward_length")),
        "num_hidden_layers": int(_get(meta, f"{a}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_get(meta, f"{a}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_get(meta, f"{a}.context_length")),
        "rms_norm_eps": float(_get(meta, f"{a}.attention.layer_norm_rms_epsilon")),
        "rope_parameters": _rope(meta, a, 10000.0),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensors,
        **_token_ids(meta),
    }


def _gemma3_config(meta: dict, tensors: dict) -> dict:
    a = "gemma3"
    n_layers = int(_get(meta, f"{a}.block_count"))
    heads = int(_get(meta, f"{a}.attention.head_count"))
    key_length = int(_get(meta, f"{a}.attention.key_length"))
    if int(_get(meta, f"{a}.attention.value_length", key_length)) != key_length:
        raise ValueError("GGUF gemma3: attention.value_length != key_length is not supported")
    full = _rope(meta, a, 1_000_000.0)
    return {
        "model_type": "gemma3_text",
        "vocab_size": int(_get(meta, f"{a}.vocab_size", len(meta.get("tokenizer.ggml.tokens", [])) or None)),
        "hidden_size": int(_get(meta, f"{a}.embedding_length")),
        "intermediate_size": int(_get(meta, f"{a}.feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(_get(meta, f"{a}.attention.head_count_kv", heads)),
        "head_dim": key_length,
        "query_pre_attn_scalar": key_length,  # as llama.cpp's gemma3 graph scales queries
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": int(_get(meta, f"{a}.context_length")),
        "rms_norm_eps": float(_get(meta, f"{a}.attention.layer_norm_rms_epsilon")),
        # GGUF stores only the global theta; local layers use Gemma 3's fixed 10k.
        "rope_parameters": {
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "sliding_window": int(_get(meta, f"{a}.attention.sliding_window")),
        # llama.cpp's gemma3: every 6th layer is global, the rest sliding-window.
        "layer_types": [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)
        ],
        "attention_bias": False,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "tie_word_embeddings": "output.weight" not in tensors,
        **_token_ids(meta),
    }


def _qwen3_config(meta: dict, tensors: dict) -> dict:
    """As `_llama_config` (same keys), for transformers' Qwen3: q/k norms, no biases."""
    hf = _llama_config(meta, tensors, arch="qwen3")
    hf["model_type"] = "qwen3"
    del hf["mlp_bias"]
    return hf


def _gemma2_config(meta: dict, tensors: dict) -> dict:
    a = "gemma2"
    n_layers = int(_get(meta, f"{a}.block_count"))
    d = int(_get(meta, f"{a}.embedding_length"))
    heads = int(_get(meta, f"{a}.attention.head_count"))
    key_length = int(_get(meta, f"{a}.attention.key_length", d // heads))
    if int(_get(meta, f"{a}.attention.value_length", key_length)) != key_length:
        raise ValueError("GGUF gemma2: attention.value_length != key_length is not supported")
    return {
        "model_type": "gemma2",
        "vocab_size": int(_get(meta, f"{a}.vocab_size", len(meta.get("tokenizer.ggml.tokens", [])) or None)),
        "hidden_size": d,
        "intermediate_size": int(_get(meta, f"{a}.feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(_get(meta, f"{a}.attention.head_count_kv", heads)),
        "head_dim": key_length,
        # llama.cpp's gemma2 query scale: 1/sqrt(d_model / heads) for the 27B (46 layers),
        # 1/sqrt(key_length) otherwise (google's query_pre_attn_scalar of each size).
        "query_pre_attn_scalar": d // heads if n_layers == 46 else key_length,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": int(_get(meta, f"{a}.context_length")),
        "rms_norm_eps": float(_get(meta, f"{a}.attention.layer_norm_rms_epsilon")),
        "rope_parameters": _rope(meta, a, 10000.0),
        # llama.cpp's defaults when a key is absent: window 4096, caps 50 and 30.
        "sliding_window": int(_get(meta, f"{a}.attention.sliding_window", 4096)),
        # llama.cpp's gemma2: layers alternate sliding-window (even) and global (odd).
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)],
        "attn_logit_softcapping": float(_get(meta, f"{a}.attn_logit_softcapping", 50.0)),
        "final_logit_softcapping": float(_get(meta, f"{a}.final_logit_softcapping", 30.0)),
        "attention_bias": False,
        "tie_word_embeddings": "output.weight" not in tensors,
        **_token_ids(meta),
    }


# general.architecture -> (config builder, family module, undo Llama's Q/K permutation,
#                          subtract 1 from norm gains)
_ARCHITECTURES = {
    "llama": (_llama_config, "lens.models.families.llama", True, False),
    "gemma3": (_gemma3_config, "lens.models.families.gemma3", False, True),
    "gemma2": (_gemma2_config, "lens.models.families.gemma2", False, True),
    "qwen3": (_qwen3_config, "lens.models.families.qwen3", False, False),
}


def gguf_tensor_names(message: str, hf_config: dict) -> str:
    """`message` with each HF tensor name it quotes followed by its GGUF name, so an error
    the shared converter raises about a GGUF's tensor names the tensor in the file."""
    import importlib

    from ..families import FAMILIES

    family = importlib.import_module(FAMILIES[hf_config["model_type"]])
    layer = {v: k for k, v in family.GGUF_LAYER_NAMES.items()}
    top = {v: k for k, v in family.GGUF_TOP_NAMES.items()}

    def name(m: re.Match) -> str:
        hf_name = m.group(1)
        b = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
        gguf = f"blk.{b.group(1)}.{layer[b.group(2)]}" if b and b.group(2) in layer else top.get(hf_name)
        return m.group(0) if gguf is None else f"{m.group(0)} (GGUF tensor {gguf!r})"

    return re.sub(r"'((?:model|lm_head)[\w.]*)'", name, message)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a [heads*d_head, d_in] Q or K weight.

    llama.cpp reorders each head's rows from HF's half-split rotary layout (x_i paired with
    x_{i+d/2}) to interleaved pairs (x_{2i}, x_{2i+1}): rows go (2, d/2) -> (d/2, 2).
    Reading them as (d/2, 2) and swapping back restores HF's order.
    """
    out = w.shape[0]
    return w.reshape(heads, out // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def read_gguf(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(HF-style config dict, {HF tensor name: float32 ndarray}) from a GGUF file."""
    import importlib

    path = Path(path)
    meta, raw = read_raw_tensors(path)
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{path.name}: unknown GGUF architecture general.architecture={arch!r}; "
            f"supported: {sorted(_ARCHITECTURES)}"
        )
    build, module_name, permuted_qk, norm_plus_one = _ARCHITECTURES[arch]
    _check_arch_keys(meta, arch)
    hf_config = build(meta, raw)
    family = importlib.import_module(module_name)
    heads, kv_heads = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    tensors: dict[str, np.ndarray] = {}
    for name, arr in raw.items():
        m = _BLOCK.fullmatch(name)
        if m and m.group(2) in family.GGUF_LAYER_NAMES:
            short = m.group(2)
            hf_name = f"model.layers.{m.group(1)}.{family.GGUF_LAYER_NAMES[short]}"
        elif name in family.GGUF_TOP_NAMES:
            short = name
            hf_name = family.GGUF_TOP_NAMES[name]
        else:
            raise CheckpointError(f"{path.name}: unexpected GGUF tensor {name!r} for architecture {arch!r}")
        if permuted_qk and short in ("attn_q.bias", "attn_k.bias"):
            raise CheckpointError(f"{path.name}: {name}: Q/K biases in a llama GGUF are not supported")
        if permuted_qk and short == "attn_q.weight":
            arr = _unpermute(arr, heads)
        elif permuted_qk and short == "attn_k.weight":
            arr = _unpermute(arr, kv_heads)
        if norm_plus_one and short.endswith("norm.weight"):
            arr = arr - np.float32(1.0)
        tensors[hf_name] = arr
    return hf_config, tensors
