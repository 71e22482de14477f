"""Train a tuned lens (AlignmentResearch/tuned-lens recipe) and score it against the logit lens.

    .venv/bin/python scripts/train_tuned_lens.py --out runs/tuned_smollm2     # layers 5, 15, 25
    .venv/bin/python scripts/train_tuned_lens.py --model runs/gpt2_ln_bpe/model --out runs/tuned_ln \\
        --layers all --steps 160 --batch 8 --seq 128 --eval-rows 790 --eval-every 10
    .venv/bin/python scripts/train_tuned_lens.py --preset smoke --out /tmp/tl

Trains on the train split of `lens.training.data` corpora (shakespeare, python-docs, python-code,
rows interleaved), validates on their validation split inside `lens.training.train`'s loop
(checkpoints every --checkpoint-every steps; the same command resumes; each fit's training
wall time, summed over the processes that made it, is kept in its train_seconds.json:
`TrainClock`), and scores the
logit lens (also with frozen final-norm statistics) and the tuned lens per layer on their
test split: KL(model || lens), top-1
agreement with the model, next-token cross-entropy in nats/token and bits/byte.

--layers (e.g. 5,15,25, or all): the tuned lens has translators for these model layers only,
the temperature control temperatures for these only, and every score is computed (and keyed
in the report: `layers`, `by_layer`) at these model layers only, then the model's output
(layer n_layers).  A layer out of range stops the run before any data is read.

Every run also trains the CONTROL a tuned lens must beat: one temperature per layer
(`TemperatureLens`, one parameter per layer) on the same rows, loss, optimiser and steps; the
frozen-scale logit lens (every layer over the FINAL layer's per-position norm divisor,
information no lens has at layer l) is kept as an oracle bound, not as a baseline.  Every
score has a 95% bootstrap interval over test rows; the four lenses are scored from one
forward per test row (`tuned_lens_fit.score_lenses`); the validation loss is logged every
--eval-every steps and the plateau criterion (`tuned_lens_fit.plateau`: < 1% relative
improvement over each of the next 2 evaluations) is reported with the step it was met, or null.

Presets (SmolLM2's 49k-token unembedding makes one layer's decode cost ~1/5 of the model's
whole forward per token, its backward as much again):
  smoke    2 steps of 2 x 8 tokens, every layer, scored on 4 x 8 (tests; < 3 min)
  default  SmolLM2 sized for this shared 2-core CPU: layers 5, 15, 25 only (early, middle,
           late of 30), 100 steps of 4 x 64 tokens (25,600 tokens per lens), validation every
           10 steps, scored on 1,600 x 64 = 102,400 held-out tokens (the issue's >= 100k; as
           even a split over the corpora as their test splits allow).  Planned from a timed
           2-step run (2026-12-07, load ~2-12): one training step of 512 tokens on 3 layers
           ~8 s at load 2, ~18 s at load 12, the same for the temperature control (the
           model's forward is most of a step); scoring ~36 CPU-min for 102,400 tokens (one
           forward + 6 decodes per token).  100 small steps rather than fewer large ones, so
           the plateau criterion has 10 evaluations and can be met before the linear LR decay
           reaches 0; its step and the LR there are in the report.  Every layer at once
           (--layers all) is ~5x the decode work per token: hours here.  Our LayerNorm model
           was run with --layers all --steps 160 --batch 8 --seq 128 --eval-rows 790 (11 min).
  paper    the reference's recipe: 250 optimiser steps of 2^18 tokens, each the mean gradient
           of 4 batches of 32 x 2,048 tokens (--accumulate 4: optax.MultiSteps; 128 rows at once
           would need ~180 GiB), every layer, scored on 100 x 2,048 tokens.  Sized for one 80 GB
           GPU, never run (no GPU was lent to this work).  `--preset paper --plan` prints it
           without training: 45.5 GiB per batch (lens.core.plan, from jax.eval_shape of the
           forward: the residual stack of 31 layers, one layer's vocab-sized logits and their
           gradient, the lens state), 3.8 GFLOP per token for the tuned lens (the frozen forward,
           then per layer a 49k-vocab decode and its gradient into the residual) and 2.0 for the
           temperature control, so 249 + 134 PFLOP for 65.5M tokens each: ~0.54 h at 198 TFLOP/s
           (40% of an H100's dense TF32 peak), before scoring.  What it cannot copy: the Pile (the
           three corpora here hold 5.0M train tokens at this row length, so 13 passes over them).

--accumulate K (any preset): --steps, --eval-every and --checkpoint-every count optimiser
steps of K batches; the training logs in report.json are in optimiser steps (`batches` keeps
the loop's count); the plan (`plan` in report.json, its line in report.md) is printed first.
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
from lens.readout.logit_lens import TunedLens, load_tuned_lens, save_tuned_lens  # noqa: E402
from lens.readout.logit_lens import check_layers  # noqa: E402
from lens.readout.tuned_lens_plan import plan_lines, training_plan  # noqa: E402
from lens.readout.tuned_lens_fit import (FROZEN_SCALE, MOMENTUM, WEIGHT_DECAY, TemperatureLens,  # noqa: E402
                                         TemperatureLensLoss, TunedLensLoss, plateau, reference_optimizer,
                                         row_bytes, score_lenses)
from lens.models.runtime import compile_cache  # noqa: E402
from figures import answer_lines  # noqa: E402  (scripts/)

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)

CORPORA = ("shakespeare", "python-docs", "python-code")


# eval_rows: test rows scored (split evenly over the corpora); steps, checkpoint_every and
# eval_every count OPTIMISER steps, each the mean gradient of `accumulate` batches of `batch` rows
PRESETS = {"default": Preset(steps=100, batch=4, accumulate=1, seq=64, eval_rows=1600, checkpoint_every=20,
                              eval_every=10, layers="5,15,25"),
           "smoke": Preset(steps=2, batch=2, accumulate=1, seq=8, eval_rows=4, checkpoint_every=1, eval_every=1,
                           layers="all"),
           # the reference's 250 steps of 2^18 tokens = 4 batches of 32 x 2,048 (45 GiB each, planned)
           "paper": Preset(steps=250, batch=32, accumulate=4, seq=2048, eval_rows=100, checkpoint_every=25,
                           eval_every=10, layers="all")}


def parse_args(argv=None):
    """The command line, every value checked before any model or data is loaded."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="embedded name or model folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--steps", type=int_at_least(1), default=None, help="override the preset")
    ap.add_argument("--batch", type=int_at_least(1), default=None, help="rows per batch (override)")
    ap.add_argument("--accumulate", type=int_at_least(1), default=None,
                    help="batches whose mean gradient makes one optimiser step (override)")
    ap.add_argument("--seq", type=int_at_least(2), default=None, help="tokens per row (override)")
    ap.add_argument("--eval-rows", type=int_at_least(1), default=None, help="test rows scored (override)")
    ap.add_argument("--checkpoint-every", type=int_at_least(1), default=None)
    ap.add_argument("--eval-every", type=int_at_least(1), default=None, help="validation-loss interval (override)")
    ap.add_argument("--lr-scale", type=positive_float, default=1.0,
                    help="the reference's lr_scale: effective SGD lr = lr_scale * (1 - 0.9)")
    ap.add_argument("--corpora", nargs="+", choices=CORPORA, default=list(CORPORA))
    ap.add_argument("--seed", type=int_at_least(0), default=0, help="data order")
    ap.add_argument("--layers", type=layer_list, default=None,
                    help="model layers to fit and score, e.g. 5,15,25, or 'all' (override the preset)")
    ap.add_argument("--init-lens", type=Path, default=None,
                    help="start the tuned lens from this saved lens (tuned_lens.safetensors of an earlier run: "
                         "a warm start with a fresh schedule of --steps; its layers must be --layers)")
    ap.add_argument("--plan", action="store_true",
                    help="print the run's size (memory per batch, FLOPs, hours on one 80 GB GPU) and exit")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    return fill_from_preset(args, PRESETS[args.preset], {"layers": layer_list})


