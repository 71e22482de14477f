"""Causal-scrubbing hypotheses as data: model nodes, samplers, the `Node` tree, and its
validation (`lens.circuits.scrubbing` samples and runs them; see its docstring for the semantics)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


# ------------------------------------------------------------------ model nodes
@dataclasses.dataclass(frozen=True)
class Output:
    """The root: the final residual stream (through the final norm to the logits)."""


@dataclasses.dataclass(frozen=True)
class Embed:
    """Token (+ learned position) embeddings: the residual entering block 0."""


@dataclasses.dataclass(frozen=True)
class Head:
    """Attention head `head` of block `layer`: its output z_h W_O (b_O is not a head's)."""
    layer: int
    head: int


@dataclasses.dataclass(frozen=True)
class MLP:
    """The MLP of block `layer` (its output, bias included)."""
    layer: int


@dataclasses.dataclass(frozen=True)
class HeadInput:
    """The residual that head (layer, head) reads through its query, key or value."""
    layer: int
    head: int
    which: str  # "q", "k" or "v"


@dataclasses.dataclass(frozen=True)
class MLPInput:
    """The residual that the MLP of block `layer` reads."""
    layer: int


@dataclasses.dataclass(frozen=True)
class Resid:
    """The residual stream entering block `layer` (layer = n_layers: before the final norm)."""
    layer: int


ModelNode = Output | Embed | Head | MLP | HeadInput | MLPInput | Resid
READERS = (Output, HeadInput, MLPInput, Resid)
WRITERS = (Embed, Head, MLP, Resid)


# ------------------------------------------------------------------ samplers
@dataclasses.dataclass(frozen=True)
class Exact:
    """x' = the parent's example."""


@dataclasses.dataclass(frozen=True)
class Uncond:
    """x' = any example of the dataset, uniformly."""


@dataclasses.dataclass(frozen=True, eq=False)
class Cond:
    """x' uniformly among the examples whose feature equals the parent example's.

    feature: dataset tokens [N, seq] -> values [N] or [N, k] (computed once, outside jit)."""
    name: str
    feature: Callable[[np.ndarray], np.ndarray]


Sampler = Exact | Uncond | Cond


# ------------------------------------------------------------------ the hypothesis tree
@dataclasses.dataclass(frozen=True, eq=False)
class Node:
    """One interpretation node: a model node, how its input is drawn given its parent's,
    its children (paths into it), how the inputs no child claims are drawn (`other`), and
    the positions at which it supplies its parent (None: all; writers and Resid only)."""
    target: ModelNode
    sampler: Sampler = Exact()
    children: tuple["Node", ...] = ()
    other: Sampler = Uncond()
    positions: tuple[int, ...] | None = None
    name: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "children", tuple(self.children))
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in np.atleast_1d(self.positions)))

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        t = self.target
        base = {Output: lambda: "out", Embed: lambda: "embed", Head: lambda: f"a{t.layer}.h{t.head}",
                MLP: lambda: f"m{t.layer}", HeadInput: lambda: f"a{t.layer}.h{t.head}.{t.which}",
                MLPInput: lambda: f"m{t.layer}.in", Resid: lambda: f"resid{t.layer}"}[type(t)]()
        return base if self.positions is None else f"{base}@{list(self.positions)}"

    def walk(self, path: tuple[str, ...] = ()):
        """(path of labels from the root, node) for every node, depth first."""
        path = path + (self.label,)
        yield path, self
        for c in self.children:
            yield from c.walk(path)


def identity() -> Node:
    """Every input exact: the scrubbed loss is the model's (100% recovered)."""
    return Node(Output(), Exact(), name="identity")


def empty() -> Node:
    """The whole input resampled unconditionally (the labels stay the reference's): the
    reference's L_random, 0% recovered by definition."""
    return Node(Output(), Uncond(), name="empty")


def full_tree(config, sampler: Sampler = Uncond(), depth: int | None = None) -> Node:
    """Every path from the output to the embeddings as its own node (leaves at Embed), all
    with `sampler`: a fully treeified model.  Attention-only paths through q / k / v, MLPs
    through their input.  Grows as (3 heads)^layers: for small models (tests)."""
    def writers(before: int, d: int) -> tuple[Node, ...]:
        out = [Node(Embed(), sampler)]
        for l in range(before):
            out += [Node(Head(l, h), sampler, readers_of(l, h, d), other=sampler)
                    for h in range(config.n_heads)]
            if not config.attn_only:
                out.append(Node(MLP(l), sampler, (Node(MLPInput(l), sampler, writers_mlp(l, d), other=sampler),),
                                other=sampler))
        return tuple(out)

    def writers_mlp(l: int, d: int) -> tuple[Node, ...]:
        ws = writers(l, d + 1)
        return ws + tuple(Node(Head(l, h), sampler, readers_of(l, h, d + 1), other=sampler)
                          for h in range(config.n_heads))

    def readers_of(l: int, h: int, d: int) -> tuple[Node, ...]:
        return tuple(Node(HeadInput(l, h, w), sampler, writers(l, d + 1), other=sampler) for w in "qkv")

    return Node(Output(), Exact(), writers(config.n_layers, 0), other=sampler, name="full-tree")


# ------------------------------------------------------------------ validation
class HypothesisError(ValueError):
    """A hypothesis that does not fit the model or the dataset."""


