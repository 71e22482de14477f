"""Are "orthogonal" steering vectors really distinct?  MELBO-ortho on the default model.

    .venv/bin/python scripts/orthogonal_steering.py                 # defaults, < 10 min on 2 CPUs
    .venv/bin/python scripts/orthogonal_steering.py --out runs/x --resume   # continue a killed run
    .venv/bin/python scripts/orthogonal_steering.py --k 800 --steps 1000 --lr 0.01 --block 32 \\
        --model path/to/qwen_folder --source 8 --target 16              # full scale

1. theta0, a "write code" vector by CAA (contrastive activation addition): the mean
   residual after block s over the first --reply-tokens positions of the model's OWN
   greedy replies to code requests minus the same for prose requests ("reply": the state
   of starting to write code), next to the classic CAA at the last prompt token ("last").
   CAA needs no training and no search over candidates (picking a MELBO vector that
   writes code needs generations per candidate).  Its norm is CALIBRATED: the design and
   the smallest rho = |theta0| / median|x_s| of --base-rho-grid whose steered greedy
   replies to non-coding instructions get the best "is this code?" score (table in the
   report).
2. K vectors by MELBO-ortho (batched blocks, checkpointed after every block).
3. Analysis of the found vectors and two controls (random vectors orthogonal to theta0
   with the found norms; theta0 rescaled to the found norms): raw, effective (exact and
   first order, next to the closed form), target- and last-layer, logit-level similarity;
   participation ratio, degeneracy factor, clusters.  4. The rho sweep.  5. Generations
   and the "is this code?" score.  Output: --out DIR (report.md, report.json, PNGs,
   generations.jsonl; vectors.safetensors, base.safetensors and checkpoint.safetensors,
   each read by `lens.steering.vectors.load_vectors`: vectors at resid_pre[s + 1] (= after block
   s), theta0 / losses / controls by `lens.steering.vectors.load_extras`).  Also: batched vs
   sequential MELBO-ortho (losses, norms, statistics next to the sequential run-to-run
   spread), per-phase timings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lens.steering import melbo, vectors  # noqa: E402
from lens.steering.code_score import code_score  # noqa: E402
from lens.cli import int_at_least, positive_float, positive_floats, positive_ints  # noqa: E402
from lens.steering.melbo import behaviour as mb, stages  # noqa: E402
from orthogonal_report import k_curve_plot, plots, readings_plot, write_markdown  # noqa: E402

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
# Instructions that do NOT ask for code but where code is a natural way to answer: the
# "write code" vector should tip them into Python.  The first is MELBO-ortho's training
# prompt (the original used one prompt); all of them are the analysis / generation set.
NEUTRAL = [
    "Sort these numbers from smallest to largest: 5, 2, 9, 1.",
    "How many vowels are in the word banana?",
    "What is the sum of the numbers from 1 to 10?",
    "Convert 100 degrees Fahrenheit to Celsius.",
]


# --preset: smoke (the tests; minutes on 2 cores), default (the README's figures), large
# (K = 256 and the PR-vs-K curve; 26 min on this 2-core machine, idle).  Flags given
# explicitly win over the preset.
PRESETS = {
    "smoke": dict(k=4, block=2, steps=10, calib_prompts=2, base_rho_grid="0.35,0.5", rho_grid="0.3,1",
                  gen_tokens=16, gen_vectors=4, gen_prompts=1, compare_k=2, compare_seeds=2, chunk=4,
                  control_seeds=2, n_boot=30, readings_prompts=2),
    "default": dict(),
    "large": dict(k=256, block=32, base_rho=0.5, compare_k=0, rho_grid="1", gen_vectors=256, gen_prompts=4,
                  control_seeds=2, n_boot=100, readings_prompts=4, k_curve="2,4,8,16,32,64,128,192,256"),
}


# Rescaled and random-control generations: at most this many (the found vectors: all of
# --gen-vectors, for the per-vector behaviour).
GEN_CONTROLS = 16


def parse_args(argv=None):
    """The command line, every value checked before anything is loaded (argparse's message
    and exit status 2 on a bad one).  The source / target blocks are checked against the
    model's depth once it is loaded (`layers`)."""
    n_prompts = len(NEUTRAL)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default="default")
    preset = pre.parse_known_args(argv)[0].preset
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default",
                    help="smoke (tests, minutes), default (README figures, ~10 min), large (K = 256, PR vs K, every vector scored)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="embedded name or HF folder / GGUF")
    ap.add_argument("--random-weights", action="store_true", help="SmolLM2-shaped random model, random prompts (pipeline check)")
    ap.add_argument("--source", type=int_at_least(0), default=None, help="residual after block s (default ~n/4)")
    ap.add_argument("--target", type=int_at_least(1), default=None, help="residual after block t (default ~n/2)")
    ap.add_argument("--k", type=int_at_least(1), default=16, help="MELBO-ortho vectors")
    ap.add_argument("--block", type=int_at_least(1), default=8, help="vectors per batched block")
    ap.add_argument("--mode", choices=("batched", "sequential"), default="batched")
    ap.add_argument("--steps", type=int_at_least(1), default=60)
    ap.add_argument("--lr", type=positive_float, default=0.3,
                    help="Adam lr (original: 0.01 over 1000 steps; over 60 steps 0.01 leaves the vectors at "
                         "cos 0.99 with their random init, 0.3 cuts the loss 71 -> 23 on the default model)")
    ap.add_argument("--base-rho-grid", type=positive_floats, default="0.25,0.35,0.5,0.75",
                    help="calibration grid for |theta0| / median|x_s|: the smallest rho with the best code score wins")
    ap.add_argument("--base-rho", type=positive_float, default=None, help="skip calibration: CAA at this rho")
    ap.add_argument("--calib-prompts", type=int_at_least(1), default=4, help=f"at most {n_prompts}")
    ap.add_argument("--reply-tokens", type=int_at_least(1), default=8,
                    help="reply positions averaged by the 'reply' CAA design")
    ap.add_argument("--train-prompts", type=int_at_least(1), default=1,
                    help=f"prompts in the objective (original: 1; at most {n_prompts})")
    ap.add_argument("--analysis-prompts", type=int_at_least(1), default=2,
                    help=f"prompts of the analysis / rho sweep (at most {n_prompts})")
    ap.add_argument("--rho-grid", type=positive_floats, default="0.1,0.3,1,3")
    ap.add_argument("--gen-tokens", type=int_at_least(1), default=64)
    ap.add_argument("--gen-vectors", type=int_at_least(0), default=4, help="found / control vectors generated from")
    ap.add_argument("--gen-prompts", type=int_at_least(1), default=2, help=f"at most {n_prompts}")
    ap.add_argument("--gen-batch", type=int_at_least(1), default=32, help="rows per generate call (one compiled shape)")
    ap.add_argument("--compare-k", type=int_at_least(0), default=4, help="mode comparison: vectors per run (0: skip)")
    ap.add_argument("--compare-seeds", type=int_at_least(0), default=3, help="mode comparison: runs (seeds) per mode")
    ap.add_argument("--objective-positions", choices=("all", "no-first"), default="all",
                    help="positions MELBO-ortho's objective averages over: every real token (the original) "
                         "or all but position 0 (the attention sink)")
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    ap.add_argument("--chunk", type=int_at_least(1), default=8, help="vectors per compiled analysis call")
    ap.add_argument("--control-seeds", type=int_at_least(1), default=3,
                    help="random-control draws for the two readings (shared vs specific; spreads)")
    ap.add_argument("--n-boot", type=int_at_least(10), default=200, help="bootstrap draws over tokens")
    ap.add_argument("--readings-prompts", type=int_at_least(1), default=4,
                    help=f"prompts whose every real token is a unit of the readings (at most {n_prompts})")
    ap.add_argument("--k-curve", type=positive_ints, default=None,
                    help="PR vs K at these K (first K found vs a control draw), e.g. 2,4,8,16")
    ap.add_argument("--out", default=None)
    ap.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    ap.set_defaults(**PRESETS[preset])
    args = ap.parse_args(argv)
    if isinstance(args.base_rho_grid, str):  # preset strings go through the same types
        args.base_rho_grid = positive_floats(args.base_rho_grid)
    if isinstance(args.rho_grid, str):
        args.rho_grid = positive_floats(args.rho_grid)
    if isinstance(args.k_curve, str):
        args.k_curve = positive_ints(args.k_curve)
    if args.k_curve is not None and (min(args.k_curve) < 2 or max(args.k_curve) > args.k):
        ap.error(f"--k-curve sizes must lie in [2, --k = {args.k}]; got {args.k_curve}")
    for flag in ("calib_prompts", "train_prompts", "analysis_prompts", "gen_prompts", "readings_prompts"):
        if getattr(args, flag) > n_prompts:
            ap.error(f"argument --{flag.replace('_', '-')}: at most {n_prompts} (the prompts in NEUTRAL); "
                     f"got {getattr(args, flag)}")
    if args.source is not None and args.target is not None and args.target <= args.source:
        ap.error(f"--target {args.target} must be a later block than --source {args.source}")
    if args.resume and args.out is None:
        ap.error("--resume continues the run in --out: give --out")
    return args


