"""Scoring a predictor on many tokens: lens.prediction.scoring + lens.prediction.ngram vs straightforward
numpy and torch implementations of the same test, one process, same inputs.

    .venv/bin/python bench/prediction.py                       # 1M tokens, vocab 4096
    .venv/bin/python bench/prediction.py --tokens 131072 --json runs/bench_prediction.json

Per chunk of `--chunk` positions every side gets the same model log-probs (a fixed set
of `--distinct` chunks, cycled: the model's forward is the same cost for every side and
is not timed) and the same token rows, and computes the bigram predictor's log-probs and
every per-position metric of lens.prediction.scoring (test error over the model's top-k, top-1,
top-k recall / Jaccard, Spearman on the top-k, exact order, KL):
  ours        what lens.prediction.scoring.score runs: NGram.factored (a bigram over <= 8,192
              tokens is its whole [V, V] log-table, built once from the sparse counts before
              timing, indexed by the context token) + lens.prediction.scoring.chunk_metrics
              (the optional native one-pass-per-row kernel, lens.kernels.prediction_rows_kernel,
              on the CPU backend)
  ours-sparse NGram.factored_by_context (one log-prob row per DISTINCT context in the chunk,
              rebuilt from the sparse counts every chunk: the trigram / large-vocabulary path)
              + chunk_metrics
  ours-dense  the predictor's log-probs materialised per position + batch_metrics
  numpy       the dense [V, V] log-table gathered, argpartition + argsort top-k, scipy-free ranks
  torch       the dense log-table gathered, torch.topk, argsort ranks (ordinal: no ties in data)
The references are unchanged from the first version of this bench: straightforward
per-position implementations (the dense log-table they gather is built before timing,
as ours is).  LENS_KERNELS=0 times ours on its pure-JAX path.
Reports tokens/s of each (the fastest run of a side named twice in --sides) and the
ratios; checks the sides agree on the means.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lens.kernels  # noqa: E402
from lens.prediction import ngram, scoring  # noqa: E402
from bench_common import write_json  # noqa: E402
from lens.cli import int_at_least  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)


SIDES = ("ours", "ours-sparse", "ours-dense", "numpy", "torch")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int_at_least(1), default=1_000_000, help="positions scored per side")
    p.add_argument("--vocab", type=int_at_least(16), default=4096)
    p.add_argument("--seq", type=int_at_least(2), default=128)
    p.add_argument("--chunk", type=int_at_least(1), default=2048, help="positions per chunk")
    p.add_argument("--k", type=int_at_least(1), default=10)
    p.add_argument("--distinct", type=int_at_least(1), default=4, help="distinct input chunks, cycled")
    p.add_argument("--sides", default="ours,ours-sparse,ours-dense,numpy,torch",
                   help="comma-separated, from ours,ours-sparse,ours-dense,numpy,torch; a side named twice "
                        "is timed twice and the faster run kept (alternating sides on a loaded machine)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    unknown = [s for s in args.sides.split(",") if s.strip() and s.strip() not in SIDES]
    if unknown or not args.sides.strip(" ,"):
        p.error(f"argument --sides: unknown side(s) {unknown} (choose from {', '.join(SIDES)})")
    return args


def numpy_metrics(m, p, k):
    """The same metrics, straightforward numpy over [P, V]."""
    part = np.argpartition(-m, k - 1, axis=-1)[:, :k]
    top_m = np.take_along_axis(part, np.argsort(-np.take_along_axis(m, part, -1), -1, kind="stable"), -1)
    part = np.argpartition(-p, k - 1, axis=-1)[:, :k]
    top_p = np.take_along_axis(part, np.argsort(-np.take_along_axis(p, part, -1), -1, kind="stable"), -1)
    mv, pv = np.take_along_axis(m, top_m, -1), np.take_along_axis(p, top_m, -1)
    hits = (top_m[:, :, None] == top_p[:, None, :]).any(-1).sum(-1)
    rank = lambda x: np.argsort(np.argsort(-x, -1), -1).astype(np.float64)  # noqa: E731
    ra, rb = rank(mv), rank(pv)
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    rho = (ra * rb).sum(-1) / np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    return {"test_err": np.abs(mv - pv).mean(-1), "top1": top_m[:, 0] == top_p[:, 0], "recall": hits / k,
            "jaccard": hits / (2 * k - hits), "spearman": rho, "order": (top_m == top_p).all(-1),
            "kl": (np.exp(m) * (m - p)).sum(-1)}


def torch_metrics(torch, m, p, k):
    mv, top_m = torch.topk(m, k, dim=-1)
    _, top_p = torch.topk(p, k, dim=-1)
    pv = torch.gather(p, -1, top_m)
    hits = (top_m[:, :, None] == top_p[:, None, :]).any(-1).sum(-1).float()
    rank = lambda x: torch.argsort(torch.argsort(-x, -1), -1).float()  # noqa: E731
    ra, rb = rank(mv), rank(pv)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    rho = (ra * rb).sum(-1) / torch.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    return {"test_err": (mv - pv).abs().mean(-1), "top1": (top_m[:, 0] == top_p[:, 0]).float(), "recall": hits / k,
            "jaccard": hits / (2 * k - hits), "spearman": rho, "order": (top_m == top_p).all(-1).float(),
            "kl": (m.exp() * (m - p)).sum(-1)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    V, T = args.vocab, args.seq
    rows_per_chunk = max(1, args.chunk // T)
    # token rows from a Zipf-like stream (a bigram table with realistic sparsity)
    train_rows = (rng.zipf(1.2, (20_000, T)) - 1) % V
    table = ngram.count(train_rows, 2, V)
    dense_logp = np.log(table.dense_bigram()).astype(np.float32)
    chunks = []
    for _ in range(args.distinct):
        rows = (rng.zipf(1.2, (rows_per_chunk, T)) - 1) % V
        model_logp = dense_logp[rows] + rng.normal(0, 1.0, (rows_per_chunk, T, V)).astype(np.float32)
        model_logp -= np.log(np.exp(model_logp).sum(-1, keepdims=True))
        chunks.append((rows, model_logp.astype(np.float32)))
    n_chunks = -(-args.tokens // (rows_per_chunk * T))
    positions = n_chunks * rows_per_chunk * T
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    results, means = {}, {}

    device_m = {id(m): jnp.asarray(m) for _, m in chunks}  # each side gets the model's log-probs in its own
    # array type, converted once (torch.from_numpy shares the numpy buffer; numpy uses it as is)
    ours_means = jax.jit(lambda got: {k: v.mean() for k, v in got.items() if k in scoring.METRICS})

    def ours_chunk(rows, m):  # what lens.prediction.scoring.score runs per chunk
        got = scoring.chunk_metrics(device_m[id(m)], (table.factored(rows),), args.k)[0]
        return {k: float(v) for k, v in ours_means(got).items()}, got

    def ours_sparse_chunk(rows, m):  # one row per distinct context, rebuilt per chunk
        got = scoring.chunk_metrics(device_m[id(m)], (table.factored_by_context(rows),), args.k)[0]
        return {k: float(v) for k, v in ours_means(got).items()}, got

    def ours_dense_chunk(rows, m):  # the predictor's log-probs materialised per position
        got = scoring.batch_metrics(device_m[id(m)], table.log_probs(rows), args.k)
        return {k: float(v) for k, v in ours_means(got).items()}, got

    def numpy_chunk(rows, m):
        p = dense_logp[rows].reshape(-1, V)
        got = numpy_metrics(m.reshape(-1, V), np.maximum(p, scoring.LOG_FLOOR), args.k)
        return {k: float(np.mean(v)) for k, v in got.items()}, got

    torch = None
    if "torch" in sides:
        import torch

        dense_t = torch.from_numpy(dense_logp)

    def torch_chunk(rows, m):
        with torch.no_grad():
            p = dense_t[torch.from_numpy(rows.reshape(-1))]
            got = torch_metrics(torch, torch.from_numpy(m.reshape(-1, V)), p.clamp_min(scoring.LOG_FLOOR), args.k)
        return {k: float(v.float().mean()) for k, v in got.items()}, got

    t0 = time.perf_counter()
    jax.block_until_ready(table.factored(chunks[0][0]).table)  # the [V, V] log-table, once
    table_seconds = time.perf_counter() - t0
    kernel = lens.kernels.prediction_rows_kernel(jax.default_backend(), args.k)
    print(f"ours: native kernel {kernel.fn is not None} {kernel.reason}; NGram.factored's first call (the "
          f"bigram's whole [V, V] log-table, built once, not timed) {table_seconds:.2f} s", flush=True)
    fns = {"ours": ours_chunk, "ours-sparse": ours_sparse_chunk, "ours-dense": ours_dense_chunk,
           "numpy": numpy_chunk, "torch": torch_chunk}
    for side in sides:  # a side named twice is timed twice (alternate sides on a loaded machine): min kept
        fn = fns[side]
        t0 = time.perf_counter()
        for c in chunks:  # warm-up: ours compiles once per shape (n-gram tables bucket their sizes)
            fn(*c)
        warm = time.perf_counter() - t0
        if side in results:
            warm = results[side]["warm_up_seconds"]
        t0 = time.perf_counter()
        acc = []
        for i in range(n_chunks):
            mean, got = fn(*chunks[i % len(chunks)])
            acc.append(mean)
        secs = time.perf_counter() - t0
        runs = results.get(side, {}).get("runs_seconds", []) + [secs]
        results[side] = {"seconds": min(runs), "tokens_per_s": positions / min(runs), "warm_up_seconds": warm,
                         "runs_seconds": runs}
        means[side] = {k: float(np.mean([a[k] for a in acc])) for k in acc[0]}
        print(f"{side:10s} {positions:,} positions in {secs:.2f} s = {positions / secs:,.0f} tok/s "
              f"(warm-up on the {len(chunks)} distinct chunks, not timed: {warm:.1f} s)", flush=True)
    if "ours" in results:
        for side in results:
            if side != "ours":
                results[side]["ours_speedup"] = results[side]["seconds"] / results["ours"]["seconds"]
                agree = {k: abs(means["ours"][k] - means[side][k]) for k in means["ours"]}
                results[side]["abs_mean_difference"] = agree
                print(f"ours / {side}: {results[side]['ours_speedup']:.1f}x faster; |mean differences| "
                      + ", ".join(f"{k} {v:.1e}" for k, v in agree.items()))
    report = {"positions": positions, "vocab": V, "seq": T, "chunk_positions": rows_per_chunk * T, "k": args.k,
              "kernel": kernel.fn is not None, "bigram_table_build_seconds": table_seconds,
              "threads": "all the process may use", "results": results, "means": means}
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
