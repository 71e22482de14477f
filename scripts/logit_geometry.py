"""Logit and norm geometry of real models: a Markdown report with plots and a JSON.

    .venv/bin/python scripts/logit_geometry.py                      # SmolLM2 (RMSNorm)
    .venv/bin/python scripts/logit_geometry.py --model path/to/gpt2 --model path/to/pythia
    .venv/bin/python scripts/logit_geometry.py --no-default --model runs/gpt2_ln_bpe/model   # train_toy

Thin: parse arguments -> `lens.geometry.on_model.analyse` per model -> report.md, report.json
and PNG plots in --out DIR (default runs/logit_geometry_<timestamp>).  Per model:
  (a) top-k overlap / Spearman of rankings by cosine, token norm, Euclidean distance with
      the model's own ranking (final-norm gain folded into W_U) at each prompt's last token;
  (b) |resid| per layer (median, first token, max, outlier dims) and the |v|/|x| that the
      steering norms --steer-norms mean at each layer;
  (c) the effective cosine of two orthogonal (and two random) steering vectors versus
      rho = |v|/|x|, measured through the model's ln1 norm at real activations of
      --layer, next to the closed form.
A folder without a tokenizer is fed deterministic random tokens (said in the report).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

import numpy as np  # noqa: E402

from lens import models  # noqa: E402
from lens.cli import int_at_least, positive_float  # noqa: E402
from figures import answer_lines, save_figure  # noqa: E402  (scripts/)
from lens.geometry import on_model as gr  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)

DEFAULT_MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In 1969, Neil Armstrong became the first person to walk on the",
    "My favourite colour is blue because it reminds me of the",
    "The quick brown fox jumps over the lazy",
    "Water boils at a temperature of one hundred degrees",
]


def slug_of(name: str) -> str:
    """A name for the report: the embedded model's name, or a folder's last two parts
    (runs/gpt2_ln_bpe/model -> gpt2_ln_bpe_model), so train_toy's model/ folders differ."""
    parts = Path(name).parts
    return "_".join(parts[-2:]) if len(parts) > 1 else name


def prompt_ids(tokenizer, vocab: int, n_random: int = 6, length: int = 16) -> tuple[list, str]:
    if tokenizer is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, vocab, (n_random, length)).tolist(), "random tokens (no tokenizer)"
    return [tokenizer.encode(p, add_special_tokens=True) for p in PROMPTS], "PROMPTS"


