"""MELBO-ortho vectors per minute: ours batched, ours sequential, two PyTorch references.

    .venv/bin/python bench/melbo.py                    # the embedded SmolLM2-135M-Instruct
    .venv/bin/python bench/melbo.py --random-weights   # same shape, random weights
    .venv/bin/python bench/melbo.py --random-weights --steps 2 --blocks 2,4 --seq-vectors 1 --matmul-n 256

Same model, same prompt, same steps, one run.  Both PyTorch references run the original
MELBO-ortho loop (github amack315/unsupervised-steering-vectors): a forward hook on decoder
layer s that adds theta to its output, torch.optim.Adam(lr), one vector at a time, the
iterate projected off theta0 and earlier vectors after every step.  They differ only in
the forward each step runs (one shared loop, `torch_reference`):
  * torch full (as the original, the reference the goal names): the CausalLM itself,
    `hf(input_ids, output_hidden_states=True).hidden_states[t + 1]`, as the original's
    `self.model(input_ids, output_hidden_states=True).hidden_states[...]`: all n layers,
    the final norm and the lm_head logits over the whole vocabulary at every position;
  * torch truncated (a stronger baseline the original did not have): the base model
    `hf.model` cut after layer t, without the final norm (so `hidden_states[t + 1]` is
    layer t's raw output, as in the full model), and no lm_head.
Ours runs blocks 0..s once and differentiates only blocks s+1..t (`lens.steering.melbo`), batched
in blocks of B vectors (one jitted call per block; `--blocks`) or one vector at a time.
Timings include nothing but training (JAX compile time is printed separately: the first
call compiles and trains, the second, timed, only trains).

FLOPs per optimisation step and vector (matmuls only; norms, rotary, softmax, SiLU,
Adam and the projections are not counted), T tokens, per layer
    forward  = 2 T P_layer + 4 H d_head T(T+1)/2        (weights; causal QK^T and PV)
    backward = 2 T P_layer + 2 * 4 H d_head T(T+1)/2    (input gradients only: weights are
               frozen; both operands of QK^T and PV are activations, so attention counts twice)
P_layer = Q, K, V, O, up, (gate,) down weights.  ours = (t-s) x (forward + backward);
torch truncated = (t+1) x forward + (t-s) x backward; torch full = n x forward + 2 T d vocab
(lm_head) + (t-s) x backward.  Achieved GFLOP/s are shown against this CPU's float32
matmul peak, measured in the same run (`bench_common.matmul_peak`).
"""

from __future__ import annotations

import argparse
import os
import time

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench_common import load_pair, matmul_peak  # noqa: E402
from lens.cli import int_at_least, positive_ints as int_list  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)


def build(random_weights: bool):
    """(our model, the transformers model, token ids of one prompt), the same weights."""
    ours, hf, _ = load_pair(random_weights)
    if random_weights:
        return ours, hf, list(np.random.RandomState(0).randint(0, 49152, 24))
    from lens import models
    from lens.models.generation.generate import chat_prompt

    _, tok = models.load("smollm2-135m-instruct")
    return ours, hf, chat_prompt(tok, "Tell me a short story about a lighthouse keeper.")


# ----------------------------------------------------------------------------- FLOPs
def layer_flops(c, n_tok: int) -> tuple[float, float]:
    """(forward, input-gradient backward) matmul FLOPs of one block over one prompt of n_tok tokens."""
    p_layer = (c.d_model * c.n_heads * c.d_head + 2 * c.d_model * c.n_kv_heads * c.d_head
               + c.n_heads * c.d_head * c.d_model + (3 if c.gated_mlp else 2) * c.d_model * c.d_mlp)
    dense = 2 * n_tok * p_layer
    attn = 4 * c.n_heads * c.d_head * n_tok * (n_tok + 1) / 2
    return dense + attn, dense + 2 * attn


