"""The one training loop: next-token loss on packed rows, AdamW, checkpoints, resume.

    result = lens.training.train.train(model, train_rows, val_rows, TrainConfig(steps=1000, batch_size=16),
                                       out_dir="runs/x")
    result = train(lens_module, rows, val_rows, cfg, "runs/y",
                   TrainOptions(loss_fn=my_loss, opt=optax.adam(1e-3), progress=False))
    result.model, result.log            # trained Transformer, list of JSON-able records

One compiled step (forward + backward + clip + AdamW with warmup and cosine decay) per
batch; batch i is `lens.training.data.batch_at(train_rows, batch_size, seed, i)`, so the data
position of a run is its step count.  Every `checkpoint_every` steps the params, the
optimiser state, the step and the log go to `out_dir/checkpoint.safetensors` (written
atomically); a run started again with the same settings continues from it and ends with
exactly the weights of an uninterrupted run (same compiled step, same batches).

On a mesh (`TrainOptions(mesh=models.make_mesh(data=2, model=4))`): a Transformer's
weights are placed by `models.shard` (heads, d_mlp, vocab over "model"; d_model over
"fsdp"), any other module's are replicated; every batch's rows are split over "data"
(`models.place_batch`: data parallelism, GSPMD all-reduces the gradients); and the
optimiser state is sharded exactly like the params it follows (Adam's mu / nu leaf by
leaf, the step counters replicated), kept so by every step.  The loss curve and the
weights equal the single-device run up to float32 reassociation.

`TrainConfig` holds the hyperparameters (recorded in the checkpoint; a resume must match
them); `TrainOptions` holds everything else a run is given: what it trains (loss_fn, opt,
lr_fn, rows_config for modules without a config), how it reports (progress,
on_checkpoint), whether it resumes, and run_info (descriptions a resume must also match).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int
from safetensors.numpy import load_file, save_file

from lens.training.data import batch_at
from lens.models.core.sharding import MESH_AXES, auto_mesh, place_batch, shard as shard_model
from lens.models.core.transformer import Transformer
from lens.models.runtime.progress import Progress

CHECKPOINT = "checkpoint.safetensors"
# Leaves decayed by AdamW: matrices.  Norm gains and biases are not (nanoGPT, GPT-2).
_DECAYED = {"embed", "pos_embed", "unembed", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_gate", "W_out",
            "W_router", "W_in_experts", "W_gate_experts", "W_out_experts"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at `steps`
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    seed: int = 0  # the data order
    bf16: bool = False  # forward/backward matmuls in bfloat16, float32 master weights

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1 (got {self.steps}, {self.batch_size})")
        if self.eval_every < 1 or self.checkpoint_every < 1:
            raise ValueError("eval_every and checkpoint_every must be >= 1")


LossFn = Callable[[eqx.Module, Int[Array, "batch seq"]], Float[Array, ""]]


@dataclasses.dataclass
class TrainResult:
    model: eqx.Module
    log: list[dict]
    opt_state: object = None  # the final optimiser state (on a mesh: sharded like the params)


def next_token_loss(model, rows: Int[Array, "batch seq"]) -> Float[Array, ""]:
    """Mean cross-entropy of predicting rows[:, 1:] from rows[:, :-1] (float32)."""
    logits = jax.vmap(model)(rows[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    target = jnp.take_along_axis(logp, rows[:, 1:, None], axis=-1)[..., 0]
    return -target.mean()


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to lr, then cosine decay to lr * min_lr_ratio at the last step."""
    warmup = min(cfg.warmup_steps, cfg.steps - 1)  # a short run still gets a decay phase
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1),
                                              cfg.lr * cfg.min_lr_ratio)


