"""Train a tuned lens (AlignmentResearch/tuned-lens recipe) and score it against the logit lens.

    .venv/bin/python scripts/train_tuned_lens.py --out runs/tuned_smollm2
    .venv/bin/python scripts/train_tuned_lens.py --model runs/gpt2_ln_bpe/model --out runs/tuned_ln \\
        --steps 300 --batch 8 --seq 128
    .venv/bin/python scripts/train_tuned_lens.py --preset smoke --out /tmp/tl

Trains on the train split of `lens.training.data` corpora (shakespeare, python-docs, python-code,
rows interleaved), validates on their validation split inside `lens.training.train`'s loop
(checkpoints every --checkpoint-every steps; the same command resumes), and scores the
logit lens (also with frozen final-norm statistics) and the tuned lens per layer on their
test split: KL(model || lens), top-1
agreement with the model, next-token cross-entropy in nats/token and bits/byte.

Presets (CPU-sized for a loaded 2-core machine; SmolLM2's 49k-token unembedding makes one
layer's lens cost ~20x the model's own forward per token, so tokens are few):
  default  16 steps of 4 x 64 tokens (4,096 tokens), scored on 8 x 64 test tokens
  smoke    2 steps of 2 x 8 tokens, scored on 2 x 8 (tests)
The reference trains 250 steps of 2^18 tokens; state --steps/--batch/--seq when quoting.

Writes to --out: tuned_lens.safetensors (`lens.readout.logit_lens.load_tuned_lens`), report.json,
report.md, lens_scores.png, log.json, checkpoint.safetensors.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)


import numpy as np  # noqa: E402

from lens import models  # noqa: E402
from lens.training import data, train  # noqa: E402
from lens.cli import Preset, fill_from_preset, int_at_least, positive_float  # noqa: E402
from lens.readout.logit_lens import TunedLens, save_tuned_lens  # noqa: E402
from lens.readout.tuned_lens_fit import (MOMENTUM, WEIGHT_DECAY, TunedLensLoss, lens_scores,  # noqa: E402
                                 reference_optimizer, row_bytes)
from lens.models.runtime import compile_cache  # noqa: E402
from figures import answer_lines  # noqa: E402  (scripts/)

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)

CORPORA = ("shakespeare", "python-docs", "python-code")


# eval_rows: test rows scored (split evenly over the corpora)
PRESETS = {"default": Preset(steps=16, batch=4, seq=64, eval_rows=8, checkpoint_every=4),
           "smoke": Preset(steps=2, batch=2, seq=8, eval_rows=2, checkpoint_every=1)}


def parse_args(argv=None):
    """The command line, every value checked before any model or data is loaded."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="embedded name or model folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--steps", type=int_at_least(1), default=None, help="override the preset")
    ap.add_argument("--batch", type=int_at_least(1), default=None, help="rows per step (override)")
    ap.add_argument("--seq", type=int_at_least(2), default=None, help="tokens per row (override)")
    ap.add_argument("--eval-rows", type=int_at_least(1), default=None, help="test rows scored (override)")
    ap.add_argument("--checkpoint-every", type=int_at_least(1), default=None)
    ap.add_argument("--lr-scale", type=positive_float, default=1.0,
                    help="the reference's lr_scale: effective SGD lr = lr_scale * (1 - 0.9)")
    ap.add_argument("--corpora", nargs="+", choices=CORPORA, default=list(CORPORA))
    ap.add_argument("--seed", type=int_at_least(0), default=0, help="data order")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    return fill_from_preset(args, PRESETS[args.preset])


def answer(report: dict) -> list[str]:
    """The report's opening: at how many layers the tuned lens is closer to the model than the
    logit lens (KL), and a verdict when the model itself predicts the test text no better than
    chance (its own top-1 near 0: a random or untrained model)."""
    lg, tu = report["logit_lens"], report["tuned_lens"]
    n = len(lg["kl"]) - 1  # the last row is the model itself
    better = sum(t < g for t, g in zip(tu["kl"][:n], lg["kl"][:n]))
    text = (f"the tuned lens is closer to the model's output than the logit lens at {better} of {n} layers "
            f"(mean KL {np.mean(tu['kl'][:n]):.3f} vs {np.mean(lg['kl'][:n]):.3f} nats).")
    top1 = lg["top1"][-1]
    why = (f"the model's own top-1 accuracy on the test text is {top1:.3f}, so it cannot predict this text and "
           "the lenses read nothing.") if top1 < 0.05 else None
    return answer_lines(text, why)


