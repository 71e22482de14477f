"""Per-neuron statistics over a corpus: lens.modularity.activation_stats vs transformers
with PyTorch forward hooks, side by side in one process.

    .venv/bin/python bench/modularity.py                                  # SmolLM2, 100k tokens
    .venv/bin/python bench/modularity.py --model runs/gpt2_ln_bpe/model --tokens 100000
    .venv/bin/python bench/modularity.py --tokens 8192 --json runs/bench_modularity.json

Both sides compute mean |a| per MLP neuron (the input of the down-projection) and per
component of each head's output before W_O (the input of o_proj / c_proj), over the same
rows of python-code text (seq 128, batches of --batch rows):
  ours:          `activation_stats` (one jitted call per batch: a scan over the layers with
                 the rows vmapped inside, each layer's |a| summed before the next runs);
  transformers:  the base model (no LM head, as ours) under no_grad, with forward
                 pre-hooks on every down_proj / c_proj and o_proj / c_proj adding
                 |input|.sum over tokens into float64 accumulators.
Timing: one untimed warm-up batch each (compilation for ours), then the whole corpus;
wall seconds and this process's CPU seconds (all threads) for each side (on a loaded
machine the CPU ratio is the steadier number).  --batch is the same for both sides.
Peak memory: each side once more in a fresh child process (`--memory-batches` batches):
the child's peak resident set size (ru_maxrss) minus its RSS after loading the model, so
the weights are not counted and neither side inherits the other's allocator caches.
(The in-process RSS sampled every 5 ms during the timed runs is reported too, but an
allocator that keeps freed memory makes it near zero for the side that ran warm.)  Both
sides report the same statistics (max relative difference printed).
"""

from __future__ import annotations

import models.xla_guard  # noqa: F401  (isort: skip)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from bench_common import write_json  # noqa: E402
from lens.cli import int_at_least  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="embedded name or HF folder")
    p.add_argument("--tokens", type=int_at_least(128), default=100_000, help="tokens of text (rounded up to rows)")
    p.add_argument("--seq", type=int_at_least(2), default=128)
    p.add_argument("--batch", type=int_at_least(1), default=8)
    p.add_argument("--memory-batches", type=int_at_least(1), default=4, help="batches per memory child")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--memory-child", choices=("ours", "hf"), default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def memory_child(args):
    """Run one side on --memory-batches batches; print its peak RSS above the loaded model."""
    import resource

    import models
    from lens import data
    from lens.modularity import activation_stats

    model, tok = models.load(args.model)
    rows = data.load_tokens("python-code", tok, args.seq, "train")[: args.batch * args.memory_batches]
    hf = hf_model_for(model, args.model) if args.memory_child == "hf" else None
    if hf is not None:
        del model
    base = _rss()
    if args.memory_child == "ours":
        activation_stats(model, rows, chunk=args.batch)
    else:
        hf_stats(hf, rows, args.batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_above_loaded_mb": max(0, peak - base) / 2**20}))


def child_memory(args, side) -> float:
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--model", args.model, "--seq", str(args.seq), "--batch", str(args.batch),
           "--memory-batches", str(args.memory_batches), "--memory-child", side]
    root = str(Path(__file__).resolve().parents[1])  # this checkout's lens, not an installed one
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_above_loaded_mb"]


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss(fn):
    """(result, seconds, peak RSS increase in bytes) of fn()."""
    base, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        th.join()
    return out, seconds, max(0, max(peak[0], _rss()) - base)


def hf_model_for(model, name):
    """transformers' model with the same float32 weights (the GGUF for an embedded model,
    the folder itself otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM

    from models import embedded

    if name in embedded.EMBEDDED:
        path = embedded.fetch(name)
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()


def hf_stats(hf, rows, batch):
    """Mean |a| per neuron [layers, d_mlp] and per head component [layers, heads * d_head]."""
    import torch

    base = getattr(hf, "model", None) or hf.transformer
    layers = base.layers if hasattr(base, "layers") else base.h
    down = [L.mlp.down_proj if hasattr(L.mlp, "down_proj") else L.mlp.c_proj for L in layers]
    o_proj = [L.self_attn.o_proj if hasattr(L, "self_attn") else L.attn.c_proj for L in layers]
    n_acc = [None] * len(layers)
    z_acc = [None] * len(layers)

    def add(acc, i):
        def hook(module, args):
            s = args[0].abs().sum(dim=(0, 1)).double()
            acc[i] = s if acc[i] is None else acc[i] + s
        return hook

    handles = [m.register_forward_pre_hook(add(n_acc, i)) for i, m in enumerate(down)]
    handles += [m.register_forward_pre_hook(add(z_acc, i)) for i, m in enumerate(o_proj)]
    try:
        with torch.no_grad():
            for i in range(0, len(rows), batch):
                base(input_ids=torch.as_tensor(rows[i:i + batch], dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    n = rows.size
    return np.stack([a.numpy() for a in n_acc]) / n, np.stack([a.numpy() for a in z_acc]) / n


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(args)
    import torch

    import models
    from lens import data
    from lens.modularity import activation_stats

    model, tok = models.load(args.model)
    hf = hf_model_for(model, args.model)
    all_rows = data.load_tokens("python-code", tok, args.seq, "train")
    n_rows = -(-args.tokens // args.seq)
    if n_rows > len(all_rows):
        raise SystemExit(f"--tokens {args.tokens} needs {n_rows} rows; python-code has {len(all_rows)}")
    rows = all_rows[:n_rows]
    warm = rows[: args.batch]
    activation_stats(model, warm, chunk=args.batch)  # compiles (the last chunk is padded: one shape)
    hf_stats(hf, warm, args.batch)
    c0 = time.process_time()
    ours, t_ours, m_ours = peak_rss(lambda: activation_stats(model, rows, chunk=args.batch))
    c1 = time.process_time()
    (hn, hz), t_hf, m_hf = peak_rss(lambda: hf_stats(hf, rows, args.batch))
    c2 = time.process_time()
    c = model.config
    diff_n = float(np.max(np.abs(ours.neurons - hn) / (np.abs(hn) + 1e-6)))
    diff_z = float(np.max(np.abs(ours.head_z.reshape(c.n_layers, -1) - hz) / (np.abs(hz) + 1e-6)))
    result = {"model": args.model, "tokens": int(rows.size), "seq": args.seq, "batch": args.batch,
              "threads_torch": torch.get_num_threads(), "cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0],
              "ours_s": t_ours, "hf_hooks_s": t_hf, "speedup": t_hf / t_ours,
              "ours_cpu_s": c1 - c0, "hf_hooks_cpu_s": c2 - c1, "cpu_ratio": (c2 - c1) / (c1 - c0),
              "ours_tok_s": rows.size / t_ours, "hf_tok_s": rows.size / t_hf,
              "ours_rss_increase_in_process_mb": m_ours / 2**20, "hf_rss_increase_in_process_mb": m_hf / 2**20,
              "ours_peak_child_mb": child_memory(args, "ours"), "hf_peak_child_mb": child_memory(args, "hf"),
              "memory_batches": args.memory_batches,
              "max_rel_diff_neurons": diff_n, "max_rel_diff_heads": diff_z}
    print(json.dumps(result, indent=1))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
