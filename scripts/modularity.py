"""Modularity: selective pruning, MoEfication and contextual sparsity, turned to finding
and separating capabilities (Python code vs English prose).

    .venv/bin/python scripts/modularity.py --out runs/modularity
    .venv/bin/python scripts/modularity.py --out runs/modularity --model smollm2-135m-instruct \\
        --model runs/gpt2_ln_bpe/model
    .venv/bin/python scripts/modularity.py --out /tmp/m --preset smoke     # tiny random models, < 3 min

Per model: (1) selective pruning (taker): forget = python-code, retain = shakespeare
(prose; python-docs is evaluated but never retained); 2% of the MLP neurons per step,
chosen globally by forget/(retain + eps), statistics (--collect-tokens per set, matmuls
in --compute-dtype) re-collected after each step; baselines with --random-draws draws
each: random pruning of the same counts, and pruning by forget-set activation alone (one
forget sample per draw); top-1 / top-10 next-token accuracy skipping the 50 most common
tokens, and loss, with 95% intervals over rows, on --eval-tokens of each corpus's
validation split; the paper's differential drop; whether the first step is selective; the pruned model is
saved and reloaded (models.save, safetensors) and its masks written as safetensors.
(2) The main job's "write code" vector theta0 (scripts/orthogonal_steering.py: reply CAA
of its code vs prose requests at resid_pre[source + 1], rho 0.5 of the median |x|): its
share in the span of the most forget-specific pruned neurons' output directions vs random
neurons, and the code score of steered greedy replies on the base model, after the first
ratio step / every step, and after random pruning of the same counts (--steer-seeds).
(3) MoEfication: experts of `expert_size` neurons by weight k-means (and its sign-free
form), co-activation and random splits; centroid, trained MLP and oracle routers; loss,
top-1 agreement with the dense model and |a| mass kept vs the fraction of experts; the
per-neuron oracle; one layer MoEfied at a time.  (4) Deja Vu predictors: recall (top-10%
label and the reference's) and the loss at the predicted sparsity, against untrained
predictors.  Routers and predictors are trained per layer on --fit-tokens fresh train
tokens to a plateau rule (lens.modularity.router_predictor_fit; epochs, steps and the stop epoch in
the report).
Writes report.md, PNGs and report.json (`selective_pruning`, `steering`, `moefication`,
`contextual_sparsity`) to --out.
"""

from __future__ import annotations

import lens.models.runtime.xla_guard  # noqa: F401  (isort: skip)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lens.modularity.sparsity_data import LABELS, check_layers  # noqa: E402
from lens.modularity import sparsity_study as SS  # noqa: E402
from lens.training import data  # noqa: E402
from lens.modularity import pruning as M  # noqa: E402
from lens.modularity import pruning_study  # noqa: E402
from lens.cli import Preset, fill_from_preset, int_at_least, positive_float, positive_floats  # noqa: E402
from lens.modularity import steering as PS  # noqa: E402
from lens.steering.prompts import CODE, NEUTRAL, PROSE, prompt_maker  # noqa: E402
from modularity_report import write_report  # noqa: E402

FORGET = "python-code"
RETAIN = ("shakespeare",)  # plainly not code: prose
EXTRA = ("python-docs",)  # code-adjacent English: evaluated and reported, never in the retain set
from lens.models.runtime import compile_cache  # noqa: E402

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)

