"""Read a Hugging Face folder: config.json + *.safetensors (single or sharded).

Never unpickles: `.bin`/`.pt`/`.pth`/`.ckpt` checkpoints are refused with an error
saying why, since loading them would execute code from the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class UnsafeCheckpointError(ValueError):
    """A checkpoint format that would execute code when loaded."""


def refuse_pickle(path: Path) -> None:
    """Raise UnsafeCheckpointError for pickle-based checkpoint files (never opened)."""
    if path.suffix in PICKLE_SUFFIXES:
        raise UnsafeCheckpointError(
            f"{path.name}: pickle-based checkpoints are refused (loading one runs code from "
            "the file). Convert it to safetensors, e.g. with transformers' "
            "`save_pretrained(..., safe_serialization=True)`."
        )


def read_config(folder: Path) -> dict:
    """The folder's config.json as a dict (clear errors if missing or not JSON)."""
    cfg = folder / "config.json"
    if not cfg.exists():
        raise FileNotFoundError(f"{folder}: no config.json")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from None


def _load_one(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path.name}: unreadable safetensors file (truncated or corrupt?): {e}") from None


def read_safetensors_folder(folder: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(HF config dict, {HF tensor name: numpy array}) from a model folder."""
    folder = Path(folder)
    config = read_config(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("*.safetensors"))
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        tensors: dict[str, np.ndarray] = {}
        for shard in shards:
            part = _load_one(folder / shard)
            wrong = [k for k in part if weight_map.get(k) != shard]
            if wrong:
                raise ValueError(f"{shard}: tensors not listed for it in the index: {wrong[:5]}")
            tensors.update(part)
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"index lists tensors no shard holds: {missing[:5]}")
        return config, tensors
    if not files:
        unsafe = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if unsafe:
            refuse_pickle(unsafe[0])
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    tensors = {}
    for f in files:
        tensors.update(_load_one(f))
    return config, tensors
