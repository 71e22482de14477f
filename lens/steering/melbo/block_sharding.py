"""Where a batched MELBO block runs: the mesh its vectors split over.

Batched mode shards each block over a `jax.sharding.Mesh` ("vectors" axis,
`lens.core.sharding.make_mesh`, or the "data" axis of a model mesh, `models.make_mesh`):
the block's thetas, hence their optimiser state, are split on the block axis and the
problem is replicated (`replicated_on`; a model already sharded on that mesh keeps its
layout), so jit (GSPMD) gives every device its share of the vmapped forward/backward; only
the joint QR gathers the (small, [B, d]) block.  `mesh=None` on a multi-device host shards
automatically (`block_mesh`); on one device nothing is placed and the computation is the
single-device one, bit for bit.  The block partition never depends on the device count, so
results, checkpoints and resume are the same on any machine (up to float32 rounding
between layouts).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lens.core import sharding
from lens.models.core.sharding import MESH_AXES as MODEL_MESH_AXES, auto_mesh


MESH_AXES = (sharding.VECTORS, sharding.BATCH, *MODEL_MESH_AXES)


def block_axis(mesh: Mesh) -> str:
    """The mesh axis a batched block's vectors split over: "vectors" (a sweep mesh,
    `lens.core.sharding.make_mesh`) or "data" (a model mesh, `models.make_mesh`, the mesh
    a model loaded with `models.load(..., mesh=...)` lives on).  ValueError for unknown
    axis names or a mesh with neither."""
    unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
    if unknown:
        raise ValueError(f"MelboRunConfig.mesh: unknown axis name(s) {unknown}; use a model mesh "
                         f"(models.make_mesh(data=..., model=...): vectors over 'data') or a "
                         f"lens.core.sharding.make_mesh(vectors=...) mesh")
    try:
        return sharding.vector_axis(mesh)
    except ValueError:
        raise ValueError(f"MelboRunConfig.mesh needs a 'vectors' or 'data' axis for the block's "
                         f"vectors; got axes {mesh.axis_names}") from None


def block_mesh(mesh: Mesh | None, block_size: int) -> Mesh | None:
    """The mesh a batched block of `block_size` vectors is sharded over, or None (one device).

    An explicit `mesh` must split `block_size` evenly over its vector axis (`block_axis`:
    "vectors", or a model mesh's "data"; ValueError otherwise).  `mesh=None` on a host with
    n > 1 devices: a 1-D "vectors" mesh over the largest m <= n devices with
    `block_size % m == 0` (all of them when n divides the block, e.g. block 32 on 8 GPUs);
    the block is NOT rounded up, so the vectors found do not depend on the device count.
    None when that m is 1."""
    if mesh is not None:
        axis = block_axis(mesh)
        n = mesh.shape[axis]
        if block_size % n:
            raise ValueError(f"block_size={block_size} is not a multiple of the {n} devices on the "
                             f"mesh's {axis!r} axis; use a block of a multiple of {n}")
        return mesh
    n = jax.device_count()
    m = max(i for i in range(1, min(n, block_size) + 1) if block_size % i == 0)
    return None if m == 1 else sharding.make_mesh(vectors=m)


def replicated_on(tree, mesh: Mesh):
    """Every array of `tree` replicated on `mesh`, except those already laid out on it (a
    model placed by `models.shard` on this mesh keeps its tensor-parallel weights)."""
    mesh = auto_mesh(mesh)
    rep = NamedSharding(mesh, PartitionSpec())

    def put(a):
        if not isinstance(a, jax.Array):
            return a
        if isinstance(a.sharding, NamedSharding) and auto_mesh(a.sharding.mesh) == mesh:
            return a
        return jax.device_put(a, rep)

    return jax.tree.map(put, tree)
