"""lens.cli.Preset and fill_from_preset: the one preset type every script declares."""

import argparse
import pickle

import pytest

from lens.cli import Preset, fill_from_preset, positive_floats


def test_preset_reads_by_attribute_and_key_in_order():
    p = Preset(steps=2, grid=(0.5, 1.0), name="smoke")
    assert p.steps == 2 and p["grid"] == (0.5, 1.0) and list(p) == ["steps", "grid", "name"]
    assert p.as_dict() == {"steps": 2, "grid": (0.5, 1.0), "name": "smoke"} and len(p) == 3
    assert dict(**p) == p.as_dict()  # ** works (argparse set_defaults(**preset))
    with pytest.raises(AttributeError, match="no 'batch'"):
        p.batch
    with pytest.raises(AttributeError, match="read-only"):
        p.steps = 3
    assert pickle.loads(pickle.dumps(p)) == p


def test_replace_checks_names():
    p = Preset(steps=2, tau=1.0)
    q = p.replace(tau=0.5)
    assert q.as_dict() == {"steps": 2, "tau": 0.5} and p.tau == 1.0
    with pytest.raises(ValueError, match="unknown preset field"):
        p.replace(stpes=3)


def test_fill_from_preset_only_fills_flags_left_none():
    args = argparse.Namespace(steps=None, batch=7, grid=None, other=None)
    fill_from_preset(args, Preset(steps=2, batch=4, grid="0.5,1"), convert={"grid": positive_floats})
    assert (args.steps, args.batch, args.grid, args.other) == (2, 7, [0.5, 1.0], None)
