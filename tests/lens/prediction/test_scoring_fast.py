"""The fast paths of lens.prediction.scoring against independent computations: the block top-k
against a numpy stable sort (ties to the lower index), and the chunk program on a
`Factored` n-gram predictor against the numpy metric loop of tests/lens/prediction/test_scoring.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens.prediction import ngram, scoring
from np_reference import log_softmax_np, metrics_np


def top_k_np(x, k):
    """Descending, ties to the lower index: a stable argsort of -x."""
    idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(x, idx, -1), idx


@pytest.mark.parametrize("v,k", [(23, 5), (1024, 3), (1536, 10), (4096, 10), (997, 4)])
def test_block_top_k_equals_a_stable_sort_with_ties(v, k):
    rng = np.random.default_rng(v)
    x = rng.normal(size=(37, v)).astype(np.float32)
    x[:12] = np.round(x[:12])  # heavy ties: many equal block maxima and candidates
    x[12] = 0.0  # a constant row: the k lowest ids
    x[13, -k:] = 9.0  # the winners in the last block, tied
    got_v, got_i = jax.jit(scoring.top_k, static_argnums=1)(jnp.asarray(x), k)
    want_v, want_i = top_k_np(x, k)
    np.testing.assert_array_equal(np.asarray(got_i), want_i)
    np.testing.assert_array_equal(np.asarray(got_v), want_v)
    # vmapped over a leading axis of 2 batches (odd rows each)
    vm_v, vm_i = jax.vmap(lambda r: scoring.top_k(r, k))(jnp.asarray(x[:36].reshape(2, 18, v)))
    np.testing.assert_array_equal(np.asarray(vm_i).reshape(36, k), want_i[:36])


def test_chunk_metrics_on_a_factored_ngram_equal_the_numpy_loop():
    rng = np.random.default_rng(11)
    V, k = 1031, 6  # odd vocabulary: the block top-k falls back or pads nothing
    train_rows = (rng.zipf(1.3, (300, 17)) - 1) % V
    rows = (rng.zipf(1.3, (3, 9)) - 1) % V
    table = ngram.count(train_rows, 3, V)
    fac = table.factored(rows)
    contexts = {tuple(r[max(0, t - 1):t + 1]) for r in rows.tolist() for t in range(9)}
    assert len(np.unique(np.asarray(fac.index))) == len(contexts)  # one row per distinct context
    dense = np.asarray(table.log_probs(rows), np.float64)
    m = log_softmax_np(dense + rng.normal(size=dense.shape) * 1.5)
    m[0, 0] = dense[0, 0]  # one position where the model is the predictor
    got_f, got_d = scoring.chunk_metrics(jnp.asarray(m, jnp.float32), (fac, jnp.asarray(dense, jnp.float32)), k)
    vm = jax.vmap(scoring.position_metrics, in_axes=(0, 0, None))(
        jnp.asarray(m, jnp.float32), jnp.asarray(dense, jnp.float32), k)
    for b in range(3):
        for t in range(9):
            want = metrics_np(m[b, t], dense[b, t], k)
            for name, w in want.items():
                for got in (got_f, got_d, vm):
                    assert float(got[name][b, t]) == pytest.approx(w, abs=2e-5), (name, b, t)
    assert float(got_f["order"][0, 0]) == 1.0 and float(got_f["kl"][0, 0]) < 1e-5
