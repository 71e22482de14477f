"""Causal scrubbing (Chan et al. 2022): hypotheses as data, treeified resampling.

A hypothesis is a tree of `Node`s.  Each names a model node (`Output`, `Embed`, `Head`,
`MLP`, `HeadInput`, `MLPInput`, `Resid`) and a sampler; the tree follows PATHS from the
output down, alternating between readers and writers:

  reader  (Output, HeadInput(l, h, "q"|"k"|"v"), MLPInput(l), Resid(l))  -> its children are
          writers into the residual it reads: Embed, Head(l', h'), MLP(l') of earlier
          layers, or Resid(l') = everything already in the stream at layer l';
  writer  Head(l, h) -> children HeadInput(l, h, which); MLP(l) -> child MLPInput(l);
          Embed is always a leaf; Resid(l) is both (a writer under its parent, a reader of
          the writers before layer l).

Sampling (the reference's `InterpNode.sample`, recursive from the root): each node draws
its input x_node from its sampler given its PARENT's draw (Exact: the same example; Uncond:
any example; Cond(feature): an example with the same feature value); a node with children
also draws `other` (Uncond by default) for every input of its model node that no child
claims.  A leaf's model node sees x_node on every path; an inner node's sees x_other except
along its children's paths.  The treeified run gives every path its own input:

  reader value  = resid_R(x_other) + sum_children mask_c * (value(c) - plain_c(x_other))
  writer value  = the writer's output when its inputs read its children's values
                  (a head: its q / k / v input patched, `Edits.q_input_*`), else on x_other

where resid_R(x) is the residual the reader reads in a plain run on x, plain_c(x) the
child's direct output in that run (Head: z_h W_O; MLP: mlp_out; Embed: embeddings; Resid:
resid_pre), and mask_c the child's `positions` (all by default).  The output's value goes
through the final norm and unembedding.  Every plain run is a run of one dataset example:
`plain_runs` computes them once (shared by every node, seed and hypothesis) and the rest
is one pure function per example (gathers, one-head blocks for the patched heads, block
re-runs for patched MLPs), vmapped over the dataset, chunked by a memory budget, the
chunks dispatched on one thread per core (`workers`: XLA:CPU runs one small program on
fewer than all cores); the loss is the caller's per-example `loss_fn(logits, target)`.

    hyp = Node(Output(), children=(Node(Head(1, 6), children=(
              Node(HeadInput(1, 6, "k"), children=(Node(Head(0, 0)),)),)),))
    result = scrub(model, tokens, hyp, loss_fn, targets, seeds=range(5))
    report = compare(model, tokens, {"naive": hyp}, loss_fn, targets, seeds=range(5))
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from lens.circuits.scrubbing_nodes import (  # noqa: F401  re-exported: hypotheses are built from lens.circuits.scrubbing
    MLP, READERS, WRITERS, Cond, Embed, Exact, Head, HeadInput, HypothesisError, MLPInput, ModelNode, Node,
    Output, Resid, Sampler, Uncond, empty, full_tree, identity, validate,
)
from models.core.interventions import Capture, Edits


# ------------------------------------------------------------------ sampling
class _FeatureIndex:
    """Examples grouped by feature value, for O(1) uniform draws within a class."""

    def __init__(self, sampler: Cond, tokens: np.ndarray):
        values = np.asarray(sampler.feature(tokens))
        if values.shape[:1] != (len(tokens),) or values.ndim > 2:
            raise HypothesisError(f"feature {sampler.name!r} must return [N] or [N, k] values for N = "
                                  f"{len(tokens)} examples; got shape {values.shape}")
        _, cls = np.unique(values.reshape(len(tokens), -1), axis=0, return_inverse=True)
        cls = cls.reshape(-1)
        counts = np.bincount(cls)
        single = np.nonzero(counts[cls] == 1)[0]
        if single.size:
            show = ", ".join(f"example {i} (value {values[i].tolist()})" for i in single[:5])
            raise HypothesisError(
                f"feature {sampler.name!r}: {single.size} of {len(tokens)} examples hold a value no other "
                f"example shares ({show}{', ...' if single.size > 5 else ''}); resampling them would be "
                "exact, not a test: coarsen the feature or drop those examples")
        self.cls = cls
        self.order = np.argsort(cls, kind="stable")
        self.start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.counts = counts

    def draw(self, parent: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c = self.cls[parent]
        return self.order[self.start[c] + (rng.random(len(parent)) * self.counts[c]).astype(np.int64)]


def _draw(sampler: Sampler, parent: np.ndarray, n: int, rng, indexes: dict) -> np.ndarray:
    if isinstance(sampler, Exact):
        return parent
    if isinstance(sampler, Uncond):
        return rng.integers(0, n, len(parent))
    return indexes[id(sampler)].draw(parent, rng)


def feature_indexes(hypothesis: Node, tokens: np.ndarray) -> dict:
    """One `_FeatureIndex` per Cond sampler of the tree (validates every feature)."""
    out = {}
    for _, node in hypothesis.walk():
        for s in (node.sampler, node.other):
            if isinstance(s, Cond) and id(s) not in out:
                out[id(s)] = _FeatureIndex(s, tokens)
            elif not isinstance(s, (Exact, Uncond, Cond)):
                raise HypothesisError(f"{node.label}: {s!r} is not a sampler (Exact, Uncond, Cond)")
    return out


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The tree without samplers, hashable (a static argument of the jitted scrub): each
    node reads plain activations of run `run` (its own draw if a leaf, else its other)."""
    target: Any
    positions: tuple[int, ...] | None
    run: int
    children: tuple["_Plan", ...]


