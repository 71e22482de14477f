"""The many-row bf16 GEMM kernel (models.bf16_kernel.gemm, VDPBF16PS) against XLA's float32
dot, on the block matmul shapes of SmolLM2-135M at 4,096 rows (32 rows x 128 tokens, what
one `activation_stats` chunk of bench/modularity.py multiplies).

    .venv/bin/python bench/bf16_gemm.py
    .venv/bin/python bench/bf16_gemm.py --rows 4096 --repeats 9 --json runs/bench_bf16_gemm.json

Sides, each one jitted call on the same float32 x [rows, K] and w [K, N], alternated,
minimum over --repeats:
  kernel:      `gemm(x, to_pairs(w), N)`: x rounded to bf16 inside the jit (XLA's convert
               is timed), w packed once outside;
  xla_f32:     `x @ w` in float32 (XLA:CPU's Eigen GEMM);
  xla_bf16:    `gemm_reference`: bf16 inputs, float32 accumulation through XLA's dot (on a
               CPU it widens to float32, so this is what the kernel replaces).
GFLOP/s = 2 rows K N / seconds.  The kernel's error is against a float64 numpy product of
the same bf16-rounded inputs (relative to the largest |y|).
"""

from __future__ import annotations

import models.runtime.xla_guard  # noqa: F401  (isort: skip)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from bench_common import write_json  # noqa: E402
from lens.cli import int_at_least  # noqa: E402
from models.runtime import compile_cache  # noqa: E402

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)

# SmolLM2-135M: q / o (576 x 576), up / gate (576 x 1536), down (1536 x 576), k / v (576 x 192)
SHAPES = ((576, 1536), (1536, 576), (576, 576), (576, 192))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int_at_least(1), default=4096)
    p.add_argument("--repeats", type=int_at_least(1), default=7)
    p.add_argument("--json", default=None, help="also write the numbers here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    from models import bf16_kernel

    if not bf16_kernel.available():
        raise SystemExit("the bf16 kernel is not available here (needs AVX-512 and a C++ compiler)")
    kernel = jax.jit(bf16_kernel.gemm, static_argnums=2)
    xla_f32 = jax.jit(lambda x, w: x @ w)
    xla_bf16 = jax.jit(bf16_kernel.gemm_reference)
    rng = np.random.default_rng(0)
    rows = []
    for k, n in SHAPES:
        x = jnp.asarray(rng.standard_normal((args.rows, k), np.float32))
        w = jnp.asarray(rng.standard_normal((k, n), np.float32))
        pairs = jax.block_until_ready(bf16_kernel.to_pairs(w))
        sides = {"kernel": lambda: kernel(x, pairs, n), "xla_f32": lambda: xla_f32(x, w),
                 "xla_bf16": lambda: xla_bf16(x, w)}
        y = np.asarray(sides["kernel"](), np.float64)
        ref = (np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
               @ np.asarray(w.astype(jnp.bfloat16).astype(jnp.float32), np.float64))
        for f in sides.values():
            jax.block_until_ready(f())  # compile
        best = dict.fromkeys(sides, float("inf"))
        for _ in range(args.repeats):
            for name, f in sides.items():
                t = time.perf_counter()
                jax.block_until_ready(f())
                best[name] = min(best[name], time.perf_counter() - t)
        gflop = 2 * args.rows * k * n / 1e9
        row = {"m": args.rows, "k": k, "n": n, **{f"{s}_gflops": gflop / t for s, t in best.items()},
               "kernel_vs_xla_f32": best["xla_f32"] / best["kernel"],
               "kernel_vs_xla_bf16": best["xla_bf16"] / best["kernel"],
               "kernel_max_rel_err": float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))}
        rows.append(row)
        print(f"[{args.rows}, {k}] x [{k}, {n}]: kernel {row['kernel_gflops']:.0f}, XLA f32 {row['xla_f32_gflops']:.0f}, "
              f"XLA bf16-in {row['xla_bf16_gflops']:.0f} GFLOP/s; kernel / XLA f32 {row['kernel_vs_xla_f32']:.2f}x; "
              f"err {row['kernel_max_rel_err']:.1e}", flush=True)
    result = {"cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0], "repeats": args.repeats, "shapes": rows}
    print(json.dumps(result, indent=1))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
