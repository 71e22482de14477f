"""Goodharting the "predict the model" test: cheap predictors, gamed training, defences.

    .venv/bin/python scripts/goodhart.py --out runs/goodhart                 # default: ~18 CPU-min (9.5 min idle before the frontier)
    .venv/bin/python scripts/goodhart.py --out /tmp/gh --preset smoke        # < 3 min (88 s at load ~4)
    .venv/bin/python scripts/goodhart.py --out /tmp/gh --preset large_smoke  # the large toy's shape, < 3 min
    .venv/bin/python scripts/goodhart.py --out runs/gh_large --preset large   # BPE-4,096, 4 layers: ~8 CPU-hours
    .venv/bin/python scripts/goodhart.py --out runs/gh --model runs/gpt2_ln_bpe/model

1. The Goodhart sweep: a small GPT-2-architecture toy (a BPE of the preset's `vocab`,
   512 by default, so a CPU-sized toy gets BETTER than the bigram table within minutes;
   prose: shakespeare + python-docs) pretrained plainly once (`steps`), then fine-tuned
   (`finetune_steps`) with loss CE + lam * KL(target || model) for each lam and seed (the
   seed: the fine-tuning data order), the target being the bigram table counted on the
   train split, or a small side model trained plainly first; lam = 0 is the plain
   continuation, so every lam is compared at the same steps.  For each run: the model's
   own validation loss, and the cheap
   predictor's pass rate on the test (mean |log p_model - log p_pred| over the model's
   top-10 <= tolerance) on prose validation rows; then the defences: exact top-10 order,
   a per-position KL threshold, only positions where the predictor's top-1 is wrong
   about the next token, and held-out prompts (python-code, never trained or gamed on).
2. Predictors on a reference model (the lam = 0 seed-0 model, or --model): unigram,
   bigram, trigram (counted on the model's training corpora), the direct path, the direct
   path through the first MLP, a 1-layer student distilled from the model, uniform.
3. The same predictors on SmolLM2-135M-Instruct (default preset up), per corpus.

Per lambda and seed the sweep also records the proposal's statistic (the mean test error
averaged over prompts, `lens.prediction.defences.prompt_statistic`) and its prompt pass
rate, and capability on text the test never scores (held-out code, and the prose test
split); `frontier` holds them per lambda with seed ranges and `gaming_found` says whether
any run gained pass rate at no capability loss (`defences.GAMING_DEFINITION`).  The side
model is held to the recursion rule: it must pass against the bigram table, or the
report says it fails.

Writes report.md, report.json (`predictors`, `lambda_sweep`, `frontier`, `gaming_found`), PNGs to --out;
trained models' checkpoints under --out/runs (a rerun resumes them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lens import models  # noqa: E402
from lens.training import data, train  # noqa: E402
from lens.prediction import defences as defence_lib  # noqa: E402
from lens.prediction import gaming, ngram, scoring  # noqa: E402
from lens.prediction.defences import K, aggregate, defences, gaming_found, prompt_statistic  # noqa: E402
from lens.cli import Preset, int_at_least, positive_float  # noqa: E402
from lens.models.core.config import ModelConfig  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402
from figures import answer_lines  # noqa: E402  (scripts/)

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)

ALL_CORPORA = ("shakespeare", "python-docs", "python-code")
PROSE = ("shakespeare", "python-docs")
HELD_OUT = "python-code"


def preset(layers: int, d_model: int, seq: int, steps: int, batch: int, finetune_steps: int, vocab: int,
           lambdas: tuple[float, ...], side_lambdas: tuple[float, ...], seeds: tuple[int, ...], score_rows: int,
           distill_steps: int, smollm2_rows: int, smollm2_distill_steps: int, finetune_lr: float = 1e-3,
           tolerances: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0), tau: float = 1.0,
           kl_threshold: float = 0.5) -> Preset:
    """This script's preset fields, in report order.  seq: tokens per row the model reads
    (rows hold seq + 1); finetune_steps: the gaming (or plain, lam = 0) phase, from the
    pretrained base; vocab: the toy's BPE vocabulary (SmolLM2 keeps its own); score_rows:
    validation rows per corpus scored; smollm2_rows 0: skip SmolLM2; tau: the headline
    tolerance (nats); kl_threshold: the per-position KL defence (nats)."""
    return Preset(layers=layers, d_model=d_model, seq=seq, steps=steps, batch=batch, finetune_steps=finetune_steps,
                  vocab=vocab, lambdas=lambdas, side_lambdas=side_lambdas, seeds=seeds, score_rows=score_rows,
                  distill_steps=distill_steps, smollm2_rows=smollm2_rows, smollm2_distill_steps=smollm2_distill_steps,
                  finetune_lr=finetune_lr, tolerances=tolerances, tau=tau, kl_threshold=kl_threshold)


PRESETS = {
    "smoke": preset(1, 32, 32, 12, 4, 4, 512, (0.0, 1.0), (1.0,), (0,), 8, 6, 0, 0),
    "default": preset(2, 128, 64, 2000, 32, 60, 512, (0.0, 1.0, 3.0), (0.0, 1.0), (0, 1, 2), 32, 40, 4, 0),
    # a toy closer to a real model (BPE-4,096, 4 layers, d 256, context 128): ~70M training tokens
    # (base and side model 3,000 steps, 45 fine-tunes of 300 steps) at ~2,700 tokens per CPU-second
    # here: ~7 CPU-hours, an accelerator's job (docs/findings/goodhart.md)
    "large": preset(4, 256, 128, 3000, 32, 300, 4096, (0.0, 0.1, 0.3, 1.0, 3.0, 10.0), (0.0, 0.3, 1.0, 3.0),
                    (0, 1, 2, 3, 4), 128, 400, 64, 150),
    # the large toy's vocabulary and depth at smoke sizes: the pipeline at BPE-4,096 and 4 layers
    # (a [4096, 4096] bigram table in the gaming loss) in < 3 min; its models are barely trained
    "large_smoke": preset(4, 32, 32, 12, 4, 4, 4096, (0.0, 1.0), (1.0,), (0,), 8, 6, 0, 0),
}


def toy_config(p: Preset, tok, layers=None, d=None) -> ModelConfig:
    layers, d = layers or p.layers, d or p.d_model
    return ModelConfig(
        architecture="gpt2", vocab_size=tok.vocab_size, d_model=d, n_layers=layers, n_heads=max(1, d // 32),
        n_kv_heads=max(1, d // 32), d_head=min(32, d), d_mlp=4 * d, max_seq_len=p.seq, norm_kind="layer",
        norm_eps=1e-5, activation="gelu_new", gated_mlp=False, positional="learned", attn_bias=True,
        attn_out_bias=True, mlp_bias=True, norm_bias=True, tie_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_ids=tuple(tok.eos_token_ids), pad_token_id=tok.pad_token_id)


def train_cfg(p: Preset, steps=None) -> train.TrainConfig:
    steps = steps or p.steps
    return train.TrainConfig(steps=steps, batch_size=p.batch, lr=3e-3, warmup_steps=max(1, steps // 10),
                             eval_every=steps, eval_batches=2, checkpoint_every=max(1, steps // 2))


def finetune_cfg(p: Preset, seed: int) -> train.TrainConfig:
    """The gaming phase: `finetune_steps` from the base, data order `1 + seed` (the base
    itself read order 0, so no fine-tune replays its first batches)."""
    return dataclasses.replace(train_cfg(p, p.finetune_steps), lr=p.finetune_lr, seed=1 + seed)


def base_model(p: Preset, tok, tr, val, out: Path, progress: bool):
    """The plainly pretrained toy every fine-tune starts from (init seed 0)."""
    return train.train(models.init(toy_config(p, tok), jax.random.key(0)), tr, val, train_cfg(p), out / "runs" / "base",
                       train.TrainOptions(progress=progress)).model


def finetune(base, p: Preset, tr, val, out: Path, progress: bool, seed: int, lam: float, target: str,
             loss=None):
    """One sweep run (lam = 0: the plain continuation, shared by both targets)."""
    folder = out / "runs" / f"{target if lam else 'plain'}_lam{lam:g}_seed{seed}"
    return train.train(base, tr, val, finetune_cfg(p, seed), folder,
                       train.TrainOptions(progress=progress, loss_fn=loss,
                                          run_info={"target": target if lam else "plain", "lam": lam})).model


def rows_of(names, tok, seq, split, n=None):
    return data.mixed_rows(names, tok, seq + 1, split, n_rows=n, seed=None)


def mixed(names, tok, seq, split, seed=0):
    return data.mixed_rows(names, tok, seq + 1, split, seed=seed)


# ----------------------------------------------------------------- the sweep
def run_sweep(p: Preset, tok, out: Path, progress: bool) -> dict:
    tr, val = mixed(PROSE, tok, p.seq, "train"), mixed(PROSE, tok, p.seq, "validation")
    val_score, code_score = val[: p.score_rows], rows_of([HELD_OUT], tok, p.seq, "validation", p.score_rows)
    # capability on text the test never scores: held-out code, and the prose TEST split
    code_all = rows_of([HELD_OUT], tok, p.seq, "validation")
    prose_test = mixed(PROSE, tok, p.seq, "test")
    n_cap = lambda r: r[: (min(len(r), 512) // p.batch) * p.batch]  # noqa: E731
    code_cap, prose_cap = n_cap(code_all), n_cap(prose_test)
    bigram = ngram.count(tr, 2, tok.vocab_size)
    table_logp = jnp.log(jnp.asarray(bigram.dense_bigram(), jnp.float32))
    side_cfg = toy_config(p, tok, layers=1, d=max(32, p.d_model // 2))
    side = train.train(models.init(side_cfg, jax.random.key(1000)), tr, val, train_cfg(p), out / "runs" / "side",
                       train.TrainOptions(progress=progress)).model
    cheap = {"bigram": bigram.predictor(), "side": scoring.model_predictor(side)}
    n_eval = (min(len(val), 512) // p.batch) * p.batch
    base = base_model(p, tok, tr, val, out, progress)
    bigram_logp = np.asarray(table_logp)  # for the table's own validation loss
    ev = val[:n_eval]
    # The recursion rule: the side model is itself a helper model, so it must pass the test
    # against a cheaper predictor (the bigram table), or is reported as failing it.
    side_vs_bigram = prompt_statistic(scoring.score(scoring.model_predictor(side), {"bigram": cheap["bigram"]},
                                                    val_score[:, :-1], k=K)["bigram"], p.tau)
    results = {"reference": {
        "base_val_loss": train.evaluate(base, ev, p.batch), "side_val_loss": train.evaluate(side, ev, p.batch),
        "bigram_val_loss": float(-bigram_logp[ev[:, :-1], ev[:, 1:]].mean()),
        "toy": {k: getattr(base.config, k) for k in ("vocab_size", "n_layers", "d_model", "max_seq_len")},
        "val_rows": int(n_eval), "positions_per_row": int(ev.shape[1] - 1),
        "held_out_rows": {"code": int(len(code_cap)), "prose_test": int(len(prose_cap))},
        "side_recursion_rule": dict(side_vs_bigram, cheaper="bigram", tau=p.tau,
                                    verdict="passes" if side_vs_bigram["passes"] else "fails")}}
    plain = {}
    for target, lams in (("bigram", p.lambdas), ("side", p.side_lambdas)):
        runs = []
        # lam = 0 (plain training, shared) is scored against EVERY target's predictor: the
        # baseline that a pass-rate gain is measured from
        for lam in sorted({0.0, *lams}):
            for seed in p.seeds:
                if lam == 0 and seed in plain:  # lam = 0 is plain training whatever the target
                    model = plain[seed]
                else:
                    loss = gaming.GoodhartLoss(lam, table_logp=table_logp if target == "bigram" else None,
                                                 side=side if target == "side" else None) if lam else None
                    model = finetune(base, p, tr, val, out, progress, seed, lam, target, loss)
                    if lam == 0:
                        plain[seed] = model
                me = scoring.model_predictor(model)
                s_in = scoring.score(me, {target: cheap[target]}, val_score[:, :-1], k=K)[target]
                s_out = scoring.score(me, {target: cheap[target]}, code_score[:, :-1], k=K)[target]
                d = defences(s_in, p.tau, p.kl_threshold)
                st = prompt_statistic(s_in, p.tau)
                runs.append({"lam": lam, "seed": seed, "val_loss": train.evaluate(model, ev, p.batch),
                             "mean_test_error": st["mean_test_error"], "prompt_pass_rate": st["prompt_pass_rate"],
                             "held_out_code_loss": train.evaluate(model, code_cap, p.batch),
                             "held_out_prose_loss": train.evaluate(model, prose_cap, p.batch),
                             **d, "pass_rate_held_out_code": defences(s_out, p.tau, p.kl_threshold)["pass_rate"],
                             "pass_rate_by_tolerance": scoring.summarize(s_in, p.tolerances)["pass_rate"]})
        results[target] = runs
    return results


def plain_model(p: Preset, tok, out: Path, progress: bool, seed: int = 0):
    """The lam = 0 model of `seed` (from its finished checkpoint when the sweep ran)."""
    tr, val = mixed(PROSE, tok, p.seq, "train"), mixed(PROSE, tok, p.seq, "validation")
    base = base_model(p, tok, tr, val, out, progress)
    return finetune(base, p, tr, val, out, progress, seed, 0.0, "plain"), tr


def predictor_table(model, train_rows, eval_sets: dict, p: Preset, distill_steps: int, out: Path,
                    progress: bool) -> dict:
    """`lens.prediction.defences.predictor_table` with the preset's tolerances and student
    training (`distill_steps` of the preset's schedule, batch 4, lr 1e-3; 0: no student)."""
    distill = (dataclasses.replace(train_cfg(p, distill_steps), batch_size=4, lr=1e-3) if distill_steps else None)
    return defence_lib.predictor_table(model, train_rows, eval_sets, p.tolerances, distill, out, progress, k=K)


CAPABILITY = ("held_out_code_loss", "held_out_prose_loss")
FRONTIER_KEYS = ("mean_test_error", "prompt_pass_rate") + CAPABILITY


def frontier(runs: list[dict]) -> list[dict]:
    """Per lam: the proposal's statistic (mean test error over prompts), the prompt pass
    rate and the held-out capability (losses on code and on prose the test never scores),
    each as mean and [min, max] over seeds."""
    return [{"lam": r["lam"], "seeds": r["seeds"],
             **{k: {"mean": r[k], "min": r[k + "_min"], "max": r[k + "_max"]} for k in FRONTIER_KEYS}}
            for r in aggregate(runs)]


# ------------------------------------------------------------------ report
def plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    panels = [(m, c) for m, per in report["predictors"].items() for c in per if c != "distill"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (m, c) in zip(axes[0], panels):
        for pred, s in report["predictors"][m][c].items():
            taus = [float(t) for t in s["pass_rate"]]
            ax.plot(taus, list(s["pass_rate"].values()), marker="o", label=pred)
        ax.set_xscale("log")
        ax.set(title=f"{m}: {c}", xlabel="tolerance (nats)", ylabel="pass rate", ylim=(0, 1.02))
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pass_rate_vs_tolerance.png", dpi=110, bbox_inches="tight")
    names.append("pass_rate_vs_tolerance.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for target, rows in report["lambda_sweep"].items():
        x = [r["pass_rate"] for r in rows]
        y = [r["val_loss"] for r in rows]
        span = lambda k: [[r[k] - r[k + "_min"] for r in rows], [r[k + "_max"] - r[k] for r in rows]]  # noqa: E731
        ax.errorbar(x, y, xerr=span("pass_rate"), yerr=span("val_loss"), marker="o", capsize=3,
                    label=f"pulled toward {target} (mean, bars: range over seeds)")
        for r in rows:
            ax.annotate(f"λ={r['lam']:g}", (r["pass_rate"], r["val_loss"]), fontsize=7)
    ref = report.get("reference_losses", {})
    if "bigram_val_loss" in ref:
        ax.axhline(ref["bigram_val_loss"], color="gray", ls="--", lw=1, label="the bigram table's own loss")
    ax.set(xlabel=f"cheap predictor's pass rate (top-{K}, tol {report['settings']['tau']} nats)",
           ylabel="model validation loss (nats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_pass_rate.png", dpi=110, bbox_inches="tight")
    names.append("loss_vs_pass_rate.png")
    plt.close(fig)
    return names


def answer(report: dict) -> list[str]:
    """The report's opening: per gaming target, how far the pass rate moved from lambda = 0 to
    the largest lambda and what it cost in validation loss."""
    s, parts = report["settings"], []
    for target, rows in report.get("lambda_sweep", {}).items():
        lo, hi = min(rows, key=lambda r: r["lam"]), max(rows, key=lambda r: r["lam"])
        parts.append(f"toward the {target}, the pass rate at {s['tau']} nats goes from {lo['pass_rate']:.3f} "
                     f"(lambda {lo['lam']:g}) to {hi['pass_rate']:.3f} (lambda {hi['lam']:g}) while the "
                     f"validation loss goes from {lo['val_loss']:.3f} to {hi['val_loss']:.3f} nats")
    if not parts:
        return answer_lines("no gaming sweep ran (see --parts); the predictor tables below are the result.")
    return answer_lines("; ".join(parts) + ".")


def markdown(report: dict, figs: list[str]) -> str:
    s = report["settings"]
    lines = [f"# Goodharting the predict-the-model test ({report['preset']} preset)", "", *answer(report),
             f"Test: mean |log p_model - log p_pred| over the model's top-{K} tokens <= tolerance; headline "
             f"tolerance {s['tau']} nats.  n-grams: Witten-Bell interpolated, add-0.1 unigram.  "
             f"Wall time {report['seconds']:.0f} s ({report['machine']}).", ""]
    for m, per in report["predictors"].items():
        for c, preds in per.items():
            if c == "distill":
                lines += [f"{m}: distilled 1-layer student, held-out KL {preds['held_out_kl_before']:.3f} -> "
                          f"{preds['held_out_kl_after']:.3f} nats after {preds['steps']} steps.", ""]
                continue
            lines += [f"## {m} on {c} ({next(iter(preds.values()))['n_positions']} positions)", "",
                      f"| predictor | top-1 | top-{K} recall | spearman | KL | pass@{s['tau']} | top-1 w/o 10 most common |",
                      "|---|---|---|---|---|---|---|"]
            for name, r in preds.items():
                lines.append(f"| {name} | {r['top1']:.3f} | {r['recall']:.3f} | {r['spearman']:.3f} | {r['kl']:.3f} "
                             f"| {r['pass_rate'][str(s['tau'])]:.3f} | {r['skip_10_most_common']['top1']:.3f} |")
            lines.append("")
    ref = report.get("reference_losses")
    if ref:
        lines += [f"Validation loss ({ref['val_rows']} prose rows x {ref['positions_per_row']} positions): the "
                  f"pretrained base {ref['base_val_loss']:.3f}, the bigram table itself {ref['bigram_val_loss']:.3f}, "
                  f"the side model {ref['side_val_loss']:.3f} nats.  Sweep runs: {s['finetune_steps']} fine-tuning "
                  f"steps from the base ({s['steps']} steps), vocabulary {s['vocab']}, {s['layers']} layers, "
                  f"d {s['d_model']}.", ""]
    rule = report["reference_losses"].get("side_recursion_rule")
    if rule:
        lines += [f"Recursion rule: the side model against the bigram table, mean test error over prompts "
                  f"{rule['mean_test_error']:.3f} (tol {rule['tau']}): **{rule['verdict']}**.", ""]
    for target, rows in report["frontier"].items():
        g = report["gaming_found"][target]
        lines += [f"## Frontier toward the {target}: Goodharting {'FOUND' if g['found'] else 'not found'}", "",
                  f"Gaming = {g['definition']}.  Runs: {g['runs'] or 'none'}.", "",
                  "| λ | mean test error (prompts) | prompt pass rate | held-out code loss | held-out prose loss |",
                  "|---|---|---|---|---|"]
        for r in rows:
            cell = lambda k: f"{r[k]['mean']:.3f} [{r[k]['min']:.3f}, {r[k]['max']:.3f}]"  # noqa: E731
            lines.append(f"| {r['lam']:g} | {cell('mean_test_error')} | {cell('prompt_pass_rate')} | "
                         f"{cell('held_out_code_loss')} | {cell('held_out_prose_loss')} |")
        lines.append("")
    for target, rows in report["lambda_sweep"].items():
        lines += [f"## Gaming toward the {target} (mean [min, max] over seeds {rows[0]['seeds']})", "",
                  "| λ | val loss | pass rate | exact top-10 order | KL<=%.1f | pass where predictor wrong | "
                  "pass, held-out code |" % s["kl_threshold"], "|---|---|---|---|---|---|---|"]
        kl_key = f"kl_below_{s['kl_threshold']}"
        for r in rows:
            cell = lambda k: f"{r[k]:.3f} [{r[k + '_min']:.3f}, {r[k + '_max']:.3f}]"  # noqa: E731
            lines.append(f"| {r['lam']:g} | {cell('val_loss')} | {cell('pass_rate')} | {cell('exact_top10_order')} "
                         f"| {cell(kl_key)} | {cell('pass_rate_where_predictor_wrong')} "
                         f"| {cell('pass_rate_held_out_code')} |")
        lines.append("")
    lines += [f"![{f}]({f})" for f in figs]
    return "\n".join(lines) + "\n"


PARTS = ("sweep", "toy", "smollm2")


def parts_list(text: str) -> tuple[str, ...]:
    got = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in got if x not in PARTS]
    if not got or bad:
        raise argparse.ArgumentTypeError(f"must be a comma-separated subset of {','.join(PARTS)}; got {text!r}")
    return got


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--model", type=Path, default=None,
                    help="a model trained with the BPE-4096 tokenizer on all three corpora (e.g. "
                         "runs/gpt2_ln_bpe/model) for the predictor table, instead of the sweep's lam=0 model")
    ap.add_argument("--steps", type=int_at_least(1), default=None, help="override the preset's training steps")
    ap.add_argument("--tau", type=positive_float, default=None, help="override the headline tolerance (nats)")
    ap.add_argument("--parts", type=parts_list, default=PARTS,
                    help="comma-separated subset of sweep,toy,smollm2 (each cached as part_*.json in --out, "
                         "so parts can run in separate processes; the report needs sweep and toy)")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def cached(path: Path, compute) -> dict:
    """A part's JSON: read when a previous (or concurrent) run wrote it, else computed and written."""
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.model is not None and not args.model.exists():
        raise SystemExit(f"--model {args.model}: no such folder")
    p = PRESETS[args.preset]
    p = p.replace(**({"steps": args.steps} if args.steps else {}), **({"tau": args.tau} if args.tau else {}))
    progress = not args.no_progress
    args.out.mkdir(parents=True, exist_ok=True)
    t0, load_at_start = time.perf_counter(), os.getloadavg()[0]
    from lens.training.bpe import corpus_tokenizer

    tok = corpus_tokenizer(ALL_CORPORA, p.vocab)
    evals = lambda tk, seq, n: {c: rows_of([c], tk, seq, "validation", n) for c in ALL_CORPORA}  # noqa: E731
    parts, timing = {}, {}

    def timed(name, compute):
        t = time.perf_counter()
        parts[name] = cached(args.out / f"part_{name}.json", compute)
        timing[name + "_s"] = time.perf_counter() - t

    if "sweep" in args.parts:
        timed("sweep", lambda: run_sweep(p, tok, args.out, progress))
    if "toy" in args.parts:
        def toy():
            if args.model is not None:
                ref, ref_tok = models.load(args.model)
                return {str(args.model): predictor_table(
                    ref, rows_of(ALL_CORPORA, ref_tok, p.seq, "train"), evals(ref_tok, p.seq, p.score_rows),
                    p, p.distill_steps, args.out / "runs" / "distill_model", progress)}
            ref, ref_train = plain_model(p, tok, args.out, progress)
            return {"toy (λ=0, seed 0)": predictor_table(ref, ref_train, evals(tok, p.seq, p.score_rows), p,
                                                         p.distill_steps, args.out / "runs" / "distill_toy", progress)}
        timed("toy", toy)
    if "smollm2" in args.parts and p.smollm2_rows:
        def smollm2():
            smol, smol_tok = models.load("smollm2-135m-instruct")
            return {"SmolLM2-135M-Instruct": predictor_table(
                smol, rows_of(ALL_CORPORA, smol_tok, 128, "train"), evals(smol_tok, 128, p.smollm2_rows),
                p, p.smollm2_distill_steps, args.out / "runs" / "distill_smollm2", progress)}
        timed("smollm2", smollm2)
    if not {"sweep", "toy"} <= set(parts):
        print(f"parts {sorted(parts)} done; run again with every part for the report")
        return parts
    report = {
        "preset": args.preset, "settings": p.as_dict(), "k": K,
        "seconds": time.perf_counter() - t0, "timing": timing,
        "machine": f"{jax.default_backend().upper()}, {os.cpu_count()} cores; 1-min load average "
                   f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (above the cores: loaded)",
        "smoothing": "unigram add-0.1; bigram/trigram interpolated Witten-Bell; counted inside train rows",
        "predictors": parts["toy"] | parts.get("smollm2", {}),
        "lambda_sweep": {t: aggregate(r) for t, r in parts["sweep"].items() if t != "reference"},
        "frontier": {t: frontier(r) for t, r in parts["sweep"].items() if t != "reference"},
        "gaming_found": {t: gaming_found(r, "prompt_pass_rate", CAPABILITY)
                         for t, r in parts["sweep"].items() if t != "reference"},
        "reference_losses": parts["sweep"]["reference"],
        "runs": parts["sweep"],
    }
    figs = plots(report, args.out)
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "report.md").write_text(markdown(report, figs))
    print(f"report at {args.out / 'report.md'} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
