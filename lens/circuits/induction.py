"""Induction and previous-token heads, measured on repeated random token sequences.

Each probe sequence is [first_token] + r + r, r a block of `block_len` distinct random ids.
In the second copy the token at position i last occurred at i - T (T = block_len), so:
  * prefix-matching (induction) score of a head: its mean attention from i to i - T + 1,
    the token that FOLLOWED the earlier occurrence, over the second copy's queries;
  * previous-token score: its mean attention from i to i - 1, over all queries but the first;
  * loss drop: mean next-token loss on the first copy minus on the second copy (an
    induction circuit predicts the second copy; nothing can predict the first).
Distinct ids within r make the "earlier occurrence" unique, so a perfect induction head
scores exactly 1 and a head attending uniformly scores about 1 / (1.5 T).
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lens.models.core.interventions import Capture


@dataclasses.dataclass(frozen=True)
class InductionReport:
    induction_score: np.ndarray  # [layers, heads]
    previous_token_score: np.ndarray  # [layers, heads]
    loss_first_copy: float
    loss_second_copy: float

    @property
    def loss_drop(self) -> float:
        return self.loss_first_copy - self.loss_second_copy

    def heads_above(self, which: str, threshold: float) -> list[tuple[int, int]]:
        """(layer, head) pairs whose `which` score ("induction" / "previous_token") exceeds threshold."""
        scores = self.induction_score if which == "induction" else self.previous_token_score
        return [(int(l), int(h)) for l, h in zip(*np.nonzero(scores > threshold))]

    def to_json(self) -> dict:
        return {"induction_score": np.round(self.induction_score, 4).tolist(),
                "previous_token_score": np.round(self.previous_token_score, 4).tolist(),
                "loss_first_copy": self.loss_first_copy, "loss_second_copy": self.loss_second_copy,
                "loss_drop": self.loss_drop}


def repeated_tokens(key: jax.Array, n: int, block_len: int, vocab: int, first_token: int,
                    low: int = 0, high: int | None = None, copies: int = 2) -> Int[np.ndarray, "n seq"]:
    """n sequences [first_token] + r + r (+ r ... : `copies` copies), each r `block_len`
    distinct ids from [low, high) (high defaults to vocab)."""
    high = vocab if high is None else high
    if not 0 <= low < high <= vocab:
        raise ValueError(f"ids from [low, high) = [{low}, {high}) must lie in the vocabulary [0, {vocab})")
    if block_len > high - low:
        raise ValueError(f"block_len={block_len} distinct ids need high - low >= block_len ({high - low})")
    if copies < 2:
        raise ValueError(f"copies={copies}: a repeat needs at least 2 copies")
    keys = jax.random.split(key, n)
    blocks = np.stack([np.asarray(jax.random.permutation(k, high - low))[:block_len] + low for k in keys])
    first = np.full((n, 1), first_token, blocks.dtype)
    return np.concatenate([first] + [blocks] * copies, axis=1).astype(np.int32)


@eqx.filter_jit
def _patterns_and_losses(model, tokens):
    def one(t):
        out = model.forward(t, capture=Capture(attn_pattern=True))
        logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp[:-1], t[1:, None], axis=-1)[:, 0]
        return out.activations.attn_pattern.astype(jnp.float32), nll

    return jax.vmap(one)(tokens)


def scores_from_patterns(patterns: Float[Array, "n layers heads seq seq"], block_len: int):
    """(induction, previous-token) scores [layers, heads] from attention patterns of
    [first] + r + r sequences (see the module docstring)."""
    T = block_len
    second = np.arange(T + 1, 2 * T + 1)  # query positions of the second copy
    induction = patterns[..., second, second - T + 1].mean(axis=(0, -1))
    queries = np.arange(1, 2 * T + 1)
    previous = patterns[..., queries, queries - 1].mean(axis=(0, -1))
    return np.asarray(induction), np.asarray(previous)


def measure_induction(model, key: jax.Array, first_token: int, n: int = 32, block_len: int = 32,
                      low: int = 0, high: int | None = None) -> InductionReport:
    """Per-head induction and previous-token scores and the loss drop, on `n` probes."""
    if 2 * block_len + 1 > model.config.max_seq_len:
        raise ValueError(f"probes of {2 * block_len + 1} tokens exceed the context {model.config.max_seq_len}")
    tokens = repeated_tokens(key, n, block_len, model.config.vocab_size, first_token, low, high)
    patterns, nll = _patterns_and_losses(model, jnp.asarray(tokens))
    induction, previous = scores_from_patterns(np.asarray(patterns), block_len)
    nll = np.asarray(nll)  # nll[:, i] is the loss of predicting token i + 1
    T = block_len
    first_copy = nll[:, 1:T].mean()  # targets 2..T: the first token of r is unpredictable too
    second_copy = nll[:, T + 1:2 * T].mean()  # targets T+2..2T: predictable by induction
    return InductionReport(induction, previous, float(first_copy), float(second_copy))
