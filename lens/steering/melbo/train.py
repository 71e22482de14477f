"""MELBO and MELBO-ortho training: pure, jitted optax loops, sequential or batched.

Sequential mode is the original algorithm: one vector at a time, each vector's whole
optimisation ONE jitted `lax.scan` over steps (a Python loop only over vectors).
Batched mode trains a block of B vectors at once: the single-vector step is `jax.vmap`ed
over the block, then the block is orthogonalised jointly (QR: Gram-Schmidt in index order,
so vector 0 of a block is untouched and a block of one is exactly the sequential step).

Orthogonality: earlier vectors (and fixed rows such as MELBO-ortho's theta0) are kept in
an orthonormal basis buffer of FIXED shape [n_fixed + K, d] (unused rows are zero, so a
projection `v - B^T (B v)` ignores them and one compilation serves every block).  The
basis is built in float64 (Gram-Schmidt twice per row) and projections are applied twice
("twice is enough"), which keeps raw |cos| at float32 rounding (~1e-7).

Determinism / resume: vector i starts from `normal(fold_in(key(seed), i))`, so a vector
depends only on (seed, i, the vectors before it).  After every finished block `on_block`
gets everything so far; `resume=` continues from such a checkpoint and reproduces the
uninterrupted run exactly (blocks are re-formed from the resumed count, so resume from a
count that is a multiple of the block size, which is what `on_block` checkpoints are).

Devices: batched mode shards each block over a `jax.sharding.Mesh` ("vectors" axis,
`lens.core.sharding.make_mesh`, or the "data" axis of a model mesh, `models.make_mesh`):
the block's thetas, hence their optimiser state, are split on the block axis and the
problem is replicated (a model already sharded on that mesh keeps its layout), so jit (GSPMD) gives every device its share
of the vmapped forward/backward; only the joint QR gathers the (small, [B, d]) block.
`mesh=None` on a multi-device host shards automatically (see `block_mesh`); on one
device nothing is placed and the computation is the single-device one, bit for bit.
The block partition never depends on the device count, so results, checkpoints and
resume are the same on any machine (up to float32 rounding between layouts).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float

from lens.core import sharding
from lens.models.core.sharding import MESH_AXES as MODEL_MESH_AXES, auto_mesh
from lens.models.runtime.progress import Progress
from lens.steering.melbo.problem import (
    HIGHEST,
    MelboProblem,
    melbo_loss,
    ortho_loss,
    ortho_reference,
    steered_target,
)


# ------------------------------------------------------------------ objectives
@dataclasses.dataclass(frozen=True)
class MelboConfig:
    """MELBO (Mack & Turner): maximise the target-layer change at fixed |theta| = radius.

    Optimiser as the original: torch AdamW(lr 1e-3, betas (0.9, 0.98), amsgrad; see
    `scale_by_torch_amsgrad` for why not optax's amsgrad) with decoupled
    weight decay `weight_decay` (0 by default; it is irrelevant after renormalisation
    except through Adam's moments).  The gradient is projected onto the sphere's tangent
    space and off earlier vectors; the iterate is projected off earlier vectors and
    renormalised to `radius` after every step."""

    radius: float
    steps: int = 300
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.98
    amsgrad: bool = True
    weight_decay: float = 0.0
    p: float = 2.0
    q: float = 1.0

    def optimizer(self) -> optax.GradientTransformation:
        scale = scale_by_torch_amsgrad if self.amsgrad else optax.scale_by_adam
        return optax.chain(
            scale(b1=self.b1, b2=self.b2, eps=1e-8),
            optax.add_decayed_weights(self.weight_decay),
            optax.scale(-self.lr),
        )

    def init(self, key, basis, ref_norm):
        v = project_off(jax.random.normal(key, basis.shape[1:], jnp.float32), basis)
        return self.radius * v / jnp.linalg.norm(v)

    def step(self, problem, aux, opt, theta, state, basis):
        loss, g = jax.value_and_grad(melbo_loss, argnums=1)(problem, theta, aux, self.p, self.q)
        g = g - (jnp.dot(g, theta, precision=HIGHEST) / jnp.dot(theta, theta, precision=HIGHEST)) * theta
        g = project_off(g, basis)
        updates, state = opt.update(g, state, theta)
        theta = project_off(theta + updates, basis)
        return self.radius * theta / jnp.linalg.norm(theta), state, loss

    def fix_block(self, thetas):
        q = gram_schmidt(thetas)
        return self.radius * q / jnp.linalg.norm(q, axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class OrthoConfig:
    """MELBO-ortho: theta orthogonal to theta0 and earlier vectors, minimising
    `|mean_pos h_t(x + theta) - mean_pos h_t(x + theta0)|` (see `ortho_loss`); Adam(lr),
    the iterate projected off earlier vectors after every step, no norm constraint.
    Init: a random vector projected off earlier ones, scaled to |theta0|."""

    steps: int = 1000
    lr: float = 0.01

    def optimizer(self) -> optax.GradientTransformation:
        return optax.adam(self.lr)

    def init(self, key, basis, ref_norm):
        v = project_off(jax.random.normal(key, basis.shape[1:], jnp.float32), basis)
        return ref_norm * v / jnp.linalg.norm(v)

    def step(self, problem, aux, opt, theta, state, basis):
        loss, g = jax.value_and_grad(ortho_loss, argnums=1)(problem, theta, aux)
        updates, state = opt.update(g, state, theta)
        return project_off(theta + updates, basis), state, loss

    def fix_block(self, thetas):
        return gram_schmidt(thetas)


Objective = MelboConfig | OrthoConfig


class TorchAmsgradState(NamedTuple):
    count: Array
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates


def scale_by_torch_amsgrad(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """AMSGrad as torch.optim.Adam(W)(amsgrad=True) computes it, which the original MELBO
    used: the running max is taken of the RAW second moment and bias-corrected after the
    max, `m_hat / (sqrt(max_t nu_t) / sqrt(1 - b2^t) + eps)`.  optax.scale_by_amsgrad takes
    the max of the bias-corrected moment instead, which differs in the first ~1/(1-b2)
    steps (tests/lens/steering/test_melbo_parity.py checks this against torch)."""

    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        return TorchAmsgradState(jnp.zeros([], jnp.int32), zeros(), zeros(), zeros())

    def update(updates, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
        c1 = 1 - b1 ** count.astype(jnp.float32)
        c2 = jnp.sqrt(1 - b2 ** count.astype(jnp.float32))
        out = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v) / c2 + eps), mu, nu_max)
        return out, TorchAmsgradState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init, update)


# ------------------------------------------------------------------ linear algebra
def project_off(v: Float[Array, " d"], basis: Float[Array, "n d"]) -> Float[Array, " d"]:
    """`v - B^T (B v)` applied twice, B = orthonormal rows (zero rows are ignored)."""
    for _ in range(2):
        v = v - jnp.einsum("n,nd->d", jnp.einsum("nd,d->n", basis, v, precision=HIGHEST), basis, precision=HIGHEST)
    return v


def gram_schmidt(vs: Float[Array, "B d"]) -> Float[Array, "B d"]:
    """Jointly orthogonalise a block in index order, keeping each residual's length:
    row b becomes its component orthogonal to rows < b (the QR factorisation's `Q R_bb`,
    sign-fixed so that row 0 is unchanged in direction).  A block of one is returned as is."""
    if vs.shape[0] == 1:
        return vs
    q, r = jnp.linalg.qr(vs.T)  # vs.T = q r, q [d, B]
    diag = jnp.diagonal(r)
    return (q * diag[None, :]).T


def extend_basis(basis: np.ndarray, n: int, rows: np.ndarray) -> int:
    """Append `rows` to the orthonormal float64 `basis[:n]` in place (Gram-Schmidt twice
    per row, in order); returns the new count.  A row already in the span is skipped."""
    for v in np.asarray(rows, np.float64):
        norm0 = np.linalg.norm(v)
        for _ in range(2):
            v = v - basis[:n].T @ (basis[:n] @ v)
        if np.linalg.norm(v) > 1e-6 * max(norm0, 1e-30):
            basis[n] = v / np.linalg.norm(v)
            n += 1
    return n


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


def _on_mesh(tree, mesh: Mesh):
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
        put = lambda tree: _on_mesh(tree, mesh)  # noqa: E731
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
