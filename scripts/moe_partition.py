"""Does MoEfication recover a real mixture of experts' experts?  Train tiny Mixtral-style
MoEs here (several seeds), merge each one's experts into one dense MLP, run MoEfication's
splits on it and score them against the true expert partition (adjusted Rand index).

    .venv/bin/python scripts/moe_partition.py --preset smoke --out /tmp/moe_smoke
    .venv/bin/python scripts/moe_partition.py --preset default --out runs/moe_partition

Presets (text: shakespeare + python-docs + python-code, the cached BPE-512 tokenizer):
  smoke    2 layers, d 64, 8 experts of 32 neurons, top-2; 120 steps of 8 x 32 tokens;
           2 seeds; 64 rows for the statistics (a few minutes on a shared CPU)
  default  the same model; 600 steps; 3 seeds; 256 rows
  random   no training (random init, 3 seeds): what the splits find in untrained weights
Writes --out/report.json (per seed and method: ARI per layer; the random control's draws;
expert usage; the final losses) and prints a summary.  Library: lens.modularity.moe_recovery.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lens import models  # noqa: E402
from lens.cli import Preset, int_at_least  # noqa: E402
from lens.modularity import moe_recovery as R  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402
from lens.training import data, train  # noqa: E402

compile_cache.enable()

CORPORA = ("shakespeare", "python-docs", "python-code")
PRESETS = {
    "smoke": Preset(steps=120, seeds=2, stat_rows=64, random_draws=10),
    "default": Preset(steps=600, seeds=3, stat_rows=256, random_draws=20),
    "random": Preset(steps=0, seeds=3, stat_rows=64, random_draws=20),
}
SEQ = 32


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int_at_least(0), default=None, help="override the preset's")
    ap.add_argument("--seeds", type=int_at_least(1), default=None, help="override the preset's")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def _stats(x: np.ndarray) -> dict:
    x = np.asarray(x, np.float64)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
            "min": float(x.min()), "max": float(x.max()), "n": int(x.size)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    p = PRESETS[args.preset].replace(**{k: v for k, v in (("steps", args.steps), ("seeds", args.seeds))
                                       if v is not None})
    from lens.training.bpe import corpus_tokenizer

    tok = corpus_tokenizer(CORPORA, 512)
    train_rows = data.mixed_rows(sorted(CORPORA), tok, SEQ + 1, "train", seed=0)
    val_rows = data.mixed_rows(sorted(CORPORA), tok, SEQ + 1, "validation", seed=0)
    stat_rows = val_rows[: p.stat_rows, :SEQ]
    config = R.moe_config(tok.vocab_size, seq_len=SEQ)
    runs = []
    start = time.perf_counter()
    for seed in range(p.seeds):
        model = models.init(config, jax.random.key(seed))
        log = []
        if p.steps:
            cfg = train.TrainConfig(steps=p.steps, batch_size=8, lr=3e-3, warmup_steps=20,
                                    eval_every=max(1, p.steps // 3), eval_batches=4,
                                    checkpoint_every=p.steps, seed=seed)
            result = train.train(model, train_rows, val_rows, cfg, args.out / f"seed{seed}",
                                 train.TrainOptions(loss_fn=R.MoELoss(0.01), progress=not args.no_progress,
                                                    run_info={"preset": args.preset, "seed": seed}))
            model, log = result.model, result.log
        acts = R.expert_activations(model, stat_rows)
        scores = R.recovery(model, acts, random_draws=p.random_draws, seed=1000 * seed)
        runs.append({"seed": seed, "log": log,
                     "expert_usage": R.expert_usage(acts, config.n_experts).tolist(),
                     "ari": {k: v.tolist() for k, v in scores.items()}})
        print(f"seed {seed}: " + "  ".join(f"{k} {np.mean(v):.3f}" for k, v in scores.items()), flush=True)
    methods = list(runs[0]["ari"])
    summary = {m: _stats([np.mean(r["ari"][m], axis=-1) if m != "random" else np.mean(r["ari"][m])
                          for r in runs]) for m in methods}
    summary["random_all_draws"] = _stats(np.concatenate([np.ravel(r["ari"]["random"]) for r in runs]))
    report = {"preset": args.preset, "steps": p.steps, "seeds": p.seeds, "stat_rows": p.stat_rows,
              "seconds": time.perf_counter() - start, "config": {
                  "d_model": config.d_model, "n_layers": config.n_layers, "n_experts": config.n_experts,
                  "expert_width": config.d_mlp, "k": config.experts_per_token, "seq": SEQ,
                  "tokenizer": "bpe-512 " + "+".join(CORPORA)},
              "summary": summary, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    for m in methods:
        s = summary[m]
        print(f"{m:13s} ARI mean over seeds {s['mean']:.3f} +- {s['std']:.3f} (min {s['min']:.3f}, max {s['max']:.3f})")
    return report


if __name__ == "__main__":
    main()