def plot(out: Path, slug: str, r: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    e = r["effective_cosine"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(e["rho"], e["closed_form"], "k-", label="closed form")
    ax.plot(e["rho"], e["orthogonal"]["sphere"], "o", ms=4, label="orthogonal, measured (sphere)")
    ax.plot(e["rho"], e["orthogonal"]["with_gain"], "s", ms=3, label="orthogonal, with ln1 gain")
    ax.plot(e["rho"], e["random"]["sphere"], "x", ms=4, label="random pair (sphere)")
    ax.plot(e["rho"], e["orthogonal"]["first_order"], "--", c="grey", label="first order")
    ax.set_xscale("log")
    ax.set_xlabel("rho = |v| / |x|")
    ax.set_ylabel("cosine of effective displacements")
    ax.set_title(f"{slug}: layer {e['layer']} ln1, {e['n_activations']} activations")
    ax.legend(fontsize=7)
    save_figure(fig, out, f"{slug}_effective_cosine.png", names)

    t = r["norm_table"]
    rows = np.arange(len(t["median"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("median", "max", "first"):
        ax.plot(rows, t[key], marker=".", label=key if key != "first" else "first token")
    ax.set_yscale("log")
    ax.set_xlabel("layer (resid_pre; last = final norm input)")
    ax.set_ylabel("|x|" if r["config"]["norm_kind"] == "rms" else "|P x|")
    ax.set_title(f"{slug}: residual norm per layer")
    ax.legend(fontsize=7)
    save_figure(fig, out, f"{slug}_resid_norm.png", names)

    k = r["rankings"]
    scores = k["scores"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / (len(k["ks"]) + 1)
    x = np.arange(len(scores))
    for i, kk in enumerate(k["ks"]):
        ax.bar(x + i * width, k["overlap_mean"][i], width, label=f"top-{kk} overlap")
    ax.bar(x + len(k["ks"]) * width, k["spearman_mean"], width, label="Spearman", color="k", alpha=0.6)
    ax.set_xticks(x + 0.4 - width / 2, scores, fontsize=8)
    ax.axhline(0, c="k", lw=0.5)
    ax.set_ylabel("agreement with the model's ranking")
    ax.set_title(f"{slug}: ranking agreement (last token, mean over prompts)")
    ax.legend(fontsize=7)
    save_figure(fig, out, f"{slug}_ranking.png", names)
    return names


def answer(r: dict) -> list[str]:
    """The section's opening: which score ranks tokens like the model, and how far the
    effective cosine of orthogonal steering pairs at rho = 1 is from 0."""
    k, e = r["rankings"], r["effective_cosine"]
    best = int(np.argmax(k["spearman_mean"]))
    cos = float(np.interp(1.0, e["rho"], e["orthogonal"]["with_gain"]))
    closed = float(np.interp(1.0, e["rho"], e["closed_form"]))
    text = (f"`{k['scores'][best]}` ranks the last token's vocabulary closest to the model's logits "
            f"(Spearman {k['spearman_mean'][best]:.3f}); two orthogonal steering vectors at rho = 1 have an "
            f"effective cosine of {cos:.3f} at layer {e['layer']} (closed form on the sphere {closed:.3f}, "
            f"max |measured - closed form| {max(e['orthogonal']['max_abs_err_vs_closed']):.1e}): orthogonal "
            "in the stream is not orthogonal in effect.")
    return answer_lines(text)


def markdown(slug: str, r: dict, source: str, pngs: list[str]) -> str:
    c, k, t, e = r["config"], r["rankings"], r["norm_table"], r["effective_cosine"]
    lines = [f"## {slug}", "", *answer(r),
             f"{c['norm_kind']} norm (eps {c['norm_eps']:.1e}), {c['n_layers']} layers, "
             f"d_model {c['d_model']}, vocab {c['vocab']}; {r['n_prompts']} prompts "
             f"({source}), {r['n_tokens']} tokens.", "",
             "### Token ranking at the last token (agreement with the model's logits)", "",
             "| score | " + " | ".join(f"top-{kk}" for kk in k["ks"]) + " | Spearman |",
             "|---|" + "---|" * (len(k["ks"]) + 1)]
    for j, s in enumerate(k["scores"]):
        cells = [f"{k['overlap_mean'][i][j]:.2f}" for i in range(len(k["ks"]))]
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {k['spearman_mean'][j]:.3f} |")
    lines += ["", f"(decomposition vs the model's unembedding: max |logit error| "
              f"{k['max_logit_err']:.1e})", "",
              "### Residual norm per layer and what a steering norm means", "",
              "| layer | median | first token | first/median | max | outlier dims | "
              + " | ".join(f"rho @|v|={s:g}" for s in t["steer_norms"]) + " |",
              "|---|" + "---|" * (5 + len(t["steer_norms"]))]
    for i, med in enumerate(t["median"]):
        name = "final" if i == len(t["median"]) - 1 else str(i)
        rho = " | ".join(f"{x:.3g}" for x in t["rho"][i])
        lines.append(f"| {name} | {med:.1f} | {t['first'][i]:.1f} | {t['first_ratio'][i]:.1f} | "
                     f"{t['max'][i]:.1f} | {t['n_outlier_dims'][i]} | {rho} |")
    o, rd = e["orthogonal"], e["random"]
    lines += ["", f"### Effective cosine vs rho at layer {e['layer']} (ln1, "
              f"{e['n_activations']} real activations x {e['n_pairs']} pairs)", "",
              "| rho | closed form | orthogonal (sphere) | max err | with gain | first order "
              "| random (sphere) |", "|---|---|---|---|---|---|---|"]
    for i, rho in enumerate(e["rho"]):
        lines.append(f"| {rho:.3g} | {e['closed_form'][i]:.4f} | {o['sphere'][i]:.4f} | "
                     f"{o['max_abs_err_vs_closed'][i]:.1e} | {o['with_gain'][i]:.4f} | "
                     f"{o['first_order'][i]:.1e} | {rd['sphere'][i]:.4f} |")
    g = e["ln1_gain"]
    lines += ["", f"ln1 gain at layer {e['layer']}: mean {g['mean']:.3f}, std {g['std']:.3f}, "
              f"range [{g['min']:.3f}, {g['max']:.3f}].", ""]
    lines += [f"![{p}]({p})" for p in pngs] + [""]
    return "\n".join(lines)


def parse_args(argv=None):
    """The command line, every value checked before a model is loaded (--layer against each
    model's depth once it is, by `geometry_report.analyse`)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[],
                    help="a model folder (HF GPT-2, Pythia, ..., or scripts/train_toy.py's DIR/model) "
                         "or an embedded name, analysed besides the default; repeatable")
    ap.add_argument("--no-default", action="store_true", help=f"skip {DEFAULT_MODEL}")
    ap.add_argument("--layer", type=int_at_least(0), default=None, help="layer of the curve (default middle)")
    ap.add_argument("--steer-norms", type=positive_float, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--pairs", type=int_at_least(1), default=8, help="vector pairs per activation and rho")
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.no_default and not args.model:
        ap.error("nothing to analyse: give --model or drop --no-default")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out = args.out or Path("runs") / f"logit_geometry_{time.strftime('%Y%m%d_%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)

    names = ([] if args.no_default else [DEFAULT_MODEL]) + args.model
    report, md = {}, ["# Logit and norm geometry", ""]
    for name in names:
        t0 = time.time()
        model, tokenizer = models.load(name)
        slug = slug_of(name)
        ids, source = prompt_ids(tokenizer, model.config.vocab_size)
        pad = model.config.pad_token_id or 0
        r = gr.analyse(model, gr.make_batch(ids, pad), args.layer, None,
                       tuple(args.steer_norms), n_pairs=args.pairs, seed=args.seed)
        r["model"], r["prompts"], r["seconds"] = name, source, round(time.time() - t0, 1)
        report[slug] = r
        md.append(markdown(slug, r, source, plot(out, slug, r)))
        k, e = r["rankings"], r["effective_cosine"]
        i10 = k["ks"].index(10) if 10 in k["ks"] else 0
        print(f"{slug} ({r['seconds']} s): top-{k['ks'][i10]} overlap with the model: "
              + ", ".join(f"{s} {v:.2f}" for s, v in zip(k["scores"], k["overlap_mean"][i10]))
              + "; Spearman " + ", ".join(f"{s} {v:.3f}" for s, v in zip(k["scores"], k["spearman_mean"])))
        print(f"  |resid| median by layer: " + " ".join(f"{v:.3g}" for v in r["norm_table"]["median"]))
        print(f"  first-token |resid| / median, max over layers: {max(r['norm_table']['first_ratio']):.0f}")
        print(f"  layer {e['layer']}: max |measured - closed form| over rho "
              f"{max(e['orthogonal']['max_abs_err_vs_closed']):.1e}; cos at rho=1: closed "
              f"{np.interp(1.0, e['rho'], e['closed_form']):.3f}, with gain "
              f"{np.interp(1.0, e['rho'], e['orthogonal']['with_gain']):.3f}")
    (out / "report.md").write_text("\n".join(md))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out}/report.md")


if __name__ == "__main__":
    main()
