"""Steering sweep benchmark: ours vs transformers, side by side in one run.

64 random vectors of norm 8 added to the residual stream entering the middle layer,
4 prompts x 32 tokens, final-position logits, on SmolLM2-135M:
  1. ours: lens.sweep_vectors (jit, prefix run once, vmapped tail, last-position logits)
  2. transformers, a forward pre-hook, one forward per vector (the usual hook loop)
  3. transformers, all vectors stacked into the batch (64 x 4 sequences, chunked)
Also: run_with_cache overhead vs a plain forward, and peak memory (max RSS).

    .venv/bin/python bench/steering_sweep.py                  # real weights (models.load)
    .venv/bin/python bench/steering_sweep.py --random-weights # SmolLM2's shape, random
"""

from __future__ import annotations

import argparse
import resource

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import lens  # noqa: E402
from lens.models import Capture  # noqa: E402


from bench_common import best_time as timed, load_pair  # noqa: E402
from lens.cli import int_at_least, positive_float  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)


def parse_args(argv=None):
    """The command line, every value checked before any model is built."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--vectors", type=int_at_least(1), default=64)
    p.add_argument("--prompts", type=int_at_least(1), default=4)
    p.add_argument("--seq", type=int_at_least(1), default=32)
    p.add_argument("--norm", type=positive_float, default=8.0)
    p.add_argument("--repeats", type=int_at_least(1), default=2)
    p.add_argument("--batch-chunk", type=int_at_least(1), default=64, help="sequences per HF stacked forward")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    model, hf, _ = load_pair(args.random_weights)
    c = model.config
    layer = c.n_layers // 2
    rng = np.random.RandomState(0)
    prompts = rng.randint(0, c.vocab_size, size=(args.prompts, args.seq)).astype(np.int32)
    vecs = rng.randn(args.vectors, c.d_model).astype(np.float32)
    vecs *= args.norm / np.linalg.norm(vecs, axis=1, keepdims=True)
    K, P = args.vectors, args.prompts
    print(f"SmolLM2-135M shape ({'random' if args.random_weights else 'real'} weights), "
          f"{K} vectors x {P} prompts x {args.seq} tokens, layer {layer}; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch threads {torch.get_num_threads()}")

    # 1. ours
    out = {}

    def ours():
        out["r"] = lens.sweep_vectors(model, prompts, vecs, coeffs=[1.0], layers=[layer],
                                      config=lens.SweepConfig(progress=False, keep_logits=True))
        out["r"].logits.block_until_ready()

    t_ours = timed(ours, args.repeats)
    ours_logits = np.asarray(out["r"].logits[:, 0, 0])  # [K, P, vocab]

    # 2. transformers hook loop
    ids = torch.as_tensor(prompts, dtype=torch.long)
    target = hf.model.layers[layer]
    current = {}
    hook = target.register_forward_pre_hook(
        lambda m, a: (a[0] + current["v"],) + a[1:])
    hook_last = np.zeros((K, P, c.vocab_size), np.float32)

    def hook_loop():
        with torch.no_grad():
            for k in range(K):
                current["v"] = torch.as_tensor(vecs[k])
                hook_last[k] = hf(input_ids=ids).logits[:, -1].numpy()

    t_loop = timed(hook_loop, max(1, args.repeats - 1))
    hook.remove()

    # 3. transformers, vectors stacked into the batch
    stacked_ids = ids.repeat(K, 1)  # [K*P, seq], vector k on rows k*P..k*P+P-1
    stacked_v = torch.as_tensor(np.repeat(vecs, P, axis=0))[:, None, :]
    rows = {}
    hook = target.register_forward_pre_hook(lambda m, a: (a[0] + rows["v"],) + a[1:])
    stack_last = np.zeros((K * P, c.vocab_size), np.float32)

    def stacked():
        with torch.no_grad():
            for s in range(0, K * P, args.batch_chunk):
                rows["v"] = stacked_v[s:s + args.batch_chunk]
                stack_last[s:s + args.batch_chunk] = hf(input_ids=stacked_ids[s:s + args.batch_chunk]).logits[:, -1].numpy()

    t_stack = timed(stacked, max(1, args.repeats - 1))
    hook.remove()

    err_loop = float(np.abs(ours_logits - hook_last).max())
    err_stack = float(np.abs(ours_logits.reshape(K * P, -1) - stack_last).max())
    print(f"\n{'method':<44}{'seconds':>9}{'vectors/s':>11}{'ours is':>10}")
    for name, t in [("ours (jit, vmap, shared prefix, last logits)", t_ours),
                    ("transformers hook, one forward per vector", t_loop),
                    (f"transformers, vectors stacked in batch ({args.batch_chunk}/fwd)", t_stack)]:
        print(f"{name:<44}{t:>9.2f}{K / t:>11.1f}{t / t_ours:>9.2f}x")
    print(f"max |logit diff| ours vs hook loop {err_loop:.2e}, vs stacked {err_stack:.2e}")

    # run_with_cache overhead vs a plain forward (same batch, jitted both)
    # the model is an argument (as in run_with_cache), not a closed-over constant
    plain = eqx.filter_jit(lambda m, t: jax.vmap(m)(t))
    tok = jnp.asarray(prompts)
    t_plain = timed(lambda: plain(model, tok).block_until_ready(), args.repeats + 1)
    t_cache = timed(lambda: jax.block_until_ready(lens.run_with_cache(model, tok)), args.repeats + 1)
    t_all = timed(lambda: jax.block_until_ready(
        lens.run_with_cache(model, tok, capture=Capture.all(attn_pattern=True))), args.repeats + 1)
    print(f"\nplain forward {P}x{args.seq}: {t_plain * 1e3:.1f} ms; run_with_cache (default capture) "
          f"{t_cache * 1e3:.1f} ms = {t_cache / t_plain:.2f}x; with attention patterns "
          f"{t_all * 1e3:.1f} ms = {t_all / t_plain:.2f}x")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS of the whole process, both frameworks loaded): {rss:.0f} MiB")


if __name__ == "__main__":
    main()