def report_lines(report: dict) -> list[str]:
    """The report.md table: per layer, logit lens vs tuned lens."""
    lg, tu = report["logit_lens"], report["tuned_lens"]
    s = report["settings"]
    lines = [f"# Tuned lens vs logit lens: {report['model']}", "", *answer(report),
             f"Trained {s['steps']} steps x {s['batch']} rows x {s['seq']} tokens "
             f"({s['steps'] * s['batch'] * s['seq']:,} tokens) on {', '.join(s['corpora'])} (train split); "
             f"SGD Nesterov momentum {MOMENTUM}, lr {s['lr']:.3g}, weight decay {WEIGHT_DECAY}, clip 1.0, "
             f"linear decay; {report['train_seconds']:.0f} s of training in this process.  Scored on {lg['tokens']:,} test tokens "
             f"({lg['bytes']:,} bytes).  Layer l = resid_pre[l]; the last row is the model itself.", "",
             "KL frozen: the logit lens with every layer over the final layer's norm divisor.", "",
             "| layer | KL logit | KL tuned | KL frozen | top-1 logit | top-1 tuned | CE nats logit | CE nats tuned "
             "| bits/byte logit | bits/byte tuned |", "|---|---|---|---|---|---|---|---|---|---|"]
    fr = report["logit_lens_frozen_scale"]
    for i in range(len(lg["kl"])):
        lines.append(f"| {i} | {lg['kl'][i]:.3f} | {tu['kl'][i]:.3f} | {fr['kl'][i]:.3f} | {lg['top1'][i]:.3f} "
                     f"| {tu['top1'][i]:.3f} "
                     f"| {lg['ce'][i]:.3f} | {tu['ce'][i]:.3f} | {lg['ce_bits_per_byte'][i]:.3f} "
                     f"| {tu['ce_bits_per_byte'][i]:.3f} |")
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for key, ax, title in (("kl", axes[0], "KL(model || lens), nats/token"), ("top1", axes[1], "top-1 agreement"),
                           ("ce_bits_per_byte", axes[2], "next-token CE, bits/byte")):
        for name, style in (("logit_lens", "o-"), ("tuned_lens", "s-"), ("logit_lens_frozen_scale", "^:")):
            v = report[name][key]
            ax.plot(range(len(v)), v, style, ms=3, label=name.replace("_", " "))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer (resid_pre)")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(report["model"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None, on_checkpoint=None) -> dict:
    args = parse_args(argv)
    model, tok = models.load(args.model)
    if tok is None:
        raise SystemExit(f"{args.model}: no tokenizer next to the model; the corpora need one")
    if args.seq > model.config.max_seq_len:
        raise SystemExit(f"--seq {args.seq} exceeds the model's context {model.config.max_seq_len}")
    corpora = tuple(args.corpora)
    train_rows = data.mixed_rows(corpora, tok, args.seq + 1, "train", seed=args.seed)
    val_rows = data.mixed_rows(corpora, tok, args.seq + 1, "validation", seed=args.seed, n_rows=args.batch)
    # the test rows: as even a share of each corpus as eval_rows allows (the first rows of each)
    test_rows = data.mixed_rows(corpora, tok, args.seq + 1, "test", n_rows=args.eval_rows, seed=None, even=True)
    opt, lr_fn = reference_optimizer(args.steps, args.lr_scale)
    cfg = train.TrainConfig(steps=args.steps, batch_size=args.batch, lr=float(lr_fn(0)), warmup_steps=0,
                            weight_decay=WEIGHT_DECAY, eval_every=args.steps, eval_batches=1,
                            checkpoint_every=args.checkpoint_every, seed=args.seed)
    info = {"lens": "tuned", "model_name": str(args.model), "corpora": list(corpora), "lr_scale": args.lr_scale,
            "optimizer": "clip 1.0 -> add_decayed_weights 1e-3 -> sgd nesterov 0.9, linear decay to 0"}
    t0 = time.perf_counter()
    result = train.train(TunedLens.init(model.config), train_rows, val_rows, cfg, args.out,
                         train.TrainOptions(progress=not args.no_progress, on_checkpoint=on_checkpoint,
                                            run_info=info, loss_fn=TunedLensLoss(model), opt=opt,
                                            rows_config=model.config, lr_fn=lr_fn))
    train_s = time.perf_counter() - t0
    n_bytes = row_bytes(tok, test_rows)
    t0 = time.perf_counter()
    scores = {name: lens_scores(model, lens, test_rows, n_bytes, progress=not args.no_progress, frozen_scale=frozen)
              for name, lens, frozen in (("logit_lens", None, False), ("tuned_lens", result.model, False),
                                         ("logit_lens_frozen_scale", None, True))}
    settings = {"steps": args.steps, "batch": args.batch, "seq": args.seq, "corpora": list(corpora),
                "lr": float(lr_fn(0)), "eval_rows": int(len(test_rows)), "seed": args.seed}
    report = {"model": str(args.model), "preset": args.preset, "settings": settings, **scores,
              "train_log": result.log, "train_seconds": train_s, "score_seconds": time.perf_counter() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    save_tuned_lens(result.model, args.out / "tuned_lens.safetensors", model, {**info, **settings})
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "report.md").write_text("\n".join(report_lines(report)) + "\n")
    plot(report, args.out / "lens_scores.png")
    print("\n".join(report_lines(report)))
    return report


if __name__ == "__main__":
    main()
