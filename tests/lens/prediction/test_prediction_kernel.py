"""The optional native prediction kernel (lens/kernels/prediction_rows.py, dispatched by
lens.kernels.prediction_rows_kernel) against numpy written from the definitions: top-k ids and
values from a stable argsort of -x (ties to the lower id), the predictor's floored log-probs at
them, KL in float64; jitted and vmapped; odd vocabularies (tails of 1-15 lanes), heavy ties,
signed zeros, k = 1, k = V and k = 64.  Then lens.prediction.scoring with the kernels on and off
(LENS_KERNELS) against the numpy metric loop of tests/lens/prediction/test_scoring.py, every
fallback reason of the dispatch (switch off, non-CPU backend, k > 64, no compiler, a missing CPU
feature, a failed build remembered) with the pure-JAX metrics it then gives, and the cached
bigram table of lens.prediction.ngram against the per-context rows.

Tolerances: top-k ids, top-k values and the predictor's values at them exactly; KL to
2e-6 relative + 2e-5 absolute (float32 sums of 23-4,096 terms against float64); the
metrics against numpy to 2e-5 absolute.  Where the CPU has AVX-512F and a C++ compiler is
found, a kernel that does not build FAILS the tests that need it (they skip only where the
CPU or the compiler is missing).  Nothing is built at collection: the first test that needs
the kernel builds it."""

import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lens.kernels
from lens.kernels import build, prediction_rows
from lens.prediction import ngram, scoring
from np_reference import log_softmax_np, metrics_np

FLOOR = scoring.LOG_FLOOR
SWITCH = lens.kernels.ENV_SWITCH


def _can_build() -> str:
    """"" where this machine should build the kernel, else why not (skip reason)."""
    missing = prediction_rows.REQUIRED_FEATURES - build.cpu_features()
    if missing:
        return f"the CPU lacks {sorted(missing)}"
    if build.compiler() is None:
        return "no C++ compiler"
    return ""


@pytest.fixture
def kernel(monkeypatch):
    """The kernel's `rows`, built on first use; skipped only without the CPU feature or a
    compiler (a failed build is a failure)."""
    monkeypatch.setenv(SWITCH, "1")
    why = _can_build()
    if why:
        pytest.skip(why)
    got = lens.kernels.prediction_rows_kernel("cpu", 4)
    assert got.fn is not None, f"the prediction kernel should build here but did not: {got.reason}"
    return got.fn


@pytest.fixture
def fresh_load():
    """`prediction_rows.load()` asked again in this test (and again after it)."""
    prediction_rows.load.cache_clear()
    yield
    prediction_rows.load.cache_clear()


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
def test_kernel_rows_equal_numpy_jitted(p, u, v, k, kernel):
    m, table, index = case(np.random.default_rng(v + k), p, u, v)
    fn = jax.jit(kernel, static_argnums=(3, 4))
    got = fn(jnp.asarray(m), jnp.asarray(table), jnp.asarray(index), k, FLOOR)
    check(got, rows_np(m, table, index, k), f"P{p} U{u} V{v} k{k}")


