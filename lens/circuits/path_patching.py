"""Path patching (Wang et al. 2022): the effect of each sender head on chosen receivers'
query / key / value inputs, on token-aligned clean / corrupted pairs.

    grid = path_patching.path_patching(model, clean, corrupted, metric, receivers=[(9, 6)], receiver_input="q")   # [layers, heads]

Inputs are checked as in `lens.circuits.patching` (`check_pair`, `check_metric`).
Reading the results: `completeness_meaning` (what an all-senders fraction says),
`additivity_sums` (the single-sender cells beside the joint run), `path_shares` (pairs
per length group).
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
    recv = _receiver_mask(model, receivers, receiver_input)
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
        masks = jax.nn.one_hot(jnp.asarray(idx), K).reshape(-1, cfg.n_layers, 1, cfg.n_heads)
        vals = _path_chunk(model, base, b.head_z, s.head_z, metric, masks,
                           jnp.asarray(recv), receiver_input, batched)
        out.append(np.asarray(vals)[:used])
    grid = jnp.asarray(np.concatenate(out).T.reshape(P, cfg.n_layers, cfg.n_heads))
    return grid if batched else grid[0]


@eqx.filter_jit
def _path_chunk(model, base, base_z, src_z, metric, masks, recv, receiver_input, batched):
    cfg = model.config
    arrays, rest = eqx.partition(metric, eqx.is_array)
    axes = jax.tree.map(lambda a: 0 if batched and a.ndim > 0 else None, arrays)
    dt = model.embed.dtype

    def one(sender, tokens, bz, sz, a):
        z = bz + sender[..., None] * (sz - bz)  # [L, seq, H, d_head]: the sender from source
        frozen = Edits(head_mix=jnp.ones((cfg.n_layers, 1, cfg.n_heads), dt), head_source=z.astype(dt))
        run2 = model.forward(tokens, edits=frozen, capture=Capture(resid=True))
        reads = run2.activations.resid_pre  # what each receiver reads in run 2
        e = Edits(**{f"{receiver_input}_input_mix": recv.astype(dt),
                     f"{receiver_input}_input_source": reads.astype(dt)})
        return eqx.combine(a, rest)(model(tokens, edits=e))

    def per_sender(mask):
        f = lambda t, bz, sz, a: one(mask, t, bz, sz, a)  # noqa: E731
        return jax.vmap(f, in_axes=(0, 0, 0, axes))(base, base_z, src_z, arrays)

    return jax.vmap(per_sender)(masks.astype(model.embed.dtype))


def _receiver_mask(model: Transformer, receivers, receiver_input: str) -> np.ndarray:
    cfg = model.config
    width = cfg.n_heads if receiver_input == "q" else cfg.n_kv_heads
    recv = np.zeros((cfg.n_layers, 1, width), np.float32)
    if len(receivers) == 0:
        raise ValueError("path patching needs at least one receiver (layer, head)")
    for layer, head in receivers:
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise ValueError(f"receiver ({layer}, {head}) outside ({cfg.n_layers} layers, "
                             f"{cfg.n_heads} heads)")
        recv[layer, 0, head if receiver_input == "q" else head // (cfg.n_heads // cfg.n_kv_heads)] = 1
    return recv


def path_completeness(
    model: Transformer,
    clean: Int[Array, "P seq"],
    corrupted: Int[Array, "P seq"],
    metric: Callable[[Float[Array, "seq vocab"]], Float[Array, ""]],
    receivers: Sequence[tuple[int, int]],
    receiver_input: str = "q",
    direction: str = "noise",
) -> dict[str, Float[np.ndarray, " P"]]:
    """The all-senders completeness check of path patching: per pair the metric when EVERY
    head before the first receiver's layer is a sender at once (step 2 of `path_patching`
    with all of them from the source run; embeddings and MLPs recomputed, later heads
    frozen to base) -> "all_senders"; the metric when the receivers' `receiver_input` is
    replaced by the source run's own residual (the receivers' whole input effect) ->
    "receiver_input"; and the unpatched base metric -> "base".

    Per-head senders sum (to first order) to the all-senders effect, and the all-senders
    effect falls short of the whole input effect by what the senders cannot carry: the
    token / position embeddings and the MLPs' direct paths (and, noising, any interaction).
    fraction = (all_senders - base) / (receiver_input - base), near 1 when the heads carry
    the receivers' input effect, near 0 when it reaches them through embeddings or MLPs.
    At a position whose token is the same in both inputs (IOI's END) the all-senders residual
    IS the source run's (only attention moves information between positions, every head is
    patched, MLPs are recomputed), so for a receiver read there the fraction is ~1 by
    construction; it falls below 1 only through the receiver's input at changed positions."""
    if receiver_input not in ("q", "k", "v"):
        raise ValueError(f"receiver_input must be 'q', 'k' or 'v'; got {receiver_input!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'denoise' or 'noise'; got {direction!r}")
    c, x, batched = check_pair(model, clean, corrupted)
    check_metric(metric, c.shape[0], batched)
    base, source = (x, c) if direction == "denoise" else (c, x)
    cfg = model.config
    recv = _receiver_mask(model, receivers, receiver_input)
    first = min(layer for layer, _ in receivers)
    senders = np.zeros((1, cfg.n_layers, 1, cfg.n_heads), np.float32)
    senders[0, :first] = 1.0
    _, b = run_with_cache(model, base, Capture(head_z=True))
    _, s = run_with_cache(model, source, Capture(head_z=True, resid=True))
    all_s = np.asarray(_path_chunk(model, base, b.head_z, s.head_z, metric, jnp.asarray(senders),
                                   jnp.asarray(recv), receiver_input, batched))[0]
    own = np.asarray(_input_patch(model, base, s.resid_pre, metric, jnp.asarray(recv), receiver_input, batched))
    none = np.asarray(_input_patch(model, base, s.resid_pre, metric, jnp.zeros_like(jnp.asarray(recv)),
                                   receiver_input, batched))
    return {"all_senders": all_s, "receiver_input": own, "base": none}


