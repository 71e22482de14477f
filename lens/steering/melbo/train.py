"""MELBO and MELBO-ortho training: pure, jitted optax loops, sequential or batched.

Sequential mode is the original algorithm: one vector at a time, each vector's whole
optimisation ONE jitted `lax.scan` over steps (a Python loop only over vectors).
Batched mode trains a block of B vectors at once: the single-vector step is `jax.vmap`ed
over the block, then the block is orthogonalised jointly (QR: Gram-Schmidt in index order,
so vector 0 of a block is untouched and a block of one is exactly the sequential step).
The objectives and their steps are in `objectives`, the orthonormal basis of earlier
vectors in `basis`, the devices a block is sharded over in `block_sharding`.

Determinism / resume: vector i starts from `normal(fold_in(key(seed), i))`, so a vector
depends only on (seed, i, the vectors before it).  After every finished block `on_block`
gets everything so far; `resume=` continues from such a checkpoint and reproduces the
uninterrupted run exactly (blocks are re-formed from the resumed count, so resume from a
count that is a multiple of the block size, which is what `on_block` checkpoints are).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float

from lens.core import sharding
from lens.models.core.sharding import auto_mesh
from lens.models.runtime.progress import Progress
from lens.steering.melbo.basis import extend_basis
from lens.steering.melbo.block_sharding import block_axis, block_mesh, replicated_on
from lens.steering.melbo.objectives import MelboConfig, Objective, OrthoConfig
from lens.steering.melbo.problem import MelboProblem, ortho_reference, steered_target


# ------------------------------------------------------------------ jitted loops
@eqx.filter_jit
def _train_one(obj: Objective, problem: MelboProblem, aux, theta, basis):
    opt = obj.optimizer()

    def body(carry, _):
        theta, state = carry
        theta, state, loss = obj.step(problem, aux, opt, theta, state, basis)
        return (theta, state), loss

    (theta, _), losses = jax.lax.scan(body, (theta, opt.init(theta)), None, length=obj.steps)
    return theta, losses


@eqx.filter_jit
def _train_block(obj: Objective, problem: MelboProblem, aux, thetas, basis,
                 split: NamedSharding | None = None):
    # `split` (static): pin the carry's layout to the block axis instead of leaving it to
    # propagation, which could keep it replicated after the QR's gather (every device
    # would then train the whole block).
    opt = obj.optimizer()
    step = jax.vmap(lambda th, st: obj.step(problem, aux, opt, th, st, basis))

    def keep(tree):
        if split is None:
            return tree
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, split), tree)

    def body(carry, _):
        thetas, state = carry
        thetas, state, loss = step(thetas, state)
        return keep((obj.fix_block(thetas), state)), loss

    state = keep(jax.vmap(opt.init)(thetas))
    (thetas, _), losses = jax.lax.scan(body, (thetas, state), None, length=obj.steps)
    return thetas, losses.T


@eqx.filter_jit
def _init_one(obj: Objective, key, basis, ref_norm):
    return obj.init(key, basis, ref_norm)


@eqx.filter_jit
def _init_block(obj: Objective, keys, basis, ref_norm):
    return obj.fix_block(jax.vmap(lambda k: obj.init(k, basis, ref_norm))(keys))


# ------------------------------------------------------------------ driver
@dataclasses.dataclass
class MelboResult:
    """vectors [n, d] in training order; losses [n, steps] (loss of the iterate at each
    step, before that step's update)."""

    vectors: np.ndarray
    losses: np.ndarray


def vector_key(seed: int, index: int) -> jax.Array:
    """The init key of vector `index`: fold_in(key(seed), index) (resume-safe)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), index)


@dataclasses.dataclass(frozen=True)
class MelboRunConfig:
    """How a MELBO / MELBO-ortho training runs (the objective's own knobs are in
    `MelboConfig` / `OrthoConfig`); checked at construction.

    mode: "sequential" (one vector at a time, the original algorithm) or "batched"
        (blocks of `block_size` vectors vmapped and jointly orthogonalised).
    block_size: vectors per block in batched mode (an int >= 1).
    seed: vector i starts from normal(fold_in(key(seed), i)).
    mesh: batched mode only: shard every block over the mesh's vector axis ("vectors", or
        "data" of a model mesh, whose sharded weights are kept), which must divide
        `block_size`; None = automatic (`block_mesh`).
    progress: a tqdm bar over vectors (a bool or a `models.runtime.progress.Progress`).
    """

    mode: str = "batched"
    block_size: int = 8
    seed: int = 0
    mesh: Mesh | None = None
    progress: bool | Progress = False

    def __post_init__(self):
        if self.mode not in ("sequential", "batched"):
            raise ValueError(f"mode must be 'sequential' or 'batched', got {self.mode!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, (int, np.integer)) or self.block_size < 1:
            raise ValueError(f"block_size must be an int >= 1; got {self.block_size!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an int; got {self.seed!r}")
        if self.mesh is not None and not isinstance(self.mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh or None; got {type(self.mesh).__name__}")
        object.__setattr__(self, "progress", Progress.of(self.progress))


def train_vectors(
    problem: MelboProblem,
    objective: Objective,
    n_vectors: int,
    aux,
    *,
    fixed: Float[Array, "n_fixed d_model"] | None = None,
    ref_norm: float = 1.0,
    run: MelboRunConfig = MelboRunConfig(),
    resume: MelboResult | None = None,
    on_block: Callable[[MelboResult], None] | None = None,
) -> MelboResult:
    """Train `n_vectors` mutually orthogonal vectors (also orthogonal to `fixed` rows).

    `run` (a `MelboRunConfig`): mode "sequential": one vector at a time (the original
    algorithm); "batched": blocks of `block_size` vectors vmapped and jointly
    orthogonalised; seed, progress.  `aux` is the objective's data (h_t(0) for MELBO, the
    theta0 reference for MELBO-ortho).  `on_block(result)` is called after every finished
    block (every vector in sequential mode) with everything trained so far, for
    checkpointing; `resume` continues from such a result.

    `run.mesh` (batched mode only; sequential mode runs on the default device): shard every
    block over the mesh's vector axis ("vectors", or a model mesh's "data"), which must divide `block_size`; None = automatic
    (`block_mesh`: all devices that divide the block, nothing on one device).  A last
    block smaller than the rest that does not split evenly runs replicated on the mesh."""
    if not isinstance(run, MelboRunConfig):
        raise TypeError(f"run must be a MelboRunConfig; got {type(run).__name__}")
    mode, block_size, seed = run.mode, run.block_size, run.seed
    mesh = block_mesh(run.mesh, block_size) if mode == "batched" else None
    d = problem.x_src.shape[-1]
    n_fixed = 0 if fixed is None else int(np.asarray(fixed).shape[0])
    if n_fixed + n_vectors > d:
        raise ValueError(f"{n_fixed} fixed + {n_vectors} orthogonal vectors exceed d_model={d}")
    basis = np.zeros((n_fixed + n_vectors, d), np.float64)
    n_basis = 0 if fixed is None else extend_basis(basis, 0, np.asarray(fixed))
    vectors = np.zeros((0, d), np.float32)
    losses = np.zeros((0, objective.steps), np.float32)
    if resume is not None and len(resume.vectors):
        vectors = np.asarray(resume.vectors, np.float32)[:n_vectors]
        losses = np.asarray(resume.losses, np.float32)[: len(vectors)]
        n_basis = extend_basis(basis, n_basis, vectors)
    size = 1 if mode == "sequential" else block_size
    bar = None
    if run.progress.enabled:
        bar = run.progress.bar(f"{type(objective).__name__} {mode}", total=n_vectors, initial=len(vectors))
    ref_norm = jnp.asarray(ref_norm, jnp.float32)
    put = lambda tree: tree  # noqa: E731
    to_host = np.asarray
    if mesh is not None:
        put = lambda tree: replicated_on(tree, mesh)  # noqa: E731
        axis = block_axis(mesh)
        problem, aux, ref_norm = put((problem, jnp.asarray(aux), ref_norm))
        to_host = sharding.to_host
    while len(vectors) < n_vectors:
        start = len(vectors)
        b = min(size, n_vectors - start)
        basis32 = put(jnp.asarray(basis, jnp.float32))
        if mode == "sequential":
            theta = _init_one(objective, vector_key(seed, start), basis32, ref_norm)
            theta, loss = _train_one(objective, problem, aux, theta, basis32)
            new, new_loss = np.asarray(theta)[None], np.asarray(loss)[None]
        else:
            keys = jnp.stack([vector_key(seed, start + i) for i in range(b)])
            thetas = _init_block(objective, put(keys), basis32, ref_norm)
            split = None
            if mesh is not None and b % mesh.shape[axis] == 0:
                split = NamedSharding(auto_mesh(mesh), PartitionSpec(axis))
                thetas = jax.device_put(thetas, split)  # the optimiser state follows
            thetas, loss = _train_block(objective, problem, aux, thetas, basis32, split)
            new, new_loss = to_host(thetas), to_host(loss)
        vectors = np.concatenate([vectors, new])
        losses = np.concatenate([losses, new_loss])
        n_basis = extend_basis(basis, n_basis, new)
        if bar is not None:
            bar.update(b)
            bar.set_postfix(loss=f"{float(new_loss[:, -1].mean()):.4g}")
        if on_block is not None:
            on_block(MelboResult(vectors, losses))
    if bar is not None:
        bar.close()
    return MelboResult(vectors, losses)


def melbo(
    problem: MelboProblem,
    n_vectors: int,
    config: MelboConfig,
    *,
    run: MelboRunConfig = MelboRunConfig(),
    resume: MelboResult | None = None,
    on_block: Callable[[MelboResult], None] | None = None,
) -> MelboResult:
    """MELBO vectors of norm `config.radius` (vectors [K, d_model]); run / resume /
    on_block as `train_vectors`."""
    d = problem.x_src.shape[-1]
    unsteered = jax.jit(steered_target)(problem, jnp.zeros((d,), jnp.float32))
    return train_vectors(problem, config, n_vectors, unsteered, run=run, resume=resume, on_block=on_block)


def melbo_ortho(
    problem: MelboProblem,
    theta0: Float[Array, " d_model"],
    n_vectors: int,
    config: OrthoConfig,
    *,
    run: MelboRunConfig = MelboRunConfig(),
    resume: MelboResult | None = None,
    on_block: Callable[[MelboResult], None] | None = None,
) -> MelboResult:
    """MELBO-ortho vectors [K, d_model], orthogonal to theta0 and to each other, each
    trained to reproduce theta0's mean target-layer activation; run / resume / on_block
    as `train_vectors`."""
    theta0 = jnp.asarray(theta0, jnp.float32)
    reference = jax.jit(ortho_reference)(problem, theta0)
    return train_vectors(
        problem, config, n_vectors, reference, fixed=theta0[None],
        ref_norm=float(jnp.linalg.norm(theta0)), run=run, resume=resume, on_block=on_block,
    )