SECTIONS = ("selective_pruning", "steering", "moefication", "contextual_sparsity")
PRESETS = {
    # one tiny random gated (Llama) model on SmolLM2's tokenizer (the GELU kind: --smoke-gelu)
    "smoke": Preset(seq=24, collect_tokens=48, eval_tokens=48, prune_steps=2, random_draws=5, expert_size=8,
                  fractions="0.25,1", fit_tokens=240, moe_eval_tokens=48, router_epochs=3, predictor_epochs=3, rank=8,
                  kmeans_iters=3, gen_tokens=6, steer_prompts=1, span_draws=2, reply_tokens=2, steer_seeds=1,
                  eval_split="validation"),
    # sized for ~20 min of an idle 2-core CPU on SmolLM2-135M; its times, measured by section:
    # docs/findings/modularity.md#runtime-measured-2026-11-29-and-2026-12-07
    "default": Preset(seq=128, collect_tokens=4096, eval_tokens=2048, prune_steps=2, random_draws=5,
                    expert_size=32, fractions="0.25,0.5", fit_tokens=16384, moe_eval_tokens=384, router_epochs=30,
                    predictor_epochs=20, rank=64, kmeans_iters=6, gen_tokens=64, steer_prompts=4, span_draws=5,
                    reply_tokens=8, steer_seeds=3, eval_split="validation"),
    # the references' sizes (taker: 1e5 tokens per set for the statistics and the metrics;
    # DejaVu: 20 epochs over 400k tokens; MoEfication: 30 epochs): an accelerator's job (the pruning
    # alone ~1.7e7 token-forwards, ~17.5 CPU-hours here: `--preset paper --plan`)
    "paper": Preset(seq=128, collect_tokens=100_000, eval_tokens=100_000, prune_steps=5, random_draws=5,
                  expert_size=32, fractions="0.125,0.25,0.5", fit_tokens=102_400, moe_eval_tokens=16_384,
                  router_epochs=30, predictor_epochs=20, rank=64, kmeans_iters=6, gen_tokens=64, steer_prompts=4,
                  span_draws=5, reply_tokens=8, steer_seeds=3, eval_split="validation+test"),
}
# shakespeare's validation split holds ~82k tokens: 1e5 per corpus needs its test split too
EVAL_SPLITS = {"validation": ("validation",), "validation+test": ("validation", "test")}


