"""argparse types for command-line entry points (scripts/, bench/, your own): a bad value
is refused while the command line is parsed, before any model is loaded, with argparse's
message naming the flag:

    orthogonal_steering.py: error: argument --k: must be an integer >= 1; got 0
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping


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


class Preset(Mapping):
    """A script's named set of defaults (`--preset smoke`): read-only, by attribute or key,
    in declaration order.

        PRESETS = {"smoke": Preset(steps=2, batch=2), "default": Preset(steps=16, batch=4)}
        p = PRESETS[args.preset].replace(steps=args.steps)     # an override (names checked)
        fill_from_preset(args, PRESETS[args.preset])           # flags left None take the preset's

    Every script with presets declares them with this one type."""

    __slots__ = ("_values",)

    def __init__(self, **values):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str):
        values = object.__getattribute__(self, "_values")
        try:
            return values[name]
        except KeyError:
            raise AttributeError(f"this preset has no {name!r}; it has {', '.join(values) or 'nothing'}") from None

    def __setattr__(self, name, value):
        raise AttributeError("a Preset is read-only: use .replace(...)")

    def __getitem__(self, name: str):
        return self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return "Preset(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"

    def __reduce__(self):
        return (_preset_from_dict, (dict(self._values),))

    def replace(self, **changes) -> "Preset":
        """A copy with `changes` (each name must be one of the preset's)."""
        unknown = [k for k in changes if k not in self._values]
        if unknown:
            raise ValueError(f"unknown preset field(s) {unknown}; the preset has {list(self._values)}")
        return Preset(**(self._values | changes))

    def as_dict(self) -> dict:
        """The values as a plain dict, in declaration order (a report's settings)."""
        return dict(self._values)


def _preset_from_dict(values: dict) -> Preset:
    return Preset(**values)


def fill_from_preset(args: argparse.Namespace, preset: Preset, convert: dict | None = None) -> argparse.Namespace:
    """Every flag of `args` that is None (not given) and named in `preset` takes the
    preset's value, through `convert[name]` when given (e.g. a string preset value parsed
    by the flag's own argparse type).  Returns `args` (changed in place)."""
    convert = convert or {}
    for name, value in preset.items():
        if getattr(args, name, None) is None:
            setattr(args, name, convert[name](value) if name in convert else value)
    return args
