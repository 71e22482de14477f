"""How a model splits over devices, declared once: every weight's axes by name, one rule
from those names to mesh axes, and one function that places a model on a mesh.

    mesh = models.make_mesh(data=2, model=4)          # 8 devices: (data, model)
    model = models.shard(model, mesh)                 # a model already in memory
    model, tok = models.load(folder, mesh=mesh)       # or read straight into its shards

Mesh axes (any subset, any order; other names are refused):
  "data"   batches (prompts, vectors of a sweep, KV caches of a batch); weights replicated
  "model"  tensor parallelism (Megatron): attention heads, kv heads, d_mlp and the
           vocabulary split; GSPMD inserts the all-reduces.  Must divide n_heads,
           n_kv_heads and d_mlp (an error otherwise); the vocabulary is split only when
           it divides (replicated otherwise).
  "fsdp"   the d_model axis of every matrix split (FSDP / ZeRO-3 style: weights are
           all-gathered per matmul, so each device stores 1/fsdp of them); must divide d_model.

Each weight's logical axes are in `BLOCK_AXES` / `TOP_AXES` (the block's leading layer
axis is never split: the forward scans over it).  `RULES` maps logical axes to mesh axes.
Activations, KV caches and `Edits` follow: `place_batch` puts any array (or pytree)
with a leading batch axis on "data"; `kv_cache_sharding` splits a cache's kv heads over
"model"; everything else is left to `jax.jit`'s propagation (GSPMD), so every tool runs
unchanged on a sharded model.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from .config import ModelConfig

DATA, MODEL, FSDP = "data", "model", "fsdp"
MESH_AXES = (DATA, MODEL, FSDP)

# Logical axes of each weight (blocks: without the leading [layers] axis).
BLOCK_AXES: dict[str, tuple[str, ...]] = {
    "ln1_w": ("d_model",), "ln1_b": ("d_model",),
    "W_Q": ("heads", "d_model_in", "d_head"), "b_Q": ("heads", "d_head"),
    "W_K": ("kv_heads", "d_model_in", "d_head"), "b_K": ("kv_heads", "d_head"),
    "W_V": ("kv_heads", "d_model_in", "d_head"), "b_V": ("kv_heads", "d_head"),
    "W_O": ("heads", "d_head", "d_model_in"), "b_O": ("d_model",),
    "q_norm_w": ("d_head",), "k_norm_w": ("d_head",), "post_attn_w": ("d_model",),
    "ln2_w": ("d_model",), "ln2_b": ("d_model",),
    "W_in": ("d_model_in", "mlp"), "b_in": ("mlp",),
    "W_gate": ("d_model_in", "mlp"), "b_gate": ("mlp",),
    "W_out": ("mlp", "d_model_in"), "b_out": ("d_model",),
    "post_mlp_w": ("d_model",),
}
TOP_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "d_model_in"), "pos_embed": ("ctx", "d_model_in"),
    "final_norm_w": ("d_model",), "final_norm_b": ("d_model",),
    "unembed": ("vocab", "d_model_in"), "unembed_b": ("vocab",),
}
# logical axis -> mesh axis.  "d_model_in" is d_model inside a matrix (split by fsdp);
# plain "d_model" (norm gains, output biases) stays replicated: small, used everywhere.
RULES: dict[str, str] = {
    "heads": MODEL, "kv_heads": MODEL, "mlp": MODEL, "vocab": MODEL, "d_model_in": FSDP,
}


def _sizes(config: ModelConfig) -> dict[str, int]:
    return {"heads": config.n_heads, "kv_heads": config.n_kv_heads, "mlp": config.d_mlp,
            "vocab": config.vocab_size, "d_model_in": config.d_model}


def make_mesh(data: int = 1, model: int | None = None, fsdp: int = 1, devices=None) -> Mesh:
    """A ("data", "model", "fsdp") mesh over `devices` (default: every device of every
    process); `model` defaults to what is left after data and fsdp.  The product must
    equal the number of devices (a ValueError naming the counts otherwise)."""
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    for name, v in (("data", data), ("fsdp", fsdp), ("model", model)):
        if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"mesh axis {name}={v!r} must be a positive integer")
    if model is None:
        if n % (data * fsdp):
            raise ValueError(f"{n} devices do not split into data={data} x fsdp={fsdp}")
        model = n // (data * fsdp)
    if data * model * fsdp != n:
        raise ValueError(f"a data={data} x model={model} x fsdp={fsdp} mesh needs "
                         f"{data * model * fsdp} devices; {n} given")
    grid = np.asarray(devices, dtype=object).reshape(data, model, fsdp)
    return Mesh(grid, (DATA, MODEL, FSDP), axis_types=(AxisType.Auto,) * 3)


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same mesh with every axis `Auto` (GSPMD propagation), so `jax.make_mesh`'s
    default Explicit axes do not turn every matmul into a sharding-in-types question."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def check_mesh(config: ModelConfig, mesh: Mesh) -> None:
    """ValueError (before anything is allocated) for unknown axis names or a mesh whose
    axes do not divide what they split.  (Anything with `axis_names` and a `shape`
    mapping passes as a mesh: plans check hypothetical meshes the same way.)"""
    if not (hasattr(mesh, "axis_names") and hasattr(mesh, "shape")):
        raise TypeError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
    if unknown:
        raise ValueError(f"unknown mesh axis name(s) {unknown}; a model mesh uses "
                         f"{list(MESH_AXES)} (e.g. models.make_mesh(data=2, model=4))")
    shape = dict(mesh.shape)
    m, f = shape.get(MODEL, 1), shape.get(FSDP, 1)
    split = [("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads)]
    if not config.attn_only:
        split.append(("d_mlp", config.d_mlp))
    bad = [f"{name}={size}" for name, size in split if size % m]
    if bad:
        raise ValueError(f"the mesh's model axis ({m} devices) must divide {', '.join(bad)}")
    if config.d_model % f:
        raise ValueError(f"the mesh's fsdp axis ({f} devices) must divide d_model={config.d_model}")


def spec_for(config: ModelConfig, mesh: Mesh, axes: tuple[str, ...], layers: bool = False) -> P:
    """The PartitionSpec of a weight with logical `axes` (plus a leading unsplit layer axis)."""
    shape, sizes = dict(mesh.shape), _sizes(config)
    out = [None] if layers else []
    for a in axes:
        target = RULES.get(a)
        if target is None or target not in shape or sizes[a] % shape[target]:
            out.append(None)
        else:
            out.append(target)
    return P(*out)


def weight_specs(config: ModelConfig, mesh: Mesh) -> tuple[dict[str, P], dict[str, P]]:
    """({top-level field: spec}, {block field: spec (with the layer axis)})."""
    top = {k: spec_for(config, mesh, v) for k, v in TOP_AXES.items()}
    block = {k: spec_for(config, mesh, v, layers=True) for k, v in BLOCK_AXES.items()}
    return top, block


def shard(model, mesh: Mesh):
    """THE way to place a model on a mesh: each weight split as declared above (a layout
    only: every result is unchanged).  Checks the mesh first."""
    mesh = auto_mesh(mesh)
    check_mesh(model.config, mesh)
    top, block = weight_specs(model.config, mesh)

    def put(value, spec):
        return None if value is None else jax.device_put(value, NamedSharding(mesh, spec))

    blocks = type(model.blocks)(**{k: put(getattr(model.blocks, k), s) for k, s in block.items()})
    fields = {k: put(getattr(model, k), s) for k, s in top.items()}
    return type(model)(config=model.config, blocks=blocks, **fields)


def batch_spec(mesh: Mesh, shape: tuple[int, ...]) -> P:
    """Leading axis over "data" when the mesh has one and it divides; else replicated."""
    n = dict(mesh.shape).get(DATA, 1)
    if len(shape) == 0 or n == 1 or shape[0] % n:
        return P()
    return P(DATA)


def place_batch(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of `tree` (tokens [B, T], masks, vectors [K, d], K-stacked
    `Edits`, ...) with its leading axis over "data" (replicated when it does not divide)."""
    mesh = auto_mesh(mesh)

    def put(a):
        if not hasattr(a, "shape"):
            return a
        return jax.device_put(a, NamedSharding(mesh, batch_spec(mesh, tuple(a.shape))))

    return jax.tree.map(put, tree)


