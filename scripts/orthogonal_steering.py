"""Are "orthogonal" steering vectors really distinct?  MELBO-ortho on the default model.

    .venv/bin/python scripts/orthogonal_steering.py                 # defaults (5-10 min on 2 idle CPUs)
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

import json
import os
import resource
import sys
import time
from pathlib import Path

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lens.steering import melbo, vectors  # noqa: E402
from lens.steering.melbo import base_vector, experiment, plan, report, score_checkpoint, stages, verdict  # noqa: E402
from lens.steering.prompts import BEHAVIOUR, CODE, NEUTRAL, PROSE, decoder, load_model  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the command line and the report writer, also under runpy
import orthogonal_cli  # noqa: E402
from orthogonal_cli import layers  # noqa: E402
from orthogonal_report import closed_form_plot, k_curve_plot, plots, readings_plot, write_markdown  # noqa: E402


ORIGINAL_D = report.ORIGINAL_D  # the original's d (Qwen1.5-1.8B): K is also reported as K / d against it


def parse_args(argv=None):
    """The command line (`orthogonal_cli.parse_args`, this file's docstring as its help)."""
    return orthogonal_cli.parse_args(argv, description=__doc__)


def load(args):
    """(model, tokenizer or None, prompt maker): `lens.steering.prompts.load_model`."""
    return load_model(args.model, args.random_weights)


class Laps:
    """Per-phase wall times (seconds, 2 decimals) for report.json's timing_s."""

    def __init__(self):
        self.start = self.t0 = time.time()
        self.timing = {}

    def lap(self, name):
        self.timing[name] = round(time.time() - self.t0, 2)
        self.t0 = time.time()


def calibrate_base(args, model, tok, make, layer, x_norm, prompts):
    """theta0 (`lens.steering.melbo.base_vector.code_theta0`: "reply" and "last" CAA of CODE
    vs PROSE, rho fixed by --base-rho or calibrated over --base-rho-grid on the code score
    of replies to `prompts`) and the report's calibration record."""
    code, prose = [make(p) for p in CODE], [make(p) for p in PROSE]
    theta0, info = base_vector.code_theta0(
        model, code, prose, prompts, layer, x_norm, args.base_rho_grid, args.reply_tokens, args.gen_tokens,
        decoder(tok), vectors_per_call=max(1, args.gen_batch // len(prompts)), fixed_rho=args.base_rho)
    if not info["calibrated"]:
        return theta0, info
    table = [{"design": r["design"], "rho": r["rho"], "norm": r["norm"], "code_score": r["score"]} for r in info["table"]]
    return theta0, {"design": info["design"], "rho": info["rho"], "calibrated": True, "wrote_code": info["scored"],
                    "table": table, "examples": info["examples"], "cos_reply_last": info["cos_reply_last"]}


def base_phase(args, model, tok, make, s, t, layer, out):
    """1. The training / analysis problems and theta0 (read back from --out under --resume)."""
    neutral = [make(p) for p in NEUTRAL]
    toks, mask = melbo.pad_prompts(neutral[: args.train_prompts])
    problem = melbo.make_problem(model, toks, mask, s, t)
    if args.objective_positions == "no-first":
        problem = melbo.without_first_position(problem)
    toks_a, mask_a = melbo.pad_prompts(neutral[: args.analysis_prompts])
    analysis_problem = melbo.make_problem(model, toks_a, mask_a, s, t)
    x_norm = melbo.median_source_norm(analysis_problem)
    base_file, calib_file = out / "base.safetensors", out / "calibration.json"
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
    return neutral, problem, analysis_problem, x_norm, theta0, calib


def train_phase(args, problem, theta0, meta, ckpt, on_checkpoint, resume=None):
    """2. MELBO-ortho, checkpointed after every block (resumed from --out's checkpoint, or
    continued from `resume`, a result of this run)."""
    if resume is None and args.resume and ckpt.exists():
        resume = experiment.resume_checkpoint(ckpt, meta, theta0)
        print(f"resuming from {len(resume.vectors)} vectors")

    def checkpoint(result):
        vectors.save_vectors(ckpt, result.vectors, meta | {"n_done": len(result.vectors)},
                              extras={"theta0": theta0, "losses": result.losses})
        if on_checkpoint is not None:
            on_checkpoint(len(result.vectors))

    return melbo.melbo_ortho(problem, jnp.asarray(theta0), args.k, melbo.OrthoConfig(steps=args.steps, lr=args.lr),
                             run=melbo.MelboRunConfig(mode=args.mode, block_size=args.block, seed=args.seed,
                                                      progress=True),
                             resume=resume, on_block=checkpoint)


def analysis_phase(args, analysis_problem, theta0, V, laps):
    """3. The found vectors and two controls analysed; 4. the rho sweep (the base set is
    parallel at every rho: skipped)."""
    norms = np.linalg.norm(V, axis=1)
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
    laps.lap("analysis")
    sweeps = {name: melbo.rho_sweep(analysis_problem, sets[name], args.rho_grid, chunk=args.chunk, progress=True)
              for name in ("found", "random_control")}
    laps.lap("rho_sweep")
    return sets, found_effects, analyses, sweeps


def plan_phase(args, out):
    """--plan-only (automatic for --preset paper without a GPU): FLOPs, memory and time of the
    training on paper (`lens.steering.melbo.plan`), for --model's config.json when it is a
    folder, else Qwen1.5-1.8B's shape; printed and written to --out/plan.json."""
    p, lines = plan.main_job_plan(args.model, k=args.k, steps=args.steps, block=args.block, source=args.source,
                                  target=args.target, n_prompts=args.train_prompts, lr=args.lr, seeds=args.melbo_seeds)
    print("\n".join(lines))
    (out / "plan.json").write_text(json.dumps(p, indent=1))
    return p


def score_store(args, out, layer, prompts, seed):
    """The behaviour scores of MELBO seed `seed`, saved per vector as they complete
    (--out/behaviour_seed<seed>.json, `lens.steering.melbo.score_checkpoint`) and reused under --resume."""
    settings = {"model": args.model, "random_weights": args.random_weights, "layer": layer,
                "max_new_tokens": args.behaviour_tokens, "prompts": [[int(i) for i in p] for p in prompts]}
    return score_checkpoint.ScoreStore(out / f"behaviour_seed{seed}.json", settings, resume=args.resume)


def behaviour_scorer(args, model, tok, layer, prompts, store, seed, on_scored):
    """vecs -> (scores [K, P], texts): `score_checkpoint.score_vectors_checkpointed` into `store`."""
    hook = None if on_scored is None else (lambda n: on_scored(seed, n))

    def score(vecs):
        return score_checkpoint.score_vectors_checkpointed(
            model, prompts, vecs, layer, max_new_tokens=args.behaviour_tokens, decode=decoder(tok),
            gen_batch=args.gen_batch, store=store, on_save=hook)

    return score


def behaviour_phase(args, model, tok, make, layer, problem, theta0, meta, out, found, on_checkpoint, on_scored):
    """5a. Every found vector scored on --behaviour-prompts non-coding prompts
    (`lens.steering.melbo.verdict.score_vectors`, saved per vector as they complete); with
    --min-code-writers N, more blocks are trained (continuing the run) until N vectors write
    code or --max-k is reached.  Returns (found, scores [K, P], texts, the stopping note)."""
    prompts = [make(p) for p in BEHAVIOUR[: args.behaviour_prompts]]
    score = behaviour_scorer(args, model, tok, layer, prompts, score_store(args, out, layer, prompts, args.seed),
                             args.seed, on_scored)
    scores, texts = score(found.vectors)
    max_k = args.max_k or args.k
    while verdict.writes_code(scores, args.code_min_replies).sum() < args.min_code_writers and len(scores) < max_k:
        args.k = min(max_k, len(scores) + args.block)
        print(f"{int(verdict.writes_code(scores, args.code_min_replies).sum())} vectors write code; training to K = {args.k}")
        found = train_phase(args, problem, theta0, meta, out / "checkpoint.safetensors", on_checkpoint, resume=found)
        more, more_texts = score(found.vectors[len(scores):])
        scores, texts = np.concatenate([scores, more]), texts + more_texts
    n = int(verdict.writes_code(scores, args.code_min_replies).sum())
    note = None
    if n < args.min_code_writers:
        note = (f"{n} of {len(scores)} vectors write code, short of --min-code-writers {args.min_code_writers}: "
                f"--max-k {max_k} reached (training longer costs ~{args.block} vectors per block on this machine)")
    return found, scores, texts, note


def seed_runs(args, model, tok, make, layer, problem, theta0, k, meta, out, on_checkpoint, on_scored):
    """4c. The other MELBO seeds (--seed + 1, ...): K vectors each, checkpointed after every
    block in vectors_seed<s>.safetensors (n_done; continued under --resume), and their
    behaviour scores (behaviour_seed<s>.json, saved per vector).  Everything here is
    resumable, so it runs before the (uncheckpointed) readings.  Returns one
    (seed, vectors, losses, scores) per seed."""
    prompts = [make(p) for p in BEHAVIOUR[: args.behaviour_prompts]]
    runs = []
    for i in range(1, args.melbo_seeds):
        seed = args.seed + i
        f, seed_meta = out / f"vectors_seed{seed}.safetensors", meta | {"seed": seed}
        resume = experiment.resume_checkpoint(f, seed_meta, theta0) if args.resume and f.exists() else None
        if resume is not None:
            print(f"seed {seed}: resuming from {len(resume.vectors)} vectors")

        def checkpoint(result, f=f, seed_meta=seed_meta):
            vectors.save_vectors(f, result.vectors, seed_meta | {"n_done": len(result.vectors)},
                                 extras={"theta0": theta0, "losses": result.losses})
            if on_checkpoint is not None:
                on_checkpoint(len(result.vectors))

        res = melbo.melbo_ortho(problem, jnp.asarray(theta0), k, melbo.OrthoConfig(steps=args.steps, lr=args.lr),
                                run=melbo.MelboRunConfig(mode=args.mode, block_size=args.block, seed=seed,
                                                         progress=True),
                                resume=resume, on_block=checkpoint)
        score = behaviour_scorer(args, model, tok, layer, prompts, score_store(args, out, layer, prompts, seed),
                                 seed, on_scored)
        scores, _ = score(res.vectors)
        runs.append((seed, res.vectors, res.losses, scores))
    return runs


def seed_readings(args, runs, readings_problem, s_factor, theta0, d, control_means):
    """4d. The other seeds' readings (found only; divided by the main seed's controls): one
    `verdict.headline` record per seed."""
    records = []
    for seed, V, losses, scores in runs:
        sr = stages.stage_readings(readings_problem, V, None, args.chunk, n_boot=10, s_factor=s_factor)
        rd = report.found_only_readings(sr)
        rec = verdict.headline(rd, verdict.writes_code(scores, args.code_min_replies), scores, losses,
                               np.linalg.norm(V, axis=1), float(np.linalg.norm(theta0)), d,
                               control_means=control_means)
        records.append(rec | {"seed": seed})
        print(f"seed {seed}: decisive {rec[verdict.DECISIVE['reading'] + '/logits/over_control']:.2f} x control")
    return records


def readings_phase(args, model, neutral, s, t, theta0, V):
    """4b. Both readings of a downstream collapse per stage (`lens.steering.melbo.stages`):
    a shared component vs few distinct effects, controls over several seeds, bootstrap
    intervals over every real token of the readings prompts; PR vs K with --k-curve."""
    toks_r, mask_r = melbo.pad_prompts(neutral[: args.readings_prompts])
    readings_problem = melbo.make_problem(model, toks_r, mask_r, s, t)
    s_factor = stages.logit_metric_factor(model)  # once for both calls
    readings = stages.answer(readings_problem, V, theta0, control_seeds=tuple(range(args.control_seeds)),
                             n_boot=args.n_boot, chunk=args.chunk, progress=True, s_factor=s_factor)
    if args.k_curve:
        ks = [k for k in args.k_curve if k <= len(V)]
        readings["pr_vs_k"] = stages.k_curve(readings_problem, V, theta0, ks, chunk=args.chunk,
                                             progress=True, s_factor=s_factor)
    return readings, readings_problem, s_factor


def write_outputs(args, out, summary, meta, theta0, found, sets, analyses, sweeps, scores, readings, samples,
                  calib, settings, laps):
    """vectors.safetensors, the plots, generations.jsonl, report.json and report.md."""
    V = found.vectors
    vectors.save_vectors(out / "vectors.safetensors", V, meta | {"norm_base": float(np.linalg.norm(theta0))},
                          extras={"theta0": theta0, "random_control": sets["random_control"], "losses": found.losses})
    summary["plots"] = plots(out, {k: a for k, a in analyses.items()}, sweeps, scores)
    readings_plot(out / "readings.png", readings)  # shared share and specific PR per stage
    summary["plots"].append("readings.png")
    closed_form_plot(out / "closed_form_pr_vs_k.png", summary["closed_form_pr_vs_k"], summary["closed_form_pr"])
    summary["plots"].append("closed_form_pr_vs_k.png")
    if "pr_vs_k" in readings:
        k_curve_plot(out / "pr_vs_k.png", readings["pr_vs_k"])
        summary["plots"].append("pr_vs_k.png")
    with open(out / "generations.jsonl", "w") as fh:
        for smp in samples:
            fh.write(json.dumps(smp) + "\n")
    laps.lap("report")
    laps.timing["total"] = round(time.time() - laps.start, 2)
    summary["peak_rss_MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    write_markdown(out, summary, analyses, settings, samples, calib)


def main(argv=None, on_checkpoint=None, on_scored=None):
    """The whole job.  Test hooks: `on_checkpoint(n_done)` runs after every training
    checkpoint (every seed's), `on_scored(seed, n_scored)` after every save of behaviour scores."""
    args = parse_args(argv)
    laps = Laps()
    out = Path(args.out or f"runs/orthogonal_{time.strftime('%Y%m%d_%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    if args.plan_only or (args.preset == "paper" and jax.default_backend() == "cpu"):
        return plan_phase(args, out)
    # The decisive reading is declared before anything is measured (and kept in the folder).
    (out / "decisive_reading.json").write_text(json.dumps(verdict.DECISIVE, indent=1))
    print(f"decisive reading (declared before the run): {verdict.DECISIVE['name']}")
    model, tok, make = load(args)
    n, d = model.config.n_layers, model.config.d_model
    if args.preset == "paper" and (d < ORIGINAL_D or not (Path(args.model) / "config.json").exists()):
        raise SystemExit(f"--preset paper needs a local Qwen2-family folder with d >= {ORIGINAL_D}; got {args.model} (d={d})")
    s, t = layers(args, n)
    layer = melbo.layer_after(s)  # the CLI speaks MELBO's "after block s"; the library's layer is the one it enters
    print(f"model {args.model} ({n} layers, d={d}); source {s}, target {t}")
    laps.lap("load")
    neutral, problem, analysis_problem, x_norm, theta0, calib = base_phase(args, model, tok, make, s, t, layer, out)
    laps.lap("calibration")
    meta = {"model": args.model, "layer": layer, "site": "resid_pre", "source_layer": s, "target_layer": t,
            "method": "melbo-ortho", "steps": args.steps, "lr": args.lr, "seed": args.seed,
            "block": args.block, "mode": args.mode, "objective_positions": args.objective_positions}
    found = train_phase(args, problem, theta0, meta, out / "checkpoint.safetensors", on_checkpoint)
    laps.lap("train")
    found, beh_scores, beh_texts, beh_note = behaviour_phase(args, model, tok, make, layer, problem, theta0, meta,
                                                             out, found, on_checkpoint, on_scored)
    laps.lap("behaviour")
    V = found.vectors
    runs = seed_runs(args, model, tok, make, layer, problem, theta0, len(V), meta, out, on_checkpoint, on_scored)
    laps.lap("seeds")
    sets, found_effects, analyses, sweeps = analysis_phase(args, analysis_problem, theta0, V, laps)
    readings, readings_problem, s_factor = readings_phase(args, model, neutral, s, t, theta0, V)
    laps.lap("readings")
    writes = verdict.writes_code(beh_scores, args.code_min_replies)
    rule = report.code_writing_rule(args.code_min_replies, args.behaviour_tokens, beh_scores.shape[1])
    beh_readings = verdict.behaviour_readings(readings, writes, rule)
    beh_readings["stopping"] = beh_note
    cf = report.closed_form_summary(readings, analyses["found"]["rho_mean"])
    laps.lap("closed_form")
    control_means = report.control_means(readings)
    records = [verdict.headline(readings, writes, beh_scores, found.losses, np.linalg.norm(V, axis=1),
                                float(np.linalg.norm(theta0)), d) | {"seed": args.seed}]
    records += seed_readings(args, runs, readings_problem, s_factor, theta0, d, control_means)
    laps.lap("seed_readings")
    comparison = None  # batched vs sequential (the agreement check)
    if args.compare_k and args.compare_seeds and args.mode == "batched" and len(V) >= args.compare_k:
        comparison = experiment.mode_comparison(
            problem, analysis_problem, theta0, found, found_effects, k=args.compare_k, steps=args.steps, lr=args.lr,
            block=args.block, seed=args.seed, n_seeds=args.compare_seeds, chunk=args.chunk)
    laps.lap("mode_comparison")
    # 5. behaviour: steered greedy generations and the code score.
    samples, scores = experiment.scored_generations(
        model, tok, neutral[: args.gen_prompts], theta0, V, sets["random_control"], layer,
        gen_vectors=args.gen_vectors, max_new_tokens=args.gen_tokens, gen_batch=args.gen_batch, decode=decoder(tok))
    laps.lap("generation")
    # clustering by specific effect vs behaviour: every found vector, scored on the behaviour prompts
    behaviour = experiment.behaviour_per_vector(V, {f"found_{i}": float(sc) for i, sc in enumerate(beh_scores.mean(1))},
                                                readings, gen_vectors=len(V), n_prompts=int(beh_scores.shape[1]),
                                                max_new_tokens=args.behaviour_tokens)
    summary = experiment.summary_record(
        model_name=args.model, source=s, target=t, n_layers=n, objective_positions=args.objective_positions,
        theta0=theta0, found=found, x_norm=x_norm, calib=calib, analyses=analyses, sweeps=sweeps,
        rho_grid=args.rho_grid, scores=scores, comparison=comparison, behaviour=behaviour, readings=readings,
        timing=laps.timing)
    summary = report.main_job_summary(summary, closed_form=cf, behaviour_readings=beh_readings,
                                      behaviour_scores=beh_scores, writes=writes, seed_records=records,
                                      seed=args.seed, d_model=d)
    settings = vars(args) | {"source": s, "target": t, "prompts_train": args.train_prompts,
                             "prompts_analysis": args.analysis_prompts, "caa_prompts": len(CODE)}
    samples += report.behaviour_samples(beh_texts, beh_scores)
    write_outputs(args, out, summary, meta, theta0, found, sets, analyses, sweeps, scores, readings, samples,
                  calib, settings, laps)
    print("\n".join(summary["lead"]))
    print(json.dumps({k: summary[k] for k in ("raw_cosine_max_abs", "norms", "effective_cosine_mean",
                                              "downstream_cosine_mean", "degeneracy_factor", "code_score",
                                              "timing_s")}, indent=1))
    print(f"wrote {out} in {time.time() - laps.start:.0f} s")
    return summary


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
