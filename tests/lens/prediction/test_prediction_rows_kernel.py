"""The native prediction kernel (lens/kernels/prediction_rows.py) against numpy written from the
definitions: top-k ids and values from a stable argsort of -x (ties to the lower id), the
predictor's floored log-probs at them, KL in float64; jitted and vmapped; odd vocabularies
(tails of 1-15 lanes), heavy ties, signed zeros, k = 1, k = V and k = 64.  Then
lens.prediction.scoring on the kernel path and on the pure-JAX path (LENS_PREDICTION_KERNEL=0)
against the numpy metric loop of tests/lens/prediction/test_scoring.py, and the cached bigram table of
lens.prediction.ngram against the per-context rows.

Tolerances: top-k ids, top-k values and the predictor's values at them exactly; KL to
2e-6 relative + 2e-5 absolute (float32 sums of 23-4,096 terms against float64).
Skipped where the kernel cannot be built (no AVX-512 or no C++ compiler)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens.prediction import ngram, scoring

from lens.kernels import prediction_rows
from np_reference import log_softmax_np, metrics_np

pytestmark = pytest.mark.skipif(not prediction_rows.available(), reason="prediction kernel not buildable here")
FLOOR = scoring.LOG_FLOOR


def rows_np(m, table, index, k, floor=FLOOR):
    """What the kernel returns, from the definitions (float64 KL)."""
    t = np.maximum(table, floor)
    order = np.argsort(-(m + 0.0), axis=-1, kind="stable")[:, :k]  # + 0.0: -0.0 ties +0.0
    m_val = np.take_along_axis(m, order, -1) + 0.0
    p_on_m = np.take_along_axis(t[index], order, -1)
    kl = (np.exp(m.astype(np.float64)) * (m.astype(np.float64) - t[index])).sum(-1)
    p_idx = np.full((len(table), k), -1)
    for u in np.unique(index):
        p_idx[u] = np.argsort(-t[u], kind="stable")[:k]
    return m_val, order, p_on_m, kl, p_idx


def case(rng, p, u, v):
    m = log_softmax_np(rng.normal(size=(p, v)) * 2).astype(np.float32)
    m[: p // 3] = np.round(m[: p // 3])  # heavy ties among the top values
    m[p // 3] = -1.0  # a constant row: the k lowest ids
    m[p // 3 + 1, : min(v, 5)] = 0.0
    m[p // 3 + 1, 1] = -0.0  # signed zeros tie: the lower id first either way
    m[p // 3 + 2, -3:] = 5.0  # the winners in the tail lanes
    table = (rng.normal(size=(u, v)) * 3).astype(np.float32)
    table[0] = np.round(table[0])
    table[1, ::3] = -300.0  # below the floor: ties at -100
    table[1, 1] = -np.inf
    index = rng.integers(0, max(1, u - 1), p).astype(np.int32)  # the last table row unread
    return m, table, index


def check(got, want, tag):
    names = ("m_val", "m_idx", "p_on_m", "kl", "p_idx")
    for name, g, w in zip(names, got, want):
        g = np.asarray(g)
        if name == "kl":
            np.testing.assert_allclose(g, w, rtol=2e-6, atol=2e-5, err_msg=f"{tag} {name}")
        else:
            np.testing.assert_array_equal(g, w, err_msg=f"{tag} {name}")
    assert not np.signbit(np.asarray(got[0])[np.asarray(got[0]) == 0]).any(), "-0.0 must come back as +0.0"


@pytest.mark.parametrize("p,u,v,k", [(37, 11, 1031, 7), (5, 3, 23, 23), (70, 66, 4096, 64), (9, 4, 48, 1),
                                     (33, 2, 32, 10)])
def test_kernel_rows_equal_numpy_jitted(p, u, v, k):
    m, table, index = case(np.random.default_rng(v + k), p, u, v)
    fn = jax.jit(prediction_rows.rows, static_argnums=(3, 4))
    got = fn(jnp.asarray(m), jnp.asarray(table), jnp.asarray(index), k, FLOOR)
    check(got, rows_np(m, table, index, k), f"P{p} U{u} V{v} k{k}")


def test_kernel_rows_vmapped_and_nested_vmap():
    rng = np.random.default_rng(5)
    cases = [case(rng, 13, 6, 301) for _ in range(6)]  # every batch element: its own table and index
    m, table, index = (np.stack([c[i] for c in cases]) for i in range(3))
    one = jax.jit(jax.vmap(lambda a, b, c: prediction_rows.rows(a, b, c, 4, FLOOR)))
    got = one(jnp.asarray(m), jnp.asarray(table), jnp.asarray(index))
    nested = jax.jit(jax.vmap(jax.vmap(lambda a, b, c: prediction_rows.rows(a, b, c, 4, FLOOR))))
    got2 = nested(*(jnp.asarray(x.reshape(2, 3, *x.shape[1:])) for x in (m, table, index)))
    for i, c in enumerate(cases):
        want = rows_np(*c, 4)
        check([g[i] for g in got], want, f"vmap {i}")
        check([g[i // 3, i % 3] for g in got2], want, f"nested vmap {i}")
    # a table shared by the batch (not batched): broadcast to every element
    shared = jax.vmap(lambda a, c: prediction_rows.rows(a, jnp.asarray(table[0]), c, 4, FLOOR))
    got3 = shared(jnp.asarray(m), jnp.asarray(index))
    for i in range(6):
        check([g[i] for g in got3], rows_np(m[i], table[0], index[i], 4), f"shared table {i}")


def test_kernel_refuses_bad_input():
    m = jnp.zeros((4, 40), jnp.float32)
    with pytest.raises(ValueError, match="k must be in"):
        prediction_rows.rows(m, m, jnp.zeros(4, jnp.int32), 65, FLOOR)
    with pytest.raises(ValueError, match="expected"):
        prediction_rows.rows(m, m[:, :30], jnp.zeros(4, jnp.int32), 3, FLOOR)
    with pytest.raises(Exception, match="index outside"):  # an error, never an out-of-bounds read
        jax.block_until_ready(prediction_rows.rows(m, m[:2], jnp.array([0, 1, 2, 0], jnp.int32), 3, FLOOR))
    nan = m.at[1, 7].set(jnp.nan)  # a NaN log-prob gives a NaN KL, not a silent number
    kl = np.asarray(prediction_rows.rows(nan, m, jnp.arange(4, dtype=jnp.int32), 3, FLOOR)[3])
    assert np.isnan(kl[1]) and np.isfinite(kl[[0, 2, 3]]).all()


@pytest.mark.parametrize("kernel", ["1", "0"])
def test_chunk_metrics_on_both_paths_equal_the_numpy_loop(kernel, monkeypatch):
    """The bigram's `factored` (its whole cached table with the kernel, per-context rows
    without), a trigram's per-context rows, a dense predictor and a whole bigram table made
    here (U = V > positions: the JAX path takes the top-k per position), with k = 6 and
    k = 65 (past the kernel's 64: the JAX path either way)."""
    monkeypatch.setenv(prediction_rows.ENV_SWITCH, kernel)
    assert prediction_rows.enabled(6) == (kernel == "1") and not prediction_rows.enabled(65)
    rng = np.random.default_rng(3)
    V = 131  # > 65, odd: 8 full vectors and a 3-lane tail
    train_rows = (rng.zipf(1.3, (200, 15)) - 1) % V
    rows = (rng.zipf(1.3, (3, 7)) - 1) % V
    bigram, trigram = ngram.count(train_rows, 2, V), ngram.count(train_rows, 3, V)
    dense = np.asarray(trigram.log_probs(rows), np.float64)
    m = log_softmax_np(dense + rng.normal(size=dense.shape) * 1.5)
    m[0, 0] = dense[0, 0]  # one position where the model is the predictor
    whole = scoring.Factored(jnp.asarray(np.log(bigram.dense_bigram()), jnp.float32), jnp.asarray(rows))
    preds = (bigram.factored(rows), trigram.factored(rows), jnp.asarray(dense, jnp.float32), whole)
    assert (preds[0].table.shape[0] == V) == (kernel == "1") and preds[1].table.shape[0] < V
    bigram_logp = np.asarray(bigram.log_probs(rows), np.float64)
    wants = (bigram_logp, dense, dense, bigram_logp)
    for k in (6, 65):
        got = scoring.chunk_metrics(jnp.asarray(m, jnp.float32), preds, k)
        per_pos = jax.vmap(scoring.position_metrics, in_axes=(0, 0, None))(
            jnp.asarray(m, jnp.float32), jnp.asarray(dense, jnp.float32), k)
        batch = scoring.batch_metrics(jnp.asarray(m, jnp.float32), jnp.asarray(dense, jnp.float32), k)
        for b in range(3):
            for t in range(7):
                for got_p, want_p in zip((*got, per_pos, batch), (*wants, dense, dense)):
                    want = metrics_np(m[b, t], np.maximum(want_p[b, t], FLOOR), k)
                    for name, w in want.items():
                        assert float(got_p[name][b, t]) == pytest.approx(w, abs=2e-5), (kernel, k, name, b, t)
        assert float(got[2]["order"][0, 0]) == 1.0 and float(got[2]["kl"][0, 0]) < 1e-5


def test_both_paths_give_the_same_scores(monkeypatch):
    """`score` end to end (bigram and trigram predictors of a fixed fake model): the top-k
    metrics identical, test error and KL to float32 rounding."""
    rng = np.random.default_rng(8)
    V = 97
    train_rows = (rng.zipf(1.2, (100, 12)) - 1) % V
    rows = (rng.zipf(1.2, (5, 12)) - 1) % V
    tables = {n: ngram.count(train_rows, n, V) for n in (2, 3)}
    noise = jnp.asarray(rng.normal(size=(12, V)), jnp.float32)
    model = lambda r: jax.nn.log_softmax(tables[3].log_probs(np.asarray(r)) + noise, -1)  # noqa: E731
    preds = {f"{n}-gram": t.predictor() for n, t in tables.items()}
    runs = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(prediction_rows.ENV_SWITCH, switch)
        runs[switch] = scoring.score(model, preds, rows, k=5, chunk_rows=2)
    for name in preds:
        for metric in scoring.PER_POSITION:
            a, b = runs["1"][name][metric], runs["0"][name][metric]
            if metric in ("test_err", "kl"):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{name} {metric}")
            else:
                np.testing.assert_array_equal(a, b, err_msg=f"{name} {metric}")


def test_cached_bigram_table_equals_the_per_context_rows(monkeypatch):
    monkeypatch.setenv(prediction_rows.ENV_SWITCH, "1")  # the whole table: only where the kernel runs
    rng = np.random.default_rng(2)
    V = 300
    train_rows = (rng.zipf(1.2, (400, 20)) - 1) % V
    rows = (rng.zipf(1.2, (4, 20)) - 1) % V
    table = ngram.count(train_rows, 2, V)
    whole, by_context = table.factored(rows), table.factored_by_context(rows)
    assert whole.table.shape == (V, V) and np.array_equal(np.asarray(whole.index), rows)
    assert by_context.table.shape[0] < V
    np.testing.assert_array_equal(np.asarray(whole.dense()), np.asarray(by_context.dense()))
    assert table.factored(rows[:1]).table is whole.table  # built once, then reused
    # the numpy float64 table of `dense_bigram` (another code path: the Goodhart loss reads it)
    np.testing.assert_allclose(np.exp(np.asarray(whole.table, np.float64)), table.dense_bigram(), rtol=1e-5)
