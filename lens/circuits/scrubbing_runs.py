"""Causal scrubbing, the treeified run: plain runs of the dataset (computed once) and one
example's treeified logits from them; the chunking and threading that `scrub` uses.

  plain_runs(model, tokens, memory_budget, workers)    [N, seq] -> PlainRuns (every field [.., N, seq, ..])
  treeified_logits(model, plan, runs)                  runs [R, seq] -> logits [seq, vocab] (plain runs recomputed)
  treeified_logits_from(model, plan, plain, index)     index [R] into `plain` -> logits [seq, vocab]
  checked_dataset(model, tokens, least)                [N, seq] integer ids, or a clear error
  chunk_indices(memory_budget, per_example, n, workers) / run_chunks(fn, chunks, workers)   chunked dispatch
  plain_bytes(config, seq), default_workers()          sizes for the memory budget, threads per scrub
"""

from __future__ import annotations

import dataclasses
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lens.circuits.scrubbing_nodes import MLP, Embed, Head, MLPInput, Output, Resid
from lens.circuits.scrubbing_sampling import Plan
from lens.models.core.interventions import Capture, Edits


# ------------------------------------------------------------------ the treeified run
class PlainRuns(eqx.Module):
    """Plain (unedited) activations of a batch of sequences: everything a treeified run
    reads from a plain run.  Every plain run of a scrub is a run of one DATASET example,
    so `plain_runs` over the dataset once serves every node, seed and hypothesis: a
    node's plain values are gathers, not forwards.  Per-layer fields are LAYER-major
    ([layers, n, ...]: the layout the forward's scan over layers writes, so no transpose
    of the whole cache); resid_mid only where an MLP reads it (not attention-only, not
    parallel residual), mlp_out only with MLPs."""

    resid_pre: Float[Array, "layers n seq d_model"]
    resid_mid: Float[Array, "layers n seq d_model"] | None
    head_z: Float[Array, "layers n seq heads d_head"]
    mlp_out: Float[Array, "layers n seq d_model"] | None
    final: Float[Array, "n seq d_model"]


def _needs_mid(config) -> bool:
    return not config.attn_only and not config.parallel_residual


def _plain_batch(model, tokens: Int[Array, "B seq"], ids_checked: bool) -> PlainRuns:
    """PlainRuns of a batch: vmapped forwards whose per-layer captures stay layer-major
    (out_axes=1), and only the captures a treeified run reads (the others are dead code
    for XLA: a vmapped scan's [batch, layers] captures cost a transpose, and capturing
    attn_out / resid_post / attention-only zeros cost as much as the forward itself)."""
    c = model.config
    cap = Capture(resid=True, head_z=True, sublayers=not c.attn_only)

    def one(t):
        x, qpos, valid = model.prefix(t, ids_checked=ids_checked)
        final, _, acts = model.run_blocks(x, qpos, valid, capture=cap)
        mid = acts.resid_mid if _needs_mid(c) else None
        mlp = None if c.attn_only else acts.mlp_out
        return final, (acts.resid_pre, mid, acts.head_z, mlp)

    final, (pre, mid, z, mlp) = jax.vmap(one, out_axes=(0, 1))(tokens)
    return PlainRuns(pre, mid, z, mlp, final)


@eqx.filter_jit
def _plain_chunk(model, tokens: Int[Array, "B seq"]) -> PlainRuns:
    return _plain_batch(model, tokens, True)


CPU_CHUNK_BYTES = 16e6  # a chunk's working set on CPU: inside the last-level cache (measured:
# 1000 examples in one chunk ran the induction bench's treeified part 2x slower than 100-200)


