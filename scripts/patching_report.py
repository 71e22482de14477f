"""The patching report: heatmaps and AtP-vs-patching scatters (one shared, labelled colour
scale per figure), and report.md from the result `scripts/patching.py` builds (its verdict
first: does the model do the task).

    .venv/bin/python scripts/patching_report.py OUT   # report.md again from OUT/report.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def heatmap(path, panels, axes, title, labels=None, unit="normalised LD"):
    """One figure, ONE colour scale (symmetric about 0, shared by every panel), one labelled
    colour bar; the title wrapped so it is never clipped."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    lim = max(float(np.abs(g).max()) for g in panels.values()) or 1.0
    width = max(4.2, 0.12 * len(labels)) if labels is not None and axes[1] == "position" else 4.2
    fig, ax = plt.subplots(1, len(panels), figsize=(width * len(panels) + 1.0, 4.6), squeeze=False)
    for a, (name, g) in zip(ax[0], panels.items()):
        im = a.imshow(g, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        a.set_title(name, fontsize=9)
        a.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        a.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        a.set_ylabel(axes[0])
        a.set_xlabel(axes[1])
        if labels is not None and axes[1] == "position":
            a.set_xticks(range(len(labels)))
            a.set_xticklabels(labels, rotation=90, fontsize=5)
    fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.92, 0.93))
    cax = fig.add_axes((0.93, 0.15, 0.015, 0.7))
    fig.colorbar(im, cax=cax).set_label(unit, fontsize=8)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def scatter(path, effect, estimates, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, len(estimates), figsize=(3.8 * len(estimates), 3.8), squeeze=False)
    for a, (name, est) in zip(ax[0], estimates.items()):
        x = np.abs(effect) if name == "AtP*" else effect
        a.scatter(x.ravel(), est.ravel(), s=6, alpha=0.6)
        lo, hi = min(x.min(), est.min()), max(x.max(), est.max())
        a.plot([lo, hi], [lo, hi], "k--", lw=0.6)
        a.set_xlabel("|patching effect|" if name == "AtP*" else "patching effect")
        a.set_ylabel(name)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def fmt_ranked(rows: list[dict]) -> str:
    return ", ".join(f"{r['cell']} {r['effect']:+.3f} [{r['interval'][0]:+.3f}, {r['interval'][1]:+.3f}]"
                     for r in rows)


def verdict(result: dict) -> list[str]:
    """The report's first lines: does the model do the task, and so what the grids mean."""
    lines = []
    for task, perf in result["performance"].items():
        o = perf["overall"]
        if o["top1"] < 0.5 or o["ld_positive"] < 0.8:
            lines.append(f"**Verdict ({task}): the model does NOT do the task** (top-1 {o['top1']:.3f}, clean "
                         f"LD > 0 on {o['ld_positive']:.3f} of {o['n']} prompts): every grid, ranking and "
                         "correlation below is a pipeline check only, not a finding about a mechanism.")
        else:
            r = result["tasks"][task]
            best = {c: r[c]["ranked"].get("heads", [{}])[0] for c in r}
            lines.append(f"**Verdict ({task}): the model does the task** (top-1 {o['top1']:.3f}, LD > 0 on "
                         f"{o['ld_positive']:.3f}); the strongest head by |denoising effect| per corruption: " +
                         "; ".join(f"{c}: {b.get('cell')} {b.get('effect', float('nan')):+.3f}" for c, b in best.items()))
    return lines


