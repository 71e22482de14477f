"""scripts/patching.py's helpers (the smoke run end to end is in
tests/lens/circuits/test_patching.py)."""

from __future__ import annotations

import numpy as np
import pytest

from script_entry import script_namespace


@pytest.fixture(scope="module")
def ns():
    return script_namespace("patching")


@pytest.mark.parametrize("n, sizes, expected", [
    (16, [13, 13, 13, 13], [4, 4, 4, 4]),   # even split over 4 templates
    (6, [13, 26, 13], [2, 2, 2]),            # round-robin, not the first group only
    (10, [2, 20], [2, 8]),                   # a small group gives what it has
    (100, [3, 4], [3, 4]),                   # never more than the groups hold
    (0, [5, 5], [0, 0]),                     # 0: path patching skipped
    (2, [13, 13, 13, 13], [1, 1, 0, 0]),
])
def test_path_shares_spread_over_length_groups(ns, n, sizes, expected):
    shares = ns["path_shares"](n, sizes)
    assert shares == expected
    assert sum(shares) == min(n, sum(sizes)) and all(s <= z for s, z in zip(shares, sizes))


def test_path_pairs_override(ns):
    args = ns["parse_args"](["--out", "x", "--path-pairs", "8"])
    assert args.path_pairs == 8
    assert ns["parse_args"](["--out", "x"]).path_pairs is None  # the preset's
    with pytest.raises(SystemExit):
        ns["parse_args"](["--out", "x", "--path-pairs", "-1"])


def test_completeness_meaning_says_when_1_is_by_construction(ns):
    meaning = ns["completeness_meaning"]
    assert meaning(1.0, 0.01, True).startswith("the receiver's query barely depends")
    # END unchanged (IOI): ~1 is what the construction gives, not evidence that heads carry it
    assert meaning(0.99, -0.5, True).startswith("~1, as the construction gives")
    assert meaning(0.99, -0.5, False) == "the earlier heads carry most of the receiver's query-input effect"
    assert meaning(0.05, -0.5, True).startswith("~0:")
    assert meaning(0.5, -0.5, True).startswith("the earlier heads carry part of it")


def test_additivity_sums_only_the_joint_runs_senders(ns):
    """The joint all-senders run patches every head before the FIRST receiver's layer: the
    single cells it is compared with are those, not the later layers' (plain numpy sums)."""
    grid = np.arange(12, dtype=float).reshape(4, 3) - 5.0  # [layers, heads]
    out = ns["additivity_sums"](grid, [(3, 1), (2, 0)])
    assert out["senders_before_layer"] == 2
    assert out["sum_of_single_sender_effects"] == grid[0].sum() + grid[1].sum()
    assert out["sum_of_single_sender_effects_all_cells"] == grid.sum()
