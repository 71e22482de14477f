"""Run sweeps over many devices: the vector axis (and optionally the prompts) sharded over
a `jax.sharding.Mesh`; weights replicated, or sharded for models too big for one device.

    mesh = lens.core.sharding.make_mesh(vectors=4)                 # 4 devices on the K axis
    res = lens.sweep_vectors(model, prompts, vecs, layers=[6], config=lens.SweepConfig(mesh=mesh))

    mesh = lens.core.sharding.make_mesh(vectors=2, batch=2)        # 2 x 2: K and prompts
    model = lens.core.sharding.shard_weights(model, mesh)          # optional (see below)

How it works: inputs are placed with `NamedSharding` (`place`), and `jax.jit` (GSPMD)
partitions the computation to follow them; the per-sequence forward is unchanged, since
the sweep is a `vmap` and the sharded axes are vmapped axes.  Each device computes its
share of the vectors against replicated weights; no collective is needed until results
are gathered.  `shard_weights` splits the d_mlp and heads axes of every block over the
"vectors" mesh axis instead (tensor parallelism, GSPMD inserts the all-reduces) for
models whose weights do not fit one device.

Testing on a CPU: `XLA_FLAGS=--xla_force_host_platform_device_count=4` (set before jax
is imported) gives 4 host devices; tests/lens/core/test_sharding.py checks sharded == single-device.

Multiple GPUs on one host: nothing to do, `jax.devices()` lists them; build the mesh from
them (`make_mesh(vectors=jax.device_count())`).

A TPU pod slice or several GPU hosts: run the SAME script on every host, and first call

    jax.distributed.initialize()   # on TPU / SLURM / Open MPI the arguments are detected;
    # elsewhere: jax.distributed.initialize(coordinator_address="host0:1234",
    #                                       num_processes=N, process_id=i)

then `jax.devices()` lists every device of every host and `make_mesh(vectors=...,
batch=...)` spans them all (put the batch axis across hosts, the vector axis within a host,
so the prefix is shared per host).  Every process loads the model and passes the same
arguments; outputs are global arrays, and `np.asarray` on them works only for fully
addressable ones, so on multi-host runs gather with
`jax.experimental.multihost_utils.process_allgather` (the sweep does this for you
when the result is not fully addressable).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array

from lens.models.core.sharding import DATA, auto_mesh
from lens.models.core.transformer import Transformer

VECTORS, BATCH = "vectors", "batch"


def make_mesh(vectors: int | None = None, batch: int = 1, devices=None) -> Mesh:
    """A ("vectors", "batch") mesh over `devices` (default: all); vectors defaults to
    device_count / batch."""
    devices = jax.devices() if devices is None else list(devices)
    vectors = len(devices) // batch if vectors is None else vectors
    if vectors * batch > len(devices) or vectors < 1 or batch < 1:
        raise ValueError(f"a {vectors} x {batch} mesh needs {vectors * batch} devices; "
                         f"{len(devices)} available")
    grid = np.asarray(devices[: vectors * batch]).reshape(vectors, batch)
    return Mesh(grid, (VECTORS, BATCH))


def vector_axis(mesh: Mesh) -> str:
    """The axis a sweep's vectors split over: "vectors", or a model mesh's "data" axis
    (`models.make_mesh`), so a model loaded with `models.load(..., mesh=mesh)` sweeps on
    the same mesh."""
    if VECTORS in mesh.axis_names:
        return VECTORS
    if DATA in mesh.axis_names:
        return DATA
    raise ValueError(f"a sweep mesh needs a {VECTORS!r} or {DATA!r} axis; got {mesh.axis_names}")


def batch_axis(mesh: Mesh) -> str | None:
    """The axis the prompts split over ("batch"), or None (prompts replicated)."""
    return BATCH if BATCH in mesh.axis_names else None


def round_chunk(chunk: int, mesh: Mesh) -> int:
    """The chunk of vectors rounded up to a multiple of the vector axis' device count."""
    n = mesh.shape[vector_axis(mesh)]
    return max(n, math.ceil(chunk / n) * n)


# How a sweep input is laid out (`place`): vectors split on the K axis ("vectors", or a
# model mesh's "data"), prompts (and anything with a leading P axis) on the "batch" axis
# when the mesh has one; entries are [L, P, seq, d].


def place(name: str, array: Array, mesh: Mesh) -> Array:
    """Put one sweep input on the mesh with its layout (batch axis only if it divides)."""
    vec, bat = vector_axis(mesh), batch_axis(mesh)
    spec = {"vectors": P(vec), "prompts": P(bat), "entries": P(None, bat)}[name]
    axis = 0 if name != "entries" else 1
    if bat is None or (name != "vectors" and array.shape[axis] % mesh.shape[bat]):
        spec = P(vec) if name == "vectors" else P()
    mesh = auto_mesh(mesh)
    if jax.process_count() > 1 and getattr(array, "is_fully_addressable", True):
        # several processes: every process holds the same host array; build the global one
        array = np.asarray(array)
        return jax.make_array_from_callback(array.shape, NamedSharding(mesh, spec), lambda i: array[i])
    return jax.device_put(array, NamedSharding(mesh, spec))


def replicate(model: Transformer, mesh: Mesh) -> Transformer:
    """Every weight fully replicated on every device of the mesh."""
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda a: jax.device_put(a, rep) if isinstance(a, jax.Array) else a, model)


def shard_weights(model: Transformer, mesh: Mesh, axis: str = VECTORS) -> Transformer:
    """Tensor-parallel layout: each block's heads and d_mlp axes split over mesh `axis`
    (Megatron-style: W_Q/W_K/W_V/W_O by head, W_in/W_gate by column, W_out by row);
    everything else replicated.  A layout only: results are unchanged."""
    n = mesh.shape[axis]
    c = model.config
    specs = {
        "W_Q": P(None, axis), "b_Q": P(None, axis), "W_O": P(None, axis),
        "W_in": P(None, None, axis), "b_in": P(None, axis), "W_gate": P(None, None, axis),
        "W_out": P(None, axis),
    }
    if c.n_kv_heads % n == 0:
        specs.update({"W_K": P(None, axis), "W_V": P(None, axis), "b_K": P(None, axis),
                      "b_V": P(None, axis)})
    if c.n_heads % n or c.d_mlp % n:
        raise ValueError(f"heads={c.n_heads} and d_mlp={c.d_mlp} must divide over {n} devices")
    blocks = model.blocks
    new = {}
    for name, spec in specs.items():
        w = getattr(blocks, name)
        if w is not None:
            new[name] = jax.device_put(w, NamedSharding(mesh, spec))
    model = replicate(model, mesh)
    for name, w in new.items():
        model = _set_block_field(model, name, w)
    return model


def _set_block_field(model, name, value):
    import equinox as eqx

    return eqx.tree_at(lambda m: getattr(m.blocks, name), model, value)


def is_main_process() -> bool:
    """True in process 0 (and in a single-process run): the one that writes reports,
    so a script run with the same flags on every host writes its outputs once."""
    return jax.process_index() == 0


def write_once(path, text: str) -> bool:
    """Write `text` to `path` from process 0 only; returns whether this process wrote."""
    if not is_main_process():
        return False
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    return True


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """`jax.distributed.initialize` with the same flags on every host (None: detected on
    TPU / SLURM / Open MPI); a no-op when num_processes is 1.  Call before anything else
    touches JAX's devices.  CPU-only runs use gloo collectives across processes."""
    if num_processes == 1:
        return
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # an older or newer JAX without the option
        pass
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def to_host(array: Array) -> np.ndarray:
    """A numpy copy of a (possibly multi-host) global array."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
