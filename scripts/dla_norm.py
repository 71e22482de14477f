"""How much does the final norm change direct logit attribution? Frozen-scale DLA vs Shapley.

    .venv/bin/python scripts/dla_norm.py --out runs/dla_smollm2
    .venv/bin/python scripts/dla_norm.py --model runs/gpt2_ln_bpe/model --out runs/dla_ln
    .venv/bin/python scripts/dla_norm.py --preset smoke --out /tmp/dla

On held-out text (the first rows of the test split of each `lens.training.data` corpus, --seq
tokens each), at the last position, the logit difference between the model's top-1 and
top-2 tokens is attributed to the parts of the final residual (`lens.readout.dla`):
  (a) frozen-scale DLA (the final norm's actual divisor held fixed; exact sum);
  (b) Shapley values of the game "logit difference of the norm of a partial sum", which
      also credits what each part does to the divisor (exact over <= 16 groups, else
      --permutations sampled orders, antithetic, with a standard error).
Two granularities: layer groups (embeddings, each layer's attention, each MLP) and single
parts (every head, attention bias, MLP).  Disagreement per prompt: relative L1 distance
sum|a - b| / sum|a|, the magnitude ratio sum|b| / sum|a|, Spearman rank correlation, overlap of the top-5 by |value|, and the
share of the top-10 parts of (a) whose sign (b) flips.  Control: the same measures between
two sampled Shapley runs of different seeds (the estimation noise floor), and (b) with the
divisor frozen, which must equal (a).

Writes report.md, report.json and dla_scatter.png to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lens import models  # noqa: E402
from lens.training import data  # noqa: E402
from lens.readout import dla
from lens.cli import Preset, fill_from_preset, int_at_least  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402
from figures import answer_lines  # noqa: E402  (scripts/)

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)

CORPORA = ("shakespeare", "python-docs", "python-code")
PRESETS = {"default": Preset(prompts=12, seq=32, permutations=512),
           "smoke": Preset(prompts=2, seq=8, permutations=16)}
EXACT_MAX_GROUPS = 16


def parse_args(argv=None):
    """The command line, checked before any model is loaded."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="embedded name or model folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--prompts", type=int_at_least(1), default=None, help="held-out windows (override)")
    ap.add_argument("--seq", type=int_at_least(2), default=None, help="tokens per window (override)")
    ap.add_argument("--permutations", type=int_at_least(2), default=None, help="sampled orders (override)")
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    args = ap.parse_args(argv)
    return fill_from_preset(args, PRESETS[args.preset])


def disagreement(a: np.ndarray, b: np.ndarray) -> dict:
    return {k: float(v) for k, v in dla.disagreement(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)).items()}


@eqx.filter_jit
def _prompt(model, toks, member, key, n_perm, exact):
    """Everything for one prompt: top-2 tokens, (a) per part, Shapley per group and per part."""
    logits = model(toks)[-1]
    top2 = jax.lax.top_k(logits, 2)[1]
    parts = dla.residual_parts(model, toks)[:, -1]
    u, bu = dla.logit_direction(model, top2[0], top2[1])
    att = dla.frozen_dla(model, parts, u, bu)
    groups = member @ parts
    k1, k2, k3 = jax.random.split(key, 3)
    if exact:
        g_shap = dla.shapley_exact(model, groups, u, bu)
        g_se = jnp.zeros_like(g_shap)
        g_ctrl = g_shap
        g_frozen = dla.shapley_exact(model, groups, u, bu, frozen_scale=True)
    else:
        g_shap, g_se = dla.shapley_sampled(model, groups, u, bu, k1, n_perm)
        g_ctrl, _ = dla.shapley_sampled(model, groups, u, bu, k3, n_perm)
        g_frozen = member @ att.parts  # (frozen Shapley = (a) is checked on the exact path)
    p_shap, p_se = dla.shapley_sampled(model, parts, u, bu, k2, n_perm)
    p_ctrl, _ = dla.shapley_sampled(model, parts, u, bu, k3, n_perm)
    return dict(top2=top2, a=att.parts, constant=att.constant, total=att.total, g_shap=g_shap, g_se=g_se,
                g_ctrl=g_ctrl, g_frozen=g_frozen, p_shap=p_shap, p_se=p_se, p_ctrl=p_ctrl)


