"""lens.modularity.steering against independent computations: the projection share by
least squares, the span record's choice of neurons by hand, the loss and agreement by a
numpy log-softmax."""

import numpy as np
import pytest

from lens.modularity import steering as PS


def test_direction_share_is_the_least_squares_projection():
    rs = np.random.RandomState(0)
    W = rs.randn(2, 5, 8)
    unit = rs.randn(8)
    unit /= np.linalg.norm(unit)
    idx = np.array([[0, 1], [1, 3], [0, 4]])
    A = W[idx[:, 0], idx[:, 1]].T  # [d, n] spanning columns
    coef, *_ = np.linalg.lstsq(A, unit, rcond=None)
    proj = A @ coef
    assert PS.direction_share(W, idx, unit) == pytest.approx(float(proj @ proj), abs=1e-10)


def test_span_share_uses_the_top_scored_pruned_neurons_before_the_layer():
    rs = np.random.RandomState(1)
    L, d_mlp, d = 3, 6, 16  # n_dir = 16 / 8 = 2
    W = rs.randn(L, d_mlp, d)
    unit = np.zeros(d)
    unit[0] = 1.0
    mask = np.zeros((L, d_mlp), bool)
    mask[0, [1, 2]] = mask[1, 4] = mask[2, 0] = True  # layer 2 is not before layer 2: left out
    scores = rs.rand(L, d_mlp)
    scores[0, 2], scores[1, 4], scores[0, 1] = 5.0, 4.0, 0.1
    out = PS.span_share(W, mask, scores, unit, layer=2, draws=3, seed=0)
    assert out["n_directions"] == 2 and out["pruned_before_layer"] == 3
    assert out["share_pruned"] == pytest.approx(PS.direction_share(W, np.array([[0, 2], [1, 4]]), unit))
    assert out["share_expected_random_subspace"] == 2 / 16
    lo, hi = out["share_random_range"]
    assert lo <= out["share_random_mean"] <= hi
    assert PS.span_share(W, np.zeros_like(mask), scores, unit, 2, 3, 0) == {"n_directions": 0}


def test_loss_and_agreement_match_numpy():
    rs = np.random.RandomState(2)
    logits, dense = rs.randn(2, 5, 7).astype(np.float32), rs.randn(2, 5, 7).astype(np.float32)
    rows = rs.randint(0, 7, (2, 5))
    x = logits[:, :-1].astype(np.float64)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    nll = -np.mean([logp[b, t, rows[b, t + 1]] for b in range(2) for t in range(4)])
    agree = np.mean(logits.argmax(-1) == dense.argmax(-1))
    loss, ag = PS.loss_and_agreement(logits, dense, rows)
    assert loss == pytest.approx(nll, rel=1e-5) and ag == agree
    assert PS.loss_and_agreement(dense, dense, rows)[1] == 1.0
    with pytest.raises(ValueError, match="disagree"):
        PS.loss_and_agreement(logits, dense[:1], rows)
