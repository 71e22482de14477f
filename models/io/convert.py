"""Shared conversion machinery: HF-named tensors -> a checked, stacked `Transformer`.

Each family file supplies `config_from_hf` and a `convert(config, tensors)` that walks
its one explicit key map with a `TensorTaker`.  Everything here is family-agnostic:
shape checks against the config, missing/extra tensor errors, stacking over layers.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import jax.numpy as jnp
import numpy as np

from ..core.block import BLOCK_FIELDS, Block
from ..core.config import ModelConfig
from ..core.transformer import Transformer


class CheckpointError(ValueError):
    """A checkpoint that does not match what its config says it should contain."""


class TensorTaker:
    """Hands out HF tensors by name, remembering which were used.

    `finish()` raises if any tensor was left over (an unexpected tensor means the key map
    does not describe this checkpoint, so loading would silently drop weights).
    """

    def __init__(self, tensors: dict[str, np.ndarray], ignore: Callable[[str], bool] = lambda k: False):
        self.tensors = tensors
        self.used: set[str] = set()
        self.ignore = ignore

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor `name`, checked against `shape` (in the checkpoint's own layout) if given.

        Checking here, before any reshape into the per-head layout, makes a mis-shaped
        tensor an error that names the checkpoint tensor rather than a numpy reshape error.
        """
        if name not in self.tensors:
            raise CheckpointError(f"missing tensor {name!r} in checkpoint")
        self.used.add(name)
        arr = np.asarray(self.tensors[name])
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}"
            )
        return arr

    def finish(self) -> None:
        extra = sorted(k for k in self.tensors if k not in self.used and not self.ignore(k))
        if extra:
            shown = ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else "")
            raise CheckpointError(f"{len(extra)} unexpected tensor(s) in checkpoint: {shown}")


def take_unembedding(t: "TensorTaker", c: ModelConfig, embed: np.ndarray, name: str = "lm_head.weight"):
    """The untied unembedding, or None when tied (then a stored copy must equal `embed`)."""
    if not c.tie_embeddings:
        return t.take(name, (c.vocab_size, c.d_model))
    # Tied checkpoints sometimes still store lm_head; it must equal the embedding.
    if name in t and not np.array_equal(t.take(name), embed):
        raise CheckpointError(f"tie_word_embeddings is true but {name} differs from the embedding")
    return None


def expected_shapes(c: ModelConfig) -> tuple[dict[str, tuple | None], dict[str, tuple | None]]:
    """(top-level field shapes, per-layer Block field shapes); None = field absent."""
    d, h, kv, dh, m = c.d_model, c.n_heads, c.n_kv_heads, c.d_head, c.d_mlp
    maybe = lambda flag, shape: shape if flag else None  # noqa: E731
    mlp = not c.attn_only
    dense = mlp and not c.is_moe  # a mixture of experts has expert matrices instead
    pre, e = c.pre_norms, c.n_experts
    qn, kn = ((h * dh,), (kv * dh,)) if c.qk_norm_over == "all" else ((dh,), (dh,))
    block = {
        "ln1_w": maybe(pre, (d,)), "ln1_b": maybe(pre and c.norm_bias, (d,)),
        "W_Q": (h, d, dh), "b_Q": maybe(c.attn_bias, (h, dh)),
        "W_K": (kv, d, dh), "b_K": maybe(c.attn_bias, (kv, dh)),
        "W_V": (kv, d, dh), "b_V": maybe(c.attn_bias, (kv, dh)),
        "W_O": (h, dh, d), "b_O": maybe(c.attn_out_bias, (d,)),
        "q_norm_w": maybe(c.qk_norm, qn), "k_norm_w": maybe(c.qk_norm, kn),
        "post_attn_w": maybe(c.sandwich_norms, (d,)),
        "ln2_w": maybe(mlp and pre, (d,)), "ln2_b": maybe(mlp and pre and c.norm_bias, (d,)),
        "W_in": maybe(dense, (d, m)), "b_in": maybe(dense and c.mlp_bias, (m,)),
        "W_gate": maybe(dense and c.gated_mlp, (d, m)),
        "b_gate": maybe(dense and c.gated_mlp and c.mlp_bias, (m,)),
        "W_out": maybe(dense, (m, d)), "b_out": maybe(dense and c.mlp_bias, (d,)),
        "post_mlp_w": maybe(mlp and c.sandwich_norms, (d,)),
        "W_router": maybe(c.is_moe, (d, e)),
        "W_in_experts": maybe(c.is_moe, (e, d, m)),
        "W_gate_experts": maybe(c.is_moe, (e, d, m)),
        "W_out_experts": maybe(c.is_moe, (e, m, d)),
    }
    top = {
        "embed": (c.vocab_size, d),
        "pos_embed": maybe(c.positional == "learned", (c.max_seq_len, d)),
        "final_norm_w": (d,),
        "final_norm_b": maybe(c.norm_bias, (d,)),
        "unembed": maybe(not c.tie_embeddings, (c.vocab_size, d)),
        "unembed_b": maybe(c.unembed_bias, (c.vocab_size,)),
    }
    return top, block


