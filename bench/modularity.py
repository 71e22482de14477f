"""Per-neuron statistics over a corpus: lens.modularity.pruning.activation_stats vs transformers
with PyTorch forward hooks, side by side in one process, in float32 and in bfloat16.

    .venv/bin/python bench/modularity.py                                  # SmolLM2, 100k tokens
    .venv/bin/python bench/modularity.py --model runs/gpt2_ln_bpe/model --tokens 100000
    .venv/bin/python bench/modularity.py --tokens 8192 --sides ours,ours-bf16 --json runs/bench_modularity.json

Every side computes mean |a| per MLP neuron (the input of the down-projection) and per
component of each head's output before W_O (the input of o_proj / c_proj), over the same
rows of python-code text (seq 128, batches of --batch rows):
  ours:          `activation_stats` (one jitted call per batch: a scan over the layers with
                 the rows vmapped inside, each layer's |a| summed before the next runs);
  ours-bf16:     the same with compute_dtype="bfloat16": every block matmul rounds its
                 input and weight to bf16 and sums in float32 (XLA's dot: no faster
                 than float32 on a CPU, where XLA widens to float32); norms, softmax,
                 activations and the |a| sums stay float32;
  hf:            the transformers base model in float32 (no LM head, as ours) under
                 no_grad, with forward pre-hooks on every down_proj / c_proj and o_proj /
                 c_proj adding |input|.sum over tokens (float32, then float64 accumulators);
  hf-bf16:       the same model in torch.bfloat16 (the same-precision reference: oneDNN's
                 bf16 matmuls; the hooks sum |input| in float32).
Timing: one untimed warm-up batch per side (compilation for ours), then the corpus in
--rounds contiguous parts, each part run by every side in turn (the order rotated per
round), so load from other jobs falls on all sides alike; wall seconds and this process's
CPU seconds (all threads) summed per side.  Ratios are reported for every side against
every other.  Peak memory: each side once more in a fresh child process
(`--memory-batches` batches): the child's peak resident set size (ru_maxrss) minus its RSS
after loading the model, so the weights are not counted and no side inherits another's
allocator caches.  Accuracy: each side's max and median relative difference from the
float32 transformers side (neurons and head components); for ours-bf16 also from ours,
and whether selective pruning's top-2% neuron choice changes (neuron_scores on
--choice-tokens of python-code (forget) vs shakespeare (retain), float32 vs bfloat16).
"""

from __future__ import annotations

import lens.models.runtime.xla_guard  # noqa: F401  (isort: skip)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from bench_common import write_json  # noqa: E402
from lens.cli import int_at_least  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)


SIDES = ("ours", "ours-bf16", "hf", "hf-bf16")


def side_list(text: str) -> list[str]:
    """A comma-separated, non-empty subset of SIDES (argparse type)."""
    sides = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in sides if t not in SIDES]
    if not sides or bad:
        raise argparse.ArgumentTypeError(f"choose a comma-separated subset of {','.join(SIDES)}; got {text!r}")
    return list(dict.fromkeys(sides))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="embedded name or HF folder")
    p.add_argument("--tokens", type=int_at_least(128), default=100_000, help="tokens of text (rounded up to rows)")
    p.add_argument("--seq", type=int_at_least(2), default=128)
    p.add_argument("--batch", type=int_at_least(1), default=8)
    p.add_argument("--sides", type=side_list, default=list(SIDES), help=f"subset of {','.join(SIDES)}")
    p.add_argument("--rounds", type=int_at_least(1), default=4, help="parts of the corpus, sides alternated per part")
    p.add_argument("--memory-batches", type=int_at_least(1), default=4, help="batches per memory child")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--choice-tokens", type=int_at_least(0), default=16384,
                   help="tokens per set for the top-2%% pruning-choice check (0: skip)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--memory-child", choices=SIDES, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def memory_child(args):
    """Run one side on --memory-batches batches; print its peak RSS above the loaded model."""
    import resource

    from lens import models
    from lens.training import data
    from lens.modularity.pruning import activation_stats

    model, tok = models.load(args.model)
    rows = data.load_tokens("python-code", tok, args.seq, "train")[: args.batch * args.memory_batches]
    side = args.memory_child
    hf = hf_model_for(model, args.model, bf16=side == "hf-bf16") if side.startswith("hf") else None
    if hf is not None:
        del model
    base = _rss()
    if hf is None:
        activation_stats(model, rows, chunk=args.batch, compute_dtype=DTYPE[side])
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


DTYPE = {"ours": "float32", "ours-bf16": "bfloat16"}


def hf_model_for(model, name, bf16: bool = False):
    """transformers' model with the same weights (the GGUF for an embedded model, the folder
    itself otherwise), in float32 or in bfloat16."""
    import torch
    from transformers import AutoModelForCausalLM

    from lens.models.io import embedded

    if name in embedded.EMBEDDED:
        path = embedded.fetch(name)
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    # cast after loading: asked for bf16, transformers' GGUF loader keeps its own matmul
    # modules that compute in float32; cast, every Linear holds a plain bf16 weight
    return (hf.to(torch.bfloat16) if bf16 else hf).eval()


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
            # float32 sums (a bf16 model's activations are not summed in bf16), float64 across batches
            s = args[0].abs().sum(dim=(0, 1), dtype=torch.float32).double()
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