def optimizer(cfg: TrainConfig, params) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW (decaying matrices only) on warmup + cosine."""
    def decayed(path, leaf):
        return getattr(path[-1], "name", None) in _DECAYED

    mask = jax.tree_util.tree_map_with_path(decayed, params)
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(lr_schedule(cfg), cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=mask),
    )


def _compute_model(params, static, bf16: bool):
    model = eqx.combine(params, static)
    if bf16:  # norms and softmax still run in float32 inside the forward
        model = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if eqx.is_inexact_array(x) else x, model)
    return model


def make_step(static, opt: optax.GradientTransformation, bf16: bool, loss_fn: LossFn | None = None,
              shardings: tuple | None = None):
    """The compiled training step: (params, opt_state, batch) -> (params, opt_state, loss, grad norm).

    shardings: None, or (params' shardings, opt_state's shardings) as pytrees of
    `jax.sharding.Sharding` (`place_on_mesh`): the step's new params and state are pinned
    to them, so every step keeps the layout (and the step compiles once)."""
    loss_fn = loss_fn or next_token_loss

    def keep(tree, target):
        if target is None:
            return tree
        return jax.tree.map(jax.lax.with_sharding_constraint, tree, target)

    p_sh, o_sh = shardings if shardings is not None else (None, None)

    # loss_fn is an argument of the compiled step, not a closure: a loss that is an
    # eqx.Module holding a frozen model (a tuned lens's) then passes the model's weights
    # as traced arguments instead of baking hundreds of MB into the program as constants.
    @eqx.filter_jit
    def step(params, opt_state, rows, loss_fn):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(_compute_model(p, static, bf16), rows))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = keep(eqx.apply_updates(params, updates), p_sh)
        return params, keep(opt_state, o_sh), loss, optax.global_norm(grads)

    return lambda params, opt_state, rows: step(params, opt_state, rows, loss_fn)


def evaluate(model, rows: np.ndarray, batch_size: int, bf16: bool = False, loss_fn: LossFn | None = None,
             mesh=None) -> float:
    """Mean loss (next-token by default, else `loss_fn(model, rows)`) over `rows` in full
    batches (the remainder rows are skipped); on `mesh` each batch is split over "data"."""
    n = (len(rows) // batch_size) * batch_size
    if n == 0:
        raise ValueError(f"{len(rows)} evaluation rows are fewer than one batch of {batch_size}")
    params, static = eqx.partition(model, eqx.is_array)
    put = jnp.asarray if mesh is None else (lambda b: place_batch(b, mesh))  # noqa: E731
    losses = [float(_eval_loss(params, static, put(rows[i:i + batch_size]), bf16, loss_fn or next_token_loss))
              for i in range(0, n, batch_size)]
    return float(np.mean(losses))


@eqx.filter_jit  # module level, so repeated evaluations reuse one compilation (per loss_fn)
def _eval_loss(params, static, rows, bf16, loss_fn):
    return loss_fn(_compute_model(params, static, bf16), rows)


def place_on_mesh(model, opt: optax.GradientTransformation, opt_state, mesh: Mesh):
    """(params, opt_state, (params' shardings, opt_state's shardings)) of `model` on `mesh`.

    A Transformer (anything with the model's `config` and `blocks`) is placed by
    `models.shard` (its checks: unknown axis names, axes that do not divide the heads or
    d_mlp); any other module's arrays are replicated.  Every leaf of `opt_state` that
    follows a param (a params-shaped subtree: Adam's mu and nu) gets that param's
    sharding; the rest (step counters) are replicated."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"TrainOptions.mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    mesh = auto_mesh(mesh)
    unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
    if unknown:
        raise ValueError(f"TrainOptions.mesh: unknown axis name(s) {unknown}; the trainer takes a model mesh "
                         f"with axes among {list(MESH_AXES)} (models.make_mesh(data=..., model=...))")
    rep = NamedSharding(mesh, PartitionSpec())
    if isinstance(model, Transformer):
        model = shard_model(model, mesh)
    else:
        model = jax.tree.map(lambda a: jax.device_put(a, rep) if eqx.is_array(a) else a, model)
    params = eqx.filter(model, eqx.is_array)
    p_sh = jax.tree.map(lambda a: a.sharding, params)
    p_def = jax.tree.structure(params)

    def follows(x):  # a params-shaped subtree of the state (Adam's mu, nu; momentum)
        return not eqx.is_array(x) and x is not None and jax.tree.structure(x) == p_def

    o_sh = jax.tree.map(lambda x: p_sh if follows(x) else rep, opt_state, is_leaf=follows)
    opt_state = jax.tree.map(jax.device_put, opt_state, o_sh)
    return params, opt_state, (p_sh, o_sh)


# --------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, params, opt_state, step: int, log: list[dict], settings: dict) -> None:
    """Params + optimiser state (flattened leaves) + step + log, written atomically."""
    arrays = {f"params/{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))}
    arrays |= {f"opt/{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(opt_state))}
    meta = {"step": str(step), "data_position": str(step), "log": json.dumps(log),
            "settings": json.dumps(settings, sort_keys=True)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(arrays, str(tmp), metadata=meta)
    os.replace(tmp, path)  # a kill during the write leaves the previous checkpoint intact


def load_checkpoint(path: Path, params, opt_state, settings: dict):
    """(params, opt_state, step, log) from `path`, checked against the run's templates.

    A checkpoint from other settings (another model, data, optimiser) is refused, naming
    the differences, so a resume never silently mixes two runs.
    """
    from safetensors import safe_open

    with safe_open(str(path), "numpy") as f:
        meta = f.metadata()
    saved = json.loads(meta["settings"])
    diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if diff:
        raise ValueError(f"{path}: checkpoint was written with other settings {diff}; "
                         "use another --out folder or delete the checkpoint")
    arrays = load_file(str(path))

    def restore(prefix, template):
        leaves, treedef = jax.tree.flatten(template)
        got = [arrays[f"{prefix}/{i:05d}"] for i in range(len(leaves))]
        for i, (a, b) in enumerate(zip(got, leaves)):
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(f"{path}: {prefix} leaf {i} is {a.shape} {a.dtype}, expected {b.shape} {b.dtype}")
        return jax.tree.unflatten(treedef, [jnp.asarray(a) for a in got])

    return restore("params", params), restore("opt", opt_state), int(meta["step"]), json.loads(meta["log"])


# --------------------------------------------------------------------------- loop
@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """Everything `train` is given besides the hyperparameters (checked at construction).

    loss_fn: `loss_fn(module, rows) -> scalar`; None = next-token loss of a Transformer.
        A frozen model is closed over; it must be a module-level function or a stable
        object so the step compiles once.
    opt: an optax transformation; None = AdamW with warmup and cosine decay from the
        TrainConfig (`optimizer(cfg)`).  Describe a custom one in `run_info`.
    lr_fn: step -> learning rate of that `opt`, for the log's `lr` column; None = the
        TrainConfig's schedule.
    rows_config: the config whose vocabulary and context the token rows must fit, when the
        trained module has no `.config` (a tuned lens, a router).
    resume: continue from out_dir's checkpoint when there is one.
    progress: a tqdm bar over steps (a bool or a `models.runtime.progress.Progress`).
    on_checkpoint: called with the step after every checkpoint is written.
    mesh: None (one device), or a model mesh (`models.make_mesh(data=..., model=...)`):
        batches over "data", a Transformer's weights split by `models.shard`, the
        optimiser state sharded like the params (`place_on_mesh`).  Not part of the
        checkpoint's settings: a run may resume on another mesh.
    run_info: JSON-able descriptions (model, data, optimiser) a resumed checkpoint must match.
    """

    loss_fn: LossFn | None = None
    opt: optax.GradientTransformation | None = None
    lr_fn: optax.Schedule | None = None
    rows_config: object | None = None
    resume: bool = True
    progress: bool | Progress = False  # the library default (models.runtime.progress)
    on_checkpoint: Callable[[int], None] | None = None
    run_info: dict | None = None
    mesh: Mesh | None = None

    def __post_init__(self):
        object.__setattr__(self, "progress", Progress.of(self.progress))
        for name in ("loss_fn", "lr_fn", "on_checkpoint"):
            v = getattr(self, name)
            if v is not None and not callable(v):
                raise TypeError(f"TrainOptions.{name} must be callable or None; got {v!r}")
        if self.opt is not None and not (hasattr(self.opt, "init") and hasattr(self.opt, "update")):
            raise TypeError(f"TrainOptions.opt must be an optax.GradientTransformation; got {self.opt!r}")
        if self.rows_config is not None and not (hasattr(self.rows_config, "vocab_size")
                                                 and hasattr(self.rows_config, "max_seq_len")):
            raise TypeError("TrainOptions.rows_config must have vocab_size and max_seq_len (a ModelConfig)")
        if self.mesh is not None and not isinstance(self.mesh, Mesh):
            raise TypeError(f"TrainOptions.mesh must be a jax.sharding.Mesh or None; got {type(self.mesh).__name__}")
        if not isinstance(self.resume, (bool, np.bool_)):
            raise TypeError(f"TrainOptions.resume must be a bool; got {self.resume!r}")
        if self.run_info is not None:
            if not isinstance(self.run_info, dict):
                raise TypeError(f"TrainOptions.run_info must be a dict or None; got {type(self.run_info).__name__}")
            try:
                json.dumps(self.run_info)
            except TypeError as e:
                raise TypeError(f"TrainOptions.run_info must be JSON-able: {e}") from None


def train(
    model,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    cfg: TrainConfig,
    out_dir: str | Path,
    options: TrainOptions = TrainOptions(),
) -> TrainResult:
    """Train `model` on `train_rows` [N, seq]; evaluate on `val_rows` every `eval_every` steps.

    By default `model` is a Transformer trained on next-token loss with AdamW
    (`optimizer(cfg)`).  Any other trainable eqx.Module (a tuned lens, a router, a
    distilled student) trains through the same loop, checkpoints and resume, given its
    `TrainOptions` (loss_fn, opt, lr_fn, rows_config).

    Writes out_dir/checkpoint.safetensors every `checkpoint_every` steps and at the end,
    and out_dir/log.json (one record per evaluation: step, train_loss, val_loss, lr,
    grad_norm, tokens_per_s).  `options.run_info` (model and data descriptions) is part of
    the settings a resumed checkpoint must match.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig; got {type(cfg).__name__}")
    if not isinstance(options, TrainOptions):
        raise TypeError(f"options must be a TrainOptions; got {type(options).__name__}")
    loss_fn, opt, lr_fn, run_info = options.loss_fn, options.opt, options.lr_fn, options.run_info
    rows_config = options.rows_config if options.rows_config is not None else getattr(model, "config", None)
    if rows_config is None:
        raise ValueError("train: `model` has no .config; pass TrainOptions(rows_config=...) (the config the token rows must fit)")
    train_rows = _check_rows(train_rows, "train_rows", rows_config)
    val_rows = _check_rows(val_rows, "val_rows", rows_config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params, static = eqx.partition(model, eqx.is_array)
    opt = opt if opt is not None else optimizer(cfg, params)
    opt_state = opt.init(params)
    mesh, shardings = options.mesh, None
    if mesh is not None:
        params, opt_state, shardings = place_on_mesh(model, opt, opt_state, mesh)
    described = getattr(model, "config", None) or type(model).__name__
    settings = {"train": dataclasses.asdict(cfg), "model": repr(described), "train_rows": list(train_rows.shape),
                "train_rows_sum": int(train_rows.astype(np.int64).sum()), **(run_info or {})}
    start, log = 0, []
    ckpt = out_dir / CHECKPOINT
    if options.resume and ckpt.exists():
        params, opt_state, start, log = load_checkpoint(ckpt, params, opt_state, settings)
        if shardings is not None:
            params, opt_state = jax.tree.map(jax.device_put, (params, opt_state), shardings)
    step_fn = make_step(static, opt, cfg.bf16, loss_fn, shardings)
    put = jnp.asarray if mesh is None else (lambda b: place_batch(b, mesh))  # noqa: E731
    schedule_lr = lr_fn if lr_fn is not None else lr_schedule(cfg)
    tokens_per_step = cfg.batch_size * (train_rows.shape[1] - 1)
    bar = options.progress.bar("train", total=cfg.steps, initial=start, dynamic_ncols=True)
    timed_tokens, timed_s, loss, gnorm = 0, 0.0, math.nan, math.nan
    for step in range(start, cfg.steps):
        batch = put(batch_at(train_rows, cfg.batch_size, cfg.seed, step))
        t0 = time.perf_counter()
        params, opt_state, loss, gnorm = step_fn(params, opt_state, batch)
        loss = float(loss)  # blocks, so the timing below is the step's real time
        if step > start:  # the first step of a process includes compilation
            timed_tokens += tokens_per_step
            timed_s += time.perf_counter() - t0
        tok_s = timed_tokens / timed_s if timed_s else math.nan
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            val = evaluate(eqx.combine(params, static), val_rows[: cfg.eval_batches * cfg.batch_size],
                           cfg.batch_size, cfg.bf16, loss_fn, mesh)
            log.append({"step": done, "train_loss": loss, "val_loss": val, "lr": float(schedule_lr(step)),
                        "grad_norm": float(gnorm), "tokens_per_s": None if math.isnan(tok_s) else tok_s})
            bar.write(f"step {done}: train {loss:.4f}  val {val:.4f}  {tok_s:,.0f} tok/s")
            (out_dir / "log.json").write_text(json.dumps(log, indent=1) + "\n")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(ckpt, params, opt_state, done, log, settings)
            if options.on_checkpoint is not None:
                options.on_checkpoint(done)
    bar.close()
    return TrainResult(eqx.combine(params, static), log, opt_state)


def _check_rows(rows, name: str, config) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"{name} must be integer token rows [N, seq]; got {rows.dtype} {rows.shape}")
    if rows.shape[1] - 1 > config.max_seq_len or rows.shape[1] < 2:
        raise ValueError(f"{name}: rows of {rows.shape[1]} tokens need 2 <= seq <= max_seq_len + 1 "
                         f"= {config.max_seq_len + 1}")
    if rows.size and (rows.min() < 0 or rows.max() >= config.vocab_size):
        raise ValueError(f"{name}: token ids out of range [0, {config.vocab_size})")
    return rows.astype(np.int32)
