"""The command line of scripts/orthogonal_steering.py (the main job): its presets, its
flags (every value checked before anything is loaded: argparse's message, exit status 2)
and the source / target blocks checked against the model's depth."""

from __future__ import annotations

import argparse

from lens.cli import Preset, int_at_least, positive_float, positive_floats, positive_ints
from lens.steering.prompts import BEHAVIOUR, NEUTRAL


# --preset: smoke (the tests; minutes on 2 cores), default (the README's figures), large
# (K = 256 and the PR-vs-K curve, trained on until 30 vectors write code), paper (the
# original recipe for a local Qwen2-family folder with d >= 2,048 on one 80 GB GPU; only its
# plan without a GPU).  Flags given explicitly win over the preset.
PRESETS = {
    "smoke": Preset(k=4, block=2, steps=10, calib_prompts=2, base_rho_grid="0.35,0.5", rho_grid="0.3,1",
                  gen_tokens=16, gen_vectors=4, gen_prompts=1, compare_k=0, compare_seeds=2, chunk=4,
                  control_seeds=2, n_boot=30, readings_prompts=2, melbo_seeds=2, behaviour_tokens=8),
    "default": Preset(compare_k=0),
    "large": Preset(k=256, block=32, base_rho=0.5, compare_k=0, rho_grid="1", gen_vectors=16, gen_prompts=4,
                  control_seeds=2, n_boot=100, readings_prompts=4, k_curve="2,4,8,16,32,64,128,192,256",
                  melbo_seeds=2, min_code_writers=30, max_k=512),
    "paper": Preset(k=800, steps=1000, lr=0.01, block=32, source=8, target=16, compare_k=0, rho_grid="1",
                  gen_vectors=16, control_seeds=2, n_boot=100, melbo_seeds=2, min_code_writers=30),
}


def parse_args(argv=None, description: str | None = None):
    """The command line (`description`: the help text), every value checked before anything is loaded (argparse's message
    and exit status 2 on a bad one).  The source / target blocks are checked against the
    model's depth once it is loaded (`layers`)."""
    n_prompts = len(NEUTRAL)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default="default")
    preset = pre.parse_known_args(argv)[0].preset
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default",
                    help="smoke (tests, minutes), default (README figures, 3 seeds, 5-10 min), large (K = 256, "
                         "PR vs K, trained on until 30 vectors write code), paper (the original recipe; its plan without a GPU)")
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
    ap.add_argument("--melbo-seeds", type=int_at_least(1), default=3,
                    help="MELBO-ortho runs (seeds --seed, --seed + 1, ...): every headline number with its spread")
    ap.add_argument("--behaviour-prompts", type=int_at_least(1), default=len(BEHAVIOUR),
                    help=f"non-coding prompts every found vector is scored on (at most {len(BEHAVIOUR)})")
    ap.add_argument("--behaviour-tokens", type=int_at_least(1), default=48, help="greedy tokens per scored reply")
    ap.add_argument("--code-min-replies", type=int_at_least(1), default=1,
                    help="a vector 'writes code' when at least this many of its replies hold real Python")
    ap.add_argument("--min-code-writers", type=int_at_least(0), default=0,
                    help="keep training blocks until this many vectors write code (or --max-k is reached)")
    ap.add_argument("--max-k", type=int_at_least(1), default=None, help="the most vectors --min-code-writers may train")
    ap.add_argument("--plan-only", action="store_true",
                    help="print the training plan (FLOPs, memory, time; lens.steering.melbo.plan) and stop "
                         "(automatic for --preset paper without a GPU)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    ap.set_defaults(**PRESETS[preset])
    return checked(ap, ap.parse_args(argv))


def checked(ap, args):
    """Preset strings through the flags' own types, and the checks across flags (ap.error)."""
    n_prompts = len(NEUTRAL)
    if isinstance(args.base_rho_grid, str):  # preset strings go through the same types
        args.base_rho_grid = positive_floats(args.base_rho_grid)
    if isinstance(args.rho_grid, str):
        args.rho_grid = positive_floats(args.rho_grid)
    if isinstance(args.k_curve, str):
        args.k_curve = positive_ints(args.k_curve)
    if args.k_curve is not None and (min(args.k_curve) < 2 or max(args.k_curve) > args.k):
        ap.error(f"--k-curve sizes must lie in [2, --k = {args.k}]; got {args.k_curve}")
    if args.behaviour_prompts > len(BEHAVIOUR):
        ap.error(f"argument --behaviour-prompts: at most {len(BEHAVIOUR)}; got {args.behaviour_prompts}")
    if args.code_min_replies > args.behaviour_prompts:
        ap.error(f"--code-min-replies {args.code_min_replies} exceeds --behaviour-prompts {args.behaviour_prompts}")
    if args.max_k is not None and args.max_k < args.k:
        ap.error(f"--max-k {args.max_k} is below --k {args.k}")
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
