"""Plans before runs: per-device bytes of a workload on a mesh, without allocating.

    p = lens.core.plan.plan(config, {"data": 1, "model": 4}, "melbo", k=800)
    print(p.table())          # weights, optimiser state, KV cache, activations per device

Weights: every field's shape (`expected_shapes`) split as models/core/sharding.py declares
for that mesh shape: exact (a test checks it against a model loaded on a mesh).
Activations: the per-token intermediates of one block come from `jax.eval_shape` of the
forward with every capture on (residuals, q/k/v, attention pattern, per-head z, neurons,
norm scales) on an abstract model (ShapeDtypeStructs, nothing allocated); a workload holds
  * forward-only work (sweep, patching, generation): the residual stream plus the
    largest single intermediate of one layer, plus the logits, per sequence;
  * training through the model (MELBO, the trainer): every intermediate of every layer the
    gradient flows through (what `lax.scan`'s reverse pass keeps) and as much again for
    their cotangents, per sequence;
times the sequences each device runs at once (the batch axis split over "data").  Heads,
d_mlp and vocabulary axes split over "model" as the weights do.  These are estimates of
the live set, not of XLA's exact buffer assignment: tests/lens/core/test_plan.py compares
them with XLA's own memory analysis of the compiled program on the CPU.

Mesh: a `jax.sharding.Mesh` or a dict of axis sizes ({"data": 2, "model": 4}), so a plan
for hardware you do not have (a TPU v4-8) runs anywhere.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lens.models.core import sharding as S
from lens.models.core.block import Block
from lens.models.core.config import ModelConfig
from lens.models.core.interventions import Capture
from lens.models.core.transformer import Transformer
from lens.models.io.convert import expected_shapes

WORKLOADS = ("forward", "sweep", "melbo", "tuned_lens", "patching", "generate", "train")
ALL = Capture(resid=True, sublayers=True, head_z=True, neurons=True, attn_pattern=True, norms=True, qkv=True)
# capture field -> the logical axis "model" splits (None: not split)
_SPLIT = {"head_z": "heads", "attn_pattern": "heads", "q": "heads", "k": "kv_heads", "v": "kv_heads",
          "neurons": "mlp"}


@dataclasses.dataclass
class Plan:
    """Bytes per device of each part of a workload (see the module docstring)."""

    workload: str
    mesh: dict[str, int]
    params: dict
    weights: int
    optimiser: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.optimiser + self.kv_cache + self.activations

    def table(self) -> str:
        """A small text table (GiB per device)."""
        g = lambda b: f"{b / 2**30:8.3f}"  # noqa: E731
        rows = [("weights", self.weights), ("optimiser state", self.optimiser),
                ("KV cache", self.kv_cache), ("activations", self.activations), ("total", self.total)]
        head = f"{self.workload} {self.params} on mesh {self.mesh}: GiB per device"
        return "\n".join([head] + [f"  {name:16s}{g(b)}" for name, b in rows])


def _mesh_shape(mesh) -> dict[str, int]:
    shape = dict(mesh.shape) if hasattr(mesh, "shape") and not isinstance(mesh, dict) else dict(mesh)
    unknown = [a for a in shape if a not in S.MESH_AXES]
    if unknown:
        raise ValueError(f"unknown mesh axis name(s) {unknown}; use {list(S.MESH_AXES)}")
    return shape


class _Shape:
    """A stand-in Mesh for `sharding.spec_for`, which reads only `.shape`."""

    def __init__(self, shape):
        self.shape = shape


def _split_bytes(shape, spec, mesh: dict[str, int], itemsize: int) -> int:
    n = math.prod(shape)
    for axis in spec:
        if axis is not None:
            n //= mesh.get(axis, 1)
    return n * itemsize


def weight_bytes(config: ModelConfig, mesh, dtype=jnp.float32) -> int:
    """Bytes of weights on the most loaded device (exact for the declared layout)."""
    shape = _mesh_shape(mesh)
    top, block = expected_shapes(config)
    top_specs, block_specs = S.weight_specs(config, _Shape(shape))
    size = np.dtype(dtype).itemsize
    total = sum(_split_bytes(s, top_specs[k], shape, size) for k, s in top.items() if s is not None)
    total += sum(_split_bytes((config.n_layers, *s), block_specs[k], shape, size)
                 for k, s in block.items() if s is not None)
    return total


def abstract_model(config: ModelConfig, dtype=jnp.float32) -> Transformer:
    """A Transformer whose leaves are ShapeDtypeStructs (nothing allocated)."""
    top, block = expected_shapes(config)
    sds = lambda s: None if s is None else jax.ShapeDtypeStruct(s, dtype)  # noqa: E731
    blocks = Block(**{k: sds(None if s is None else (config.n_layers, *s)) for k, s in block.items()})
    return Transformer(config=config, blocks=blocks, **{k: sds(s) for k, s in top.items()})


def layer_intermediates(config: ModelConfig, seq: int, mesh, dtype=jnp.float32) -> dict[str, int]:
    """{capture field: bytes of ONE layer's intermediate for one sequence of `seq` tokens,
    on one device}, from `jax.eval_shape` of the forward with every capture on."""
    shape = _mesh_shape(mesh)
    model = abstract_model(config, dtype)
    tokens = jax.ShapeDtypeStruct((seq,), jnp.int32)
    out = jax.eval_shape(lambda m, t: m.forward(t, capture=ALL), model, tokens)
    sizes = {"heads": config.n_heads, "kv_heads": config.n_kv_heads, "mlp": config.d_mlp}
    m = shape.get(S.MODEL, 1)
    res = {}
    for f in dataclasses.fields(out.activations):
        a = getattr(out.activations, f.name)
        if a is None or f.name.startswith("final"):
            continue
        b = math.prod(a.shape[1:]) * a.dtype.itemsize  # drop the layer axis
        split = _SPLIT.get(f.name)
        if split is not None and sizes[split] % m == 0:
            b //= m
        res[f.name] = b
    vocab = config.vocab_size // m if config.vocab_size % m == 0 else config.vocab_size
    res["logits"] = seq * vocab * 4
    return res


def _per_device(n: int, mesh: dict[str, int]) -> int:
    return math.ceil(n / mesh.get(S.DATA, 1))


def forward_flops_per_token(config: ModelConfig, seq: int) -> int:
    """Matmul FLOPs (multiply-adds x 2) of one token's forward in a sequence of `seq`: every
    block's weight matrices (q, k, v, o; the MLP's two or three), the unembedding, and causal
    attention's QK^T and AV at half the context on average.  Norms, softmax and activations
    are left out (a few percent at these widths)."""
    c = config
    q, kv = c.n_heads * c.d_head, c.n_kv_heads * c.d_head
    per_layer = c.d_model * (2 * q + 2 * kv) + (3 if c.gated_mlp else 2) * c.d_model * c.d_mlp
    return 2 * (c.n_layers * per_layer + c.d_model * c.vocab_size) + 2 * c.n_layers * seq * q


def plan(config: ModelConfig, mesh, workload: str, dtype=jnp.float32, **params) -> Plan:
    """Per-device bytes of `workload` for `config` on `mesh` (a Mesh or {axis: size}).

    Workloads and their parameters (defaults in brackets):
      forward     batch [8], seq [128]
      sweep       k [256] vectors per chunk, prompts [8], seq [64]; keep_logits [False]
      melbo       k [800] vectors, block [k] of them trained at once, prompts [1], seq [64],
                  layers [n/2] (blocks the gradient flows through: source to target)
      tuned_lens  batch [8] rows, seq [2048]: the frozen model's forward, every layer's
                  residual kept, one layer's lens logits (+ grad) live; SGD momentum state
      patching    prompts [1], seq [64], chunk [n_layers * seq] runs at once (the grid)
      generate    batch [8], slots [2048] (KV cache), one decode step's activations
      train       batch [8], seq [512]: weights + grads + Adam (2 x float32) + activations
    """
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; one of {WORKLOADS}")
    shape = _mesh_shape(mesh)
    S.check_mesh(config, _MeshLike(shape))
    L, d = config.n_layers, config.d_model
    size = np.dtype(dtype).itemsize
    weights = weight_bytes(config, shape, dtype)
    opt = kv = 0
    p = dict(params)

    def live(seq):  # forward-only: residual + the largest intermediate + logits, per sequence
        inter = layer_intermediates(config, seq, shape, dtype)
        logits = inter.pop("logits")
        return 2 * seq * d * size + max(inter.values()) + logits

    def stored(seq, layers):  # training: every intermediate of every layer, per sequence,
        # and as much again for their cotangents in the reverse pass; logits, their
        # softmax and its cotangent
        inter = layer_intermediates(config, seq, shape, dtype)
        logits = inter.pop("logits")
        return 2 * layers * sum(inter.values()) + 3 * logits

    if workload == "forward":
        p = {"batch": 8, "seq": 128, **p}
        act = _per_device(p["batch"], shape) * live(p["seq"])
    elif workload == "sweep":
        p = {"k": 256, "prompts": 8, "seq": 64, "keep_logits": False, **p}
        act = _per_device(p["k"], shape) * p["prompts"] * live(p["seq"])
    elif workload == "melbo":
        p = {"k": 800, "prompts": 1, "seq": 64, "layers": max(1, L // 2), **p}
        p.setdefault("block", p["k"])
        act = _per_device(p["block"], shape) * p["prompts"] * stored(p["seq"], p["layers"])
        opt = 3 * p["k"] * d * 4  # the vectors, Adam's two moments (float32, replicated)
    elif workload == "tuned_lens":
        p = {"batch": 8, "seq": 2048, **p}
        rows = _per_device(p["batch"], shape)
        inter = layer_intermediates(config, p["seq"], shape, dtype)
        act = rows * ((L + 1) * p["seq"] * d * 4 + 3 * inter["logits"] + max(
            v for k, v in inter.items() if k != "logits"))
        opt = 2 * L * (d * d + d) * 4  # the translators and their momentum (float32)
    elif workload == "patching":
        p = {"prompts": 1, "seq": 64, **p}
        p.setdefault("chunk", L * p["seq"])
        act = _per_device(p["chunk"], shape) * p["prompts"] * live(p["seq"])
    elif workload == "generate":
        p = {"batch": 8, "slots": 2048, **p}
        m = shape.get(S.MODEL, 1)
        kv_heads = config.n_kv_heads // m if config.n_kv_heads % m == 0 else config.n_kv_heads
        kv = _per_device(p["batch"], shape) * 2 * L * p["slots"] * kv_heads * config.d_head * size
        act = _per_device(p["batch"], shape) * live(1)
    else:  # train
        p = {"batch": 8, "seq": 512, **p}
        opt = weights + 2 * weight_bytes(config, shape, jnp.float32)  # grads + Adam moments
        act = _per_device(p["batch"], shape) * stored(p["seq"], L)
    return Plan(workload, shape, p, weights, opt, kv, act)


class _MeshLike:
    """Enough of a Mesh for `sharding.check_mesh` from a dict of axis sizes."""

    def __init__(self, shape: dict[str, int]):
        self.shape = shape
        self.axis_names = tuple(shape)