def rel_diff(a, b) -> dict:
    """max and median |a - b| / |b| over the units."""
    r = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / (np.abs(np.asarray(b, np.float64)) + 1e-12)
    return {"max": float(r.max()), "median": float(np.median(r))}


def pruning_choice(model, tok, args) -> dict:
    """neuron_scores float32 vs bfloat16 on --choice-tokens of python-code (forget) and
    shakespeare (retain): how many of the top-2% neurons (selective pruning's first step)
    differ, and the scores' relative difference."""
    from lens.training import data
    from lens.modularity.pruning import neuron_scores, top_unpruned

    n_rows = -(-args.choice_tokens // args.seq)
    forget = data.load_tokens("python-code", tok, args.seq, "validation")[:n_rows]
    retain = data.load_tokens("shakespeare", tok, args.seq, "validation")[:n_rows]
    s32 = neuron_scores(model, forget, retain, chunk=args.batch)
    s16 = neuron_scores(model, forget, retain, chunk=args.batch, compute_dtype="bfloat16")
    none = np.zeros(s32.shape, bool)
    k = int(0.02 * s32.size)
    a, b = top_unpruned(s32, k, none), top_unpruned(s16, k, none)
    return {"forget_tokens": int(forget.size), "retain_tokens": int(retain.size), "top2pct_neurons": k,
            "top2pct_changed": int((a & ~b).sum()), "score_rel_diff": rel_diff(s16, s32)}


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(args)
    import torch

    from lens import models
    from lens.training import data
    from lens.modularity.pruning import activation_stats

    model, tok = models.load(args.model)
    sides = args.sides
    hf = {s: hf_model_for(model, args.model, bf16=s == "hf-bf16") for s in sides if s.startswith("hf")}
    all_rows = data.load_tokens("python-code", tok, args.seq, "train")
    n_rows = -(-args.tokens // args.seq)
    if n_rows > len(all_rows):
        raise SystemExit(f"--tokens {args.tokens} needs {n_rows} rows; python-code has {len(all_rows)}")
    rows = all_rows[:n_rows]
    c = model.config

    def run(side, part):
        """(neuron means [layers, d_mlp], head-component means [layers, heads * d_head])."""
        if side in hf:
            return hf_stats(hf[side], part, args.batch)
        st = activation_stats(model, part, chunk=args.batch, compute_dtype=DTYPE[side])
        return st.neurons, st.head_z.reshape(c.n_layers, -1)

    for side in sides:  # warm-up: compiles ours (every part is padded to --batch rows: one shape)
        run(side, rows[: args.batch])
    # parts of whole batches, so every side sees the same batches as in one pass
    bounds = np.linspace(0, -(-n_rows // args.batch), min(args.rounds, -(-n_rows // args.batch)) + 1).astype(int)
    wall = dict.fromkeys(sides, 0.0)
    cpu = dict.fromkeys(sides, 0.0)
    rss = dict.fromkeys(sides, 0)
    sums = {s: [0.0, 0.0] for s in sides}
    for r, (b0, b1) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = rows[b0 * args.batch: b1 * args.batch]
        for side in sides[r % len(sides):] + sides[: r % len(sides)]:
            c0 = time.process_time()
            (n, z), seconds, peak = peak_rss(lambda: run(side, part))
            cpu[side] += time.process_time() - c0
            wall[side] += seconds
            rss[side] = max(rss[side], peak)
            sums[side][0] += np.asarray(n, np.float64) * part.size
            sums[side][1] += np.asarray(z, np.float64) * part.size
            print(f"round {r + 1}/{len(bounds) - 1} {side}: {part.size} tokens in {seconds:.1f} s", flush=True)
    means = {s: (v[0] / rows.size, v[1] / rows.size) for s, v in sums.items()}
    result = {"model": args.model, "tokens": int(rows.size), "seq": args.seq, "batch": args.batch,
              "rounds": len(bounds) - 1, "sides": sides, "threads_torch": torch.get_num_threads(),
              "cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0]}
    for s in sides:
        result[s] = {"wall_s": wall[s], "cpu_s": cpu[s], "tok_s": rows.size / wall[s],
                     "rss_increase_in_process_mb": rss[s] / 2**20}
    result["ratios_wall"] = {f"{a}/{b}": wall[b] / wall[a] for a in sides for b in sides if a != b}
    result["ratios_cpu"] = {f"{a}/{b}": cpu[b] / cpu[a] for a in sides for b in sides if a != b}
    ref = "hf" if "hf" in sides else ("ours" if "ours" in sides else None)
    for s in sides:
        if ref is not None and s != ref:
            result[s]["vs_" + ref] = {"neurons": rel_diff(means[s][0], means[ref][0]),
                                      "heads": rel_diff(means[s][1], means[ref][1])}
    if "ours" in sides and "ours-bf16" in sides:
        result["ours-bf16"]["vs_ours"] = {"neurons": rel_diff(means["ours-bf16"][0], means["ours"][0]),
                                          "heads": rel_diff(means["ours-bf16"][1], means["ours"][1])}
    if args.choice_tokens:
        result["pruning_choice_bf16_vs_f32"] = pruning_choice(model, tok, args)
    if not args.no_memory:
        result["memory_batches"] = args.memory_batches
        for s in sides:
            result[s]["peak_child_mb"] = child_memory(args, s)
    print(json.dumps(result, indent=1))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