def layers(args, n: int) -> tuple[int, int]:
    """(source, target) blocks: the flags or the defaults (~n/4, ~n/2), checked against n."""
    s = args.source if args.source is not None else max(0, round(n / 4) - 1)
    t = args.target if args.target is not None else max(s + 1, round(n / 2))
    if not 0 <= s < t <= n - 1:
        raise SystemExit(f"--source {s} / --target {t}: this model has blocks 0..{n - 1}; "
                         "need 0 <= source < target <= " + str(n - 1))
    return s, t


def load(args):
    """(model, tokenizer or None, prompt maker).  Without a tokenizer (a bare HF folder, or
    --random-weights) a prompt is 8-20 random ids seeded by the text's crc32: deterministic."""
    import zlib

    def random_prompt(vocab):
        def make(text):
            rs = np.random.RandomState(zlib.crc32(text.encode()))
            return [int(i) for i in rs.randint(0, vocab, 8 + zlib.crc32(text.encode()) % 13)]
        return make

    if args.random_weights:
        import models
        from models.io.embedded import SMOLLM2_135M_HF_CONFIG
        from models.families.llama import config_from_hf

        model = models.init(config_from_hf(SMOLLM2_135M_HF_CONFIG), jax.random.key(0))
        return model, None, random_prompt(model.config.vocab_size)
    import models
    from models.generation.generate import chat_prompt

    model, tok = models.load(args.model)
    if tok is None:
        return model, None, random_prompt(model.config.vocab_size)
    if getattr(tok, "chat_template", None) is None:
        # A base model (e.g. gemma3-270m): the prompts go in as plain text (the report says so).
        print(f"{args.model}: no chat template, prompts are plain text")
        return model, tok, lambda text: tok.encode(text)
    return model, tok, lambda text: chat_prompt(tok, text)


