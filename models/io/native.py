"""The project's own checkpoint format, for models no HF family can describe.

An attention-only model, a model with an unembedding bias, or any config the HF writers
in models/io/save.py cannot express exactly is saved as

    config.json        {"model_type": "lens", "lens_config": {ModelConfig fields}}
    model.safetensors  our field names: "embed", "pos_embed", ..., "blocks.W_Q" [layers, ...]

and read back by `models.load(folder)` through this module (registered as model_type
"lens" in models/families/__init__.py).  transformers cannot read it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..core.block import BLOCK_FIELDS
from ..core.config import ModelConfig, RopeScaling
from .convert import CheckpointError, TensorTaker, assemble, expected_shapes

MODEL_TYPE = "lens"
_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_TUPLES = {"eos_token_ids", "local_layers"}


def config_to_hf(config: ModelConfig) -> dict:
    """ModelConfig -> the config.json dict of the native format (JSON-safe)."""
    return {"model_type": MODEL_TYPE, "lens_config": dataclasses.asdict(config)}


def config_from_hf(hf: dict) -> ModelConfig:
    """The native config.json dict -> ModelConfig, refusing fields it does not know."""
    extra = sorted(set(hf) - {"model_type", "lens_config"})
    fields = dict(hf.get("lens_config") or {})
    unknown = sorted(set(fields) - _FIELDS)
    if extra or unknown:
        raise ValueError(f"lens checkpoint: unknown config field(s) {extra + unknown}")
    for name in _TUPLES:
        if fields.get(name) is not None:
            fields[name] = tuple(fields[name])
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    return ModelConfig(**fields)


def to_tensors(model) -> dict[str, np.ndarray]:
    """{our name: array} of every weight present (blocks stacked over layers)."""
    out = {}
    top, block = expected_shapes(model.config)
    for name in top:
        value = getattr(model, name)
        if value is not None:
            out[name] = np.asarray(value)
    for name in BLOCK_FIELDS:
        value = getattr(model.blocks, name)
        if value is not None:
            out[f"blocks.{name}"] = np.asarray(value)
    return out


def convert(config: ModelConfig, tensors: dict[str, np.ndarray], dtype):
    """Native tensors -> Transformer (every shape checked by `assemble`)."""
    t = TensorTaker(tensors)
    top_shapes, block_shapes = expected_shapes(config)
    top = {n: t.take(n) for n, s in top_shapes.items() if s is not None}
    stacked = {n: t.take(f"blocks.{n}") for n, s in block_shapes.items() if s is not None}
    for name, arr in stacked.items():
        if arr.shape[0] != config.n_layers:
            raise CheckpointError(f"blocks.{name}: {arr.shape[0]} layers, expected {config.n_layers}")
    t.finish()
    per_layer = [{n: a[i] for n, a in stacked.items()} for i in range(config.n_layers)]
    return assemble(config, top, per_layer, dtype)
