"""Reading path patching and head roles (lens.circuits.path_patching's `path_shares`,
`completeness_meaning`, `additivity_sums`; lens.circuits.head_roles.role_name): by hand."""

from __future__ import annotations

import numpy as np
import pytest

from lens.circuits.head_roles import role_name
from lens.circuits.path_patching import additivity_sums, completeness_meaning, path_shares


@pytest.mark.parametrize("n, sizes, expected", [
    (16, [13, 13, 13, 13], [4, 4, 4, 4]),   # even split over 4 templates
    (6, [13, 26, 13], [2, 2, 2]),            # round-robin, not the first group only
    (10, [2, 20], [2, 8]),                   # a small group gives what it has
    (100, [3, 4], [3, 4]),                   # never more than the groups hold
    (0, [5, 5], [0, 0]),                     # 0: path patching skipped
    (2, [13, 13, 13, 13], [1, 1, 0, 0]),
])
def test_path_shares_spread_over_length_groups(n, sizes, expected):
    shares = path_shares(n, sizes)
    assert shares == expected
    assert sum(shares) == min(n, sum(sizes)) and all(s <= z for s, z in zip(shares, sizes))


def test_completeness_meaning_says_when_1_is_by_construction():
    assert completeness_meaning(1.0, 0.01, True).startswith("the receiver's query barely depends")
    # END unchanged (IOI): ~1 is what the construction gives, not evidence that heads carry it
    assert completeness_meaning(0.99, -0.5, True).startswith("~1, as the construction gives")
    assert completeness_meaning(0.99, -0.5, False) == "the earlier heads carry most of the receiver's query-input effect"
    assert completeness_meaning(0.05, -0.5, True).startswith("~0:")
    assert completeness_meaning(0.5, -0.5, True).startswith("the earlier heads carry part of it")


def test_additivity_sums_only_the_joint_runs_senders():
    """The joint all-senders run patches every head before the FIRST receiver's layer: the
    single cells it is compared with are those, not the later layers' (plain numpy sums)."""
    grid = np.arange(12, dtype=float).reshape(4, 3) - 5.0  # [layers, heads]
    out = additivity_sums(grid, [(3, 1), (2, 0)])
    assert out["senders_before_layer"] == 2
    assert out["sum_of_single_sender_effects"] == grid[0].sum() + grid[1].sum()
    assert out["sum_of_single_sender_effects_all_cells"] == grid.sum()


def _row(io, s, dla=0.0, ind=0.0, dup=0.0):
    return {"attn_end_to_io": io, "attn_end_to_s": s, "dla_io_minus_s": dla, "induction_score": ind,
            "duplicate_token_score": dup}


@pytest.mark.parametrize("row, role", [
    (_row(0.6, 0.1, dla=1.2), "name mover"),
    (_row(0.6, 0.1, dla=-0.4), "negative name mover"),
    (_row(0.6, 0.1, dla=0.0), "negative name mover"),       # not positive: not a (positive) mover
    (_row(0.5, 0.3, dla=1.0), "unclear"),                   # IO not over twice S
    (_row(0.25, 0.0, dla=1.0), "unclear"),                  # under the 0.3 attention bar
    (_row(0.1, 0.7), "S-attending (S-inhibition?)"),
    (_row(0.1, 0.1, ind=0.9, dup=0.9), "induction"),        # induction is named before duplicate token
    (_row(0.1, 0.1, dup=0.5), "duplicate token"),
])
def test_role_name_by_hand(row, role):
    assert role_name(row) == role


def test_head_roles_refuses_heads_outside_the_model():
    from lens.circuits.head_roles import head_roles
    from lens_tiny import tiny

    _, model, _ = tiny("llama")
    c = model.config
    groups = [(np.zeros((1, 6), np.int32), np.zeros(1, np.int32), np.ones(1, np.int32))]
    with pytest.raises(ValueError, match="inside the model"):
        head_roles(model, groups, [(c.n_layers, 0)])
    with pytest.raises(ValueError, match="inside the model"):
        head_roles(model, groups, [])
    with pytest.raises(ValueError, match="at least one"):
        head_roles(model, [], [(0, 0)])