def layer_list(text: str) -> tuple[int, ...] | None:
    """--layers: 'all' (None) or comma-separated layer indices >= 0, e.g. '5,15,25' (their
    range against the model is checked once it is loaded: `resolve_layers`)."""
    if text.strip() == "all":
        return None
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'all' or comma-separated layer indices, e.g. 5,15,25; got {text!r}")
    if any(x < 0 for x in out):
        raise argparse.ArgumentTypeError(f"layer indices must be >= 0; got {text!r}")
    return out


def resolve_layers(layers, n_layers: int) -> tuple[int, ...] | None:
    """--layers against the loaded model: sorted, each in [0, n_layers) (SystemExit in the
    library's range wording), None for every layer."""
    if layers is None:
        return None
    try:
        return check_layers(sorted(set(layers)), n_layers)
    except ValueError as e:
        raise SystemExit(f"--layers: {e}") from None


def test_shares(n_rows: int, sizes: list[int], corpora=None, row_len: int | None = None) -> list[int]:
    """How many test rows each corpus gives: an even split of `n_rows` where every corpus has
    its share; a corpus with fewer rows gives all it has and the rest is split evenly over the
    others (water-filling; the earlier corpora take any remainder).  SystemExit when the
    corpora together hold fewer than `n_rows`."""
    if sum(sizes) < n_rows:
        names = ", ".join(f"{c}: {z}" for c, z in zip(corpora or range(len(sizes)), sizes))
        raise SystemExit(f"--eval-rows {n_rows} exceeds the test splits' {sum(sizes)} rows"
                         f"{f' of {row_len} tokens' if row_len else ''} ({names})")
    shares, left, open_ = list(sizes), n_rows, list(range(len(sizes)))
    while True:  # fix every corpus too small for an even share at its size, then share the rest
        small = [i for i in open_ if sizes[i] * len(open_) < left]
        if not small:
            break
        left -= sum(sizes[i] for i in small)
        open_ = [i for i in open_ if i not in small]
    each, extra = divmod(left, len(open_))
    for rank, i in enumerate(open_):
        shares[i] = each + (rank < extra)
    return shares