def sample_runs(hypothesis: Node, n: int, rng: np.random.Generator, indexes: dict,
                ref: np.ndarray | None = None) -> tuple[_Plan, np.ndarray, dict]:
    """Recursive sampling from the root (`InterpNode.sample`): (plan, runs [N, R] dataset
    indices, draws).  draws[path] = (the node's own draw [N], the input its model node
    reads where no child claims it [N]: the own draw for a leaf, `other`'s for an inner
    node), path = the labels from the root.  ref: the reference examples (default: every
    example once, in order)."""
    ref = np.arange(n) if ref is None else np.asarray(ref)
    runs, draws = [], {}  # runs: one column per DISTINCT draw

    def take(sampler: Sampler, parent: np.ndarray, parent_run: int) -> tuple[np.ndarray, int]:
        # An Exact draw IS its parent's draw (same column); any other draw is a new one.
        # Sharing is decided by the tree, not by the values, so the plan (a static argument
        # of the compiled scrub) is the same for every seed.
        if isinstance(sampler, Exact):
            return parent, parent_run
        runs.append(_draw(sampler, parent, n, rng, indexes))
        return runs[-1], len(runs) - 1

    runs.append(ref)

    def visit(node: Node, parent: np.ndarray, parent_run: int, path: tuple) -> _Plan:
        path = path + (node.label,)
        mine, mine_run = take(node.sampler, parent, parent_run)
        used, run = take(node.other, mine, mine_run) if node.children else (mine, mine_run)
        draws[path] = (mine, used)
        children = tuple(visit(c, mine, mine_run, path) for c in node.children)
        return _Plan(node.target, node.positions, run, children)

    plan = visit(hypothesis, ref, 0, ())
    # keep only the columns some node reads (a column read by no node is a draw that only
    # seeded its children's), renumbered in order
    read = sorted({p.run for p in _plan_nodes(plan)})
    renumber = {r: i for i, r in enumerate(read)}

    def relabel(p: _Plan) -> _Plan:
        return _Plan(p.target, p.positions, renumber[p.run], tuple(relabel(c) for c in p.children))

    return relabel(plan), np.stack([runs[r] for r in read], axis=1), draws


def _plan_nodes(plan: _Plan):
    yield plan
    for c in plan.children:
        yield from _plan_nodes(c)


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


def _checked_dataset(model, tokens, least: int) -> np.ndarray:
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
        raise ValueError(f"token ids outside [0, {c.vocab_size})")
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


def _chunks(memory_budget: float, per_example: int, n: int, workers: int) -> list[np.ndarray]:
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


