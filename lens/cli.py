"""argparse types for command-line entry points (scripts/, bench/, your own): a bad value
is refused while the command line is parsed, before any model is loaded, with argparse's
message naming the flag:

    orthogonal_steering.py: error: argument --k: must be an integer >= 1; got 0
"""

from __future__ import annotations

import argparse
import math


def int_at_least(low: int):
    """argparse type: an integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}; got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0; got {value}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0; got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type: any finite number."""
    return _float(text)


def probability(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]; got {value}")
    return value


def positive_floats(text: str) -> list[float]:
    """argparse type: a comma-separated, non-empty list of numbers > 0 ("0.1,0.3,1")."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers > 0; got {text!r}")
    return [positive_float(p) for p in parts]


def positive_ints(text: str) -> list[int]:
    """argparse type: a comma-separated, non-empty list of integers >= 1 ("8,32")."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1; got {text!r}")
    return [int_at_least(1)(p) for p in parts]
