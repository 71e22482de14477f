"""The forward that generation runs: per-layer weight buffers and a per-layer KV cache.

Why not `model.forward(..., kv_cache=...)` under `lax.scan` (what generation ran before):
a decode step is one token, so its time is the time to stream the weights from memory
(SmolLM2-135M float32: 538 MB per step).  The profile of that step (bench/README.md)
showed 58% of it spent COPYING weights, not multiplying by them:
  * `lax.scan` over the stacked [layers, ...] weights slices each layer's matrices out of
    the stack with a dynamic-slice, which XLA:CPU materialises (a copy of every weight
    matrix, every step);
  * W_Q / W_K / W_V are stored [heads, d_model, d_head], but the dot wants d_model
    leading (x @ W with W [d_model, heads * d_head]), so each step transposed them (another
    copy).
Here the weights are split once, outside jit, into one buffer per layer (`DecodeWeights`),
with W_Q / W_K / W_V stored [d_model, heads, d_head] and turned back into the logical
[heads, d_model, d_head] by a transpose INSIDE the compiled step, which XLA folds into
the dot's dimension numbers (no copy).  The layers are unrolled (a Python loop: no scan,
no slicing), and the cache is one (k, v) buffer per layer, updated in place in the
decode loop.  The block itself is `models.core.block.block_forward`, the one the forward runs,
so every family and every `Edits` field behaves exactly as in `model.forward`.

Nothing here validates: `models.generation.generate` checks token ids, lengths and edits on the host
before calling in, so the compiled step has no host callback (`eqx.error_if`) and JAX's
persistent compilation cache can store it.
"""

from __future__ import annotations


import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ..runtime import per_model_cache as per_model
from ..core.block import Block, block_forward
from ..core.interventions import Edits, layer_slice

_QKV = ("W_Q", "W_K", "W_V")


class DecodeWeights(eqx.Module):
    """One `Block` per layer (separate buffers), W_Q/W_K/W_V stored [d_model, heads, d_head]."""

    layers: tuple[Block, ...]


class LayerCache(eqx.Module):
    """One row's cache: per-layer keys/values [slots, kv_heads, d_head], slot positions
    (-1: empty or padding) and how many slots are written."""

    k: tuple[Float[Array, "slots kv_heads d_head"], ...]
    v: tuple[Float[Array, "slots kv_heads d_head"], ...]
    positions: Int[Array, " slots"]
    length: Int[Array, ""]


# id(model) -> its decode layout (models/runtime/per_model_cache.py: dropped with the model).
_LAYOUTS: dict[tuple[int, str], DecodeWeights] = {}


def decode_weights(model) -> DecodeWeights:
    """The model's blocks split per layer in the decode layout (built once per model and
    kept while the model lives: a second copy of the block weights)."""
    return per_model.cached(_LAYOUTS, model, "decode", lambda: _build_decode_weights(model))


def _build_decode_weights(model) -> DecodeWeights:
    layers = []
    for i in range(model.config.n_layers):
        block = jax.tree.map(lambda w: w[i], model.blocks)
        # [heads, d_model, d_head] -> [d_model, heads, d_head], materialised contiguous.
        block = eqx.tree_at(lambda b: [getattr(b, n) for n in _QKV], block,
                            [jnp.transpose(getattr(block, n), (1, 0, 2)).copy() for n in _QKV])
        layers.append(block)
    return jax.block_until_ready(DecodeWeights(tuple(layers)))


def _logical(block: Block) -> Block:
    """Back to [heads, d_model, d_head] (a transpose XLA folds into the dot)."""
    return eqx.tree_at(lambda b: [getattr(b, n) for n in _QKV], block,
                       [jnp.transpose(getattr(block, n), (1, 0, 2)) for n in _QKV])


def forward_cached(
    model,
    weights: DecodeWeights,
    tokens: Int[Array, " seq"],
    valid: Bool[Array, " seq"],
    cache: LayerCache,
    edits: Edits | None,
) -> tuple[Float[Array, " vocab"], LayerCache]:
    """One row: run `tokens` (padding where `valid` is False) through every block with
    the cache, write them into it, and return the LAST position's float32 logits.

    Positions continue from the cache (one past its largest position) and count real
    tokens only, as `model.forward` with a KV cache does; `edits` apply exactly as there
    (their position axes must be 1: every position)."""
    config = model.config
    seq = tokens.shape[0]
    start = jnp.max(cache.positions) + 1
    qpos = jnp.maximum(start + jnp.cumsum(valid.astype(jnp.int32)) - 1, 0)
    positions = jax.lax.dynamic_update_slice(
        cache.positions, jnp.where(valid, qpos, -1).astype(jnp.int32), (cache.length,))
    x = model.embed_tokens(tokens, qpos)
    rot = model.rotary(qpos)
    per_layer = layer_slice(edits)
    local = config.local_layers
    ks, vs = [], []
    for i, block in enumerate(weights.layers):
        edits_i = None if per_layer is None else jax.tree.map(lambda a: a[i], per_layer)
        is_local = None if local is None else jnp.asarray(local[i])
        x, (k, v), _ = block_forward(config, _logical(block), x, qpos, key_pos=positions, rotary=rot,
                                     is_local=is_local, edits=edits_i, kv=(cache.k[i], cache.v[i]),
                                     write_index=cache.length)
        ks.append(k)
        vs.append(v)
    logits, _ = model.unembed_resid(x[-1:], edits=edits)
    return logits[0], LayerCache(tuple(ks), tuple(vs), positions, cache.length + seq)


def prefill(
    model,
    tokens: Int[Array, " seq"],
    valid: Bool[Array, " seq"],
    slots: int,
    edits: Edits | None,
) -> tuple[Float[Array, " vocab"], LayerCache]:
    """One row's prompt into a fresh cache of `slots` slots: (last position's logits, cache).

    The prompt is many tokens at once, so the per-layer weight copies of `lax.scan` are a
    small share of it; it scans the stacked blocks (one block compiled instead of
    n_layers) and then lays the prompt's keys and values out per layer.  Same positions and edits as `forward_cached` (tested against it and
    against the full forward)."""
    config = model.config
    seq = tokens.shape[0]
    qpos = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32)) - 1, 0)
    key_pos = jnp.where(valid, qpos, -1).astype(jnp.int32)
    x = model.embed_tokens(tokens, qpos)
    rot = model.rotary(qpos)
    local = config.local_layers
    is_local = None if local is None else jnp.asarray(local)
    empty = jnp.zeros((seq, config.n_kv_heads, config.d_head), model.embed.dtype)

    def step(h, xs):
        block, local_l, edits_l = xs
        h, kv, _ = block_forward(config, block, h, qpos, key_pos=key_pos, rotary=rot, is_local=local_l,
                                 edits=edits_l, kv=(empty, empty), write_index=jnp.zeros((), jnp.int32))
        return h, kv

    x, (ks, vs) = jax.lax.scan(step, x, (model.blocks, is_local, layer_slice(edits)))
    logits, _ = model.unembed_resid(x[-1:], edits=edits)
    pad = ((0, slots - seq), (0, 0), (0, 0))
    cache = LayerCache(tuple(jnp.pad(k, pad) for k in ks), tuple(jnp.pad(v, pad) for v in vs),
                       jnp.pad(key_pos, (0, slots - seq), constant_values=-1), jnp.asarray(seq, jnp.int32))
    return logits[0], cache