def write_report(out_dir: Path, result: dict):
    lines = [f"# Patching report ({result['model']}, preset {result['preset']})", ""] + verdict(result) + [
             "", "Metric: normalised logit difference (LD - LD_corr) / (LD_clean - LD_corr) at the "
             "last token; denoising (the corrupted run, one clean activation patched in); grids "
             "are means over pairs of ALL the task's templates (position grids per prompt length, side by side), "
             "95% intervals by bootstrap over pairs within templates.  AtP: first-order estimate from one "
             "forward + one backward; QK fix and AtP* (QK fix + GradDrop, unsigned |effect|) per Kramar et "
             "al. 2024.  Machine: shared 2-core CPU, loaded.", "",
             "## Does the model do the task?", "",
             "| task | prompts | clean LD mean (std) | corrupted LD mean | LD > 0 | top-1 |",
             "|---|---|---|---|---|---|"]
    for task, perf in result["performance"].items():
        o = perf["overall"]
        lines.append(f"| {task} | {o['n']} | {o['clean_ld_mean']:.2f} ({o['clean_ld_std']:.2f}) | "
                     f"{o['corrupted_ld_mean']:.2f} | {o['ld_positive']:.3f} | {o['top1']:.3f} |")
    for task, by_c in result["tasks"].items():
        for corr, r in by_c.items():
            lines += ["", f"## {task}, {corr} corruption: {r['n_pairs']} pairs over templates {r['templates']}, "
                      f"e.g. \"{r['pairs'][0]}\"", "",
                      "| site | grid | patching s | r(AtP) [95%] | top-k AtP [95%] | r(QK fix) | "
                      "r(AtP*, abs) [95%] | top-k AtP* [95%] |", "|---|---|---|---|---|---|---|---|"]
            for site, c in r["compare"].items():
                g = r["grid"][site]
                shape = "x".join(str(s) for s in np.shape(g["patching"]))
                qk = c.get("atp_qk_fix")
                iv = lambda v: f"[{v[0]:.2f}, {v[1]:.2f}]"  # noqa: E731
                lines.append(
                    f"| {site} | {shape} | {g['seconds']['patching']:.1f} | {c['atp']['pearson']:.3f} "
                    f"{iv(c['atp']['pearson_interval_95'])} | {c['atp']['topk_overlap']:.2f} "
                    f"{iv(c['atp']['topk_overlap_interval_95'])} | "
                    f"{'' if qk is None else format(qk['pearson'], '.3f')} | {c['atp_star']['pearson']:.3f} "
                    f"{iv(c['atp_star']['pearson_interval_95'])} | {c['atp_star']['topk_overlap']:.2f} "
                    f"{iv(c['atp_star']['topk_overlap_interval_95'])} |")
            lines += ["", "Largest |effect| per site (sign shown, 95% interval):", ""]
            lines += [f"- {site}: {fmt_ranked(rows)}" for site, rows in r["ranked"].items()]
            if "head_roles" in r:
                lines += ["", "Head roles (top heads by |denoising effect|; attention from END, DLA on "
                          "logit(IO) - logit(S), scores on repeated random tokens):", "",
                          "| head | effect | END->IO | END->S | DLA | induction | duplicate | prev | role |",
                          "|---|---|---|---|---|---|---|---|---|"]
                for h in r["head_roles"]:
                    lines.append(f"| L{h['head'][0]}.H{h['head'][1]} | {h['denoising_effect']:+.3f} | "
                                 f"{h['attn_end_to_io']:.2f} | {h['attn_end_to_s']:.2f} | {h['dla_io_minus_s']:+.3f} | "
                                 f"{h['induction_score']:.2f} | {h['duplicate_token_score']:.2f} | "
                                 f"{h['previous_token_score']:.2f} | {h['role']} |")
            lines += [""] + [f"![{task} {corr} {s}]({task}_{corr}_{s}.png)" for s in r["compare"]]
            if "path" in r:
                pth = r["path"]
                lines += ["", f"Path patching (noising, {pth['pairs']} pairs): senders -> queries of "
                          f"{pth['receivers']} ({pth['receiver_choice']}); strongest senders by |effect| "
                          "(normalised LD - 1, sign shown, 95% interval): " + fmt_ranked(pth["top_senders"]), "",
                          "Completeness (all senders at once vs the receiver's whole query input):", ""]
                lines += [f"- {k}: fraction explained {v['fraction_explained']:.2f} [{v['fraction_interval_95'][0]:.2f}, "
                          f"{v['fraction_interval_95'][1]:.2f}] (all senders {v['all_senders_effect']:+.3f}, "
                          f"receiver input {v['receiver_input_effect']:+.3f}): {v['meaning']}"
                          for k, v in pth["path_completeness"].items()]
                ad = pth["additivity"]
                lines += ["", f"Additivity (all receivers together, senders = every head before layer "
                          f"{ad.get('senders_before_layer', '?')}): all senders {ad['all_senders_effect']:+.3f}, "
                          f"sum of those senders' single cells {ad['sum_of_single_sender_effects']:+.3f}, "
                          "the receivers' "
                          f"whole query input {ad['receiver_input_effect']:+.3f}: {ad['meaning']}.",
                          "", f"![path]({task}_{corr}_path.png)"]
    lines += ["", f"Total wall time {result['seconds']:.0f} s."]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")


def render(out_dir: Path) -> Path:
    """report.md again from out_dir/report.json (e.g. after a change to this file)."""
    out_dir = Path(out_dir)
    write_report(out_dir, json.loads((out_dir / "report.json").read_text()))
    return out_dir / "report.md"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: patching_report.py OUT  (a folder holding report.json)")
    print(f"wrote {render(Path(sys.argv[1]))}")
