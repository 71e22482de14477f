"""Training-step speed: ours (one compiled JAX step) vs a nanoGPT-style PyTorch loop.

    python bench/train.py                       # gpt2-small-ln's shape: 4 layers, d 256, V 4096
    python bench/train.py --steps 10 --json runs/bench_train.json

Both sides train the SAME model from the SAME weights on the SAME batches, in one process:
  * ours:  `lens.training.train.make_step` (forward + backward + global-norm clip + AdamW with
           warmup + cosine, decay on matrices), one `eqx.filter_jit` call per step;
  * torch: transformers' GPT2LMHeadModel (eager, SDPA attention) read from the folder
           `models.save` wrote for our initial weights, and nanoGPT's loop: forward,
           cross-entropy, backward, `clip_grad_norm_`, `torch.optim.AdamW` (decay on the
           2-D parameters, nanoGPT's grouping, which is ours), `zero_grad(set_to_none=True)`;
           the learning rate follows our schedule through LambdaLR.  Dropout is 0.
Timed: the median step time over --steps steps after --warmup steps (ours' first step
compiles; its time is reported separately); the two loops alternate step by step, so load
from other jobs on shared CPUs hits both alike.  The loss of both sides at every step is
printed: same weights and batches, so they agree to float32 round-off and a slowly
growing drift, a check that the two loops train the same thing.

FLOPs per step = 3 x forward (backward = 2 x forward), forward as in forward_generate.py:
  B*S * 2 * (P_matmul + d_model*vocab) + 4 * layers * heads * d_head * B * S(S+1)/2,
reported as GFLOP/s and as % of the measured float32 matmul peak (bench_common.matmul_peak).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

from bench_common import matmul_peak, write_json  # noqa: E402
from lens.cli import int_at_least  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int_at_least(1), default=4)
    p.add_argument("--d-model", type=int_at_least(1), default=256)
    p.add_argument("--heads", type=int_at_least(1), default=4)
    p.add_argument("--vocab", type=int_at_least(1), default=4096)
    p.add_argument("--batch", type=int_at_least(1), default=8)
    p.add_argument("--seq", type=int_at_least(1), default=128, help="tokens per row fed to the model")
    p.add_argument("--steps", type=int_at_least(1), default=8, help="timed steps per side")
    p.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed steps per side (ours: includes compile)")
    p.add_argument("--matmul-n", type=int_at_least(1), default=1024)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.d_model % args.heads:
        p.error(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    return args


def config(args):
    from lens.models.core.config import ModelConfig

    return ModelConfig(
        architecture="gpt2", vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
        n_heads=args.heads, n_kv_heads=args.heads, d_head=args.d_model // args.heads, d_mlp=4 * args.d_model,
        max_seq_len=args.seq, norm_kind="layer", norm_eps=1e-5, activation="gelu_new", gated_mlp=False,
        positional="learned", attn_bias=True, attn_out_bias=True, mlp_bias=True, norm_bias=True,
        tie_embeddings=True, bos_token_id=0, eos_token_ids=(0,))


def step_flops(c, batch: int, seq: int) -> float:
    p_matmul = c.n_layers * (4 * c.d_model * c.n_heads * c.d_head + 2 * c.d_model * c.d_mlp)
    forward = 2 * batch * seq * (p_matmul + c.d_model * c.vocab_size)
    forward += 4 * c.n_layers * c.n_heads * c.d_head * batch * seq * (seq + 1) / 2
    return 3 * forward


def ours_steps(model, tcfg, batches):
    """Yields (loss, seconds) per step; the first step's seconds include compilation."""
    import equinox as eqx
    import jax.numpy as jnp

    from lens.training import train

    params, static = eqx.partition(model, eqx.is_array)
    opt = train.optimizer(tcfg, params)
    opt_state = opt.init(params)
    step = train.make_step(static, opt, False)
    for b in batches:
        rows = jnp.asarray(b)
        t0 = time.perf_counter()
        params, opt_state, loss, _ = step(params, opt_state, rows)
        loss = float(loss)  # blocks
        yield loss, time.perf_counter() - t0


