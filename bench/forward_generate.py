"""Forward and greedy-generation speed: ours (JAX, jit) vs transformers (PyTorch eager).

    python bench/forward_generate.py                    # SmolLM2-135M-Instruct (embedded GGUF)
    python bench/forward_generate.py --random-weights   # same shape, random weights, no download
    python bench/forward_generate.py --json runs/bench.json

Everything is measured in ONE process, side by side, with the same thread count for
both frameworks (the CPUs this process may run on, or --threads N):
  * peak:     float32 matmul throughput of this CPU (n x n @ n x n; the fastest run of
              jnp and of torch, the better of the two)
  * forward:  batch 8 x 128 tokens; ours = jit(vmap(model)); transformers = model(ids)
              under no_grad.  Median of --repeats timed runs after a warm-up.
  * generate: batch 1, a 16-token prompt, 64 new tokens, greedy; ours =
              models.generation.generate.generate (prefill + one compiled decode loop, compiled in
              a warm-up call); transformers = model.generate(do_sample=False).
  * achieved forward GFLOP/s as % of the peak, with
      FLOPs = tokens * 2 * (P_matmul + d_model * vocab) + 4 * layers * heads * d_head * B * S(S+1)/2
    P_matmul = every block weight matrix (Q, K, V, O, up, gate, down), d_model * vocab the
    unembedding, the last term causal attention (QK^T and PV over the keys at or before
    each query).  Embedding lookups, norms, rotary and softmax are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

from bench_common import load_pair, write_json  # noqa: E402
from lens.cli import int_at_least  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m-instruct", help="an embedded model name")
    p.add_argument("--random-weights", action="store_true",
                   help="random HF Llama with SmolLM2-135M's shape instead of the real weights")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="threads for both frameworks (default: the CPUs this process may use)")
    p.add_argument("--batch", type=int_at_least(1), default=8)
    p.add_argument("--seq", type=int_at_least(1), default=128)
    p.add_argument("--new-tokens", type=int_at_least(1), default=64)
    p.add_argument("--prompt-len", type=int_at_least(1), default=16)
    p.add_argument("--repeats", type=int_at_least(1), default=5, help="timed runs per measurement (median)")
    p.add_argument("--matmul-n", type=int_at_least(1), default=2048)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    if args.prompt_len > args.seq:
        p.error(f"--prompt-len {args.prompt_len} is longer than --seq {args.seq}")
    return args


def set_threads(n: int | None) -> int:
    """Pin this process to n CPUs (before jax/torch start their pools) and return n."""
    cpus = sorted(os.sched_getaffinity(0))
    if n is None or n >= len(cpus):
        return len(cpus)
    os.sched_setaffinity(0, cpus[:n])
    flags = f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={n}"
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + flags
    return n


def timed(fn, repeats: int, reduce=statistics.median) -> float:
    """Median (or `reduce`) wall time of `fn()` over `repeats` calls, after a warm-up."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return reduce(times)


# ----------------------------------------------------------------------------- models
def load_models(args):
    """(our model, the transformers model, description): the same float32 weights."""
    return load_pair(args.random_weights, args.model)


def forward_flops(config, tokens_per_seq: int, batch: int, matmul_params: int) -> float:
    c = config
    dense = 2 * (matmul_params + c.d_model * c.vocab_size) * tokens_per_seq * batch
    attn = 4 * c.n_layers * c.n_heads * c.d_head * batch * tokens_per_seq * (tokens_per_seq + 1) / 2
    return dense + attn


