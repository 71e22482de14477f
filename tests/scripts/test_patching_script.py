"""scripts/patching.py's arguments (the smoke run end to end is in
tests/lens/circuits/test_patching.py; the path-patching readers it calls are tested in
tests/lens/circuits/test_path_reading.py)."""

from __future__ import annotations

import pytest

from script_entry import script_namespace


@pytest.fixture(scope="module")
def ns():
    return script_namespace("patching")


def test_path_pairs_override(ns):
    args = ns["parse_args"](["--out", "x", "--path-pairs", "8"])
    assert args.path_pairs == 8
    assert ns["parse_args"](["--out", "x"]).path_pairs is None  # the preset's
    with pytest.raises(SystemExit):
        ns["parse_args"](["--out", "x", "--path-pairs", "-1"])