def layer_list(text: str) -> list[int]:
    """--layers: comma-separated layer indices (checked against the model once loaded)."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integer layer indices; got {text!r}") from None
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"non-empty, non-negative layer indices; got {text!r}")
    return out


def token_counts(text: str) -> list[int]:
    """--fit-sweep: comma-separated token counts (>= 8 each; may be empty)."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integer token counts; got {text!r}") from None
    if any(n < 8 for n in out):
        raise argparse.ArgumentTypeError(f"token counts must be >= 8; got {text!r}")
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="report folder")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--model", action="append", default=None,
                    help="embedded name or folder (repeatable); default: smollm2-135m-instruct "
                         "(smoke: two tiny random models)")
    ap.add_argument("--smoke-gelu", action="store_true", help="smoke: the tiny GELU LayerNorm model instead")
    ap.add_argument("--seq", type=int_at_least(8), help="tokens per row")
    ap.add_argument("--collect-tokens", type=int_at_least(8), help="tokens per set for statistics / clustering")
    ap.add_argument("--eval-tokens", type=int_at_least(8), help="validation tokens per corpus for every metric")
    ap.add_argument("--eval-split", choices=sorted(EVAL_SPLITS),
                    help="held-out split(s) the metrics draw from (validation+test: both, disjoint by document)")
    ap.add_argument("--collect-rows", type=int_at_least(1), help="override: rows per set (else from --collect-tokens)")
    ap.add_argument("--eval-rows", type=int_at_least(1), help="override: rows per corpus (else from --eval-tokens)")
    ap.add_argument("--compute-dtype", choices=M.COMPUTE_DTYPES, default="float32",
                    help="the pruning statistics' matmuls (bfloat16: bf16 inputs, float32 sums)")
    ap.add_argument("--prune-steps", type=int_at_least(1))
    ap.add_argument("--prune-frac", type=positive_float, default=0.02, help="share of all MLP neurons per step")
    ap.add_argument("--random-draws", type=int_at_least(1),
                    help="draws of each baseline: random pruning (seeds), forget-only pruning (collection samples)")
    ap.add_argument("--first-draw", type=int_at_least(0), default=0,
                    help="index of the first baseline draw (a study in parts: --first-draw 3 --random-draws 2 "
                         "runs draws 3-4; scripts/modularity_report.py OUT --merge A --merge B joins the parts)")
    ap.add_argument("--expert-size", type=int_at_least(1))
    ap.add_argument("--fractions", type=positive_floats, help="fractions of experts / neurons kept")
    ap.add_argument("--fit-tokens", type=int_at_least(8),
                    help="training tokens (train split, code + prose) for the routers and predictors; 10%% of the "
                         "rows held out for the plateau rule")
    ap.add_argument("--moe-eval-tokens", type=int_at_least(8),
                    help="validation tokens (all three corpora) for the MoEfication / Deja Vu tables")
    ap.add_argument("--router-epochs", type=int_at_least(1), help="router epochs at most (plateau stops earlier)")
    ap.add_argument("--predictor-epochs", type=int_at_least(1), help="predictor epochs at most (plateau stops earlier)")
    ap.add_argument("--predictor-label", choices=LABELS, default="active",
                    help="the predictors' neuron label: active (the reference's: on) or top (|a| in the top 10%%)")
    ap.add_argument("--rank", type=int_at_least(1), help="Deja Vu predictor rank")
    ap.add_argument("--layers", type=layer_list, default=None,
                    help="fit the routers and predictors of these layers only (comma-separated indices), on "
                         "--fit-tokens and on the --fit-sweep shares of the same collection; reports the per-layer "
                         "held-out fits (`fit_sweep`) instead of the MoEfication / Deja Vu loss tables")
    ap.add_argument("--fit-sweep", type=token_counts, default=[4096, 16384],
                    help="with --layers: also fit on these many training tokens (nested rows of the same "
                         "collection, the same held-out rows), to compare with --fit-tokens")
    ap.add_argument("--kmeans-iters", type=int_at_least(1))
    ap.add_argument("--gen-tokens", type=int_at_least(1))
    ap.add_argument("--steer-prompts", type=int_at_least(1))
    ap.add_argument("--span-draws", type=int_at_least(1))
    ap.add_argument("--reply-tokens", type=int_at_least(1), help="reply CAA: reply tokens averaged (main job: 8)")
    ap.add_argument("--steer-rho", type=positive_float, default=0.5,
                    help="|theta0| / median residual norm (the main job's calibrated rho: 0.5)")
    ap.add_argument("--steer-seeds", type=int_at_least(1), help="random-pruning draws for the steering control")
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    ap.add_argument("--masks", default=None, help="steering without re-pruning: a masks file of an earlier run "
                    "(pruned_m0_masks.safetensors); the random control is drawn afresh with the same count")
    ap.add_argument("--plan", action="store_true",
                    help="print the selective-pruning study's size (token-forwards, FLOPs, memory, hours: "
                         "lens.modularity.pruning_study.study_plan) for these settings and stop")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)} (steering needs pruning)")
    args = ap.parse_args(argv)
    args.sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    bad = [x for x in args.sections if x not in SECTIONS]
    if bad or not args.sections:
        ap.error(f"--sections: choose from {','.join(SECTIONS)}; got {bad or 'nothing'}")
    if "steering" in args.sections and "selective_pruning" not in args.sections and args.masks is None:
        ap.error("--sections: steering needs selective_pruning (it reads the pruned neurons) or --masks")
    fill_from_preset(args, PRESETS[args.preset], convert={"fractions": positive_floats})
    if args.collect_rows is None:
        args.collect_rows = -(-args.collect_tokens // args.seq)
    if args.eval_rows is None:
        args.eval_rows = -(-args.eval_tokens // args.seq)
    if any(f > 1 for f in args.fractions):
        ap.error(f"--fractions must be in (0, 1]; got {args.fractions}")
    if args.prune_frac * args.prune_steps > 1:
        ap.error(f"--prune-frac {args.prune_frac} x --prune-steps {args.prune_steps} prunes more than every neuron")
    if args.steer_prompts > len(NEUTRAL):
        ap.error(f"--steer-prompts: at most {len(NEUTRAL)}")
    return args


# ------------------------------------------------------------------ models and data
def smoke_models(gelu: bool):
    """A tiny random model on SmolLM2's tokenizer: gated (Llama), or GELU LayerNorm (GPT-2)."""
    from lens import models
    from lens.models.io import embedded
    from lens.models.families import gpt2, llama
    from lens.models.io.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(embedded.fetch("smollm2-135m-instruct"))
    v = tok.vocab_size if hasattr(tok, "vocab_size") else embedded.SMOLLM2_135M_HF_CONFIG["vocab_size"]
    gated = llama.config_from_hf(dict(embedded.SMOLLM2_135M_HF_CONFIG, vocab_size=v, hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64))
    gelu_config = gpt2.config_from_hf(dict(vocab_size=v, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                    activation_function="gelu_new", layer_norm_epsilon=1e-5, model_type="gpt2"))
    if gelu:
        return [("tiny-gelu (random)", models.init(gelu_config, jax.random.key(2), 0.1), tok)]
    return [("tiny-gated (random)", models.init(gated, jax.random.key(1), 0.1), tok)]


def rows_for(tok, args, split, n, seed):
    """n rows of each corpus (forget first) from `split` ("train", or a key of EVAL_SPLITS:
    those splits' rows concatenated), drawn with `seed`; a corpus with fewer rows gives all."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in (FORGET,) + RETAIN + (EXTRA if split != "train" else ()):
        r = np.concatenate([data.load_tokens(name, tok, args.seq, s) for s in EVAL_SPLITS.get(split, (split,))])
        out[name] = r[np.sort(rng.choice(len(r), size=min(n, len(r)), replace=False))]
    return out


# ------------------------------------------------------------------ the sections
def the_study(args) -> pruning_study.PruningStudy:
    return pruning_study.PruningStudy(FORGET, RETAIN[0], args.prune_frac, args.prune_steps, args.random_draws,
                                      args.seed, args.compute_dtype, first_draw=args.first_draw)


def pruning_plan(args, model, train, evals) -> dict:
    """The study's size before it runs (`pruning_study.study_plan`), printed."""
    plan = pruning_study.study_plan(model.config, the_study(args), args.seq, int(train[FORGET].size),
                                    int(sum(train[n].size for n in RETAIN)), {c: int(r.size) for c, r in evals.items()})
    print(pruning_study.plan_lines(plan)[0], flush=True)
    return plan


def pruning_section(args, model, tok, train, evals, skip, out: Path, label: str):
    """`lens.modularity.pruning_study`: the ratio method and both baselines, every run saved
    to out/pruning_runs_<label>/ as it finishes (a stopped study resumes); then the pruned
    model is saved and reloaded."""
    forget = train[FORGET]
    plan = pruning_plan(args, model, train, evals)
    result, masks = pruning_study.run_pruning_study(
        model, forget, np.concatenate([train[n] for n in RETAIN]), evals, skip, the_study(args),
        out / f"pruning_runs_{label}",
        forget_sample=lambda d: rows_for(tok, args, "train", args.collect_rows, args.seed + 1000 + d)[FORGET],
        label=label)
    result["also_evaluated"] = list(EXTRA)
    result["plan"] = plan
    # The pruned model saves and reloads: the weights file, and the mask as its own file.
    from lens import models

    pruned = M.prune(model, masks["ratio"])
    folder = models.save(pruned, out / f"pruned_{label}")
    reloaded, _ = models.load(folder)
    probe = jnp.asarray(forget[0])
    result["reload_max_abs_logit_diff"] = float(jnp.abs(reloaded(probe) - pruned(probe)).max())
    M.save_masks(out / f"pruned_{label}_masks.safetensors", masks["ratio"], None,
                 {"method": "ratio", "steps": args.prune_steps, "frac": args.prune_frac})
    return result, masks


def steering_section(args, model, tok, masks, train, out_scores):
    """The main job's "write code" vector theta0 (`lens.steering.melbo.base_vector.code_theta0`,
    the "reply" design at --steer-rho x the median residual norm of 2 analysis prompts),
    its share in the span of the most forget-specific pruned neurons' output directions vs
    random neurons (`lens.modularity.steering.span_share`), and the code score of its greedy
    generations on the base model, the ratio-pruned models (first step and every step)
    and randomly pruned models with the same counts (`pruned_steering_table`)."""
    from lens.steering import melbo
    from lens.steering.melbo.base_vector import code_theta0

    n = model.config.n_layers
    source = max(0, round(n / 4) - 1)  # the main job's default source block (SmolLM2: 7)
    layer = melbo.layer_after(source)
    n_req = 2 if args.preset == "smoke" else len(CODE)
    make = prompt_maker(tok)
    code, prose = [make(p) for p in CODE[:n_req]], [make(p) for p in PROSE[:n_req]]
    neutral = [make(p) for p in NEUTRAL[: args.steer_prompts]]
    # |x| as the main job measures it: 2 analysis prompts, the huge first token left out
    toks, mask = melbo.pad_prompts(neutral[:2])
    x_norm = melbo.median_source_norm(melbo.make_problem(model, toks, mask, source, min(source + 1, n - 1)))
    decode = (lambda ids: tok.decode(ids))
    theta0, calib = code_theta0(model, code, prose, neutral, layer, x_norm, [args.steer_rho], args.reply_tokens,
                                args.gen_tokens, decode, designs=("reply",))
    unit = theta0 / np.linalg.norm(theta0)
    W = np.asarray(model.blocks.W_out, np.float32)  # [L, d_mlp, d]
    span = PS.span_share(W, masks["ratio"], out_scores, unit, layer, args.span_draws, args.seed)
    # Pruned sets: the first ratio step (2%: the most code-specific neurons of the base
    # model) and the whole run; each against random pruning of the same count.
    first = M.top_unpruned(out_scores, int(args.prune_frac * out_scores.size), np.zeros(out_scores.shape, bool))
    sets = {"first_step": first, "all_steps": masks["ratio"]}

    def scores(m):
        return PS.steered_code_scores(m, neutral, theta0, layer, args.gen_tokens, decode, model.config.eos_token_ids)

    table, examples = PS.pruned_steering_table(model, sets, scores, args.steer_seeds)
    return {"layer": layer, "source_block": source, "method": f"reply CAA ({args.reply_tokens} reply tokens), "
            f"{n_req} code vs {n_req} prose requests, |theta0| = {args.steer_rho} x median |x|",
            "rho": args.steer_rho, "resid_norm": x_norm, "theta0_norm": float(np.linalg.norm(theta0)),
            "calibration": calib["table"], "neurons_pruned": {k: int(m.sum()) for k, m in sets.items()},
            "span": span, "code_score": table, "example_steered_reply": examples, "prompts": NEUTRAL[: args.steer_prompts],
            "gen_tokens": args.gen_tokens, "steer_seeds": args.steer_seeds}


def sparsity_rows(args, tok, train):
    """The MoEfication / Deja Vu rows: the clustering rows (the statistics rows, half of
    --collect-rows per corpus) and --fit-tokens fresh train rows (half code, half prose)."""
    cluster = np.concatenate([train[n][: max(1, args.collect_rows // 2)] for n in (FORGET,) + RETAIN])
    n_fit = max(2, -(-args.fit_tokens // args.seq))
    fit = rows_for(tok, args, "train", -(-n_fit // 2), args.seed + 7)
    return cluster, np.concatenate([fit[n] for n in (FORGET,) + RETAIN])


def sparsity_study(args) -> SS.SparsityStudy:
    return SS.SparsityStudy(args.expert_size, args.kmeans_iters, tuple(args.fractions), args.router_epochs,
                            args.predictor_epochs, args.rank, args.predictor_label, args.seed,
                            "moefication" in args.sections, "contextual_sparsity" in args.sections)


def sparsity_sections(args, model, tok, train, eval_rows, out: Path) -> tuple[dict, dict]:
    """`lens.modularity.sparsity_study.run_sparsity_study`: the tables on --moe-eval-tokens
    of the held-out rows (all three corpora)."""
    n_eval = max(1, -(-args.moe_eval_tokens // (args.seq * len(eval_rows))))
    ev = np.concatenate([r[:n_eval] for r in eval_rows.values()])
    return SS.run_sparsity_study(model, *sparsity_rows(args, tok, train), ev, sparsity_study(args), out)


def fit_sweep_section(args, model, tok, train, out: Path) -> dict:
    """--layers: `lens.modularity.sparsity_study.run_fit_sweep` on --fit-tokens and the
    --fit-sweep shares of them."""
    try:
        return SS.run_fit_sweep(model, *sparsity_rows(args, tok, train), sparsity_study(args), args.layers,
                                args.fit_sweep, out)
    except ValueError as e:
        raise SystemExit(f"--layers: {e}") from None


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if args.model:
        from lens import models

        entries = [(name, *models.load(name)) for name in args.model]
    elif args.preset == "smoke":
        entries = smoke_models(args.smoke_gelu)
    else:
        from lens import models

        entries = [("smollm2-135m-instruct", *models.load("smollm2-135m-instruct"))]
    report = {"preset": args.preset, "args": {k: v for k, v in vars(args).items() if k != "model"},
              "models": [e[0] for e in entries], "selective_pruning": {}, "steering": {}, "moefication": {},
              "contextual_sparsity": {}, "fit_sweep": {}, "seconds": {}}
    for i, (name, model, tok) in enumerate(entries):
        if tok is None:
            raise SystemExit(f"{name}: no tokenizer in the folder; the corpora need one")
        label = f"m{i}"
        print(f"== {name}: {model.config.n_layers} layers, d {model.config.d_model}, d_mlp {model.config.d_mlp}, "
              f"{'gated ' if model.config.gated_mlp else ''}{model.config.activation}")
        train = rows_for(tok, args, "train", args.collect_rows, args.seed)
        evals = rows_for(tok, args, args.eval_split, args.eval_rows, args.seed + 1)
        if args.plan:
            report["selective_pruning"][name] = {"plan": pruning_plan(args, model, train, evals)}
            continue
        skip = M.common_tokens(np.concatenate([data.load_tokens(n, tok, args.seq, "train")[:256] for n in (FORGET,) + RETAIN + EXTRA]), 50)
        t = {}
        if "selective_pruning" in args.sections:
            t0 = time.perf_counter()
            prune_result, masks = pruning_section(args, model, tok, train, evals, skip, out, label)
            t["selective_pruning"] = time.perf_counter() - t0
            report["selective_pruning"][name] = prune_result
        if "steering" in args.sections:
            t0 = time.perf_counter()
            if "selective_pruning" not in args.sections:
                ratio_mask, _, _ = M.load_masks(args.masks)
                rnd = M.random_unpruned(ratio_mask.shape, int(ratio_mask.sum()), np.zeros_like(ratio_mask),
                                        np.random.default_rng(args.seed))
                masks = {"ratio": ratio_mask, "random": rnd}
            first = M.neuron_scores(model, train[FORGET], np.concatenate([train[n] for n in RETAIN]),
                                    compute_dtype=args.compute_dtype)
            report["steering"][name] = steering_section(args, model, tok, masks, train, first)
            t["steering"] = time.perf_counter() - t0
        if args.layers is not None and {"moefication", "contextual_sparsity"} & set(args.sections):
            try:
                check_layers(model, args.layers)
            except ValueError as e:
                raise SystemExit(f"--layers: {e}") from None
            t0 = time.perf_counter()
            report["fit_sweep"][name] = fit_sweep_section(args, model, tok, train, out / label)
            t["fit_sweep"] = time.perf_counter() - t0
        elif {"moefication", "contextual_sparsity"} & set(args.sections):
            t0 = time.perf_counter()
            moe, dv = sparsity_sections(args, model, tok, train, evals, out / label)
            if moe:
                report["moefication"][name] = moe
            if dv:
                report["contextual_sparsity"][name] = dv
            t["moefication_and_contextual_sparsity"] = time.perf_counter() - t0
        report["seconds"][name] = t
        print(f"   seconds: {json.dumps({k: round(v) for k, v in t.items()})}")
    if args.plan:  # sizes only: nothing ran
        (out / "plan.json").write_text(json.dumps(report["selective_pruning"], indent=1))
        return report
    report["seconds"]["total"] = time.perf_counter() - t_start
    # CPU seconds of this process (all threads): on a machine shared with other jobs the
    # wall time says more about the neighbours than about this script.
    report["seconds"]["cpu_total"] = time.process_time()
    report["load_avg_1min_at_end"] = os.getloadavg()[0]
    write_report(report, out)
    print(f"wrote {out / 'report.md'} in {report['seconds']['total']:.0f} s")
    return report


if __name__ == "__main__":
    main()