def step_flops(c, n_tok: int, source: int, target: int) -> dict:
    """Matmul FLOPs of one optimisation step of one vector, per method (see the docstring)."""
    fwd, bwd = layer_flops(c, n_tok)
    k = target - source  # blocks s+1..t
    return {
        "ours": k * (fwd + bwd),
        "torch full": c.n_layers * fwd + 2 * n_tok * c.d_model * c.vocab_size + k * bwd,
        "torch truncated": (target + 1) * fwd + k * bwd,
    }


# ----------------------------------------------------------------------------- torch
def torch_reference(hf, tokens, theta0, n_vectors, steps, source, target, lr, seed, full, init=None):
    """The original loop: hook + Adam + projection, one vector at a time.
    full=True: the whole CausalLM every step, as the original; False: cut after layer t.
    init: optional [n_vectors, d] raw normal draws used instead of torch.randn (the parity
    test passes lens.steering.melbo's draws, so both sides start from the same vectors).
    Returns (training seconds, the vectors [n_vectors, d])."""
    import torch

    torch.manual_seed(seed)
    layers, norm = hf.model.layers, hf.model.norm
    ids = torch.as_tensor([tokens])
    if full:
        def forward():  # the original's self.model(...): CausalLM, lm_head included
            return hf(input_ids=ids, output_hidden_states=True).hidden_states[target + 1][0]
    else:
        hf.model.layers = layers[: target + 1]
        hf.model.norm = torch.nn.Identity()  # hidden_states[-1] is the normed last one

        def forward():
            return hf.model(input_ids=ids, output_hidden_states=True).hidden_states[target + 1][0]

    theta0 = torch.as_tensor(np.array(theta0))  # a writable copy
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
            ref = forward().mean(0)
        found = [theta0 / theta0.norm()]
        vectors = []
        t0 = time.perf_counter()
        for i in range(n_vectors):
            v = torch.randn_like(theta0) if init is None else torch.as_tensor(np.array(init[i], np.float32))
            for q in found:
                v = v - (v @ q) * q
            v = (v / v.norm() * theta0.norm()).requires_grad_(True)
            opt = torch.optim.Adam([v], lr=lr)
            for _ in range(steps):
                opt.zero_grad()
                state["v"] = v
                loss = (forward().mean(0) - ref).norm()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for q in found:
                        v -= (v @ q) * q
            with torch.no_grad():
                vectors.append(v.detach().clone().numpy())
                u = v.detach().clone()
                for q in found:
                    u = u - (u @ q) * q
                found.append(u / u.norm())
        return time.perf_counter() - t0, np.stack(vectors)
    finally:
        handle.remove()
        hf.model.layers, hf.model.norm = layers, norm


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    """The command line, every value checked before any model is built."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random-weights", action="store_true", help="HF Llama with SmolLM2's shape, random")
    ap.add_argument("--source", type=int_at_least(0), default=7)
    ap.add_argument("--target", type=int_at_least(1), default=15)
    ap.add_argument("--steps", type=int_at_least(1), default=30)
    ap.add_argument("--blocks", type=int_list, default="8,32",
                    help="comma-separated block sizes for ours batched (one block of B vectors each)")
    ap.add_argument("--seq-vectors", type=int_at_least(1), default=2, help="vectors for ours sequential / each torch")
    ap.add_argument("--threads", type=int_at_least(1), default=2)
    ap.add_argument("--matmul-n", type=int_at_least(1), default=2048, help="size of the matmul-peak measurement")
    args = ap.parse_args(argv)
    if args.target <= args.source:
        ap.error(f"--target {args.target} must be a later block than --source {args.source}")
    return args


def main(argv=None):
    args = parse_args(argv)
    blocks = args.blocks

    import torch

    torch.set_num_threads(args.threads)
    from lens.steering import melbo

    ours, hf, tokens = build(args.random_weights)
    c = ours.config
    toks, mask = melbo.pad_prompts([tokens])
    problem = melbo.make_problem(ours, toks, mask, args.source, args.target)
    theta0 = 7.0 * jax.random.normal(jax.random.PRNGKey(1), (c.d_model,)) / np.sqrt(c.d_model)
    cfg = melbo.OrthoConfig(steps=args.steps, lr=0.01)
    print(f"model d={c.d_model} layers={c.n_layers} heads={c.n_heads}/{c.n_kv_heads} "
          f"d_mlp={c.d_mlp} vocab={c.vocab_size}, {len(tokens)} tokens, s={args.source} "
          f"t={args.target}, {args.steps} steps, jax {jax.__version__}, torch {torch.__version__}, "
          f"torch threads {args.threads}")

    def timed(n, mode, block):
        t = time.perf_counter()
        melbo.melbo_ortho(problem, theta0, n, cfg, run=melbo.MelboRunConfig(mode=mode, block_size=block))
        return time.perf_counter() - t

    peak = matmul_peak(args.matmul_n)["peak_gflops"]
    flops = step_flops(c, len(tokens), args.source, args.target)

    rows = {}  # name: (vectors, seconds, compile seconds, FLOP key)
    for b in blocks:
        comp = timed(b, "batched", b)  # first call: compile + run
        w = timed(b, "batched", b)
        rows[f"ours batched B={b}"] = (b, w, comp - w, "ours")
    comp = timed(1, "sequential", 1)
    w = timed(args.seq_vectors, "sequential", 1)
    rows["ours sequential"] = (args.seq_vectors, w, comp - w / args.seq_vectors, "ours")
    ref = (theta0, args.seq_vectors, args.steps, args.source, args.target, 0.01, 0)
    t_full, v_full = torch_reference(hf, tokens, *ref, full=True)
    rows["torch full (original)"] = (args.seq_vectors, t_full, 0.0, "torch full")
    t_trunc, v_trunc = torch_reference(hf, tokens, *ref, full=False)
    rows["torch truncated"] = (args.seq_vectors, t_trunc, 0.0, "torch truncated")

    g = {k: v / 1e9 for k, v in flops.items()}
    print(f"matmul GFLOP per step and vector ({len(tokens)} tokens): ours {g['ours']:.2f} "
          f"(blocks {args.source + 1}..{args.target} fwd+bwd), torch full {g['torch full']:.2f} "
          f"({c.n_layers} blocks fwd + lm_head {2 * len(tokens) * c.d_model * c.vocab_size / 1e9:.2f} "
          f"+ {args.target - args.source} bwd), torch truncated {g['torch truncated']:.2f} "
          f"({args.target + 1} fwd + {args.target - args.source} bwd)")
    print(f"best-case ratio at equal GFLOP/s: vs torch full {g['torch full'] / g['ours']:.2f}x, "
          f"vs torch truncated {g['torch truncated'] / g['ours']:.2f}x; float32 matmul peak "
          f"({args.matmul_n}^3) {peak:.1f} GFLOP/s")
    rate = {k: n / sec for k, (n, sec, _, _) in rows.items()}
    full, trunc = rate["torch full (original)"], rate["torch truncated"]
    print(f"\n| method | vectors | seconds | vec/min | vs torch full | vs torch trunc | "
          f"GFLOP/s | % of peak | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (n, sec, comp, key) in rows.items():
        gfs = n * args.steps * g[key] / sec
        print(f"| {name} | {n} | {sec:.1f} | {60 * rate[name]:.2f} | {rate[name] / full:.2f}x | "
              f"{rate[name] / trunc:.2f}x | {gfs:.1f} | {100 * gfs / peak:.0f}% | {comp:.1f} |")
    ceiling = 60 * peak / (args.steps * g["ours"])
    print(f"\nours at 100% of the matmul peak: {ceiling:.1f} vec/min = {ceiling / 60 / full:.2f}x torch "
          f"full, {ceiling / 60 / trunc:.2f}x torch truncated (as measured here)")
    print(f"torch full vs truncated vectors, max |diff|: {np.abs(v_full - v_trunc).max():.2e} "
          f"(max |v| {np.abs(v_full).max():.2e})")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
