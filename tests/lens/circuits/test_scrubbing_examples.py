"""The synthetic induction task's rows and masks (lens.circuits.scrubbing_examples),
checked against their definition by a plain loop: a masked target is exactly one that
copying predicts (its current token occurred earlier in the row, followed by the target)."""

import numpy as np
import pytest

from lens.circuits import scrubbing_examples as X


def _copy_predictable(row: np.ndarray, t: int) -> bool:
    """Does an earlier occurrence of row[t] (within its block's first copy) precede row[t + 1]?"""
    return any(row[j] == row[t] and row[j + 1] == row[t + 1] for j in range(1, t))


@pytest.mark.parametrize("setup", [X.SyntheticInduction(), X.SyntheticInduction.smoke()])
def test_rows_masks_match_the_task(setup):
    rows, mask, first = X.synthetic_rows(64, setup, seed=3, with_first=True)
    assert rows.shape == (64, setup.seq_len + 1) and mask.shape == first.shape == (64, setup.seq_len)
    assert (rows[:, 0] == 0).all() and (rows[:, 1:] >= 1).all() and (rows < setup.vocab).all()
    assert not (mask * first).any()  # a target is never both
    for i in range(len(rows)):
        for t in np.nonzero(mask[i])[0]:
            assert _copy_predictable(rows[i], t), (i, t)
        # the first block: its first copy starts at 1; its length is where the row first repeats
        b = next(k for k in range(setup.min_block, setup.max_block + 1) if rows[i, 1] == rows[i, 1 + k])
        assert first[i, 1:b].all() and not mask[i, :b].any()
        assert (rows[i, 1:1 + b] == rows[i, 1 + b:1 + 2 * b][:len(rows[i, 1 + b:1 + 2 * b])]).all()
    # about half the targets are second copies after their first token (b - 1 of every 2b)
    assert 0.3 < mask.mean() < 0.5


def test_block_bounds_are_checked():
    with pytest.raises(ValueError, match="max_block"):
        X.synthetic_rows(2, X.SyntheticInduction(vocab=8, max_block=11), seed=0)
