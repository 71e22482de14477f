"""Residual activation-patching grid benchmark: ours vs a transformers hook loop, one process.

The full grid of the issue: every layer x every position of --pairs IOI pairs (template 0,
14 tokens), denoising (the corrupted run with one clean resid_pre[l][p] patched in), metric
the logit difference at the last token, on SmolLM2-135M-Instruct (same float32 weights):
  1. ours: lens.circuits.patching.activation_patching(site="resid") on all pairs at once (one
     vmapped call per memory-budget chunk, each chunk starting at its first patched layer);
  2. transformers: a forward pre-hook on decoder layer l replacing position p by the clean
     run's hidden state, one forward per (pair, layer, position) (the usual hook loop);
  3. ours: attribution_patching (AtP) for the same grid, and AtP* (GradDrop, 30 backwards).
Ours is timed on a second call (the first compiles; its time is printed too).

    .venv/bin/python bench/patching.py                 # 20 pairs (the issue's size)
    .venv/bin/python bench/patching.py --pairs 2       # a tenth of it
    .venv/bin/python bench/patching.py --reference-pairs 4   # 20 pairs; the loop timed on 4, scaled x5
"""

from __future__ import annotations

import argparse
import time

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_common import load_pair  # noqa: E402
from lens.cli import int_at_least, positive_float  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)


def parse_args(argv=None):
    """The command line, every value checked before any model is built."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int_at_least(1), default=20)
    p.add_argument("--memory-budget", type=positive_float, default=2.0, help="GiB per chunk (ours)")
    p.add_argument("--no-atp-star", action="store_true")
    p.add_argument("--reference-pairs", type=int_at_least(1), default=None,
                   help="run the transformers loop on the first N pairs only and scale its time by "
                        "pairs / N (every (pair, layer, position) is one forward of the same length); "
                        "default: all pairs")
    return p.parse_args(argv)


def timed_twice(fn):
    """(first call incl. compilation, second call) wall seconds, and the second's result."""
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    out = fn()
    return t1 - t0, time.perf_counter() - t1, out


def main(argv=None):
    args = parse_args(argv)
    from lens.circuits import attribution as AtP, patching as Pt
    from lens.circuits import tasks
    from lens import models

    model, hf, desc = load_pair(False)
    _, tok = models.load("smollm2-135m-instruct")
    pairs = tasks.ioi_pairs(tok, args.pairs, seed=1, templates=[0])
    clean, corrupted, correct, wrong = tasks.stack_pairs(pairs)
    P, seq = clean.shape
    n = model.config.n_layers
    metric = Pt.logit_diff_metric(correct, wrong, seq - 1)
    print(f"{desc}; {P} IOI pairs x {seq} tokens, grid {n} layers x {seq} positions = "
          f"{P * n * seq} patched runs; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch threads {torch.get_num_threads()}")

    budget = args.memory_budget * 2**30
    first, t_ours, grid = timed_twice(lambda: np.asarray(Pt.activation_patching(
        model, clean, corrupted, metric, site="resid", memory_budget=budget)))

    # transformers: one hooked forward per (pair, layer, position)
    layers = hf.model.layers
    n_ref = min(args.reference_pairs or P, P)
    ref = np.zeros((n_ref, n, seq), np.float32)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(n_ref):
            hidden = hf(input_ids=torch.as_tensor(clean[i][None].astype(np.int64)),
                        output_hidden_states=True).hidden_states
            ids = torch.as_tensor(corrupted[i][None].astype(np.int64))
            for layer in range(n):
                for pos in range(seq):
                    src = hidden[layer][:, pos]

                    def pre(m, a, src=src, pos=pos):
                        x = a[0].clone()
                        x[:, pos] = src
                        return (x,) + a[1:]

                    h = layers[layer].register_forward_pre_hook(pre)
                    try:
                        logits = hf(input_ids=ids).logits[0, -1]
                    finally:
                        h.remove()
                    ref[i, layer, pos] = float(logits[correct[i]] - logits[wrong[i]])
    t_hf = (time.perf_counter() - t0) * P / n_ref  # = the measured time when n_ref == P
    err = float(np.abs(grid[:n_ref] - ref).max())

    atp_first, t_atp, _ = timed_twice(lambda: np.asarray(AtP.attribution_patching(
        model, clean, corrupted, metric, site="resid")))
    print(f"\n{'method':<58}{'seconds':>9}{'runs/s':>9}{'vs ours':>9}")
    runs = P * n * seq
    rows = [("ours: activation_patching resid (2nd call)", t_ours),
            ("transformers: pre-hook loop, one forward per patch" + (f" (x{P / n_ref:g})" if n_ref < P else ""),
             t_hf),
            ("ours: attribution_patching (AtP) resid (2nd call)", t_atp)]
    if not args.no_atp_star:
        star_first, t_star, _ = timed_twice(lambda: np.asarray(AtP.atp_star(
            model, clean, corrupted, metric, site="resid", memory_budget=budget)))
        rows.append(("ours: atp_star (GradDrop, 30 backwards) resid (2nd call)", t_star))
    for name, t in rows:
        print(f"{name:<58}{t:>9.2f}{runs / t:>9.1f}{t / t_ours:>8.2f}x")
    print(f"first calls (with compilation): grid {first:.1f} s, AtP {atp_first:.1f} s"
          + ("" if args.no_atp_star else f", AtP* {star_first:.1f} s"))
    if n_ref < P:
        print(f"transformers loop timed on {n_ref} of {P} pairs ({n_ref * n * seq} forwards), scaled by {P / n_ref:g}")
    print(f"ratio transformers / ours: {t_hf / t_ours:.2f}x; full grid / AtP: {t_ours / t_atp:.1f}x")
    print(f"max |grid difference| ours vs transformers ({n_ref} pairs): {err:.2e} (logit differences, float32)")


if __name__ == "__main__":
    main()