def kv_cache_sharding(config: ModelConfig, mesh: Mesh, batched: bool = True, batch: int | None = None):
    """A `KVCache`-shaped pytree of NamedSharding: k / v [batch?, layers, slots, kv_heads,
    d_head] with the batch over "data" (when `batch`, if given, divides) and the kv heads
    over "model"."""
    from .kv_cache import KVCache

    mesh = auto_mesh(mesh)
    shape = dict(mesh.shape)
    heads = MODEL if MODEL in shape and config.n_kv_heads % shape[MODEL] == 0 else None
    split = DATA in shape and (batch is None or batch % shape[DATA] == 0)
    lead = ((DATA if split else None),) if batched else ()
    kv = NamedSharding(mesh, P(*lead, None, None, heads, None))
    small = NamedSharding(mesh, P(*lead))
    return KVCache(kv, kv, small, small)


def place_kv_cache(cache, config: ModelConfig, mesh: Mesh, batched: bool = True):
    """`cache` (one, or a vmapped batch when batched) laid out by `kv_cache_sharding`."""
    batch = cache.k.shape[0] if batched else None
    return jax.tree.map(jax.device_put, cache, kv_cache_sharding(config, mesh, batched, batch))


def per_device_bytes(tree: Any) -> dict:
    """{device: bytes of `tree`'s arrays held there} (addressable devices only)."""
    out: dict = {}
    for a in jax.tree.leaves(tree):
        for s in getattr(a, "addressable_shards", []):
            out[s.device] = out.get(s.device, 0) + math.prod(s.data.shape) * s.data.dtype.itemsize
    return out