def torch_steps(folder: Path, tcfg, batches):
    """Yields (loss, seconds) per step of nanoGPT's loop."""
    import torch
    import torch.nn.functional as F
    from transformers import GPT2LMHeadModel

    from lens.training import train

    model = GPT2LMHeadModel.from_pretrained(folder, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                            attn_implementation="sdpa").float().train()
    params = [p for p in model.parameters() if p.requires_grad]  # tied wte / lm_head counted once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tcfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.b1, tcfg.b2), eps=tcfg.eps)
    schedule = train.lr_schedule(tcfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(schedule(s)) / tcfg.lr)
    for b in batches:
        x = torch.as_tensor(b, dtype=torch.long)
        t0 = time.perf_counter()
        logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.clip_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.item()
        yield loss, time.perf_counter() - t0


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    import numpy as np
    import torch

    from lens import models
    from lens.training import train

    torch.manual_seed(0)
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    c = config(args)
    n = args.warmup + args.steps
    tcfg = train.TrainConfig(steps=n, batch_size=args.batch, lr=2e-3, warmup_steps=1)
    # Rows of seq + 1 tokens (inputs + shifted targets); a Zipf-ish stream, so there is
    # something to learn and the two loss curves can be compared.
    rng = np.random.default_rng(0)
    batches = [np.minimum(rng.zipf(1.3, (args.batch, args.seq + 1)), args.vocab - 1).astype(np.int32)
               for _ in range(n)]
    model = models.init(c, jax.random.key(0))
    # The two loops alternate step by step, so a change in the machine's load (shared
    # CPUs) hits both sides alike.
    with tempfile.TemporaryDirectory() as d:
        models.save(model, d, format="hf")
        pairs = list(zip(ours_steps(model, tcfg, batches), torch_steps(Path(d), tcfg, batches)))
    (ours_losses, ours_all), (torch_losses, torch_all) = ([list(x) for x in zip(*side)] for side in zip(*pairs))
    compile_s = ours_all[0]
    ours_times, torch_times = ours_all[args.warmup:], torch_all[args.warmup:]
    peak = matmul_peak(args.matmul_n)
    flops = step_flops(c, args.batch, args.seq)
    tokens = args.batch * args.seq
    res = {"shape": {"layers": c.n_layers, "d_model": c.d_model, "heads": c.n_heads, "vocab": c.vocab_size,
                     "batch": args.batch, "seq": args.seq,
                     "params": int(sum(x.size for x in jax.tree.leaves(model)))},
           "threads": threads, "jax": jax.__version__, "torch": torch.__version__,
           "step_gflop": flops / 1e9, "peak": peak, "ours_compile_s": compile_s}
    for name, times in (("ours", ours_times), ("torch", torch_times)):
        s = statistics.median(times)
        res[name] = {"step_s_median": s, "step_s_min": min(times), "step_s_all": times, "tokens_per_s": tokens / s,
                     "gflops": flops / s / 1e9, "pct_of_peak": 100 * flops / s / 1e9 / peak["peak_gflops"]}
    res["speedup_ours_over_torch"] = res["ours"]["tokens_per_s"] / res["torch"]["tokens_per_s"]
    res["losses"] = {"ours": ours_losses, "torch": torch_losses,
                     "max_abs_diff": float(np.max(np.abs(np.array(ours_losses) - np.array(torch_losses))))}
    print(f"shape {res['shape']}, {threads} threads, {flops / 1e9:.1f} GFLOP/step, "
          f"matmul peak {peak['peak_gflops']:.1f} GFLOP/s (jax {peak['jax_gflops']:.1f}, torch {peak['torch_gflops']:.1f})")
    for name in ("ours", "torch"):
        r = res[name]
        print(f"{name:5s}: {r['step_s_median']:.3f} s/step (min {r['step_s_min']:.3f})  {r['tokens_per_s']:,.0f} tok/s  "
              f"{r['gflops']:.1f} GFLOP/s = {r['pct_of_peak']:.0f}% of peak")
    print(f"ours / torch tokens/s: {res['speedup_ours_over_torch']:.2f}x (ours compiled in {compile_s:.1f} s)")
    print("loss ours : " + " ".join(f"{x:.4f}" for x in ours_losses))
    print("loss torch: " + " ".join(f"{x:.4f}" for x in torch_losses))
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