def checked_dataset(model, tokens, least: int) -> np.ndarray:
    """tokens as a numpy [N, seq] integer array, or a clear error: not integer ids [N, seq],
    fewer than `least` examples, an id outside the vocabulary (a gather inside jit would
    clamp it silently), or longer than the model's context."""
    c = model.config
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integer ids [N, seq]; got {tokens.dtype} {tokens.shape}")
    if len(tokens) < least:
        raise ValueError(f"the dataset needs at least {least} example(s) (scrubbing resamples from it); "
                         f"got {len(tokens)}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= c.vocab_size):
        raise ValueError(f"token ids out of range [0, {c.vocab_size})")
    if tokens.shape[1] > c.max_seq_len:
        raise ValueError(f"sequences of {tokens.shape[1]} tokens exceed the model's context {c.max_seq_len}")
    return tokens


def default_workers() -> int:
    """Threads that dispatch a scrub's chunks concurrently: on CPU one per core this
    process may use (XLA:CPU runs a program of small ops on fewer than all of them:
    measured 1.2-1.6 of 2 cores for the induction bench, so a second chunk in flight fills
    the rest); elsewhere 1 (the device runs one program at a time; dispatch is already
    asynchronous)."""
    if jax.default_backend() != "cpu":
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def chunk_indices(memory_budget: float, per_example: int, n: int, workers: int) -> list[np.ndarray]:
    """Example rows of each compiled call: equal sizes (one compile; the last chunk
    repeats example n-1, cut afterwards), as few as the memory budget (shared by the
    `workers` chunks in flight) and, on CPU, the cache allow, but a multiple of `workers`
    so every thread gets the same work."""
    limit = memory_budget / workers
    limit = limit if jax.default_backend() != "cpu" else min(limit, CPU_CHUNK_BYTES)
    most = min(n, max(1, int(limit // per_example)))
    count = -(-n // most)
    count = min(n, -(-count // workers) * workers)
    size = -(-n // count)
    return [np.minimum(np.arange(s, s + size), n - 1) for s in range(0, n, size)]


def run_chunks(fn: Callable, chunks: list, workers: int, bar=None) -> list:
    """[fn(chunk) for chunk in chunks], results ready, `workers` chunks in flight at a time
    (threads: a jitted call releases the GIL while it runs)."""
    def ready(ch):
        out = jax.block_until_ready(fn(ch))
        if bar is not None:  # distinct examples (the last chunk repeats its last one)
            bar.update(int(np.count_nonzero(ch != ch[-1])) + 1)
        return out

    if workers <= 1 or len(chunks) <= 1:
        return [ready(ch) for ch in chunks]
    with ThreadPoolExecutor(min(workers, len(chunks))) as pool:
        return list(pool.map(ready, chunks))


def plain_bytes(config, seq: int) -> int:
    """Bytes of one example's PlainRuns (float32)."""
    c = config
    per_layer = (1 + _needs_mid(c) + (0 if c.attn_only else 1)) * c.d_model + c.n_heads * c.d_head
    return 4 * seq * (c.d_model + c.n_layers * per_layer)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _concat(arrays: list, axis: int, n: int) -> Array:
    return jax.lax.slice_in_dim(jnp.concatenate(arrays, axis=axis), 0, n, axis=axis)


def _concat_plain(parts: list[PlainRuns], n: int, workers: int) -> PlainRuns:
    """The chunks' PlainRuns as one (cut to n examples), a field per thread: a copy of
    the whole cache, memory-bound, so the cores split it."""
    fields = [f for f in ("final", "resid_pre", "resid_mid", "head_z", "mlp_out") if getattr(parts[0], f) is not None]
    cat = lambda f: _concat([getattr(p, f) for p in parts], 0 if f == "final" else 1, n)  # noqa: E731
    got = dict(zip(fields, run_chunks(cat, fields, workers)))
    return PlainRuns(*(got.get(f) for f in ("resid_pre", "resid_mid", "head_z", "mlp_out", "final")))


def plain_runs(model, tokens: Int[np.ndarray, "N seq"], memory_budget: float = 2e9,
               workers: int | None = None) -> PlainRuns:
    """The plain activations of every dataset example (vmapped, chunked by the budget,
    `workers` chunks in flight: default `default_workers()`), for `scrub(..., plain=)`:
    computed once, shared by every node, seed and hypothesis."""
    c = model.config
    tokens = checked_dataset(model, tokens, least=1)  # checked here: not in the compiled call
    seq = tokens.shape[1]
    workers = default_workers() if workers is None else workers
    # a block's working set (attention scores, MLP hidden) on top of what is kept
    work = 4 * seq * (c.n_heads * seq + 4 * c.d_model + 2 * max(c.d_mlp, 0))
    chunks = chunk_indices(memory_budget, plain_bytes(c, seq) + work, len(tokens), workers)
    parts = run_chunks(lambda rows: _plain_chunk(model, tokens[rows]), chunks, workers)
    if len(parts) == 1:
        return parts[0]
    return _concat_plain(parts, len(tokens), workers)


def treeified_logits(model, plan: Plan, runs: Int[Array, "R seq"]) -> Float[Array, "seq vocab"]:
    """Logits of the treeified model for one example: `runs[plan.run]` is the input of each
    plan node's plain activations (see the module docstring).  Pure; vmap over examples.
    (`scrub` uses `treeified_logits_from`, which gathers those runs from `plain_runs`.)"""
    plain = _plain_batch(model, runs, False)
    return treeified_logits_from(model, plan, plain, jnp.arange(runs.shape[0]))


def _patched_head(model, layer: int, head: int, q: Float[Array, "seq d_model"], k: Float[Array, "seq d_model"],
                  v: Float[Array, "seq d_model"], qpos, valid) -> Float[Array, "seq d_head"]:
    """z of head (layer, head) when its query / key / value read q / k / v: `block_forward`
    on a ONE-HEAD slice of the block (its W_Q row, its kv head's W_K / W_V, no MLP), so
    norms, rotary, q/k norms and windows are the model's own code, at 1 / n_heads of a
    block's attention cost.  One call per head (its slice is static), vmapped by the
    caller over examples only."""
    from lens.models.core.block import block_forward

    c = model.config
    kv = head // (c.n_heads // c.n_kv_heads)
    one = dataclasses.replace(c, n_heads=1, n_kv_heads=1, attn_only=True)
    full = jax.tree.map(lambda w: w[layer], model.blocks)

    def pick(a, row):  # [1, ...]: this head's own slice
        return None if a is None else a[row:row + 1]

    sliced = dataclasses.replace(
        full, W_Q=pick(full.W_Q, head), b_Q=pick(full.b_Q, head), W_K=pick(full.W_K, kv),
        b_K=pick(full.b_K, kv), W_V=pick(full.W_V, kv), b_V=pick(full.b_V, kv), W_O=pick(full.W_O, head))
    local = c.local_layers
    is_local = None if local is None else jnp.asarray(local[layer])
    ones = jnp.ones((1, 1), q.dtype)
    e = Edits(q_input_mix=ones, q_input_source=q, k_input_mix=ones, k_input_source=k,
              v_input_mix=ones, v_input_source=v)
    x = jnp.zeros_like(q)  # every input comes from a source: the residual itself is unused
    return block_forward(one, sliced, x, qpos, key_pos=jnp.where(valid, qpos, -1), rotary=model.rotary(qpos),
                         is_local=is_local, edits=e, capture=Capture(head_z=True))[2].head_z[:, 0]


def treeified_logits_from(model, plan: Plan, plain: PlainRuns, index: Int[Array, " R"]) -> Float[Array, "seq vocab"]:
    """`treeified_logits` when the plain runs are precomputed: plan node p reads the plain
    activations `plain[index[p.run]]`.  Only what the plan reads is gathered or computed
    (one head's output, not every head's; one block re-run per patched writer)."""
    c = model.config
    seq = plain.final.shape[1]
    qpos, valid = model.default_positions(jnp.zeros((seq,), jnp.int32), None, None, None)
    blocks = model.blocks
    memo: dict = {}

    def get(field: str, r: int, layer: int | None = None):
        key = (field, r, layer)
        if key not in memo:  # gather once per (field, run, layer), however many nodes read it
            a = getattr(plain, field)
            memo[key] = a[index[r]] if layer is None else a[layer, index[r]]
        return memo[key]

    def mask(positions):
        m = np.zeros((seq,), np.float32)
        m[slice(None) if positions is None else list(positions)] = 1.0
        return jnp.asarray(m)[:, None]

    def head_out(z, layer, head):  # z [seq, heads, d_head] -> [seq, d_model]
        return jnp.einsum("sk,kd->sd", z[:, head], blocks.W_O[layer, head])

    def plain_head(r, layer, head):
        key = ("head_out", r, layer, head)
        if key not in memo:
            memo[key] = head_out(get("head_z", r, layer), layer, head)
        return memo[key]

    at_layer = lambda layer, v: jnp.asarray(np.eye(c.n_layers, dtype=np.float32)[layer])[:, None, None] * v[None]  # noqa: E731

    def plain_writer(t, r):
        if isinstance(t, Embed):
            return get("resid_pre", r, 0)
        if isinstance(t, Head):
            return plain_head(r, t.layer, t.head)
        if isinstance(t, MLP):
            return get("mlp_out", r, t.layer)
        return get("resid_pre", r, t.layer) if t.layer < c.n_layers else get("final", r)

    def plain_reader(t, r):
        if isinstance(t, Output) or (isinstance(t, Resid) and t.layer == c.n_layers):
            return get("final", r)
        if isinstance(t, MLPInput) and not c.parallel_residual:
            return get("resid_mid", r, t.layer)
        return get("resid_pre", r, t.layer)

    values: dict[int, Array] = {}  # id(plan node) -> value of a writer run with edits

    zvals: dict[int, Array] = {}  # id(patched head node) -> its z [seq, d_head]

    def delta(ch: Plan, run: int):
        """value(ch) - plain_writer(ch.target, run), or None where that is exactly zero (a
        leaf reading the reader's own run).  A head's is (z - z_plain) W_O: linear in z,
        one projection instead of two."""
        t = ch.target
        leaf = not ch.children or isinstance(t, Embed)
        if leaf and ch.run == run:
            return None
        if isinstance(t, Head):
            z = get("head_z", ch.run, t.layer)[:, t.head] if leaf else zvals[id(ch)]
            dz = z - get("head_z", run, t.layer)[:, t.head]
            return jnp.einsum("sk,kd->sd", dz, blocks.W_O[t.layer, t.head])
        return writer_value(ch) - plain_writer(t, run)

    def reader_value(p: Plan):
        x = plain_reader(p.target, p.run)
        for ch in p.children:
            d = delta(ch, p.run)
            if d is not None:
                x = x + (d if ch.positions is None else mask(ch.positions) * d)
        return x

    def writer_value(p: Plan):
        if isinstance(p.target, Resid) and p.children:
            return reader_value(p)
        if not p.children or isinstance(p.target, Embed):
            return plain_writer(p.target, p.run)
        return values[id(p)]

    def edits_for(p: Plan) -> dict:
        """The Edits fields that make block `layer` of p's other run give its MLP p's
        child's value as input."""
        layer = p.target.layer
        x = get("resid_pre", p.run, layer)
        one = np.zeros((c.n_layers, 1), np.float32)
        one[layer] = 1.0
        want = reader_value(p.children[0])  # MLP: its input set through the attention output
        if c.parallel_residual:  # (or the residual when the MLP reads the block's input)
            return {"resid_mix": jnp.asarray(one, x.dtype),
                    "resid_source": at_layer(layer, want)}
        return {"attn_out_mix": jnp.asarray(one, x.dtype),
                "attn_out_source": at_layer(layer, want - x)}

    def _head_input(p: Plan, which: str):
        """What head p reads through `which`: its child's value, else its other run's residual."""
        for ch in p.children:
            if ch.target.which == which:
                return reader_value(ch)
        return get("resid_pre", p.run, p.target.layer)

    # Writers that need a forward of their block, deepest first; those of one height,
    # layer and kind share one vmapped block call (a few compiled calls, not one per node).
    groups: dict[tuple, list[Plan]] = {}

    def height(p: Plan) -> int:
        below = max((height(ch) for ch in p.children), default=-1)
        needs = isinstance(p.target, (Head, MLP)) and bool(p.children)
        if needs:
            groups.setdefault((below + 1, p.target.layer, type(p.target).__name__), []).append(p)
        return below + int(needs)

    height(plan)
    for key in sorted(groups):
        members = groups[key]
        layer, is_head = key[1], key[2] == "Head"
        if is_head:  # only the patched heads themselves: one-head blocks, not whole blocks
            for p in members:
                zvals[id(p)] = _patched_head(model, layer, p.target.head, *(_head_input(p, w) for w in "qkv"),
                                             qpos, valid)
            continue
        fields = [edits_for(p) for p in members]
        stacked = Edits(**{k: jnp.stack([f[k] for f in fields]) for k in fields[0]})
        xs = jnp.stack([get("resid_pre", p.run, layer) for p in members])

        def block(x, e, layer=layer):
            return model.run_blocks(x, qpos, valid, start=layer, stop=layer + 1, edits=e,
                                    capture=Capture(sublayers=True))[2]

        out = jax.vmap(block)(xs, stacked)
        for i, p in enumerate(members):
            values[id(p)] = out.mlp_out[i, 0]

    resid = reader_value(plan)
    logits, _ = model.unembed_resid(resid)
    return logits