def caa_vector(model, prompts_a, prompts_b, layer):
    """CAA at the last prompt token: mean over pairs of resid_pre[layer](a) - (b) at each
    prompt's last token (`lens.steering.vectors.mean_difference`)."""
    (ta, ma), (tb, mb) = melbo.pad_prompts(prompts_a), melbo.pad_prompts(prompts_b)
    return np.asarray(vectors.mean_difference(model, ta, tb, layer, ma, mb, reduce="last"))


def decoder(tok):
    """Token ids -> text: the tokenizer's, or the ids themselves without one."""
    return (lambda ids: tok.decode(ids)) if tok is not None else (lambda ids: " ".join(map(str, ids)))


def steered_generate(args, model, tok, layer, prompts, vecs):
    """Greedy generations of every prompt under every vector (added at `layer` on every
    prompt and generated token), vector-major; calls of --gen-batch // len(prompts)
    vectors, so every call of a run reuses ONE compiled prefill/decode."""
    per_call = max(1, args.gen_batch // len(prompts))
    out = vectors.generate_with_vectors(model, prompts, np.asarray(vecs, np.float32), layer, args.gen_tokens,
                                         vectors_per_call=per_call)
    dec = decoder(tok)
    rows = vectors.new_token_lists(out.reshape(-1, out.shape[-1]), model.config.eos_token_ids)
    return [dec(row) for row in rows]


def calibrate_base(args, model, tok, make, layer, x_norm, prompts):
    """theta0: the CAA design (code requests vs prose requests; "reply" = the first reply
    tokens, `lens.steering.vectors.reply_mean_difference`; "last" = the last prompt token) and
    rho = |theta0| / median|x_s| chosen by `lens.steering.vectors.calibrate_norm` on the code score
    of greedy replies to non-coding prompts ("reply" wins ties; if nothing writes code,
    "reply" at the smallest rho, and the table says so).  Returns (theta0, the report's
    calibration record)."""
    code, prose = [make(p) for p in CODE], [make(p) for p in PROSE]
    designs = {"reply": vectors.reply_mean_difference(model, code, prose, layer, args.reply_tokens),
               "last": caa_vector(model, code, prose, layer)}
    cos = float(designs["reply"] @ designs["last"] / np.linalg.norm(designs["reply"]) / np.linalg.norm(designs["last"]))
    if args.base_rho is not None:
        v = designs["reply"]
        return v / np.linalg.norm(v) * args.base_rho * x_norm, {
            "design": "reply", "rho": args.base_rho, "calibrated": False, "table": [], "cos_reply_last": cos}
    theta0, info = vectors.calibrate_norm(
        model, designs, prompts, layer, x_norm, args.base_rho_grid, args.gen_tokens,
        score=code_score, decode=decoder(tok), vectors_per_call=max(1, args.gen_batch // len(prompts)))
    table = [{"design": r["design"], "rho": r["rho"], "norm": r["norm"], "code_score": r["score"]} for r in info["table"]]
    return theta0, {"design": info["design"], "rho": info["rho"], "calibrated": True, "wrote_code": info["scored"],
                    "table": table, "examples": info["examples"], "cos_reply_last": cos}


def mode_comparison(args, problem, analysis_problem, theta0, found, found_effects):
    """Batched vs sequential MELBO-ortho, like with like: runs of the FIRST --compare-k
    vectors (later vectors are constrained by more earlier ones and reach higher losses, so
    they are not compared with a first group) at --compare-seeds seeds, in both modes.

    Sequential: fresh runs at seeds seed, seed+1, ...  Batched (block --block): at `seed`
    the main run's first k vectors (a batched run of k is exactly those: blocks are
    orthogonalised in index order, so a vector never depends on later ones), at the other
    seeds fresh runs.  Same seed = same initial vectors in both modes, and vector 0 of a
    seed is trained identically (a block's first vector is the sequential step): its
    max |difference| between the modes is reported.  Per quantity: both modes' mean and
    max-min spread over seeds (the run-to-run spread), and whether |difference| <= spread."""
    kk = args.compare_k
    cfg = melbo.OrthoConfig(steps=args.steps, lr=args.lr)
    stats = ("effective_exact", "target", "last", "logits")
    seeds = [args.seed + i for i in range(args.compare_seeds)]

    def row(vectors, losses, analysis, seed):
        r = {"seed": seed, "loss_first": float(losses[:, 0].mean()), "loss_last": float(losses[:, -1].mean()),
             "norm_mean": float(np.linalg.norm(vectors, axis=1).mean())}
        for st in stats:
            r[f"{st}_cos_mean"] = analysis[st]["cos_mean"]
            r[f"{st}_degeneracy"] = analysis[st]["degeneracy_factor"]
        return r

    runs = {"sequential": [], "batched": []}
    first = {}
    for seed in seeds:
        for mode in ("sequential", "batched"):
            if mode == "batched" and seed == args.seed:
                res = melbo.MelboResult(found.vectors[:kk], found.losses[:kk])
                e = found_effects
                eff = melbo.SteeredEffects(e.target[:kk], e.last[:kk], e.logits[:kk], e.base_logits,
                                           e.first_share_target[:kk], e.first_share_last[:kk])
                a = melbo.analyse_vectors(analysis_problem, res.vectors, effects=eff)
            else:
                res = melbo.melbo_ortho(problem, jnp.asarray(theta0), kk, cfg, mode=mode, block_size=args.block,
                                        seed=seed, progress=True)
                a = melbo.analyse_vectors(analysis_problem, res.vectors, chunk=args.chunk)
            runs[mode].append(row(res.vectors, res.losses, a, seed))
            if seed == args.seed:
                first[mode] = np.asarray(res.vectors[0])
    summary = {}
    for key in runs["sequential"][0]:
        if key == "seed":
            continue
        seq = np.array([r[key] for r in runs["sequential"]])
        bat = np.array([r[key] for r in runs["batched"]])
        spread, bspread = float(seq.max() - seq.min()), float(bat.max() - bat.min())
        diff = float(bat.mean() - seq.mean())
        summary[key] = {"sequential_mean": float(seq.mean()), "sequential_spread": spread,
                        "batched_mean": float(bat.mean()), "batched_spread": bspread, "difference": diff,
                        "within_spread": bool(abs(diff) <= max(spread, 1e-12)),
                        "within_pooled_spread": bool(abs(diff) <= max(spread, bspread, 1e-12))}
    v0 = float(np.abs(first["batched"] - first["sequential"]).max() / np.abs(first["sequential"]).max())
    return {"k_per_run": kk, "seeds": seeds, "runs": runs, "summary": summary,
            "vector0_max_rel_diff": v0,
            "note": f"the first {kk} vectors at seeds {seeds} in each mode (batched: block {args.block}; at seed "
                    f"{args.seed} the main run's first {kk}). 'within_spread': |batched mean - sequential mean| <= "
                    "the sequential max-min spread over seeds; 'within_pooled_spread': <= the larger of the two "
                    f"modes' spreads. Vector 0 (same init, trained alike in both modes): max |difference| / max |v| "
                    f"= {v0:.1e}."}


def main(argv=None, on_checkpoint=None):
    """The whole job.  `on_checkpoint(n_done)` (a test hook) runs after every checkpoint."""
    args = parse_args(argv)
    t_start = time.time()
    timing = {}

    def lap(name, t0):
        timing[name] = round(time.time() - t0, 2)
        return time.time()

    out = Path(args.out or f"runs/orthogonal_{time.strftime('%Y%m%d_%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    model, tok, make = load(args)
    n = model.config.n_layers
    s, t = layers(args, n)
    # The CLI speaks MELBO's "after block s"; the library's layer is the one it enters.
    layer = melbo.layer_after(s)
    print(f"model {args.model} ({n} layers, d={model.config.d_model}); source {s}, target {t}")
    t0 = lap("load", t_start)

    # 1. base vector theta0 (CAA), |theta0| calibrated on the code score.
    neutral = [make(p) for p in NEUTRAL]
    toks, mask = melbo.pad_prompts(neutral[: args.train_prompts])
    problem = melbo.make_problem(model, toks, mask, s, t)
    if args.objective_positions == "no-first":
        problem = melbo.without_first_position(problem)
    toks_a, mask_a = melbo.pad_prompts(neutral[: args.analysis_prompts])
    analysis_problem = melbo.make_problem(model, toks_a, mask_a, s, t)
    x_norm = melbo.median_source_norm(analysis_problem)
    ckpt, base_file, calib_file = out / "checkpoint.safetensors", out / "base.safetensors", out / "calibration.json"
    if args.resume and calib_file.exists() and base_file.exists():
        calib = json.loads(calib_file.read_text())
        theta0 = vectors.load_vectors(base_file)[0]
    else:
        theta0, calib = calibrate_base(args, model, tok, make, layer, x_norm, neutral[: args.calib_prompts])
        calib_file.write_text(json.dumps(calib, indent=1))
        vectors.save_vectors(base_file, theta0, {"model": args.model, "layer": layer, "site": "resid_pre",
                                                  "source_layer": s, "method": f"caa-{calib['design']}",
                                                  "rho": calib["rho"]})
    print(f"theta0: {calib['design']} at rho {calib['rho']} (|theta0| {np.linalg.norm(theta0):.2f}), "
          f"wrote code: {calib.get('wrote_code')}")
    t0 = lap("calibration", t0)

    # 2. MELBO-ortho, checkpointed after every block.
    meta = {"model": args.model, "layer": layer, "site": "resid_pre", "source_layer": s, "target_layer": t,
            "method": "melbo-ortho", "steps": args.steps, "lr": args.lr, "seed": args.seed,
            "block": args.block, "mode": args.mode, "objective_positions": args.objective_positions}
    resume = None
    if args.resume and ckpt.exists():
        saved_vectors, saved_meta = vectors.load_vectors(ckpt)
        saved = vectors.load_extras(ckpt)
        # Vectors trained under other settings must not be mixed into this run.
        changed = {k: (saved_meta.get(k), v) for k, v in meta.items() if saved_meta.get(k) != v}
        if changed or not np.array_equal(saved["theta0"], theta0):
            what = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in changed.items()) or "theta0 differs"
            raise SystemExit(f"--resume: {ckpt} was trained with other settings ({what}); "
                             "resume with the same flags, or use a new --out")
        resume = melbo.MelboResult(saved_vectors, saved["losses"])
        print(f"resuming from {len(resume.vectors)} vectors")

    def checkpoint(result):
        vectors.save_vectors(ckpt, result.vectors, meta | {"n_done": len(result.vectors)},
                              extras={"theta0": theta0, "losses": result.losses})
        if on_checkpoint is not None:
            on_checkpoint(len(result.vectors))

    found = melbo.melbo_ortho(
        problem, jnp.asarray(theta0), args.k, melbo.OrthoConfig(steps=args.steps, lr=args.lr),
        mode=args.mode, block_size=args.block, seed=args.seed, resume=resume,
        on_block=checkpoint, progress=True,
    )
    t0 = lap("train", t0)
    V = found.vectors
    norms = np.linalg.norm(V, axis=1)

    # 3. analysis: found vectors and two controls.
    sets = {
        "found": V,
        "random_control": np.asarray(melbo.random_orthogonal_controls(jax.random.PRNGKey(args.seed + 1), theta0, norms)),
        "base_rescaled": np.asarray(melbo.rescale(np.tile(theta0[None], (len(V), 1)), norms)),
    }
    found_effects = melbo.steered_effects(analysis_problem, V, args.chunk)
    analyses = {}
    for name, vecs in sets.items():
        print(f"analysing {name}")
        analyses[name] = melbo.analyse_vectors(analysis_problem, vecs, chunk=args.chunk,
                                               effects=found_effects if name == "found" else None)
    all_raw = np.concatenate([theta0[None], V]).astype(np.float64)
    u = all_raw / np.linalg.norm(all_raw, axis=1, keepdims=True)
    raw_max = float(np.abs(u @ u.T - np.eye(len(u))).max())
    t0 = lap("analysis", t0)

    # 4. rho sweep (the base set is parallel at every rho: skipped).
    grid = args.rho_grid
    sweeps = {name: melbo.rho_sweep(analysis_problem, sets[name], grid, chunk=args.chunk, progress=True)
              for name in ("found", "random_control")}
    t0 = lap("rho_sweep", t0)

    # 4b. Both readings of a downstream collapse, per stage (lens.steering.melbo.stages): a shared
    # component (shared share) vs few distinct effects (specific PR), with controls over
    # several seeds and bootstrap intervals over every real token of the readings prompts.
    toks_r, mask_r = melbo.pad_prompts(neutral[: args.readings_prompts])
    readings_problem = melbo.make_problem(model, toks_r, mask_r, s, t)
    s_factor = stages.logit_metric_factor(model)  # once for both calls
    readings = stages.answer(readings_problem, V, theta0, control_seeds=tuple(range(args.control_seeds)),
                             n_boot=args.n_boot, chunk=args.chunk, progress=True, s_factor=s_factor)
    if args.k_curve:
        readings["pr_vs_k"] = stages.k_curve(readings_problem, V, theta0, args.k_curve, chunk=args.chunk,
                                             progress=True, s_factor=s_factor)
    t0 = lap("readings", t0)

    # Batched vs sequential (the agreement check).
    comparison = None
    if args.compare_k and args.compare_seeds and args.mode == "batched" and len(V) >= args.compare_k:
        comparison = mode_comparison(args, problem, analysis_problem, theta0, found, found_effects)
    t0 = lap("mode_comparison", t0)

    # 5. behaviour: steered greedy generations and the code score.
    samples, scores = generations(args, model, tok, neutral, theta0, sets, norms, layer)
    t0 = lap("generation", t0)
    behaviour = behaviour_per_vector(args, V, scores, readings)

    def mean_score(prefix):
        vals = [v for k, v in scores.items() if k.startswith(prefix)]
        return float(np.mean(vals)) if vals else None

    f = analyses["found"]
    stage_keys = {"raw": "raw", "effective": "effective_exact", "effective_first_order": "effective_first_order",
                  "target": "target", "last": "last", "logits": "logits"}
    summary = {
        "model": args.model, "source_layer": s, "target_layer": t, "k_vectors": int(len(V)),
        "objective_positions": args.objective_positions,
        "layer_choice": (f"source = residual after block {s} of {n} (~1/4 depth), target = after block {t} "
                         "(~1/2 depth), as the original's 8 and 16 of Qwen1.5-1.8B's 24 (1/3, 2/3): early "
                         "enough that the steered change passes through many blocks before the target, "
                         "late enough that the residual already carries formed features; --source/--target "
                         "override"),
        "raw_cosine_max_abs": raw_max,
        "norms": {"base": float(np.linalg.norm(theta0)), "found_mean": float(norms.mean()),
                  "found_min": float(norms.min()), "found_max": float(norms.max()),
                  "found_over_base": float(norms.mean() / np.linalg.norm(theta0)),
                  "median_source_resid": x_norm},
        "base_vector": {k: v for k, v in calib.items() if k != "examples"},
        "effective_cosine_mean": {"exact": f["effective_exact"]["cos_mean"],
                                  "first_order": f["effective_first_order"]["cos_mean"],
                                  "closed_form_at_mean_rho": f["closed_form_cosine"],
                                  "rho_mean": f["rho_mean"]},
        "downstream_cosine_mean": {"target": f["target"]["cos_mean"], "last": f["last"]["cos_mean"],
                                   "logits": f["logits"]["cos_mean"]},
        # Effects leave out position 0 (the attention-sink token); this is the share of the
        # found vectors' |effect|^2 that sits there, and what the training objective weighs.
        "first_token_effect_share": f["first_token_share"],
        "participation_ratio": {k: f[v]["participation_ratio"] for k, v in stage_keys.items()},
        "degeneracy_factor": {k: f[v]["degeneracy_factor"] for k, v in stage_keys.items()},
        "clusters": {k: f[v]["clusters"] for k, v in stage_keys.items()},
        "logit_similarity": {"kl_pairwise_mean": f["logit_kl_pairwise_mean"],
                             "topk_overlap_mean": f["logit_topk_overlap_mean"]},
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
        "mode_comparison": comparison,
        "behaviour_per_vector": behaviour,
        # The two readings (see README): shared component vs few distinct effects.
        "shared_share": readings["shared_share"],
        "specific_participation_ratio": readings["specific_participation_ratio"],
        "residual_participation_ratio": readings["residual_participation_ratio"],
        "participation_ratio_per_token": readings["participation_ratio"],
        "shared_cos_theta0": readings["shared_cos_theta0"],
        "control_spread": readings["control_spread"],
        "closed_form_per_token": readings["closed_form_per_token"],
        "readings_choices": readings["choices"],
        **({"pr_vs_k": readings["pr_vs_k"]} if "pr_vs_k" in readings else {}),
        "timing_s": timing,
    }
    settings = vars(args) | {"source": s, "target": t, "prompts_train": args.train_prompts,
                             "prompts_analysis": args.analysis_prompts, "caa_prompts": len(CODE)}
    vectors.save_vectors(out / "vectors.safetensors", V, meta | {"norm_base": float(np.linalg.norm(theta0))},
                          extras={"theta0": theta0, "random_control": sets["random_control"], "losses": found.losses})
    summary["plots"] = plots(out, {k: a for k, a in analyses.items()}, sweeps, scores)
    readings_plot(out / "readings.png", readings)  # shared share and specific PR per stage
    summary["plots"].append("readings.png")
    if "pr_vs_k" in readings:
        k_curve_plot(out / "pr_vs_k.png", readings["pr_vs_k"])
        summary["plots"].append("pr_vs_k.png")
    with open(out / "generations.jsonl", "w") as fh:
        for smp in samples:
            fh.write(json.dumps(smp) + "\n")
    lap("report", t0)
    timing["total"] = round(time.time() - t_start, 2)
    summary["peak_rss_MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    write_markdown(out, summary, analyses, settings, samples, calib)
    print(json.dumps({k: summary[k] for k in ("raw_cosine_max_abs", "norms", "effective_cosine_mean",
                                              "downstream_cosine_mean", "degeneracy_factor", "code_score",
                                              "timing_s")}, indent=1))
    print(f"wrote {out} in {time.time() - t_start:.0f} s")
    return summary


def behaviour_per_vector(args, V, scores, readings):
    """Do vectors whose (centred) effects are close also write code alike?  The first
    `gen_vectors` found vectors, clustered by specific effect at the target and logit
    stages (lens.steering.melbo.behaviour); None with fewer than 4 scored vectors."""
    g = min(args.gen_vectors, len(V))
    if g < 4:
        return None
    per_vec = np.array([scores[f"found_{i}"] for i in range(g)])
    grams = readings["found_gram"]
    n_clusters = max(2, g // 8)
    return {"code_score": per_vec.tolist(), "n_prompts": min(args.gen_prompts, len(NEUTRAL)),
            "choices": (f"code score = mean over {min(args.gen_prompts, len(NEUTRAL))} greedy replies of "
                        f"{args.gen_tokens} tokens; clusters: average linkage on 1 - cosine of the specific "
                        f"(centred) effects, cut into max(2, K/8) = {n_clusters}; nulls: 1000 shuffles of the scores"),
            **{st: mb.behaviour_vs_effect(grams[st][:g, :g], per_vec, n_clusters, n_perm=1000)
               for st in ("target", "logits")}}


def generations(args, model, tok, neutral, theta0, sets, norms, layer):
    """Greedy generations steered by: found vectors, random controls, found rescaled to
    |theta0|, theta0, theta0 at the found mean norm, nothing; the code score of each."""
    g = args.gen_vectors
    V = sets["found"]
    gc = min(g, len(V), GEN_CONTROLS)  # every found vector is scored; controls need fewer
    steer = {f"found_{i}": V[i] for i in range(min(g, len(V)))}
    steer |= {f"foundrescaled_{i}": V[i] / norms[i] * np.linalg.norm(theta0) for i in range(gc)}
    steer |= {f"random_{i}": sets["random_control"][i] for i in range(gc)}
    steer |= {"base": theta0, "base_at_found_norm": theta0 / np.linalg.norm(theta0) * norms.mean(),
              "unsteered": np.zeros_like(theta0)}
    prompts = neutral[: args.gen_prompts]
    rows = [p for _ in steer for p in prompts]
    labels = [lab for lab in steer for _ in prompts]
    print(f"generating {len(rows)} rows x {args.gen_tokens} tokens")
    texts = steered_generate(args, model, tok, layer, prompts, list(steer.values()))
    samples, per = [], {lab: [] for lab in steer}
    for lab, p, text in zip(labels, rows, texts):
        sc = code_score(text)
        per[lab].append(sc)
        samples.append({"label": lab, "prompt": tok.decode(p) if tok is not None else str(p[:8]),
                        "text": text, "code": sc})
    return samples, {lab: float(np.mean(v)) for lab, v in per.items()}


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