def summary(rows: list[dict]) -> dict:
    keys = rows[0].keys()
    return {k: {"median": float(np.median([r[k] for r in rows])), "min": float(np.min([r[k] for r in rows])),
                "max": float(np.max([r[k] for r in rows]))} for k in keys}


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, tok = models.load(args.model)
    if tok is None:
        raise SystemExit(f"{args.model}: no tokenizer next to the model")
    if args.seq > model.config.max_seq_len:
        raise SystemExit(f"--seq {args.seq} exceeds the model's context {model.config.max_seq_len}")
    group_names, member = dla.layer_groups(model.config)
    part_names = dla.part_names(model.config)
    exact = len(group_names) <= EXACT_MAX_GROUPS
    rows = data.mixed_rows(CORPORA, tok, args.seq, "test", n_rows=args.prompts, seed=None, even=True)
    t0 = time.perf_counter()
    keys = jax.random.split(jax.random.key(args.seed), len(rows))
    per_prompt, m_groups, m_parts, c_groups, c_parts, frozen_err = [], [], [], [], [], []
    for toks, key in zip(rows, keys):
        r = {k: np.asarray(v) for k, v in _prompt(model, jnp.asarray(toks), jnp.asarray(member, jnp.float32), key,
                                                     args.permutations, exact).items()}
        a_g = member.astype(np.float64) @ r["a"].astype(np.float64)
        m_groups.append(disagreement(a_g, r["g_shap"]))
        m_parts.append(disagreement(r["a"], r["p_shap"]))
        c_groups.append(disagreement(r["g_shap"], r["g_ctrl"]) if not exact else None)
        c_parts.append(disagreement(r["p_shap"], r["p_ctrl"]))
        frozen_err.append(float(np.abs(r["g_frozen"] - a_g).max()))
        top_a = int(np.argmax(np.abs(a_g)))
        per_prompt.append({"text": tok.decode([int(t) for t in toks])[-60:],
                           "top2": [tok.decode([int(t)]) for t in r["top2"]],
                           "logit_diff": float(r["total"]), "constant": float(r["constant"]),
                           "sum_a": float(r["a"].sum()), "sum_shapley_groups": float(r["g_shap"].sum()),
                           "largest_group_a": group_names[top_a], "largest_group_value_a": float(a_g[top_a]),
                           "largest_group_value_shapley": float(r["g_shap"][top_a]),
                           "groups_a": a_g.tolist(), "groups_shapley": r["g_shap"].tolist(),
                           "groups_shapley_se": r["g_se"].tolist(), "parts_a": r["a"].tolist(),
                           "parts_shapley": r["p_shap"].tolist(), "parts_shapley_se": r["p_se"].tolist()})
    report = {"model": str(args.model), "preset": args.preset, "norm": model.config.norm_kind,
              "settings": {"prompts": len(rows), "seq": args.seq, "permutations": args.permutations,
                           "group_shapley": "exact" if exact else "sampled", "seed": args.seed,
                           "quantity": "logit(top-1) - logit(top-2) at the last position"},
              "groups": group_names, "parts": part_names,
              "disagreement_groups": summary(m_groups), "disagreement_parts": summary(m_parts),
              "control_parts_two_seeds": summary(c_parts),
              "control_groups_two_seeds": None if exact else summary([c for c in c_groups if c]),
              "frozen_shapley_vs_a_max_abs": max(frozen_err), "prompts": per_prompt,
              "seconds": time.perf_counter() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = report_lines(report)
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    plot(report, args.out / "dla_scatter.png")
    print("\n".join(lines))
    return report


def report_lines(r: dict) -> list[str]:
    s = r["settings"]

    def row(name, d):
        return (f"| {name} | {d['rel_l1']['median']:.3f} ({d['rel_l1']['min']:.3f}-{d['rel_l1']['max']:.3f}) "
                f"| {d['abs_ratio']['median']:.2f} ({d['abs_ratio']['min']:.2f}-{d['abs_ratio']['max']:.2f}) "
                f"| {d['spearman']['median']:.3f} ({d['spearman']['min']:.3f}-{d['spearman']['max']:.3f}) "
                f"| {d['top5_overlap']['median']:.2f} ({d['top5_overlap']['min']:.2f}-{d['top5_overlap']['max']:.2f}) "
                f"| {d['top10_sign_flips']['median']:.2f} ({d['top10_sign_flips']['min']:.2f}-"
                f"{d['top10_sign_flips']['max']:.2f}) |")

    a, ctl = r["disagreement_parts"]["rel_l1"]["median"], r["control_parts_two_seeds"]["rel_l1"]["median"]
    text = (f"frozen-scale DLA (a) and the Shapley attribution over the final norm (b) differ by a median "
            f"relative L1 of {a:.3f} over {len(r['parts'])} parts (Spearman "
            f"{r['disagreement_parts']['spearman']['median']:.3f}), against {ctl:.3f} between two Shapley seeds: "
            + ("the difference is larger than the estimator's noise." if a > 2 * ctl
               else "the difference is within twice the estimator's noise, so it is not resolved."))
    lines = [f"# Frozen-scale DLA vs Shapley over the final norm: {r['model']} ({r['norm']} norm)", "",
             *answer_lines(text),
             f"{s['prompts']} held-out windows of {s['seq']} tokens; {s['quantity']}; group Shapley {s['group_shapley']}, "
             f"part Shapley from {s['permutations']} antithetic permutation pairs.  Median (min-max) over prompts.", "",
             "| comparison | rel. L1 | sum abs (b) / (a) | Spearman | top-5 overlap | top-10 sign flips |",
             "|---|---|---|---|---|---|",
             row(f"(a) vs (b), {len(r['groups'])} layer groups", r["disagreement_groups"]),
             row(f"(a) vs (b), {len(r['parts'])} parts", r["disagreement_parts"]),
             row("control: (b) seed 1 vs seed 2, parts", r["control_parts_two_seeds"])]
    if r["control_groups_two_seeds"]:
        lines.append(row("control: (b) seed 1 vs seed 2, groups", r["control_groups_two_seeds"]))
    lines += ["", f"(b) with the divisor frozen vs (a): max |difference| {r['frozen_shapley_vs_a_max_abs']:.2e}.", "",
              "| prompt (end) | top-1 / top-2 | logit diff | largest group by (a) | (a) | (b) |", "|---|---|---|---|---|---|"]
    for p in r["prompts"]:
        text = p["text"].replace("\n", "\\n").replace("|", "\\|")[-30:]
        t2 = " / ".join(repr(t) for t in p["top2"]).replace("|", "\\|")
        lines.append(f"| `{text}` | {t2} | {p['logit_diff']:.2f} | {p['largest_group_a']} "
                     f"| {p['largest_group_value_a']:.2f} | {p['largest_group_value_shapley']:.2f} |")
    return lines


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, (ka, kb, title) in zip(axes, (("groups_a", "groups_shapley", "layer groups"),
                                          ("parts_a", "parts_shapley", "heads / biases / MLPs"))):
        a = np.concatenate([p[ka] for p in r["prompts"]])
        b = np.concatenate([p[kb] for p in r["prompts"]])
        ax.scatter(a, b, s=6, alpha=0.6)
        lim = max(np.abs(a).max(), np.abs(b).max()) * 1.05
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.7)
        ax.set_xlabel("(a) frozen-scale DLA")
        ax.set_ylabel("(b) Shapley over the norm")
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{r['model']} ({r['norm']} norm): top-1 minus top-2 logit, {len(r['prompts'])} prompts", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