def _run_chunks(fn: Callable, chunks: list, workers: int, bar=None) -> list:
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


def _plain_bytes(config, seq: int) -> int:
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
    got = dict(zip(fields, _run_chunks(cat, fields, workers)))
    return PlainRuns(*(got.get(f) for f in ("resid_pre", "resid_mid", "head_z", "mlp_out", "final")))


def plain_runs(model, tokens: Int[np.ndarray, "N seq"], memory_budget: float = 2e9,
               workers: int | None = None) -> PlainRuns:
    """The plain activations of every dataset example (vmapped, chunked by the budget,
    `workers` chunks in flight: default `default_workers()`), for `scrub(..., plain=)`:
    computed once, shared by every node, seed and hypothesis."""
    c = model.config
    tokens = _checked_dataset(model, tokens, least=1)  # checked here: not in the compiled call
    seq = tokens.shape[1]
    workers = default_workers() if workers is None else workers
    # a block's working set (attention scores, MLP hidden) on top of what is kept
    work = 4 * seq * (c.n_heads * seq + 4 * c.d_model + 2 * max(c.d_mlp, 0))
    chunks = _chunks(memory_budget, _plain_bytes(c, seq) + work, len(tokens), workers)
    parts = _run_chunks(lambda rows: _plain_chunk(model, tokens[rows]), chunks, workers)
    if len(parts) == 1:
        return parts[0]
    return _concat_plain(parts, len(tokens), workers)


def treeified_logits(model, plan: _Plan, runs: Int[Array, "R seq"]) -> Float[Array, "seq vocab"]:
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
    from models.core.block import block_forward

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


def treeified_logits_from(model, plan: _Plan, plain: PlainRuns, index: Int[Array, " R"]) -> Float[Array, "seq vocab"]:
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

    def delta(ch: _Plan, run: int):
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

    def reader_value(p: _Plan):
        x = plain_reader(p.target, p.run)
        for ch in p.children:
            d = delta(ch, p.run)
            if d is not None:
                x = x + (d if ch.positions is None else mask(ch.positions) * d)
        return x

    def writer_value(p: _Plan):
        if isinstance(p.target, Resid) and p.children:
            return reader_value(p)
        if not p.children or isinstance(p.target, Embed):
            return plain_writer(p.target, p.run)
        return values[id(p)]

    def edits_for(p: _Plan) -> dict:
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

    def _head_input(p: _Plan, which: str):
        """What head p reads through `which`: its child's value, else its other run's residual."""
        for ch in p.children:
            if ch.target.which == which:
                return reader_value(ch)
        return get("resid_pre", p.run, p.target.layer)

    # Writers that need a forward of their block, deepest first; those of one height,
    # layer and kind share one vmapped block call (a few compiled calls, not one per node).
    groups: dict[tuple, list[_Plan]] = {}

    def height(p: _Plan) -> int:
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


@eqx.filter_jit
def _chunk_losses_tokens(model, plan: _Plan, loss_fn, runs: Int[Array, "B R seq"], targets) -> Float[Array, " B"]:
    """Per-example losses computing each example's plain runs itself (when the whole
    dataset's plain runs do not fit the memory budget)."""
    return jax.vmap(lambda r, tgt: loss_fn(treeified_logits(model, plan, r), tgt))(runs, targets)


def _max_runs(hypothesis: Node) -> int:
    """An upper bound on the distinct input columns a hypothesis draws (one per node, plus
    one per inner node's `other`, plus the reference)."""
    return 1 + sum(1 + bool(node.children) for _, node in hypothesis.walk())


def plain_fits(config, shape: tuple[int, int], memory_budget: float) -> bool:
    """Whether `plain_runs` of a [N, seq] dataset fits half the memory budget (else `scrub`
    computes each chunk's plain runs itself: R forwards per example instead of 1)."""
    return shape[0] * _plain_bytes(config, shape[1]) <= memory_budget / 2


@eqx.filter_jit
def _chunk_losses(model, plan: _Plan, loss_fn, plain: PlainRuns, index: Int[Array, "B R"], targets) -> Float[Array, " B"]:
    def one(i, tgt):
        return loss_fn(treeified_logits_from(model, plan, plain, i), tgt)

    return jax.vmap(one)(index, targets)


