"""Helpers of scripts/orthogonal_steering.py: the code score, checkpoints, plots, report.md."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np

FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|$)", re.S)
CODE_HINTS = ("def ", "import ", "print(", "return ", "class ", "for ", " = ")


def code_score(text: str) -> float:
    """1.0 if the reply holds Python that `ast.parse` accepts: a fenced block (```python or
    a bare ```), or the whole reply / its longest run of lines that looks like code (one of
    def/import/print(/return/class/for/assignment).  0.0 otherwise."""
    for lang, body in FENCE.findall(text):
        if lang.lower() not in ("", "python", "py", "python3"):
            continue
        if body.strip() and _parses(body):
            return 1.0
    if any(h in text for h in CODE_HINTS):
        lines = text.strip().splitlines()
        for start in range(len(lines)):
            chunk = "\n".join(lines[start:])
            if any(h in chunk for h in CODE_HINTS) and len(chunk.strip()) > 8 and _parses(chunk):
                return 1.0
    return 0.0


def _parses(src: str) -> bool:
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return False
    # A lone name or string is prose that happens to parse.
    return any(not isinstance(n, ast.Expr) or isinstance(n.value, ast.Call) for n in tree.body)


def save_vectors(path: Path, tensors: dict[str, np.ndarray], metadata: dict) -> None:
    """Safetensors with string metadata, written atomically (a kill never leaves half a file)."""
    from safetensors.numpy import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(tmp),
              metadata={k: str(v) for k, v in metadata.items()})
    tmp.replace(path)


def load_vectors(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def plots(out: Path, analyses: dict, sweeps: dict, scores: dict) -> list[str]:
    """Cosine histograms per stage and set, degeneracy / effective cosine vs rho, code scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    stages = ("raw", "effective_exact", "target", "last", "logits")
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2), sharey=False)
    for ax, st in zip(axes, stages):
        for label, a in analyses.items():
            c = a["cos_matrices"][st]
            off = c[~np.eye(len(c), dtype=bool)]
            ax.hist(off, bins=30, range=(-1, 1), alpha=0.5, label=label)
        ax.set_title(st)
        ax.set_xlabel("pairwise cosine")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "cosine_histograms.png", dpi=90)
    names.append("cosine_histograms.png")
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for label, sw in sweeps.items():
        rho = sw["rho_grid"]
        for st, ls in (("effective_exact", "-"), ("target", "--"), ("last", ":"), ("logits", "-.")):
            a1.plot(rho, sw["degeneracy_vs_rho"][st], ls, marker="o", label=f"{label} {st}")
        a2.plot(rho, sw["effective_cosine_vs_rho"]["exact"], marker="o", label=f"{label} exact")
        a2.plot(rho, sw["effective_cosine_vs_rho"]["first_order"], "--", label=f"{label} first order")
    if sweeps:
        sw = next(iter(sweeps.values()))
        a2.plot(sw["rho_grid"], sw["closed_form"], "k:", label="closed form")
    for ax, yl in ((a1, "degeneracy factor K / PR"), (a2, "mean effective cosine")):
        ax.set_xscale("log")
        ax.set_xlabel("rho = |theta| / median |x_s|")
        ax.set_ylabel(yl)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "degeneracy_vs_rho.png", dpi=90)
    names.append("degeneracy_vs_rho.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3))
    labels = list(scores)
    ax.bar(range(len(labels)), [scores[k] for k in labels])
    ax.set_xticks(range(len(labels)), labels, rotation=70, fontsize=6)
    ax.set_ylabel("code score")
    fig.tight_layout()
    fig.savefig(out / "code_scores.png", dpi=90)
    names.append("code_scores.png")
    plt.close(fig)
    return names


def write_markdown(out: Path, summary: dict, analyses: dict, settings: dict, samples: list[dict]) -> None:
    """report.md: settings, the key numbers per set and stage, plots, a few generations."""
    L = [f"# Orthogonal steering vectors: how distinct are they? ({summary['model']})", ""]
    L += ["## Settings", "", "```", json.dumps(settings, indent=1), "```", ""]
    L += ["## Key numbers", ""]
    for k in ("source_layer", "target_layer", "k_vectors", "raw_cosine_max_abs", "norms",
              "effective_cosine_mean", "downstream_cosine_mean", "code_score"):
        L.append(f"- **{k}**: `{json.dumps(summary[k])}`")
    L += ["", "## Per set and stage", "",
          "| set | stage | mean cos | mean abs cos | PR | degeneracy K/PR | clusters (0.5 / 0.9) |",
          "|---|---|---|---|---|---|---|"]
    for name, a in analyses.items():
        for st in ("raw", "effective_exact", "effective_first_order", "target", "last", "logits"):
            s = a[st]
            L.append(f"| {name} | {st} | {s['cos_mean']:.3f} | {s['abs_cos_mean']:.3f} | "
                     f"{s['participation_ratio']:.2f} | {s['degeneracy_factor']:.2f} | "
                     f"{s['clusters']['0.5']} / {s['clusters']['0.9']} |")
        L.append(f"| {name} | norms mean (min-max) | {a['norms']['mean']:.2f} ({a['norms']['min']:.2f}-"
                 f"{a['norms']['max']:.2f}) | rho {a['rho_mean']:.3f} | closed-form cos {a['closed_form_cosine']:.3f}"
                 f" | logit KL {a['logit_kl_pairwise_mean']:.3g} | top-k overlap {a['logit_topk_overlap_mean']:.2f} |")
    L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in summary.get("plots", [])]
    L += ["", "## Generations (greedy; steering on prompt and generated tokens)", ""]
    for s in samples[:40]:
        text = s["text"].replace("\n", " ⏎ ")[:300]
        L.append(f"- **{s['label']}** (code {s['code']:.0f}) on *{s['prompt'][:50]}*: {text}")
    (out / "report.md").write_text("\n".join(L) + "\n")
