"""`models.load(folder, mesh=mesh)`: each device's shard read straight from the safetensors.

The whole model is never built on the host.  How:

1. config.json -> ModelConfig; the mesh is checked against it (unknown axis names, a
   model axis that does not divide the heads / kv heads / d_mlp): errors before anything
   is read or allocated.
2. Every tensor of every *.safetensors file becomes a zero-copy, read-only numpy view of
   the memory-mapped file (the header gives each tensor's dtype, shape and byte range).
3. The family's own `convert` walks its key map over those views (the reshapes and
   transposes of the key map are views too, and every shape is checked against the
   config there: a mismatched checkpoint is an error before any allocation), and ends in
   `assemble`, which `assembling_with` replaces by `_placer`'s: for each weight and each
   device, one slice (all layers of it) is copied out of the views, cast to `dtype`,
   checked finite and put on that device before the next is read (the arrays are then
   joined with `jax.make_array_from_single_device_arrays`, the per-device form of
   `jax.make_array_from_callback`).
4. After every slice the file's pages are dropped from this process
   (`madvise(MADV_DONTNEED)`; they stay in the OS page cache), so the host holds one
   device's slice of one weight plus the pages of the tensor it came from: peak host
   memory is about one shard plus one tensor, never the model.

GGUF files are read whole and then placed with `models.shard` (they are small models).
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from ..core import sharding as S
from ..core.block import BLOCK_FIELDS, Block
from ..core.config import ModelConfig
from ..core.transformer import Transformer
from ..families import family_module
from .convert import CheckpointError, assembling_with, expected_shapes
from .safetensors_reader import PICKLE_SUFFIXES, read_config, refuse_pickle

# safetensors dtype codes -> numpy (bfloat16 / float8 from ml_dtypes, which JAX ships)
def _np_dtype(code: str):
    import ml_dtypes

    table = {
        "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
        "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
        "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
        "BOOL": np.bool_,
    }
    if code not in table:
        raise CheckpointError(f"unsupported safetensors dtype {code!r}")
    return np.dtype(table[code])


class MappedFile:
    """One memory-mapped .safetensors file: {name: read-only numpy view}, no copies."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("shorter than its 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                header = json.loads(f.read(n))
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path.name}: unreadable safetensors file (truncated or corrupt?): {e}") from None
        header.pop("__metadata__", None)
        start, size = 8 + n, len(self.mm)
        self.views: dict[str, np.ndarray] = {}
        for name, info in header.items():
            dt = _np_dtype(info["dtype"])
            shape = tuple(info["shape"])
            a, b = info["data_offsets"]
            count = int(np.prod(shape, dtype=np.int64))
            if start + b > size or b - a != count * dt.itemsize:
                raise ValueError(f"{path.name}: tensor {name!r} lies outside the file (truncated?)")
            self.views[name] = np.frombuffer(self.mm, dt, count, start + a).reshape(shape)

    def drop_pages(self) -> None:
        """Release this process's hold on the pages read so far (they stay cached)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self.mm.madvise(mmap.MADV_DONTNEED)


def map_folder(folder: Path) -> tuple[dict, dict[str, np.ndarray], list[MappedFile]]:
    """(HF config, {HF name: view}, mapped files) for a folder of *.safetensors."""
    config = read_config(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / s for s in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
        weight_map = None
    if not files:
        unsafe = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if unsafe:
            refuse_pickle(unsafe[0])
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    mapped = [MappedFile(f) for f in files]
    views: dict[str, np.ndarray] = {}
    for m in mapped:
        if weight_map is not None:
            wrong = [k for k in m.views if weight_map.get(k) != m.path.name]
            if wrong:
                raise ValueError(f"{m.path.name}: tensors not listed for it in the index: {wrong[:5]}")
        views.update(m.views)
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(views))
        if missing:
            raise ValueError(f"index lists tensors no shard holds: {missing[:5]}")
    return config, views, mapped


def _check_layout(config: ModelConfig, top: dict, per_layer: list[dict]) -> None:
    """`assemble`'s shape checks, on views (nothing read)."""
    top_shapes, block_shapes = expected_shapes(config)
    if len(per_layer) != config.n_layers:
        raise CheckpointError(f"{len(per_layer)} layers of weights for n_layers={config.n_layers}")
    for name in set(top) - set(top_shapes):
        raise CheckpointError(f"unknown top-level field {name!r}")
    entries = [(name, top.get(name), shape) for name, shape in top_shapes.items()]
    for i, lp in enumerate(per_layer):
        for name in set(lp) - set(block_shapes):
            raise CheckpointError(f"layer {i}: unknown field {name!r}")
        entries += [(f"layer {i} {name}", lp.get(name), shape) for name, shape in block_shapes.items()]
    for name, arr, shape in entries:
        if shape is None and arr is not None:
            raise CheckpointError(f"{name}: the config says this tensor is absent, but one was given")
        if shape is not None and arr is None:
            raise CheckpointError(f"{name}: missing (expected shape {shape})")
        if shape is not None and tuple(np.shape(arr)) != tuple(shape):
            raise CheckpointError(f"{name}: shape {tuple(np.shape(arr))}, expected {tuple(shape)}")