def _bytes_per_example(config, n_nodes: int, seq: int) -> int:
    """One example's working set, roughly: per plan node a gathered plain value, its
    difference and the sum it feeds, plus a head's scores; the logits with their
    log-softmax; an MLP node's hidden layer."""
    c = config
    per_node = 4 * seq * (3 * c.d_model + seq + max(c.d_mlp, 0))
    return n_nodes * per_node + 3 * seq * c.vocab_size * 4


@dataclasses.dataclass
class ScrubResult:
    """Per-seed, per-example scrubbed losses and each node's draws (for checks)."""
    losses: np.ndarray  # [seeds, N]
    seeds: tuple[int, ...]
    draws: list[dict]  # per seed: {path: [N] dataset indices}

    @property
    def mean_per_seed(self) -> np.ndarray:
        return self.losses.astype(np.float64).mean(axis=1)  # float64: identity recovers exactly 100%


LossFn = Callable[[Float[Array, "seq vocab"], Any], Float[Array, ""]]


def scrub(model, tokens: Int[np.ndarray, "N seq"], hypothesis: Node, loss_fn: LossFn, targets: Any,
          seeds: Sequence[int] = (0,), memory_budget: float = 2e9, progress: bool = False,
          plain: PlainRuns | None = None, workers: int | None = None) -> ScrubResult:
    """The scrubbed loss of every example, once per resampling seed.

    tokens: the dataset (also the pool resampled from); targets: a pytree of [N, ...]
    arrays, example i's slice passed to `loss_fn(logits [seq, vocab], target) -> scalar`
    (a module-level function: it is a static argument of the compiled chunk).  plain:
    `plain_runs(model, tokens)` when the caller already has it (`compare` shares it across
    hypotheses); else computed here, once for every seed.  workers: chunks in flight at
    once (default `default_workers()`: one per CPU core).  Cost: one plain forward per
    dataset example, then per example and seed one compiled program of gathers, one block
    re-run per patched writer and the unembedding."""
    tokens = _checked_dataset(model, tokens, least=2)
    n, seq = tokens.shape
    for leaf in jax.tree.leaves(targets):
        if np.shape(leaf)[:1] != (n,):
            raise ValueError(f"every targets leaf needs a leading axis of N = {n}; got {np.shape(leaf)}")
    validate(hypothesis, model.config, seq)
    indexes = feature_indexes(hypothesis, tokens)
    if plain is None and plain_fits(model.config, tokens.shape, memory_budget):
        plain = plain_runs(model, tokens, memory_budget / 2, workers)
    elif plain is not None and plain.final.shape[:2] != (n, seq):
        raise ValueError(f"plain runs of shape {plain.final.shape[:2]} do not match the tokens {(n, seq)}")
    n_nodes = sum(1 for _ in hypothesis.walk())
    per_example = _bytes_per_example(model.config, n_nodes, seq)
    if plain is None:  # the dataset's plain runs exceed the budget: each chunk runs its own
        per_example += _max_runs(hypothesis) * 2 * _plain_bytes(model.config, seq)
    workers = default_workers() if workers is None else workers
    chunks = _chunks(memory_budget / 2, per_example, n, workers)
    host_targets = jax.tree.map(np.asarray, targets)  # sliced on the host: no per-chunk dispatches
    all_losses, all_draws = [], []
    bar = tqdm(total=len(seeds) * n, disable=not progress, desc="scrub", dynamic_ncols=True)
    for seed in seeds:
        plan, runs, draws = sample_runs(hypothesis, n, np.random.default_rng(seed), indexes)
        index = runs.astype(np.int32)

        def losses(rows):
            tgt = jax.tree.map(lambda a: a[rows], host_targets)
            if plain is not None:
                return _chunk_losses(model, plan, loss_fn, plain, index[rows], tgt)
            return _chunk_losses_tokens(model, plan, loss_fn, tokens[index[rows]], tgt)

        out = _run_chunks(losses, chunks, workers, bar)
        all_losses.append(np.concatenate([np.asarray(o) for o in out])[:n])
        all_draws.append(draws)
    bar.close()
    return ScrubResult(np.stack(all_losses), tuple(int(s) for s in seeds), all_draws)


