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

Modules: `scrubbing_nodes` (the hypothesis tree, re-exported here), `scrubbing_sampling`
(each node's draws), `scrubbing_runs` (plain runs, the treeified logits, chunked dispatch),
this one (`scrub`, `compare`, % loss recovered).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from lens.circuits.scrubbing_nodes import (  # noqa: F401  re-exported: hypotheses are built from lens.circuits.scrubbing
    MLP, READERS, WRITERS, Cond, Embed, Exact, Head, HeadInput, HypothesisError, MLPInput, ModelNode, Node,
    Output, Resid, Sampler, Uncond, empty, full_tree, identity, validate,
)
from lens.circuits.scrubbing_runs import (
    PlainRuns, checked_dataset, chunk_indices, default_workers, plain_bytes, plain_runs, run_chunks,
    treeified_logits, treeified_logits_from,
)
from lens.circuits.scrubbing_sampling import Plan, feature_indexes, sample_runs


@eqx.filter_jit
def _chunk_losses_tokens(model, plan: Plan, loss_fn, runs: Int[Array, "B R seq"], targets) -> Float[Array, " B"]:
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
    return shape[0] * plain_bytes(config, shape[1]) <= memory_budget / 2


@eqx.filter_jit
def _chunk_losses(model, plan: Plan, loss_fn, plain: PlainRuns, index: Int[Array, "B R"], targets) -> Float[Array, " B"]:
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
    tokens = checked_dataset(model, tokens, least=2)
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
        per_example += _max_runs(hypothesis) * 2 * plain_bytes(model.config, seq)
    workers = default_workers() if workers is None else workers
    chunks = chunk_indices(memory_budget / 2, per_example, n, workers)
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

        out = run_chunks(losses, chunks, workers, bar)
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
    tokens = checked_dataset(model, tokens, least=2)
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
