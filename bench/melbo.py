"""MELBO-ortho vectors per minute: ours batched, ours sequential, a PyTorch reference.

    .venv/bin/python bench/melbo.py                    # the embedded SmolLM2-135M-Instruct
    .venv/bin/python bench/melbo.py --random-weights   # same shape, random weights

Same model, same prompt, same steps, one run.  The PyTorch reference works as the
original MELBO-ortho code: transformers' model, a forward hook on decoder layer s that
adds theta to its output, torch.optim.Adam(lr), one vector at a time, the iterate
projected off theta0 and earlier vectors after every step.  It is given one advantage the
original did not take: the model is truncated after the target layer (no wasted layers).
Ours runs blocks 0..s once and differentiates only blocks s+1..t (`lens.melbo`).
Timings include nothing but training (JAX compile time is printed separately).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench_common import load_pair  # noqa: E402


def build(random_weights: bool):
    """(our model, the transformers model, token ids of one prompt), the same weights."""
    ours, hf, _ = load_pair(random_weights)
    if random_weights:
        return ours, hf, list(np.random.RandomState(0).randint(0, 49152, 24))
    import models
    from models.generate import chat_prompt

    _, tok = models.load("smollm2-135m-instruct")
    return ours, hf, chat_prompt(tok, "Tell me a short story about a lighthouse keeper.")


def torch_reference(hf, tokens, theta0, n_vectors, steps, source, target, lr, seed):
    """The original loop: hook + Adam + projection, one vector at a time."""
    import torch

    torch.manual_seed(seed)
    layers = hf.model.layers
    hf.model.layers = layers[: target + 1]  # truncated after the target layer
    ids = torch.as_tensor([tokens])
    theta0 = torch.as_tensor(np.asarray(theta0))
    state = {"v": None}

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + state["v"],) + tuple(output[1:])
        return output + state["v"]

    handle = layers[source].register_forward_hook(hook)
    for p in hf.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            state["v"] = theta0
            ref = hf.model(input_ids=ids, output_hidden_states=True).hidden_states[target + 1][0].mean(0)
        found = [theta0 / theta0.norm()]
        t0 = time.perf_counter()
        for _ in range(n_vectors):
            v = torch.randn_like(theta0)
            for q in found:
                v = v - (v @ q) * q
            v = (v / v.norm() * theta0.norm()).requires_grad_(True)
            opt = torch.optim.Adam([v], lr=lr)
            for _ in range(steps):
                opt.zero_grad()
                state["v"] = v
                h = hf.model(input_ids=ids, output_hidden_states=True).hidden_states[target + 1][0]
                loss = (h.mean(0) - ref).norm()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for q in found:
                        v -= (v @ q) * q
            with torch.no_grad():
                u = v.detach().clone()
                for q in found:
                    u = u - (u @ q) * q
                found.append(u / u.norm())
        return time.perf_counter() - t0
    finally:
        handle.remove()
        hf.model.layers = layers


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random-weights", action="store_true", help="HF Llama with SmolLM2's shape, random")
    ap.add_argument("--source", type=int, default=7)
    ap.add_argument("--target", type=int, default=15)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--vectors", type=int, default=8, help="vectors for ours batched (one block)")
    ap.add_argument("--seq-vectors", type=int, default=2, help="vectors for ours sequential / torch")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from lens import melbo

    ours, hf, tokens = build(args.random_weights)
    toks, mask = melbo.pad_prompts([tokens])
    problem = melbo.make_problem(ours, toks, mask, args.source, args.target)
    theta0 = 7.0 * jax.random.normal(jax.random.PRNGKey(1), (ours.config.d_model,)) / np.sqrt(ours.config.d_model)
    cfg = melbo.OrthoConfig(steps=args.steps, lr=0.01)
    print(f"model d={ours.config.d_model} layers={ours.config.n_layers}, {len(tokens)} tokens, "
          f"s={args.source} t={args.target}, {args.steps} steps, jax {jax.__version__}, "
          f"torch threads {args.threads}")

    def timed(n, mode, block):
        t = time.perf_counter()
        melbo.melbo_ortho(problem, theta0, n, cfg, mode=mode, block_size=block)
        return time.perf_counter() - t

    rows = {}
    c = timed(args.vectors, "batched", args.vectors)  # first call: compile + run
    w = timed(args.vectors, "batched", args.vectors)
    rows["ours batched"] = (args.vectors, w, c - w)
    c = timed(1, "sequential", 1)
    w = timed(args.seq_vectors, "sequential", 1)
    rows["ours sequential"] = (args.seq_vectors, w, c - w / args.seq_vectors)
    t = torch_reference(hf, tokens, theta0, args.seq_vectors, args.steps, args.source, args.target, 0.01, 0)
    rows["torch hook + Adam"] = (args.seq_vectors, t, 0.0)

    ref = rows["torch hook + Adam"][0] / rows["torch hook + Adam"][1]
    print(f"{'method':<22}{'vectors':>8}{'seconds':>10}{'vec/min':>10}{'vs torch':>10}{'compile s':>11}")
    for name, (n, sec, comp) in rows.items():
        print(f"{name:<22}{n:>8}{sec:>10.1f}{60 * n / sec:>10.2f}{(n / sec) / ref:>9.2f}x{comp:>11.1f}")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