# ------------------------------------------------------------------ % loss recovered
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def mean_interval(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high): a 95% Student-t interval over the values (one per seed)."""
    v = np.asarray(values, np.float64)
    m = float(v.mean())
    if v.size < 2:
        return m, m, m
    df = v.size - 1
    t = _T975[max(k for k in _T975 if k <= df)] if df <= 30 else 1.96
    half = t * float(v.std(ddof=1)) / math.sqrt(v.size)
    return m, m - half, m + half


def loss_recovered(model_loss: float, random_losses: np.ndarray, scrubbed_losses: np.ndarray) -> np.ndarray:
    """(L_random - L_scrubbed) / (L_random - L_model), per seed (the reference's formula)."""
    random_losses, scrubbed_losses = np.asarray(random_losses), np.asarray(scrubbed_losses)
    gap = random_losses - model_loss
    if np.any(np.abs(gap) < 1e-9):
        raise ValueError("the random (empty) hypothesis's loss equals the model's: nothing to recover")
    return (random_losses - scrubbed_losses) / gap


def compare(model, tokens, hypotheses: dict[str, Node], loss_fn: LossFn, targets, seeds: Sequence[int] = (0, 1, 2),
            memory_budget: float = 2e9, progress: bool = False, baseline: str = "empty",
            workers: int | None = None) -> dict:
    """Scrub every hypothesis (plus "identity" and "empty", always) with the same seeds;
    per hypothesis: mean loss, % loss recovered per seed with its 95% interval, and the
    per-example losses averaged over seeds.  `baseline`: the hypothesis playing L_random
    (default "empty"; the induction study also normalises by a path-specific baseline).
    workers: see `scrub`."""
    hyps = {"identity": identity(), "empty": empty(), **hypotheses}
    if baseline not in hyps:
        raise ValueError(f"baseline {baseline!r} is not one of the hypotheses {sorted(hyps)}")
    tokens = np.asarray(tokens)
    for h in hyps.values():  # every hypothesis checked before anything runs
        validate(h, model.config, tokens.shape[-1])
    tokens = _checked_dataset(model, tokens, least=2)
    plain = None
    if plain_fits(model.config, tokens.shape, memory_budget):
        plain = plain_runs(model, tokens, memory_budget / 2, workers)  # one plain forward, every hypothesis
    results = {name: scrub(model, tokens, h, loss_fn, targets, seeds, memory_budget, progress, plain, workers)
               for name, h in hyps.items()}
    model_loss = float(results["identity"].mean_per_seed.mean())
    base = results[baseline].mean_per_seed
    out = {}
    for name, r in results.items():
        rec = loss_recovered(model_loss, base, r.mean_per_seed)
        m, lo, hi = mean_interval(rec)
        lm, llo, lhi = mean_interval(r.mean_per_seed)
        out[name] = {"loss_mean": lm, "loss_interval": [llo, lhi], "loss_recovered_mean": m,
                     "loss_recovered_interval": [lo, hi], "loss_recovered_per_seed": rec.tolist(),
                     "loss_per_seed": r.mean_per_seed.tolist(),
                     "per_example_losses": r.losses.mean(axis=0).tolist(), "n_nodes": sum(1 for _ in hyps[name].walk())}
    return {"model_loss": model_loss, "baseline": baseline, "seeds": [int(s) for s in seeds],
            "n_examples": int(np.shape(tokens)[0]), "hypotheses": out}


def compare_to(report: dict, baseline: str) -> dict[str, float]:
    """Mean % loss recovered of every hypothesis of a `compare` report with another
    hypothesis as L_random (same seeds, per-seed ratios averaged)."""
    hs = report["hypotheses"]
    base = np.asarray(hs[baseline]["loss_per_seed"])
    return {k: float(loss_recovered(report["model_loss"], base, np.asarray(h["loss_per_seed"])).mean())
            for k, h in hs.items()}
