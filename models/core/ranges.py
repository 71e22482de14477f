"""THE wording of an index out of range, for layers, positions, heads and neurons.

Every boundary check of the library (lens.core.edits' validators, capture, the readers, the
forward's own checks) raises through `range_error`, so a bad index always reads the same:

    layer 30 out of range [0, 30) (the model has 30 layers)
    position -9 out of range [-8, 8) (a sequence of 8 tokens; negatives count from the end)
    head 7 out of range [0, 6) at layer 2

The interval is half-open [lo, hi), as Python's range and every `[0, n)` in the docs.
"""

from __future__ import annotations

import numpy as np


def range_error(what: str, value, lo: int, hi: int, context: str = "") -> ValueError:
    """A ValueError "{what} {value} out of range [lo, hi){ context}" (hi exclusive)."""
    value = value.tolist() if isinstance(value, np.ndarray) else value
    return ValueError(f"{what} {value} out of range [{lo}, {hi})" + (f" {context}" if context else ""))


def check_index(what: str, value, n: int, *, negative: bool = False, context: str = "") -> int:
    """`value` as an index into `n` items (negatives from the end when `negative`), else
    `range_error`.  Returns the non-negative index."""
    i = int(value)
    lo = -n if negative else 0
    if not lo <= i < n:
        raise range_error(what, i, lo, n, context)
    return i % n if n else i


def layer_context(n: int) -> str:
    return f"(the model has {n} layers)"


def position_context(seq_len: int) -> str:
    return f"(a sequence of {seq_len} tokens; negatives count from the end)"
