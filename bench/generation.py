"""Generation at the memory limit: greedy decoding and K-vector steered generation, ours
(JAX) vs transformers (PyTorch eager), side by side in ONE process on the same prompts.

    python bench/generation.py                      # SmolLM2-135M-Instruct, every part
    python bench/generation.py --loop-vectors 8 --json runs/bench_generation.json

Parts (all timings after a warm-up / compile call, which is reported separately):
  * bandwidth: this machine's memory bandwidth in this run (the best of a jitted sum over
    a --bandwidth-mb float32 array: bytes read / time), the floor a decode step can reach.
  * greedy, batch 1, a 16-token prompt, 64 new tokens: ours float32 and ours with bf16
    weights (XLA's dots) vs transformers `generate` float32.  Decode step = (t(64 new) - t(1 new)) / 63;
    bytes per step = every weight (+ the KV cache); fraction of the bandwidth floor =
    (bytes / bandwidth) / step time.
  * bf16 parity: N prompts greedy in float32 and in bf16 weights; identical greedy tokens
    per prompt and the max |logit diff| at the steps where both saw the same tokens.
  * steered: K vectors x P prompts x T new tokens (added at resid_pre[layer], prompt and
    generated positions): ours `lens.steering.vectors.generate_with_vectors` (one compiled decode
    over the K x P rows) vs a transformers hook loop (a forward pre-hook on the block, one
    vector at a time, batch of P; timed on the first --loop-vectors vectors and scaled to
    K, said so in the output) and vs transformers with the K x P rows batched and per-row
    steering (one hook adding a [K*P, 1, d] tensor).
  * the decode step's per-op profile (jax.profiler; time by XLA op kind).
  * peak RSS of the process (resource.getrusage ru_maxrss).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import resource
import tempfile
import time
from pathlib import Path

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

from lens.cli import int_at_least  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)


PARTS = ("greedy", "bf16_parity", "profile", "steered")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="an embedded model name")
    p.add_argument("--new-tokens", type=int_at_least(2), default=64)
    p.add_argument("--prompt-len", type=int_at_least(1), default=16)
    p.add_argument("--repeats", type=int_at_least(1), default=3, help="timed runs (best is reported)")
    p.add_argument("--parity-prompts", type=int_at_least(1), default=8)
    p.add_argument("--parity-tokens", type=int_at_least(1), default=32)
    p.add_argument("--vectors", type=int_at_least(1), default=64)
    p.add_argument("--prompts", type=int_at_least(1), default=4)
    p.add_argument("--steer-tokens", type=int_at_least(1), default=48)
    p.add_argument("--layer", type=int_at_least(0), default=15)
    p.add_argument("--loop-vectors", type=int_at_least(1), default=8,
                   help="vectors the transformers hook loop is timed on (scaled to --vectors)")
    p.add_argument("--skip-hf-batched", action="store_true", help="skip transformers with K x P rows batched")
    p.add_argument("--bandwidth-mb", type=int_at_least(16), default=512)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                   help="which parts to run (default: all; a loaded machine may need them one by one)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    if args.loop_vectors > args.vectors:
        p.error(f"--loop-vectors {args.loop_vectors} is more than --vectors {args.vectors}")
    return args


def best(fn, repeats: int) -> float:
    """Fastest of `repeats` timed calls; every caller here warms up (compiles) first."""
    from bench_common import best_time

    return best_time(fn, repeats, warmup=False)


def bandwidth(mb: int, repeats: int = 5) -> float:
    """Bytes/s read by a jitted float32 sum over `mb` MB (the best of `repeats`)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((mb * 2**20 // 4,), jnp.float32)
    s = jax.jit(jnp.sum)
    s(a).block_until_ready()
    t = best(lambda: s(a).block_until_ready(), repeats)
    return a.size * 4 / t


def weight_bytes(model) -> int:
    import jax

    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(model))


def greedy(ours, ours16, hf, args, bw) -> dict:
    import numpy as np
    import torch

    from lens.models.generation.generate import GenerationConfig, generate

    prompt = np.random.RandomState(1).randint(3, ours.config.vocab_size, args.prompt_len).tolist()
    n = args.new_tokens
    res = {}
    for name, m in (("ours_fp32", ours), ("ours_bf16", ours16)):
        t0 = time.perf_counter()
        toks = generate(m, prompt, GenerationConfig(n, eos_token_ids=())).tokens[0]
        generate(m, prompt, GenerationConfig(1, eos_token_ids=()))
        compile_s = time.perf_counter() - t0
        t_full = best(lambda: generate(m, prompt, GenerationConfig(n, eos_token_ids=())), args.repeats)
        t_one = best(lambda: generate(m, prompt, GenerationConfig(1, eos_token_ids=())), args.repeats)
        step = (t_full - t_one) / (n - 1)
        c = m.config
        slots = -(-args.prompt_len // 8) * 8 + n
        cache = 2 * c.n_layers * slots * c.n_kv_heads * c.d_head * np.dtype(m.embed.dtype).itemsize
        nbytes = weight_bytes(m) + cache
        res[name] = {"s": t_full, "tok_per_s": n / t_full, "first_call_s": compile_s, "step_ms": 1e3 * step,
                     "bytes_per_step": nbytes, "floor_ms": 1e3 * nbytes / bw,
                     "fraction_of_floor": nbytes / bw / step, "tokens": toks}
    ids = torch.tensor([prompt])
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
              pad_token_id=ours.config.pad_token_id or 0)
    with torch.no_grad():
        hf_tokens = hf.generate(ids, **kw)[0, len(prompt):].tolist()
        t_hf = best(lambda: hf.generate(ids, **kw), args.repeats)
    res["hf_fp32"] = {"s": t_hf, "tok_per_s": n / t_hf}
    res["same_tokens_fp32_vs_hf"] = res["ours_fp32"]["tokens"] == hf_tokens
    res["speedup_fp32"] = t_hf / res["ours_fp32"]["s"]
    for name in ("ours_fp32", "ours_bf16"):
        res[name.replace("ours", "speedup")] = t_hf / res[name]["s"]
        res[name].pop("tokens")
    return res


def bf16_parity(ours, ours16, args) -> dict:
    import numpy as np

    from lens.models.generation.generate import GenerationConfig, generate

    rs = np.random.RandomState(7)
    prompts = [rs.randint(3, ours.config.vocab_size, int(rs.randint(8, 24))).tolist()
               for _ in range(args.parity_prompts)]
    n = args.parity_tokens
    a = generate(ours, prompts, GenerationConfig(n, eos_token_ids=(), return_logits=True))
    b = generate(ours16, prompts, GenerationConfig(n, eos_token_ids=(), return_logits=True))
    same, diffs, agreed_steps = 0, [], 0
    for ta, tb, la, lb in zip(a.tokens, b.tokens, a.logits, b.logits):
        same += ta == tb
        k = next((j for j, (x, y) in enumerate(zip(ta, tb)) if x != y), n)
        # logits of step j depend on the tokens before it: compare up to the first difference
        upto = min(k + 1, n)
        agreed_steps += upto
        diffs.append(float(np.abs(la[:upto] - lb[:upto]).max()))
        scale = float(np.abs(la).max())
    return {"prompts": len(prompts), "tokens": n, "identical_greedy": int(same), "max_abs_logit_diff": max(diffs),
            "max_abs_logit_fp32": scale, "steps_compared": agreed_steps}


def steered(ours, hf, tok, args) -> dict:
    import numpy as np
    import torch

    from lens.steering import vectors
    from lens.models.generation.generate import GenerationConfig, chat_prompt

    texts = ["Tell me about your neighbour.", "Write one sentence about the weather.",
             "What should I cook tonight?", "Describe a walk in the park.", "Give me advice on sleep.",
             "What is your favourite book?"]
    prompts = [chat_prompt(tok, texts[i % len(texts)]) for i in range(args.prompts)]
    K, P, T, layer = args.vectors, args.prompts, args.steer_tokens, args.layer
    vecs = (8.0 * np.random.RandomState(3).randn(K, ours.config.d_model) / np.sqrt(ours.config.d_model)).astype(np.float32)
    # ours: one compiled decode over K x P rows (compile = the first call, reported apart)
    run = lambda: vectors.generate_with_vectors(ours, prompts, vecs, layer, GenerationConfig(T, eos_token_ids=()),  # noqa: E731
                                                 vectors_per_call=K, progress=False)
    t0 = time.perf_counter()
    ours_tokens = run()
    first = time.perf_counter() - t0
    t_ours = best(run, 1)

    eos = None
    pad = ours.config.pad_token_id or 0
    enc = [torch.tensor(p) for p in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.full((P, width), pad)
    mask = torch.zeros((P, width), dtype=torch.long)
    for i, p in enumerate(enc):  # left padding, as transformers generation wants
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    block = hf.model.layers[layer]
    current = {"v": None}

    def hook(module, args_, kwargs):
        h = args_[0] if args_ else kwargs["hidden_states"]
        h = h + current["v"].to(h.dtype)
        if args_:
            return (h,) + tuple(args_[1:]), kwargs
        return args_, {**kwargs, "hidden_states": h}

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    kw = dict(do_sample=False, max_new_tokens=T, min_new_tokens=T, pad_token_id=pad, eos_token_id=eos)
    try:
        with torch.no_grad():
            current["v"] = torch.from_numpy(vecs[0])
            hf.generate(ids, attention_mask=mask, **kw)  # warm-up
            L = args.loop_vectors
            same = 0
            t0 = time.perf_counter()
            for k in range(L):
                current["v"] = torch.from_numpy(vecs[k])
                out = hf.generate(ids, attention_mask=mask, **kw)[:, width:].numpy()
                same += int((out == ours_tokens[k]).all(axis=1).sum())
            t_loop = (time.perf_counter() - t0) * K / L
            res = {"ours_s": t_ours, "ours_first_call_s": first, "hf_loop_s": t_loop, "hf_loop_timed_vectors": L,
                   "hf_loop_scaled_from": f"{L} of {K} vectors", "rows_identical_to_hf_loop": f"{same}/{L * P}",
                   "speedup_vs_loop": t_loop / t_ours}
            if not args.skip_hf_batched:
                big_ids, big_mask = ids.repeat(K, 1), mask.repeat(K, 1)
                current["v"] = torch.from_numpy(np.repeat(vecs, P, axis=0))[:, None, :]
                t0 = time.perf_counter()
                out = hf.generate(big_ids, attention_mask=big_mask, **kw)[:, width:].numpy()
                t_batched = time.perf_counter() - t0
                same_b = int((out.reshape(K, P, T) == ours_tokens).all(axis=2).sum())
                res |= {"hf_batched_s": t_batched, "speedup_vs_batched": t_batched / t_ours,
                        "rows_identical_to_hf_batched": f"{same_b}/{K * P}"}
    finally:
        handle.remove()
    res |= {"K": K, "P": P, "new_tokens": T, "layer": layer}
    return res


def profile_decode(ours, args) -> dict:
    """Time per XLA op kind in the decode loop (jax.profiler, CPU thunk events)."""
    import jax
    import numpy as np

    from lens.models.generation.generate import GenerationConfig, generate

    prompt = np.random.RandomState(1).randint(3, ours.config.vocab_size, args.prompt_len).tolist()
    generate(ours, prompt, GenerationConfig(args.new_tokens, eos_token_ids=()))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            generate(ours, prompt, GenerationConfig(args.new_tokens, eos_token_ids=()))
        files = sorted(Path(d).rglob("*.json.gz"))
        if not files:
            return {"error": "no perfetto trace written"}
        events = json.load(gzip.open(files[-1]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    kinds = collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        name = e["name"]
        if name.startswith(("dot", "fusion", "copy", "dynamic", "bitcast", "reduce", "iota", "wrapped",
                            "broadcast", "transpose", "concatenate", "select", "slice", "sort", "while")):
            kind = name.split(".")[0]
            kinds[kind] += e["dur"]
    kinds.pop("while", None)  # the loop itself encloses the ops
    total = sum(kinds.values())
    return {"ms_per_step_by_op_kind": {k: round(v / 1e3 / args.new_tokens, 3) for k, v in kinds.most_common(12)},
            "fraction_in_dots": kinds["dot"] / total if total else None}


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import torch

    from lens import models
    from bench_common import load_pair, write_json

    t_start = time.time()
    ours, hf, what = load_pair(False, args.model)
    need16 = {"greedy", "bf16_parity"} & set(args.parts)
    ours16 = models.load(args.model, dtype=jnp.bfloat16)[0] if need16 else None
    tok = models.load(args.model)[1] if "steered" in args.parts else None
    bw = bandwidth(args.bandwidth_mb)
    res = {"model": what, "jax": jax.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "bandwidth_GBps": bw / 1e9}
    parts = (("greedy", lambda: greedy(ours, ours16, hf, args, bw)),
             ("bf16_parity", lambda: bf16_parity(ours, ours16, args)),
             ("profile", lambda: profile_decode(ours, args)),
             ("steered", lambda: steered(ours, hf, tok, args)),
             ("bandwidth_GBps_end", lambda: bandwidth(args.bandwidth_mb) / 1e9))
    parts = [(name, part) for name, part in parts if name in args.parts or name == "bandwidth_GBps_end"]
    for name, part in parts:  # each part printed and saved as soon as it is done
        res[name] = part()
        res["peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        res["wall_s"] = time.time() - t_start
        print(json.dumps({name: res[name]}, indent=1), flush=True)
        write_json(args.json, res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
