"""Are "orthogonal" steering vectors really distinct?  MELBO-ortho on the default model.

    .venv/bin/python scripts/orthogonal_steering.py                 # defaults, < 10 min on 2 CPUs
    .venv/bin/python scripts/orthogonal_steering.py --out runs/x --resume   # continue a killed run
    .venv/bin/python scripts/orthogonal_steering.py --k 800 --steps 1000 --block 32 \\
        --model path/to/qwen_folder --source 8 --target 16              # full scale

1. theta0, a "write code" vector by CAA: mean difference of the residual after block s at
   the last prompt token (the assistant's first position) between code requests and
   matched prose requests, scaled to --base-rho * median|x_s|.  CAA is deterministic, needs
   no training and no code detector in the loop (picking a MELBO vector that writes code
   needs generations per candidate); the code score below checks that it works.
2. K vectors by MELBO-ortho (batched blocks, checkpointed after every block).
3. Analysis of the found vectors and two controls (random vectors orthogonal to theta0
   with the found norms; theta0 rescaled to the found norms): raw, effective (exact and
   first order, next to the closed form), target- and last-layer, logit-level similarity;
   participation ratio, degeneracy factor, clusters.  4. The rho sweep.  5. Generations
   and the "is this code?" score.  Output: --out DIR (report.md, report.json, PNGs,
   vectors.safetensors, generations.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lens import melbo  # noqa: E402
from orthogonal_report import code_score, load_vectors, plots, save_vectors, write_markdown  # noqa: E402

CODE = [
    "Write a Python function that reverses a string.",
    "Write a Python function to check whether a number is prime.",
    "Write Python code that reads a CSV file and prints the first row.",
    "Implement binary search in Python.",
    "Write a Python script that counts the words in a text.",
    "Write a Python class for a simple stack.",
    "Write a Python function that returns the factorial of n.",
    "Write Python code to sort a list of dictionaries by a key.",
]
PROSE = [
    "Write a short poem about the sea.",
    "Write a paragraph about why people enjoy autumn.",
    "Write a short story about a lost dog finding its way home.",
    "Describe the city of Paris in a few sentences.",
    "Write a letter thanking a friend for a birthday gift.",
    "Explain why the sky is blue in simple words.",
    "Write a few sentences about your favourite holiday.",
    "Describe a sunrise over the mountains.",
]
NEUTRAL = [
    "Tell me about your weekend plans.",
    "What is a good way to spend a rainy afternoon?",
    "Give me some advice for a job interview.",
    "What should I cook for dinner tonight?",
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="embedded name or HF folder / GGUF")
    ap.add_argument("--random-weights", action="store_true", help="SmolLM2-shaped random model, random prompts (pipeline check)")
    ap.add_argument("--source", type=int, default=None, help="residual after block s (default ~n/4)")
    ap.add_argument("--target", type=int, default=None, help="residual after block t (default ~n/2)")
    ap.add_argument("--k", type=int, default=16, help="MELBO-ortho vectors")
    ap.add_argument("--block", type=int, default=8, help="vectors per batched block")
    ap.add_argument("--mode", choices=("batched", "sequential"), default="batched")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--base-rho", type=float, default=0.3, help="|theta0| = base_rho * median|x_s|")
    ap.add_argument("--train-prompts", type=int, default=1, help="neutral prompts in the objective (original: 1)")
    ap.add_argument("--rho-grid", default="0.1,0.3,1,3")
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--gen-vectors", type=int, default=4, help="found / control vectors generated from")
    ap.add_argument("--gen-prompts", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=8, help="vectors per compiled analysis call")
    ap.add_argument("--out", default=None)
    ap.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    return ap.parse_args(argv)


def load(args):
    """(model, tokenizer or None, prompt maker)."""
    if args.random_weights:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
        from melbo import build  # bench/melbo.py

        model, _, _ = build(True)
        rs = np.random.RandomState(0)
        return model, None, lambda text: list(rs.randint(0, model.config.vocab_size, 12 + len(text) % 9))
    import models
    from models.generate import chat_prompt

    model, tok = models.load(args.model)
    return model, tok, lambda text: chat_prompt(tok, text)


def caa_vector(model, prompts_a, prompts_b, source):
    """mean_a x_s[last] - mean_b x_s[last]: residual after block s at the last token."""
    def last_resid(prompts):
        toks, mask = melbo.pad_prompts(prompts)
        x = np.asarray(melbo.make_problem(model, toks, mask, source, source + 1).x_src)
        return np.stack([x[i, mask[i].sum() - 1] for i in range(len(prompts))])

    return last_resid(prompts_a).mean(0) - last_resid(prompts_b).mean(0)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    out = Path(args.out or f"runs/orthogonal_{time.strftime('%Y%m%d_%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    model, tok, make = load(args)
    n = model.config.n_layers
    s = args.source if args.source is not None else max(0, round(n / 4) - 1)
    t = args.target if args.target is not None else max(s + 1, round(n / 2))
    print(f"model {args.model} ({n} layers, d={model.config.d_model}); source {s}, target {t}")

    # 1. base vector theta0 by CAA, scaled to base_rho * median |x_s| on the neutral prompts.
    neutral = [make(p) for p in NEUTRAL]
    train = neutral[: args.train_prompts]
    toks, mask = melbo.pad_prompts(train)
    problem = melbo.make_problem(model, toks, mask, s, t)
    toks_a, mask_a = melbo.pad_prompts(neutral)
    analysis_problem = melbo.make_problem(model, toks_a, mask_a, s, t)
    x_norm = melbo.median_source_norm(analysis_problem)
    caa = caa_vector(model, [make(p) for p in CODE], [make(p) for p in PROSE], s)
    theta0 = caa / np.linalg.norm(caa) * args.base_rho * x_norm

    # 2. MELBO-ortho, checkpointed after every block.
    ckpt = out / "checkpoint.safetensors"
    meta = {"model": args.model, "source_layer": s, "target_layer": t, "site": "resid_post[source]",
            "method": "melbo-ortho", "steps": args.steps, "lr": args.lr, "seed": args.seed,
            "block": args.block, "mode": args.mode}
    resume = None
    if args.resume and ckpt.exists():
        saved, _ = load_vectors(ckpt)
        if not np.allclose(saved["theta0"], theta0, atol=1e-5):
            raise SystemExit("checkpoint's theta0 differs from this run's: different model/settings")
        resume = melbo.TrainResult(saved["vectors"], saved["losses"])
        print(f"resuming from {len(resume.vectors)} vectors")

    def checkpoint(result):
        save_vectors(ckpt, {"theta0": theta0, "vectors": result.vectors, "losses": result.losses},
                     meta | {"n_done": len(result.vectors)})

    t_train = time.time()
    found = melbo.melbo_ortho(
        problem, jnp.asarray(theta0), args.k, melbo.OrthoConfig(steps=args.steps, lr=args.lr),
        mode=args.mode, block_size=args.block, seed=args.seed, resume=resume,
        on_block=checkpoint, progress=True,
    )
    train_s = time.time() - t_train
    V = found.vectors
    norms = np.linalg.norm(V, axis=1)

    # 3. analysis: found vectors and two controls.
    sets = {
        "found": V,
        "random_control": np.asarray(melbo.random_orthogonal_controls(jax.random.PRNGKey(args.seed + 1), theta0, norms)),
        "base_rescaled": np.asarray(melbo.rescale(np.tile(theta0[None], (len(V), 1)), norms)),
    }
    analyses = {}
    for name, vecs in sets.items():
        print(f"analysing {name}")
        analyses[name] = melbo.analyse_vectors(analysis_problem, vecs, chunk=args.chunk)
    all_raw = np.concatenate([theta0[None], V]).astype(np.float64)
    u = all_raw / np.linalg.norm(all_raw, axis=1, keepdims=True)
    raw_max = float(np.abs(u @ u.T - np.eye(len(u))).max())

    # 4. rho sweep (the base set is parallel at every rho: skipped).
    grid = [float(r) for r in args.rho_grid.split(",")]
    sweeps = {name: melbo.rho_sweep(analysis_problem, sets[name], grid, chunk=args.chunk, progress=True)
              for name in ("found", "random_control")}

    # 5. behaviour: steered greedy generations and the code score.
    samples, scores = generations(args, model, tok, neutral, theta0, sets, norms, s)

    def mean_score(prefix):
        vals = [v for k, v in scores.items() if k.startswith(prefix)]
        return float(np.mean(vals)) if vals else None

    f = analyses["found"]
    stage_keys = {"raw": "raw", "effective": "effective_exact", "effective_first_order": "effective_first_order",
                  "target": "target", "last": "last", "logits": "logits"}
    summary = {
        "model": args.model, "source_layer": s, "target_layer": t, "k_vectors": int(len(V)),
        "raw_cosine_max_abs": raw_max,
        "norms": {"base": float(np.linalg.norm(theta0)), "found_mean": float(norms.mean()),
                  "found_min": float(norms.min()), "found_max": float(norms.max()),
                  "median_source_resid": x_norm},
        "effective_cosine_mean": {"exact": f["effective_exact"]["cos_mean"],
                                  "first_order": f["effective_first_order"]["cos_mean"],
                                  "closed_form_at_mean_rho": f["closed_form_cosine"]},
        "downstream_cosine_mean": {"target": f["target"]["cos_mean"], "last": f["last"]["cos_mean"],
                                   "logits": f["logits"]["cos_mean"]},
        "participation_ratio": {k: f[v]["participation_ratio"] for k, v in stage_keys.items()},
        "degeneracy_factor": {k: f[v]["degeneracy_factor"] for k, v in stage_keys.items()},
        "clusters": {k: f[v]["clusters"] for k, v in stage_keys.items()},
        "rho_grid": grid,
        "effective_cosine_vs_rho": sweeps["found"]["effective_cosine_vs_rho"],
        "degeneracy_vs_rho": sweeps["found"]["degeneracy_vs_rho"],
        "downstream_cosine_vs_rho": sweeps["found"]["downstream_cosine_vs_rho"],
        "closed_form_vs_rho": sweeps["found"]["closed_form"],
        "controls": {name: {k: a[v]["degeneracy_factor"] for k, v in stage_keys.items()} | {
            "cos_mean": {k: a[v]["cos_mean"] for k, v in stage_keys.items()}}
            for name, a in analyses.items() if name != "found"},
        "random_control_sweep": sweeps["random_control"],
        "code_score": {"base": scores.get("base"), "ortho_mean": mean_score("found_"),
                       "ortho_rescaled_to_base_mean": mean_score("foundrescaled_"),
                       "random_control": mean_score("random_"), "base_rescaled_to_found": scores.get("base_at_found_norm"),
                       "unsteered": scores.get("unsteered"), "per_vector": scores},
        "loss": {"first_step_mean": float(found.losses[:, 0].mean()), "last_step_mean": float(found.losses[:, -1].mean())},
        "timing_s": {"train": train_s, "total": time.time() - t_start},
    }
    settings = vars(args) | {"source": s, "target": t, "prompts_train": args.train_prompts,
                             "prompts_analysis": len(NEUTRAL), "caa_pairs": len(CODE)}
    save_vectors(out / "vectors.safetensors", {"theta0": theta0, "found": V, "random_control": sets["random_control"],
                                               "losses": found.losses}, meta | {"norm_base": float(np.linalg.norm(theta0))})
    summary["plots"] = plots(out, {k: a for k, a in analyses.items()}, sweeps, scores)
    summary["timing_s"]["total"] = time.time() - t_start
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    write_markdown(out, summary, analyses, settings, samples)
    with open(out / "generations.jsonl", "w") as fh:
        for smp in samples:
            fh.write(json.dumps(smp) + "\n")
    print(json.dumps({k: summary[k] for k in ("raw_cosine_max_abs", "norms", "effective_cosine_mean",
                                              "downstream_cosine_mean", "degeneracy_factor", "code_score")}, indent=1))
    print(f"wrote {out} in {time.time() - t_start:.0f} s")


def generations(args, model, tok, neutral, theta0, sets, norms, s):
    """Greedy generations steered by: found vectors, random controls, found rescaled to
    |theta0|, theta0, theta0 at the found mean norm, nothing; the code score of each."""
    from models import Edits
    from models.generate import generate

    g = args.gen_vectors
    V = sets["found"]
    steer = {f"found_{i}": V[i] for i in range(min(g, len(V)))}
    steer |= {f"foundrescaled_{i}": V[i] / norms[i] * np.linalg.norm(theta0) for i in range(min(g, len(V)))}
    steer |= {f"random_{i}": sets["random_control"][i] for i in range(min(g, len(V)))}
    steer |= {"base": theta0, "base_at_found_norm": theta0 / np.linalg.norm(theta0) * norms.mean(),
              "unsteered": np.zeros_like(theta0)}
    prompts = neutral[: args.gen_prompts]
    labels = list(steer)
    rows, row_vecs = [], []
    for lab in labels:
        for p in prompts:
            rows.append(p)
            row_vecs.append(steer[lab])
    n, d = model.config.n_layers, model.config.d_model
    add = np.zeros((len(rows), n, 1, d), np.float32)
    add[:, s + 1, 0] = np.stack(row_vecs)  # "after block s" = entering block s+1
    print(f"generating {len(rows)} rows x {args.gen_tokens} tokens")
    res = generate(model, rows, args.gen_tokens, edits=Edits(resid_add=jnp.asarray(add)),
                   edits_batched=True, progress=True)
    samples, per = [], {lab: [] for lab in labels}
    for i, new in enumerate(res.tokens):
        lab, p = labels[i // len(prompts)], rows[i]
        text = tok.decode(new) if tok is not None else " ".join(map(str, new))
        sc = code_score(text)
        per[lab].append(sc)
        samples.append({"label": lab, "prompt": tok.decode(p) if tok is not None else str(p[:8]),
                        "text": text, "code": sc})
    return samples, {lab: float(np.mean(v)) for lab, v in per.items()}


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