def _atoms(node: Node, config, seq: int) -> set:
    """The (writer, position) pairs a writer child covers in its parent's residual."""
    t = node.target
    pos = range(seq) if node.positions is None else node.positions
    if isinstance(t, Embed):
        units = [("embed",)]
    elif isinstance(t, Head):
        units = [("head", t.layer, t.head)]
    elif isinstance(t, MLP):
        units = [("mlp", t.layer)]
    else:  # Resid: everything written before its layer
        units = [("embed",)] + [("head", l, h) for l in range(t.layer) for h in range(config.n_heads)]
        units += [] if config.attn_only else [("mlp", l) for l in range(t.layer)]
    return {u + (p,) for u in units for p in pos}


def _reader_layer(t, config) -> float:
    """Writers of layers < this (MLPInput: heads of its own layer too) may feed the reader."""
    if isinstance(t, Output):
        return config.n_layers
    if isinstance(t, MLPInput):
        return t.layer + (0 if config.parallel_residual else 0.5)
    return t.layer


def _writer_layer(t) -> float:
    if isinstance(t, Embed):
        return -1
    if isinstance(t, Head):
        return t.layer
    if isinstance(t, MLP):
        return t.layer + 0.5
    return t.layer - 0.5  # Resid(l): written by layers < l, MLPs included


def validate(hypothesis: Node, config, seq: int) -> None:
    """Raise HypothesisError (naming the node by its path) for a node that does not exist
    in the model, a child that cannot feed its parent, two children claiming the same
    writer at the same positions, or a name used twice."""
    if not isinstance(hypothesis, Node) or not isinstance(hypothesis.target, Output):
        raise HypothesisError("the root of a hypothesis must be a Node(Output(), ...)")
    names: dict[str, str] = {}
    for path, node in hypothesis.walk():
        where = " > ".join(path)
        if node.name is not None:
            if node.name in names:
                raise HypothesisError(f"the name {node.name!r} is given to two nodes ({names[node.name]} and "
                                      f"{where}); names must be unique")
            names[node.name] = where
        _check_exists(node, config, seq, where)
    for path, node in hypothesis.walk():
        _check_children(node, config, seq, " > ".join(path))


def _check_exists(node: Node, config, seq: int, where: str) -> None:
    t = node.target
    n, h = config.n_layers, config.n_heads
    if not isinstance(t, (Output, Embed, Head, MLP, HeadInput, MLPInput, Resid)):
        raise HypothesisError(f"{where}: {t!r} is not a model node")
    layer = getattr(t, "layer", None)
    top = n if isinstance(t, Resid) else n - 1
    if layer is not None and not 0 <= layer <= top:
        raise HypothesisError(f"{where}: layer {layer} does not exist (the model has {n} layers)")
    if isinstance(t, (Head, HeadInput)) and not 0 <= t.head < h:
        raise HypothesisError(f"{where}: head {t.head} does not exist (layer {t.layer} has {h} heads)")
    if isinstance(t, HeadInput) and t.which not in ("q", "k", "v"):
        raise HypothesisError(f"{where}: HeadInput.which must be 'q', 'k' or 'v'; got {t.which!r}")
    if isinstance(t, (MLP, MLPInput)) and config.attn_only:
        raise HypothesisError(f"{where}: the model is attention-only; it has no MLP")
    if node.positions is not None:
        if isinstance(t, (Output, HeadInput, MLPInput)):
            raise HypothesisError(f"{where}: positions= applies to writers (and Resid), which supply their "
                                  "parent at those positions; not to a reader")
        bad = [p for p in node.positions if not 0 <= p < seq]
        if bad or not node.positions:
            raise HypothesisError(f"{where}: positions {bad or '[]'} out of range [0, {seq})")
    if isinstance(t, Embed) and node.children:
        raise HypothesisError(f"{where}: Embed is a leaf (the embeddings read no residual)")


def _check_children(node: Node, config, seq: int, where: str) -> None:
    t = node.target
    seen: dict = {}
    for c in node.children:
        ct, cw = c.target, f"{where} > {c.label}"
        if isinstance(t, Head):
            if not (isinstance(ct, HeadInput) and (ct.layer, ct.head) == (t.layer, t.head)):
                raise HypothesisError(f"{cw}: a head's children are its own HeadInput({t.layer}, {t.head}, "
                                      f"'q'|'k'|'v'); got {ct!r}")
            if ct.which in seen:
                raise HypothesisError(f"{cw}: head {t.layer}.{t.head}'s {ct.which} input is named twice")
            seen[ct.which] = c
        elif isinstance(t, MLP):
            if not (isinstance(ct, MLPInput) and ct.layer == t.layer) or seen:
                raise HypothesisError(f"{cw}: an MLP's one child is its MLPInput({t.layer}); got {ct!r}")
            seen["in"] = c
        elif isinstance(t, READERS):
            if not isinstance(ct, WRITERS):
                raise HypothesisError(f"{cw}: a reader's children write into its residual (Embed, Head, MLP, "
                                      f"Resid); got {ct!r}")
            if not _writer_layer(ct) < _reader_layer(t, config):
                raise HypothesisError(f"{cw}: {ct!r} is not upstream of {t!r} (no path from it)")
            atoms = _atoms(c, config, seq)
            for other, other_atoms in seen.items():
                both = atoms & other_atoms
                if both:
                    raise HypothesisError(f"{cw}: claims the same writer at the same positions as sibling "
                                          f"{other} (e.g. {sorted(both)[0]}); a path can draw only one input")
            seen[c.label] = atoms
