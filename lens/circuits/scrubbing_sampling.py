"""Causal scrubbing, sampling: each hypothesis node's draws of dataset examples
(`lens.circuits.scrubbing` describes the rules).

  feature_indexes(hypothesis, tokens)            {feature: index} for the Cond samplers of a [N, seq] dataset
  sample_runs(hypothesis, n, rng, indexes)       (Plan, runs [N, R] dataset indices, draws {path: [N]})
  Plan, plan_nodes(plan)                         the compiled tree a treeified run follows, walked depth first
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lens.circuits.scrubbing_nodes import Cond, Exact, HypothesisError, Node, Sampler, Uncond


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
class Plan:
    """The tree without samplers, hashable (a static argument of the jitted scrub): each
    node reads plain activations of run `run` (its own draw if a leaf, else its other)."""
    target: Any
    positions: tuple[int, ...] | None
    run: int
    children: tuple["Plan", ...]


def sample_runs(hypothesis: Node, n: int, rng: np.random.Generator, indexes: dict,
                ref: np.ndarray | None = None) -> tuple[Plan, np.ndarray, dict]:
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

    def visit(node: Node, parent: np.ndarray, parent_run: int, path: tuple) -> Plan:
        path = path + (node.label,)
        mine, mine_run = take(node.sampler, parent, parent_run)
        used, run = take(node.other, mine, mine_run) if node.children else (mine, mine_run)
        draws[path] = (mine, used)
        children = tuple(visit(c, mine, mine_run, path) for c in node.children)
        return Plan(node.target, node.positions, run, children)

    plan = visit(hypothesis, ref, 0, ())
    # keep only the columns some node reads (a column read by no node is a draw that only
    # seeded its children's), renumbered in order
    read = sorted({p.run for p in plan_nodes(plan)})
    renumber = {r: i for i, r in enumerate(read)}

    def relabel(p: Plan) -> Plan:
        return Plan(p.target, p.positions, renumber[p.run], tuple(relabel(c) for c in p.children))

    return relabel(plan), np.stack([runs[r] for r in read], axis=1), draws


def plan_nodes(plan: Plan):
    yield plan
    for c in plan.children:
        yield from plan_nodes(c)