def interleave(parts: list[np.ndarray]) -> np.ndarray:
    """The rows of `parts` round-robin (one of each part in turn while it lasts), so every
    prefix of the test rows (what a stopped scoring pass has scored: its cache) is as even a
    mix of the corpora as the whole."""
    order = sorted(((i, k) for k, part in enumerate(parts) for i in range(len(part))))
    return np.stack([parts[k][i] for i, k in order])


class TrainClock:
    """The wall seconds of a fit's training, summed over the processes that made its
    checkpoint: out_dir/train_seconds.json ({"step", "seconds"}) is rewritten after every
    checkpoint with the seconds up to it, so a resumed run (or a rerun on a finished
    checkpoint, which trains nothing) adds its own time to what the file holds rather than
    reporting only its own.  A checkpoint written without the file (by an older version)
    leaves the total unknown: `seconds()` is then None."""

    FILE = "train_seconds.json"

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / self.FILE
        self.t0 = time.perf_counter()
        if not (Path(out_dir) / train.CHECKPOINT).exists():
            self.prior = 0.0  # a fresh fit (a stale file from a deleted checkpoint is overwritten)
        elif self.path.is_file():
            self.prior = float(json.loads(self.path.read_text())["seconds"])
        else:
            self.prior = None

    def hook(self, then=None):
        """An `on_checkpoint` callback: records the seconds up to the checkpoint, then calls `then`."""
        def on_checkpoint(step: int) -> None:
            if self.prior is not None:
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text(json.dumps({"step": step, "seconds": self.prior + time.perf_counter() - self.t0}) + "\n")
                tmp.replace(self.path)
            if then is not None:
                then(step)
        return on_checkpoint

    def seconds(self) -> float | None:
        """Training seconds through the last checkpoint, every process together (None: unknown)."""
        if self.prior is None:
            return None
        return float(json.loads(self.path.read_text())["seconds"]) if self.path.is_file() else self.prior


def answer(report: dict) -> list[str]:
    """The report's opening: at how many layers the tuned lens is closer to the model than the
    logit lens (KL), and a verdict when the model itself predicts the test text no better than
    chance (its own next-token cross-entropy within 10% of ln(vocab): a random or untrained model)."""
    lg, tu = report["logit_lens"], report["tuned_lens"]
    n = len(lg["kl"]) - 1  # the last row is the model itself
    better = sum(t < g for t, g in zip(tu["kl"][:n], lg["kl"][:n]))
    which = f" ({', '.join(str(x) for x in report['layers'][:n])})" if "layers" in report else ""
    text = (f"the tuned lens is closer to the model's output than the logit lens at {better} of {n} layers{which} "
            f"(mean KL {np.mean(tu['kl'][:n]):.3f} vs {np.mean(lg['kl'][:n]):.3f} nats).")
    # the last row is the model against itself (top-1 agreement 1 always): whether the model
    # predicts the text at all is its own next-token cross-entropy against uniform, ln(vocab)
    ce, uniform = lg["ce"][-1], float(np.log(report["vocab_size"]))
    why = (f"the model's own next-token cross-entropy on the test text is {ce:.2f} nats/token, within 10% of "
           f"uniform ({uniform:.2f} = ln {report['vocab_size']}), so it cannot predict this text and the "
           "lenses read nothing.") if ce > 0.9 * uniform else None
    return answer_lines(text, why)