# ----------------------------------------------------------------------------- measurements
def measure_peak(n: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a = np.random.RandomState(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.RandomState(1).standard_normal((n, n)).astype(np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    mm(ja, jb).block_until_ready()
    # A peak is the best run, not the typical one.
    t_jax = timed(lambda: mm(ja, jb).block_until_ready(), repeats, min)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    torch.matmul(ta, tb)
    t_torch = timed(lambda: torch.matmul(ta, tb), repeats, min)
    flops = 2 * n**3
    return {"jax_gflops": flops / t_jax / 1e9, "torch_gflops": flops / t_torch / 1e9,
            "peak_gflops": max(flops / t_jax, flops / t_torch) / 1e9}


def measure_forward(ours, hf, args) -> dict:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    ids = np.random.RandomState(0).randint(0, ours.config.vocab_size, (args.batch, args.seq))
    fwd = eqx.filter_jit(lambda m, t: jax.vmap(m)(t))
    jids = jnp.asarray(ids, jnp.int32)
    t0 = time.perf_counter()
    ours_logits = fwd(ours, jids).block_until_ready()
    compile_s = time.perf_counter() - t0
    t_ours = timed(lambda: fwd(ours, jids).block_until_ready(), args.repeats)

    tids = torch.as_tensor(ids)
    with torch.no_grad():
        hf_logits = hf(input_ids=tids).logits
        t_hf = timed(lambda: hf(input_ids=tids), args.repeats)
    diff = float(np.abs(np.asarray(ours_logits) - hf_logits.numpy()).max())
    return {"ours_s": t_ours, "hf_s": t_hf, "ours_compile_s": compile_s, "max_abs_logit_diff": diff}


def measure_generate(ours, hf, args) -> dict:
    import numpy as np
    import torch

    from lens.models.generation.generate import GenerationConfig, generate

    n_new = args.new_tokens
    prompt = np.random.RandomState(1).randint(3, ours.config.vocab_size, args.prompt_len).tolist()
    run = lambda: generate(ours, prompt, GenerationConfig(n_new, eos_token_ids=()))  # noqa: E731
    t0 = time.perf_counter()
    ours_tokens = run().tokens[0]
    compile_s = time.perf_counter() - t0
    t_ours = timed(run, args.repeats)

    ids = torch.tensor([prompt])
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n_new,
              min_new_tokens=n_new, pad_token_id=ours.config.pad_token_id or 0)
    with torch.no_grad():
        hf_tokens = hf.generate(ids, **kw)[0, len(prompt):].tolist()  # warm-up
        t_hf = timed(lambda: hf.generate(ids, **kw), args.repeats)
    return {"ours_s": t_ours, "hf_s": t_hf, "ours_compile_s": compile_s,
            "same_tokens": ours_tokens == hf_tokens, "n_new": n_new}


# ----------------------------------------------------------------------------- main
def main():
    args = parse_args()
    threads = set_threads(args.threads)
    import jax
    import torch

    torch.set_num_threads(threads)
    ours, hf, what = load_models(args)
    c = ours.config
    matmul_params = sum(int(w.size) for w in jax.tree.leaves(ours.blocks) if w.ndim >= 3)

    peak = measure_peak(args.matmul_n, args.repeats)
    fwd = measure_forward(ours, hf, args)
    gen = measure_generate(ours, hf, args)

    tokens = args.batch * args.seq
    flops = forward_flops(c, args.seq, args.batch, matmul_params)
    res = {
        "model": what, "threads": threads, "jax": jax.__version__, "torch": torch.__version__,
        "cpu": _cpu_name(), "matmul_params": matmul_params, "forward_flops": flops,
        "peak": peak, "forward": fwd, "generate": gen,
        "forward_tokens_per_s": {"ours": tokens / fwd["ours_s"], "hf": tokens / fwd["hf_s"]},
        "forward_gflops": {"ours": flops / fwd["ours_s"] / 1e9, "hf": flops / fwd["hf_s"] / 1e9},
        "generate_tokens_per_s": {
            "ours": gen["n_new"] / gen["ours_s"], "hf": gen["n_new"] / gen["hf_s"]
        },
    }
    import resource

    res["peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(report(res, args))
    print(f"peak RSS: {res['peak_rss_MB']:.0f} MB")
    write_json(args.json, res)


def report(r, args) -> str:
    pk = r["peak"]["peak_gflops"]
    ft, fg, gt = r["forward_tokens_per_s"], r["forward_gflops"], r["generate_tokens_per_s"]
    f, g = r["forward"], r["generate"]
    lines = [
        f"model: {r['model']}; {r['threads']} threads; jax {r['jax']}, torch {r['torch']}; "
        f"{r['cpu']}",
        f"float32 matmul peak ({args.matmul_n}^3): {pk:.0f} GFLOP/s "
        f"(jnp {r['peak']['jax_gflops']:.0f}, torch {r['peak']['torch_gflops']:.0f})",
        f"forward FLOPs ({args.batch} x {args.seq}): {r['forward_flops'] / 1e9:.1f} GFLOP "
        f"(matmul params {r['matmul_params'] / 1e6:.1f}M)",
        "",
        "| measurement | ours (JAX jit) | transformers (eager) | ratio ours/HF |",
        "|---|---|---|---|",
        f"| forward {args.batch}x{args.seq}: time | {f['ours_s']:.3f} s | {f['hf_s']:.3f} s | "
        f"{f['hf_s'] / f['ours_s']:.2f}x faster |",
        f"| forward: tokens/s | {ft['ours']:.0f} | {ft['hf']:.0f} | {ft['ours'] / ft['hf']:.2f} |",
        f"| forward: GFLOP/s (% of peak) | {fg['ours']:.0f} ({100 * fg['ours'] / pk:.0f}%) | "
        f"{fg['hf']:.0f} ({100 * fg['hf'] / pk:.0f}%) | {fg['ours'] / fg['hf']:.2f} |",
        f"| greedy generate b=1, {g['n_new']} new: new tokens/s | {gt['ours']:.1f} | "
        f"{gt['hf']:.1f} | {gt['ours'] / gt['hf']:.2f} |",
        "",
        f"forward max |logit diff| ours vs HF: {f['max_abs_logit_diff']:.2e}; "
        f"greedy tokens identical: {g['same_tokens']}; compile (one-off, not timed above): "
        f"forward {f['ours_compile_s']:.1f} s, generate {g['ours_compile_s']:.1f} s; "
        f"median of {args.repeats} runs",
    ]
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