def _checked(name: str, arr, shape, dtype) -> jnp.ndarray | None:
    if shape is None:
        if arr is not None:
            raise CheckpointError(f"{name}: the config says this tensor is absent, but one was given")
        return None
    if arr is None:
        raise CheckpointError(f"{name}: missing (expected shape {shape})")
    arr = np.asarray(arr)
    if tuple(arr.shape) != tuple(shape):
        raise CheckpointError(f"{name}: shape {tuple(arr.shape)}, expected {tuple(shape)}")
    if not np.all(np.isfinite(arr.astype(np.float32))):
        raise CheckpointError(f"{name}: contains NaN or inf")
    return jnp.asarray(arr, dtype)


# Set by `assembling_with`: a replacement for `assemble` (the sharded loader's, which
# places each device's slice of the family's lazily read tensors instead of stacking them).
_ASSEMBLER: contextvars.ContextVar = contextvars.ContextVar("assembler", default=None)


@contextlib.contextmanager
def assembling_with(fn: Callable):
    """Within the block, every family's `convert` ends in `fn(config, top, per_layer,
    dtype)` instead of `assemble`: the key maps stay declared once, in the family files."""
    token = _ASSEMBLER.set(fn)
    try:
        yield
    finally:
        _ASSEMBLER.reset(token)


def assemble(
    config: ModelConfig,
    top: dict[str, np.ndarray | None],
    per_layer: list[dict[str, np.ndarray | None]],
    dtype=jnp.float32,
) -> Transformer:
    """Check every tensor's shape against the config, stack the layers, build the model."""
    custom = _ASSEMBLER.get()
    if custom is not None:
        return custom(config, top, per_layer, dtype)
    top_shapes, block_shapes = expected_shapes(config)
    if len(per_layer) != config.n_layers:
        raise CheckpointError(f"{len(per_layer)} layers of weights for n_layers={config.n_layers}")
    for name in set(top) - set(top_shapes):
        raise CheckpointError(f"unknown top-level field {name!r}")
    stacked = {}
    for field in BLOCK_FIELDS:
        shape = block_shapes[field]
        arrs = [_checked(f"layer {i} {field}", lp.get(field), shape, dtype) for i, lp in enumerate(per_layer)]
        stacked[field] = None if shape is None else jnp.stack(arrs)
    for i, lp in enumerate(per_layer):
        for name in set(lp) - set(block_shapes):
            raise CheckpointError(f"layer {i}: unknown field {name!r}")
    return Transformer(
        config=config,
        embed=_checked("embed", top.get("embed"), top_shapes["embed"], dtype),
        pos_embed=_checked("pos_embed", top.get("pos_embed"), top_shapes["pos_embed"], dtype),
        blocks=Block(**stacked),
        final_norm_w=_checked("final_norm_w", top.get("final_norm_w"), top_shapes["final_norm_w"], dtype),
        final_norm_b=_checked("final_norm_b", top.get("final_norm_b"), top_shapes["final_norm_b"], dtype),
        unembed=_checked("unembed", top.get("unembed"), top_shapes["unembed"], dtype),
        unembed_b=_checked("unembed_b", top.get("unembed_b"), top_shapes["unembed_b"], dtype),
    )


# Layout helpers: HF nn.Linear stores [out, in]; we store per-head [heads, in, d_head] etc.
def heads_in(w: np.ndarray, heads: int) -> np.ndarray:
    """Linear weight [heads*d_head, d_model] -> [heads, d_model, d_head]."""
    out, d = w.shape
    return w.reshape(heads, out // heads, d).transpose(0, 2, 1)


def heads_out(w: np.ndarray, heads: int) -> np.ndarray:
    """Linear weight [d_model, heads*d_head] -> [heads, d_head, d_model]."""
    d, inner = w.shape
    return w.T.reshape(heads, inner // heads, d)


def heads_bias(b: np.ndarray, heads: int) -> np.ndarray:
    """Bias [heads*d_head] -> [heads, d_head]."""
    return b.reshape(heads, -1)