def seconds(s: float | None) -> str:
    """A training time for report.md ('not recorded': resumed from a checkpoint written without one)."""
    return "not recorded" if s is None else f"{s:.0f} s"


def report_lines(report: dict) -> list[str]:
    """report.md: the verdict first, then per layer the logit lens, the temperature control,
    the tuned lens (95% intervals over test rows) and the frozen-scale oracle bound."""
    lg, tu, te, fr = (report[k] for k in ("logit_lens", "tuned_lens", "temperature_control", "frozen_scale_oracle"))
    s = report["settings"]
    n = len(report["tuned_beats_temperature_kl"])
    wins = sum(report["tuned_beats_temperature_kl"])
    pl = report["plateau"]
    met = {k: v["met_at_step"] for k, v in pl.items()}
    iv = lambda d, k, i: f"[{d[k + '_interval_95'][0][i]:.3f}, {d[k + '_interval_95'][1][i]:.3f}]"  # noqa: E731
    lines = [f"# Tuned lens vs its temperature control: {report['model']} ({report['preset']})", "",
             *answer(report),
             f"**Verdict: the tuned lens beats the per-layer temperature control on KL (intervals disjoint) at "
             f"{wins} of {n} layers.**  Plateau ({pl['tuned_lens']['criterion']}): tuned lens "
             f"{'met at step ' + str(met['tuned_lens']) if met['tuned_lens'] is not None else 'NOT met'}, "
             f"temperature control {'met at step ' + str(met['temperature_control']) if met['temperature_control'] is not None else 'NOT met'}"
             f" (of {s['steps']}).", "",
             f"Trained {s['steps']} steps x {s.get('accumulate', 1)} x {s['batch']} rows x {s['seq']} tokens "
             f"({s['steps'] * s.get('accumulate', 1) * s['batch'] * s['seq']:,} tokens) on {', '.join(s['corpora'])} "
             "(train split)"
             f"{'; the tuned lens warm-started from ' + s['init_lens'] if s.get('init_lens') else ''}; "
             f"SGD Nesterov momentum {MOMENTUM}, lr {s['lr']:.3g}, weight decay {WEIGHT_DECAY}, clip 1.0, "
             f"linear decay; {seconds(report['train_seconds'])} (tuned) + {seconds(report['temperature_train_seconds'])} "
             f"(temperature) of training (wall time, every process together).  Scored on {lg['tokens']:,} held-out test tokens ({lg['rows']} rows, "
             f"{lg['bytes']:,} bytes); 95% intervals by bootstrap over rows.  Layer l = resid_pre[l]; the last row "
             f"is the model itself (layer {report['layers'][-1]}); layers fitted and scored: "
             f"{'all' if len(report['layers']) - 1 == s.get('n_layers') else s.get('layers')}.  Oracle: " + report["oracle_note"] + ".", "",
             "| layer | KL logit [95%] | KL temperature [95%] | T | KL tuned [95%] | KL oracle [95%] | top-1 logit [95%] | "
             "top-1 temp [95%] | top-1 tuned [95%] | top-1 oracle | bits/byte logit | bits/byte temp | bits/byte tuned |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, layer in enumerate(report["layers"]):
        t = te["temperature"][i] if i < len(te["temperature"]) else 1.0
        lines.append(f"| {layer} | {lg['kl'][i]:.3f} {iv(lg, 'kl', i)} | {te['kl'][i]:.3f} {iv(te, 'kl', i)} | {t:.2f} | "
                     f"{tu['kl'][i]:.3f} {iv(tu, 'kl', i)} | {fr['kl'][i]:.3f} {iv(fr, 'kl', i)} | "
                     f"{lg['top1'][i]:.3f} {iv(lg, 'top1', i)} | {te['top1'][i]:.3f} {iv(te, 'top1', i)} | "
                     f"{tu['top1'][i]:.3f} {iv(tu, 'top1', i)} | {fr['top1'][i]:.3f} | {lg['ce_bits_per_byte'][i]:.3f} | "
                     f"{te['ce_bits_per_byte'][i]:.3f} | {tu['ce_bits_per_byte'][i]:.3f} |")
    if report.get("plan"):
        lines += ["", *plan_lines(report["plan"])]
    lines += ["", "Validation loss (summed over layers) by step, tuned / temperature: " +
              ", ".join(f"{a[0]}: {a[1]:.3f} / {b[1]:.3f}" for a, b in zip(pl["tuned_lens"]["curve"],
                                                                          pl["temperature_control"]["curve"]))]
    return lines


def by_layer(scores: dict) -> dict:
    """{model layer (str): {lens: {"kl", "kl_interval_95", "top1", "top1_interval_95"}}} from
    `score_lenses`'s lists (the last layer, n_layers, is the model itself)."""
    out = {}
    for i, layer in enumerate(scores["logit_lens"]["layers"]):
        out[str(layer)] = {name: {"kl": s["kl"][i], "kl_interval_95": [s["kl_interval_95"][0][i], s["kl_interval_95"][1][i]],
                                  "top1": s["top1"][i],
                                  "top1_interval_95": [s["top1_interval_95"][0][i], s["top1_interval_95"][1][i]]}
                           for name, s in scores.items()}
    return out


def optimiser_steps(log: list[dict], accumulate: int) -> list[dict]:
    """The training loop's log (one record per evaluation, `step` counting batches) with
    `step` in optimiser steps (`accumulate` batches each) and the batch count kept as `batches`."""
    return [{**r, "step": r["step"] // accumulate, "batches": r["step"]} for r in log]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for key, ax, title in (("kl", axes[0], "KL(model || lens), nats/token"), ("top1", axes[1], "top-1 agreement"),
                           ("ce_bits_per_byte", axes[2], "next-token CE, bits/byte")):
        for name, style in (("logit_lens", "o-"), ("temperature_control", "d-"), ("tuned_lens", "s-"),
                            ("frozen_scale_oracle", "^:")):
            v, xs = report[name][key], report["layers"]
            if key == "kl":  # the model against itself is KL 0: off a log axis (it drew a drop to -inf)
                v, xs = v[:-1], xs[:-1]
            ax.plot(xs, v, style, ms=3, label=name.replace("_", " "))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer (resid_pre)")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(report["model"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def initial_lens(path: Path | None, model, layers: tuple[int, ...] | None) -> TunedLens:
    """The tuned lens training starts from: identity translators (`TunedLens.init`), or the
    lens saved at `path` (a warm start), which must be fitted to this model on these layers."""
    if path is None:
        return TunedLens.init(model.config, layers)
    try:
        lens, _ = load_tuned_lens(path, model)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--init-lens: {e}") from None
    want = tuple(layers) if layers is not None else tuple(range(model.config.n_layers))
    if tuple(lens.layer_indices) != want:
        raise SystemExit(f"--init-lens: {path} holds layers {list(lens.layer_indices)}, this run fits {list(want)} "
                         "(set --layers to match)")
    return lens


def main(argv=None, on_checkpoint=None) -> dict:
    args = parse_args(argv)
    model, tok = models.load(args.model)
    if tok is None:
        raise SystemExit(f"{args.model}: no tokenizer next to the model; the corpora need one")
    layers = resolve_layers(args.layers, model.config.n_layers)
    if args.seq > model.config.max_seq_len:
        raise SystemExit(f"--seq {args.seq} exceeds the model's context {model.config.max_seq_len}")
    K = args.accumulate
    corpora = tuple(args.corpora)
    train_rows = data.mixed_rows(corpora, tok, args.seq + 1, "train", seed=args.seed)
    plan = training_plan(model.config, args.batch, args.seq, args.steps, K, layers)
    plan["train_tokens_available"] = int(len(train_rows) * args.seq)  # predicted tokens in the train rows
    plan["epochs"] = plan["tokens"] / max(1, plan["train_tokens_available"])
    print("\n".join(plan_lines(plan)))
    if args.plan:
        return {"plan": plan}
    # the test rows: as even a share of each corpus as eval_rows and the corpora's test splits
    # allow (the first rows of each; a small split gives all it has, the others make up the rest)
    test_parts = [data.load_tokens(name, tok, args.seq + 1, "test") for name in corpora]
    shares = test_shares(args.eval_rows, [len(r) for r in test_parts], corpora, args.seq + 1)
    test_rows = interleave([r[:k] for r, k in zip(test_parts, shares) if k])
    val_rows = data.mixed_rows(corpora, tok, args.seq + 1, "validation", seed=args.seed,
                               n_rows=max(args.batch, 8))
    info = {"lens": "tuned", "model_name": str(args.model), "corpora": list(corpora), "lr_scale": args.lr_scale,
            **({"init_lens": str(args.init_lens)} if args.init_lens else {}),
            "optimizer": "clip 1.0 -> add_decayed_weights 1e-3 -> sgd nesterov 0.9, linear decay to 0"}

    def fit(init, loss_fn, out_dir):
        # the same rows, optimiser, steps and validation for the tuned lens and its control;
        # the training loop counts batches: K of them per optimiser step
        opt, lr_fn = reference_optimizer(args.steps, args.lr_scale, accumulate=K)
        cfg = train.TrainConfig(steps=args.steps * K, batch_size=args.batch, lr=float(lr_fn(0)), warmup_steps=0,
                                weight_decay=WEIGHT_DECAY, eval_every=args.eval_every * K, eval_batches=1,
                                checkpoint_every=args.checkpoint_every * K, seed=args.seed)
        clock = TrainClock(out_dir)
        result = train.train(init, train_rows, val_rows, cfg, out_dir,
                             train.TrainOptions(progress=not args.no_progress, on_checkpoint=clock.hook(on_checkpoint),
                                                run_info=info, loss_fn=loss_fn, opt=opt,
                                                rows_config=model.config, lr_fn=lr_fn))
        return result, optimiser_steps(result.log, K), clock.seconds(), float(lr_fn(0))

    result, train_log, train_s, lr0 = fit(initial_lens(args.init_lens, model, layers), TunedLensLoss(model),
                                          args.out)
    temp, temp_log, temp_s, _ = fit(TemperatureLens.init(model.config, layers), TemperatureLensLoss(model),
                                    args.out / "temperature")
    n_bytes = row_bytes(tok, test_rows)
    t0 = time.perf_counter()
    # all four from one forward per test row (score_lenses)
    scores = score_lenses(model, {"logit_lens": None, "tuned_lens": result.model, "temperature_control": temp.model,
                                  "frozen_scale_oracle": FROZEN_SCALE},
                          test_rows, n_bytes, progress=not args.no_progress, cache=args.out / "score_cache.npz")
    scores["temperature_control"]["temperature"] = [float(t) for t in np.exp(np.asarray(temp.model.log_temperature))]
    lens_layers = list(result.model.layer_indices)
    settings = {"steps": args.steps, "batch": args.batch, "accumulate": K, "seq": args.seq, "corpora": list(corpora),
                "layers": lens_layers, "n_layers": int(model.config.n_layers),
                "lr": lr0, "eval_rows": int(len(test_rows)), "seed": args.seed, "eval_every": args.eval_every,
                "eval_rows_per_corpus": dict(zip(corpora, (int(k) for k in shares))),
                "init_lens": str(args.init_lens) if args.init_lens else None}
    n = len(lens_layers)
    beats = [bool(scores["tuned_lens"]["kl_interval_95"][1][i] < scores["temperature_control"]["kl_interval_95"][0][i])
             for i in range(n)]
    preset_values = {k: layer_list(v) if k == "layers" else v for k, v in PRESETS[args.preset].items()}
    changed = {k: getattr(args, k) for k, v in preset_values.items() if getattr(args, k) != v}
    preset = args.preset + (" preset, overridden: " + ", ".join(f"{k}={v}" for k, v in changed.items())
                            if changed else " preset")
    report = {"model": str(args.model), "preset": preset, "settings": settings,
              "layers": scores["logit_lens"]["layers"], **scores, "by_layer": by_layer(scores),
              "vocab_size": int(model.config.vocab_size),
              "oracle_note": "frozen_scale_oracle decodes layer l with the FINAL layer's per-position norm divisor: "
                             "an oracle bound (information no lens has at layer l), not a baseline",
              "tuned_beats_temperature_kl": beats,
              "plateau": {"tuned_lens": plateau(train_log), "temperature_control": plateau(temp_log)},
              "train_log": train_log, "temperature_train_log": temp_log, "plan": plan, "train_seconds": train_s,
              "temperature_train_seconds": temp_s, "score_seconds": time.perf_counter() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    save_tuned_lens(result.model, args.out / "tuned_lens.safetensors", model, {**info, **settings})
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "report.md").write_text("\n".join(report_lines(report)) + "\n")
    plot(report, args.out / "lens_scores.png")
    print("\n".join(report_lines(report)))
    return report


if __name__ == "__main__":
    main()
