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
through the final norm and unembedding.  Everything is one pure function per example,
vmapped over the dataset and chunked by a memory budget; the loss is the caller's
per-example `loss_fn(logits, target)`.

    hyp = Node(Output(), children=(Node(Head(1, 6), children=(
              Node(HeadInput(1, 6, "k"), children=(Node(Head(0, 0)),)),)),))
    result = scrub(model, tokens, hyp, loss_fn, targets, seeds=range(5))
    report = compare(model, tokens, {"naive": hyp}, loss_fn, targets, seeds=range(5))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from lens.scrubbing_nodes import (  # noqa: F401  re-exported: hypotheses are built from lens.scrubbing
    MLP, READERS, WRITERS, Cond, Embed, Exact, Head, HeadInput, HypothesisError, MLPInput, ModelNode, Node,
    Output, Resid, Sampler, Uncond, empty, full_tree, identity, validate,
)
from models.interventions import Capture, Edits


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
    runs, draws = [], {}

    def visit(node: Node, parent: np.ndarray, path: tuple) -> tuple:
        path = path + (node.label,)
        mine = _draw(node.sampler, parent, n, rng, indexes)
        runs.append(_draw(node.other, mine, n, rng, indexes) if node.children else mine)
        draws[path] = (mine, runs[-1])
        run = len(runs) - 1
        return node.target, node.positions, run, tuple(visit(c, mine, path) for c in node.children)

    raw = visit(hypothesis, ref, ())
    # Nodes drawing the same inputs (Exact samplers) share one plain run.
    # (numbered by first use, so the plan, a static argument, is the same for every seed)
    cols = np.stack(runs, axis=1)
    _, first, which = np.unique(cols, axis=1, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    which = rank[np.asarray(which).reshape(-1)]
    unique = cols[:, np.sort(first)]

    def build(r) -> _Plan:
        return _Plan(r[0], r[1], int(which[r[2]]), tuple(build(c) for c in r[3]))

    return build(raw), unique, draws


# ------------------------------------------------------------------ the treeified run
def _plain_runs(model, runs: Int[Array, "R seq"]):
    """Plain activations of every run (no logits): resid_pre/mid/post, head_z, mlp_out."""
    def one(t):
        x, qpos, valid = model.prefix(t)
        final, _, acts = model.run_blocks(x, qpos, valid, capture=Capture(resid=True, sublayers=True, head_z=True))
        return acts, final

    return jax.vmap(one)(runs)


def treeified_logits(model, plan: _Plan, runs: Int[Array, "R seq"]) -> Float[Array, "seq vocab"]:
    """Logits of the treeified model for one example: `runs[plan.run]` is the input of each
    plan node's plain activations (see the module docstring).  Pure; vmap over examples."""
    c = model.config
    seq = runs.shape[1]
    acts, final = _plain_runs(model, runs)
    qpos, valid = model.default_positions(runs[0], None, None, None)
    blocks = model.blocks

    def mask(positions):
        m = np.zeros((seq,), np.float32)
        m[slice(None) if positions is None else list(positions)] = 1.0
        return jnp.asarray(m)[:, None]

    def head_out(z, layer, head):  # z [seq, heads, d_head] -> [seq, d_model]
        return jnp.einsum("sk,kd->sd", z[:, head], blocks.W_O[layer, head])

    # every run's per-head outputs at once: one contraction instead of one per plan node
    head_outs = jnp.einsum("rlshk,lhkd->rlhsd", acts.head_z, blocks.W_O)
    at_layer = lambda layer, v: jnp.asarray(np.eye(c.n_layers, dtype=np.float32)[layer])[:, None, None] * v[None]  # noqa: E731

    def plain_writer(t, r):
        if isinstance(t, Embed):
            return acts.resid_pre[r, 0]
        if isinstance(t, Head):
            return head_outs[r, t.layer, t.head]
        if isinstance(t, MLP):
            return acts.mlp_out[r, t.layer]
        return acts.resid_pre[r, t.layer] if t.layer < c.n_layers else final[r]

    def plain_reader(t, r):
        if isinstance(t, Output) or (isinstance(t, Resid) and t.layer == c.n_layers):
            return final[r]
        if isinstance(t, MLPInput) and not c.parallel_residual:
            return acts.resid_mid[r, t.layer]
        return acts.resid_pre[r, t.layer]

    values: dict[int, Array] = {}  # id(plan node) -> value of a writer run with edits

    def reader_value(p: _Plan):
        x = plain_reader(p.target, p.run)
        for ch in p.children:
            x = x + mask(ch.positions) * (writer_value(ch) - plain_writer(ch.target, p.run))
        return x

    def writer_value(p: _Plan):
        if isinstance(p.target, Resid) and p.children:
            return reader_value(p)
        if not p.children or isinstance(p.target, Embed):
            return plain_writer(p.target, p.run)
        return values[id(p)]

    def edits_for(p: _Plan) -> dict:
        """The Edits fields (every q/k/v / input site, mix 0 where unused, so a group stacks)
        that make block `layer` of p's other run read p's children's values."""
        t, layer = p.target, p.target.layer
        x = acts.resid_pre[p.run, layer]
        one = np.zeros((c.n_layers, 1), np.float32)
        one[layer] = 1.0
        if isinstance(t, Head):
            fields = {}
            group = c.n_heads // c.n_kv_heads
            given = {ch.target.which: ch for ch in p.children}
            for which in "qkv":
                unit, width = (t.head, c.n_heads) if which == "q" else (t.head // group, c.n_kv_heads)
                mix = np.zeros((c.n_layers, 1, width), np.float32)
                src = x
                if which in given:
                    mix[layer, 0, unit] = 1.0
                    src = reader_value(given[which])
                fields[f"{which}_input_mix"] = jnp.asarray(mix, x.dtype)
                fields[f"{which}_input_source"] = at_layer(layer, src)
            return fields
        want = reader_value(p.children[0])  # MLP: its input set through the attention output
        if c.parallel_residual:  # (or the residual when the MLP reads the block's input)
            return {"resid_mix": jnp.asarray(one, x.dtype),
                    "resid_source": at_layer(layer, want)}
        return {"attn_out_mix": jnp.asarray(one, x.dtype),
                "attn_out_source": at_layer(layer, want - x)}

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
        fields = [edits_for(p) for p in members]
        stacked = Edits(**{k: jnp.stack([f[k] for f in fields]) for k in fields[0]})
        xs = jnp.stack([acts.resid_pre[p.run, layer] for p in members])
        cap = Capture(head_z=True) if is_head else Capture(sublayers=True)

        def block(x, e, layer=layer, cap=cap):
            return model.run_blocks(x, qpos, valid, start=layer, stop=layer + 1, edits=e, capture=cap)[2]

        out = jax.vmap(block)(xs, stacked)
        for i, p in enumerate(members):
            values[id(p)] = (head_out(out.head_z[i, 0], layer, p.target.head) if is_head
                             else out.mlp_out[i, 0])

    resid = reader_value(plan)
    logits, _ = model.unembed_resid(resid)
    return logits


@eqx.filter_jit
def _chunk_losses(model, plan: _Plan, loss_fn, runs: Int[Array, "B R seq"], targets) -> Float[Array, " B"]:
    def one(r, tgt):
        return loss_fn(treeified_logits(model, plan, r), tgt)

    return jax.vmap(one)(runs, targets)


def _bytes_per_example(config, n_runs: int, seq: int) -> int:
    """A rough upper bound: every run's captured activations, the attention of one block
    per run, and the logits (with their log-softmax)."""
    c = config
    per_run = seq * 4 * (c.n_layers * (4 * c.d_model + c.n_heads * c.d_head) + 2 * c.n_heads * seq)
    return n_runs * 2 * per_run + 3 * seq * c.vocab_size * 4


@dataclasses.dataclass
class ScrubResult:
    """Per-seed, per-example scrubbed losses and each node's draws (for checks)."""
    losses: np.ndarray  # [seeds, N]
    seeds: tuple[int, ...]
    draws: list[dict]  # per seed: {path: [N] dataset indices}

    @property
    def mean_per_seed(self) -> np.ndarray:
        return self.losses.mean(axis=1)


LossFn = Callable[[Float[Array, "seq vocab"], Any], Float[Array, ""]]


def scrub(model, tokens: Int[np.ndarray, "N seq"], hypothesis: Node, loss_fn: LossFn, targets: Any,
          seeds: Sequence[int] = (0,), memory_budget: float = 2e9, progress: bool = False) -> ScrubResult:
    """The scrubbed loss of every example, once per resampling seed.

    tokens: the dataset (also the pool resampled from); targets: a pytree of [N, ...]
    arrays, example i's slice passed to `loss_fn(logits [seq, vocab], target) -> scalar`
    (a module-level function: it is a static argument of the compiled chunk)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integer ids [N, seq]; got {tokens.dtype} {tokens.shape}")
    n, seq = tokens.shape
    if n < 2:
        raise ValueError("scrubbing resamples from the dataset: it needs at least 2 examples")
    if tokens.min() < 0 or tokens.max() >= model.config.vocab_size:
        raise ValueError(f"token ids outside [0, {model.config.vocab_size})")
    if seq > model.config.max_seq_len:
        raise ValueError(f"sequences of {seq} tokens exceed the model's context {model.config.max_seq_len}")
    for leaf in jax.tree.leaves(targets):
        if np.shape(leaf)[:1] != (n,):
            raise ValueError(f"every targets leaf needs a leading axis of N = {n}; got {np.shape(leaf)}")
    validate(hypothesis, model.config, seq)
    indexes = feature_indexes(hypothesis, tokens)
    all_losses, all_draws = [], []
    bar = tqdm(total=len(seeds) * n, disable=not progress, desc="scrub", dynamic_ncols=True)
    for seed in seeds:
        plan, runs, draws = sample_runs(hypothesis, n, np.random.default_rng(seed), indexes)
        chunk = max(1, int(memory_budget // _bytes_per_example(model.config, runs.shape[1], seq)))
        out = []
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            out.append(np.asarray(_chunk_losses(model, plan, loss_fn, jnp.asarray(tokens[runs[sl]]),
                                                jax.tree.map(lambda a: jnp.asarray(a[sl]), targets))))
            bar.update(sl.stop - sl.start)
        all_losses.append(np.concatenate(out))
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
            memory_budget: float = 2e9, progress: bool = False, baseline: str = "empty") -> dict:
    """Scrub every hypothesis (plus "identity" and "empty", always) with the same seeds;
    per hypothesis: mean loss, % loss recovered per seed with its 95% interval, and the
    per-example losses averaged over seeds.  `baseline`: the hypothesis playing L_random
    (default "empty"; the induction study also normalises by a path-specific baseline)."""
    hyps = {"identity": identity(), "empty": empty(), **hypotheses}
    if baseline not in hyps:
        raise ValueError(f"baseline {baseline!r} is not one of the hypotheses {sorted(hyps)}")
    results = {name: scrub(model, tokens, h, loss_fn, targets, seeds, memory_budget, progress)
               for name, h in hyps.items()}
    model_loss = float(results["identity"].losses.mean())
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