def test_kernel_rows_vmapped_and_nested_vmap(kernel):
    rng = np.random.default_rng(5)
    cases = [case(rng, 13, 6, 301) for _ in range(6)]  # every batch element: its own table and index
    m, table, index = (np.stack([c[i] for c in cases]) for i in range(3))
    one = jax.jit(jax.vmap(lambda a, b, c: kernel(a, b, c, 4, FLOOR)))
    got = one(jnp.asarray(m), jnp.asarray(table), jnp.asarray(index))
    nested = jax.jit(jax.vmap(jax.vmap(lambda a, b, c: kernel(a, b, c, 4, FLOOR))))
    got2 = nested(*(jnp.asarray(x.reshape(2, 3, *x.shape[1:])) for x in (m, table, index)))
    for i, c in enumerate(cases):
        want = rows_np(*c, 4)
        check([g[i] for g in got], want, f"vmap {i}")
        check([g[i // 3, i % 3] for g in got2], want, f"nested vmap {i}")
    # a table shared by the batch (not batched): broadcast to every element
    shared = jax.vmap(lambda a, c: kernel(a, jnp.asarray(table[0]), c, 4, FLOOR))
    got3 = shared(jnp.asarray(m), jnp.asarray(index))
    for i in range(6):
        check([g[i] for g in got3], rows_np(m[i], table[0], index[i], 4), f"shared table {i}")


def test_kernel_refuses_bad_input(kernel):
    m = jnp.zeros((4, 40), jnp.float32)
    with pytest.raises(ValueError, match="k must be in"):
        kernel(m, m, jnp.zeros(4, jnp.int32), 65, FLOOR)
    with pytest.raises(ValueError, match="expected"):
        kernel(m, m[:, :30], jnp.zeros(4, jnp.int32), 3, FLOOR)
    with pytest.raises(Exception, match="index outside"):  # an error, never an out-of-bounds read
        jax.block_until_ready(kernel(m, m[:2], jnp.array([0, 1, 2, 0], jnp.int32), 3, FLOOR))
    nan = m.at[1, 7].set(jnp.nan)  # a NaN log-prob gives a NaN KL, not a silent number
    kl = np.asarray(kernel(nan, m, jnp.arange(4, dtype=jnp.int32), 3, FLOOR)[3])
    assert np.isnan(kl[1]) and np.isfinite(kl[[0, 2, 3]]).all()


@pytest.mark.parametrize("switch", ["1", "0"])
def test_chunk_metrics_with_kernels_on_and_off_equal_the_numpy_loop(switch, monkeypatch):
    """The bigram's `factored` (its whole cached table), a trigram's per-context rows, a
    dense predictor and a whole bigram table made here (U = V > positions: the JAX path
    takes the top-k per position), with k = 6 and k = 65 (past the kernel's 64: the JAX
    path either way)."""
    monkeypatch.setenv(SWITCH, switch)
    on = lens.kernels.prediction_rows_kernel("cpu", 6).fn is not None
    assert on == (switch == "1" and not _can_build()), lens.kernels.prediction_rows_kernel("cpu", 6).reason
    assert lens.kernels.prediction_rows_kernel("cpu", 65).fn is None
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
    assert preds[0].table.shape[0] == V and preds[1].table.shape[0] < V  # whichever path runs
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
                        assert float(got_p[name][b, t]) == pytest.approx(w, abs=2e-5), (switch, k, name, b, t)
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
        monkeypatch.setenv(SWITCH, switch)
        runs[switch] = scoring.score(model, preds, rows, k=5, chunk_rows=2)
    for name in preds:
        for metric in scoring.PER_POSITION:
            a, b = runs["1"][name][metric], runs["0"][name][metric]
            if metric in ("test_err", "kl"):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{name} {metric}")
            else:
                np.testing.assert_array_equal(a, b, err_msg=f"{name} {metric}")


@pytest.mark.parametrize("switch", ["1", "0"])
def test_cached_bigram_table_equals_the_per_context_rows(switch, monkeypatch):
    monkeypatch.setenv(SWITCH, switch)  # the same representation either way
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


def _fallback_metrics_match_numpy():
    """chunk_metrics now (whatever the dispatch says) against the numpy metric loop: a
    bigram's whole table and a dense predictor, k = 5."""
    rng = np.random.default_rng(11)
    V = 67
    train_rows = (rng.zipf(1.3, (80, 10)) - 1) % V
    rows = (rng.zipf(1.3, (2, 6)) - 1) % V
    bigram = ngram.count(train_rows, 2, V)
    logp = np.asarray(bigram.log_probs(rows), np.float64)
    m = log_softmax_np(logp + rng.normal(size=logp.shape))
    got = scoring.chunk_metrics(jnp.asarray(m, jnp.float32), (bigram.factored(rows), jnp.asarray(logp, jnp.float32)), 5)
    for got_p in got:
        for b in range(2):
            for t in range(6):
                want = metrics_np(m[b, t], np.maximum(logp[b, t], FLOOR), 5)
                for name, w in want.items():
                    assert float(got_p[name][b, t]) == pytest.approx(w, abs=2e-5), (name, b, t)


def test_fallback_switch_off_backend_and_k(monkeypatch):
    monkeypatch.setenv(SWITCH, "off")
    got = lens.kernels.prediction_rows_kernel("cpu", 5)
    assert got.fn is None and "LENS_KERNELS=off" in got.reason
    _fallback_metrics_match_numpy()
    monkeypatch.setenv(SWITCH, "1")
    for backend in ("gpu", "tpu"):
        got = lens.kernels.prediction_rows_kernel(backend, 5)
        assert got.fn is None and "XLA:CPU only" in got.reason
    got = lens.kernels.prediction_rows_kernel("cpu", 65)
    assert got.fn is None and "outside" in got.reason
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # what scoring asks
    assert scoring._rows_kernel(5) is None
    _fallback_metrics_match_numpy()


def test_fallback_missing_cpu_feature(monkeypatch, fresh_load):
    monkeypatch.setenv(SWITCH, "1")
    monkeypatch.setattr(build, "cpu_features", lambda: frozenset({"sse2", "avx2"}))
    got = lens.kernels.prediction_rows_kernel("cpu", 5)
    assert got.fn is None and "avx512f" in got.reason
    _fallback_metrics_match_numpy()


@pytest.mark.parametrize("how", ["CXX", "PATH"])
def test_fallback_missing_compiler(how, monkeypatch, tmp_path, fresh_load):
    monkeypatch.setenv(SWITCH, "1")
    monkeypatch.setattr(build, "cpu_features", lambda: frozenset({"avx512f"}))
    if how == "CXX":
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    else:
        monkeypatch.delenv("CXX", raising=False)
        monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no g++, no c++
    got = lens.kernels.prediction_rows_kernel("cpu", 5)
    assert got.fn is None and "no C++ compiler" in got.reason
    _fallback_metrics_match_numpy()


def test_failed_build_is_remembered_not_retried(monkeypatch, tmp_path, fresh_load):
    """A compiler that fails (a script counting its runs): the first process-level load
    records the failure under <lens cache>/kernels/, the next one reads it back without
    running the compiler, and scoring runs the pure-JAX path meanwhile."""
    runs = tmp_path / "runs"
    cxx = tmp_path / "bad-g++"
    cxx.write_text(f"#!/bin/sh\necho x >> {runs}\necho 'error: this compiler always fails' >&2\nexit 1\n")
    cxx.chmod(cxx.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv(SWITCH, "1")
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "cpu_features", lambda: frozenset({"avx512f"}))
    got = lens.kernels.prediction_rows_kernel("cpu", 5)
    assert got.fn is None and "build failed" in got.reason and "always fails" in got.reason
    markers = list((tmp_path / "cache" / "kernels").glob("prediction_rows-*.failed"))
    assert len(markers) == 1 and runs.read_text().count("x") == 1
    _fallback_metrics_match_numpy()
    prediction_rows.load.cache_clear()  # a new process, as far as load() knows
    got = lens.kernels.prediction_rows_kernel("cpu", 5)
    assert got.fn is None and "remembered" in got.reason and "always fails" in got.reason
    assert runs.read_text().count("x") == 1  # the compiler did not run again
    with pytest.raises(build.BuildError) as e:
        build.build(prediction_rows.SOURCE, "prediction_rows", str(cxx))
    assert e.value.remembered


def test_kernel_builds_where_it_can(monkeypatch, tmp_path, fresh_load):
    """In a fresh cache: built once into <lens cache>/kernels/ (content-addressed), and a
    second `build` call returns the same library without compiling."""
    why = _can_build()
    if why:
        pytest.skip(why)
    monkeypatch.setenv(SWITCH, "1")
    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp_path))
    got = lens.kernels.prediction_rows_kernel("cpu", 5)
    assert got.fn is prediction_rows.rows, got.reason
    libs = list((tmp_path / "kernels").glob("prediction_rows-*.so"))
    assert len(libs) == 1 and not list((tmp_path / "kernels").glob("*.failed"))
    path = build.build(prediction_rows.SOURCE, "prediction_rows", build.compiler())
    assert path == libs[0]


def test_nothing_is_built_at_import(tmp_path):
    """Importing lens, lens.kernels and lens.prediction in a fresh process with an empty
    cache builds nothing."""
    import subprocess
    import sys

    env = dict(os.environ, LENS_CACHE_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join(sys.path))
    code = "import lens, lens.kernels, lens.kernels.prediction_rows, lens.prediction.scoring, lens.prediction.ngram"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert not (tmp_path / "kernels").exists()