def _placer(mesh: Mesh, files: list[MappedFile]):
    """An `assemble` replacement that reads each device's slice into a sharded array."""

    def drop():
        for f in files:
            f.drop_pages()

    def place(name, shape, spec, dtype, read):
        # One device at a time (not `jax.make_array_from_callback`, which reads every
        # device's slice before placing any): the host holds one device's slice of one
        # weight.  Devices holding the same slice (replicas over "data") share one read.
        dt = np.dtype(dtype)
        sharding = NamedSharding(mesh, spec)
        by_index: dict = {}
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            key = tuple((s.start, s.stop) for s in index)
            by_index.setdefault(key, (index, []))[1].append(device)
        placed = {}
        for index, devices in by_index.values():
            out = read(index, dt)
            if np.issubdtype(dt, np.floating) and not np.isfinite(out).all():
                raise CheckpointError(f"{name}: contains NaN or inf")
            drop()
            for device in devices:
                placed[device] = jax.device_put(out, device)
            del out
        arrays = [placed[d] for d in sharding.addressable_devices_indices_map(shape)]
        return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

    def assemble_sharded(config: ModelConfig, top: dict, per_layer: list[dict], dtype) -> Transformer:
        _check_layout(config, top, per_layer)
        top_specs, block_specs = S.weight_specs(config, mesh)
        top_shapes, block_shapes = expected_shapes(config)
        fields = {}
        for name, shape in top_shapes.items():
            view = top.get(name)
            fields[name] = None if shape is None else place(
                name, shape, top_specs[name], dtype,
                lambda index, dt, view=view: np.array(view[index], dtype=dt))
        blocks = {}
        for name in BLOCK_FIELDS:
            shape = block_shapes[name]
            if shape is None:
                blocks[name] = None
                continue
            views = [lp[name] for lp in per_layer]

            def read(index, dt, views=views):
                layers = range(len(views))[index[0]]
                out = np.empty((len(layers),) + views[0][index[1:]].shape, dt)
                for j, layer in enumerate(layers):
                    out[j] = views[layer][index[1:]]
                return out

            blocks[name] = place(f"blocks.{name}", (config.n_layers, *shape), block_specs[name], dtype, read)
        return Transformer(config=config, blocks=Block(**blocks), **fields)

    return assemble_sharded


def load_sharded(folder: str | Path, mesh: Mesh, dtype) -> Transformer:
    """The model in `folder` (config.json + *.safetensors), each weight split over `mesh`
    as `models.core.sharding` declares, read one device slice at a time."""
    folder = Path(folder)
    hf = read_config(folder)
    module = family_module(hf)
    config = module.config_from_hf(hf)
    mesh = S.auto_mesh(mesh)
    S.check_mesh(config, mesh)
    _, views, files = map_folder(folder)
    try:
        with assembling_with(_placer(mesh, files)):
            model = module.convert(config, views, dtype)
    finally:
        del views
        for f in files:
            f.drop_pages()
    return model


def load_sharded_or_place(load, name_or_path, dtype, mesh: Mesh):
    """`models.load(..., mesh=mesh)`: a folder or .safetensors file is read shard by shard;
    anything else (an embedded model, a GGUF) is loaded whole by `load`, then placed."""
    from .tokenizer import Tokenizer

    path = Path(name_or_path)
    folder = path if path.is_dir() else path.parent if path.suffix == ".safetensors" and path.exists() else None
    if folder is None:
        model, tokenizer = load(name_or_path, dtype)
        return S.shard(model, mesh), tokenizer
    return load_sharded(folder, mesh, dtype), Tokenizer.from_folder(folder)
