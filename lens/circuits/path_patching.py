"""Path patching (Wang et al. 2022): the effect of each sender head on chosen receivers'
query / key / value inputs, on token-aligned clean / corrupted pairs.

    grid = path_patching.path_patching(model, clean, corrupted, metric, receivers=[(9, 6)], receiver_input="q")   # [layers, heads]

Inputs are checked as in `lens.circuits.patching` (`check_pair`, `check_metric`).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lens.circuits.patching import DIRECTIONS, check_metric, check_pair
from lens.core.capture import run_with_cache
from lens.core.sweep import chunk_size_for
from lens.models.core.interventions import Capture, Edits
from lens.models.core.transformer import Transformer


def path_patching(
    model: Transformer,
    clean: Int[Array, " seq"] | Int[Array, "P seq"],
    corrupted: Int[Array, " seq"] | Int[Array, "P seq"],
    metric: Callable[[Float[Array, "seq vocab"]], Float[Array, ""]],
    receivers: Sequence[tuple[int, int]],
    receiver_input: str = "q",
    direction: str = "noise",
    chunk_size: int | None = None,
    memory_budget: float = 2**30,
) -> Float[Array, "*P layers heads"]:
    """Path patching (Wang et al. 2022, IOI, section 3.1 / appendix B), sender head -> the
    receivers' `receiver_input` ("q", "k" or "v"), for every sender head: grid [layers, heads].

    With base = the run whose behaviour is measured and source = the other input
    (direction "noise", Wang et al.'s: base = clean x_orig, source = corrupted x_new):
      1. cache every head's output z on base and source;
      2. run base with the SENDER's z taken from source and every other head frozen to its
         base z (MLPs and norms recomputed), and record the residual each receiver reads;
      3. run base with only the receivers' q (k, v) input replaced by that residual (each
         through ln1 with its own divisor: what the receiver would have read in run 2), and
         measure the metric.
    A cell is that metric; senders at or after the first receiver's layer cannot reach it
    (their cell is the unpatched base metric).  With grouped-query attention a key / value
    input is per KV head: a receiver (layer, h) patches h's KV head (shared by its group)."""
    if receiver_input not in ("q", "k", "v"):
        raise ValueError(f"receiver_input must be 'q', 'k' or 'v'; got {receiver_input!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'denoise' or 'noise'; got {direction!r}")
    c, x, batched = check_pair(model, clean, corrupted)
    check_metric(metric, c.shape[0], batched)
    base, source = (x, c) if direction == "denoise" else (c, x)
    cfg = model.config
    P, seq = base.shape
    width = cfg.n_heads if receiver_input == "q" else cfg.n_kv_heads
    recv = np.zeros((cfg.n_layers, 1, width), np.float32)
    if len(receivers) == 0:
        raise ValueError("path_patching needs at least one receiver (layer, head)")
    for layer, head in receivers:
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise ValueError(f"receiver ({layer}, {head}) outside ({cfg.n_layers} layers, "
                             f"{cfg.n_heads} heads)")
        recv[layer, 0, head if receiver_input == "q" else head // (cfg.n_heads // cfg.n_kv_heads)] = 1
    _, b = run_with_cache(model, base, Capture(head_z=True))
    _, s = run_with_cache(model, source, Capture(head_z=True))
    K = cfg.n_layers * cfg.n_heads
    if chunk_size is None:
        chunk_size = max(1, chunk_size_for(model, 1, 1, P, seq, False, True, True, memory_budget) // 2)
    chunk = max(1, min(chunk_size, K))
    out = []
    for i in range(math.ceil(K / chunk)):
        idx = np.minimum(np.arange(i * chunk, (i + 1) * chunk), K - 1)
        used = min(chunk, K - i * chunk)
        vals = _path_chunk(model, base, b.head_z, s.head_z, metric, jnp.asarray(idx),
                           jnp.asarray(recv), receiver_input, batched)
        out.append(np.asarray(vals)[:used])
    grid = jnp.asarray(np.concatenate(out).T.reshape(P, cfg.n_layers, cfg.n_heads))
    return grid if batched else grid[0]


@eqx.filter_jit
def _path_chunk(model, base, base_z, src_z, metric, indices, recv, receiver_input, batched):
    cfg = model.config
    arrays, rest = eqx.partition(metric, eqx.is_array)
    axes = jax.tree.map(lambda a: 0 if batched and a.ndim > 0 else None, arrays)
    dt = model.embed.dtype

    def one(index, tokens, bz, sz, a):
        sender = jax.nn.one_hot(index, cfg.n_layers * cfg.n_heads).reshape(cfg.n_layers, 1, cfg.n_heads)
        z = bz + sender[..., None] * (sz - bz)  # [L, seq, H, d_head]: the sender from source
        frozen = Edits(head_mix=jnp.ones((cfg.n_layers, 1, cfg.n_heads), dt), head_source=z.astype(dt))
        run2 = model.forward(tokens, edits=frozen, capture=Capture(resid=True))
        reads = run2.activations.resid_pre  # what each receiver reads in run 2
        e = Edits(**{f"{receiver_input}_input_mix": recv.astype(dt),
                     f"{receiver_input}_input_source": reads.astype(dt)})
        return eqx.combine(a, rest)(model(tokens, edits=e))

    def per_sender(index):
        f = lambda t, bz, sz, a: one(index, t, bz, sz, a)  # noqa: E731
        return jax.vmap(f, in_axes=(0, 0, 0, axes))(base, base_z, src_z, arrays)

    return jax.vmap(per_sender)(indices)