@eqx.filter_jit
def _input_patch(model, base, src_resid, metric, recv, receiver_input, batched):
    arrays, rest = eqx.partition(metric, eqx.is_array)
    axes = jax.tree.map(lambda a: 0 if batched and a.ndim > 0 else None, arrays)
    dt = model.embed.dtype

    def one(tokens, resid, a):
        e = Edits(**{f"{receiver_input}_input_mix": recv.astype(dt),
                     f"{receiver_input}_input_source": resid.astype(dt)})
        return eqx.combine(a, rest)(model(tokens, edits=e))

    return jax.vmap(one, in_axes=(0, 0, axes))(base, src_resid, arrays)


# ------------------------------------------------------------------ reading the results
def completeness_meaning(fraction: float, receiver_effect: float, ends_match: bool) -> str:
    """What a receiver's all-senders completeness fraction says (path patching into QUERIES,
    noising, `path_completeness`: every earlier head from the corrupted run at once, MLPs and
    norms recomputed).  When END's token is the same in both prompts, the residual at every
    position whose token did not change (END included) then IS the corrupted run's (only
    attention moves information between positions, and every head is patched), so the
    receiver's query at END is fully patched and a fraction near 1 is what the construction
    gives: it rules out only an effect through the receiver's query at the changed (name)
    positions, and cannot tell heads from MLPs (both are on the path).  The informative
    numbers are then the single-sender cells and how they add up."""
    if abs(receiver_effect) < 0.05:
        return "the receiver's query barely depends on the corruption (|effect| < 0.05): nothing to explain"
    if ends_match and fraction > 0.9:
        return ("~1, as the construction gives when END's token is unchanged: with every earlier head patched "
                "and MLPs recomputed, the residual at END is the corrupted run's, so this says only that the "
                "effect does not come through the receiver's query at the changed name positions; it does not "
                "separate heads from MLPs (see the single-sender cells and the additivity line)")
    if abs(fraction) < 0.2:
        return ("~0: the receiver's query-input effect does not come through earlier heads (embeddings / MLPs at "
                "the changed positions carry it, or the heads' effects cancel); its per-sender cells explain nothing")
    if fraction > 0.7:
        return "the earlier heads carry most of the receiver's query-input effect"
    return "the earlier heads carry part of it; the rest comes through embeddings / MLPs at the changed positions"


def additivity_sums(grid: np.ndarray, receivers) -> dict:
    """The single-sender cells (noising, base = 0) summed over the SAME senders as the joint
    all-senders run (every head before the first receiver's layer), and over every cell (which
    adds the senders between the receivers' layers, absent from the joint run)."""
    first = min(layer for layer, _ in receivers)
    return {"sum_of_single_sender_effects": float(np.asarray(grid)[:first].sum()),
            "sum_of_single_sender_effects_all_cells": float(np.asarray(grid).sum()),
            "senders_before_layer": int(first)}


def path_shares(n_pairs: int, sizes: list[int]) -> list[int]:
    """How many of `n_pairs` path-patching pairs each length group gives: as even a split as
    the groups' sizes allow (round-robin), so a small budget still spans every template."""
    shares = [0] * len(sizes)
    left = min(n_pairs, sum(sizes))
    while left > 0:
        for i, size in enumerate(sizes):
            if left > 0 and shares[i] < size:
                shares[i] += 1
                left -= 1
    return shares
