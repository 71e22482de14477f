"""Activation, attribution and path patching on IOI and factual recall: grids, heatmaps,
AtP / AtP* against true patching.

    .venv/bin/python scripts/patching.py --out runs/patching --preset default
    .venv/bin/python scripts/patching.py --out runs/patching_smoke --preset smoke   # < 3 min

1. Does the model do each task?  Clean / corrupted logit differences and accuracy over
   --perf-prompts prompts of every template (lens.circuits.tasks.performance).
2. For each task, --pairs token-aligned pairs of ONE template (positions line up across
   pairs): the normalised logit difference (LD - LD_corr) / (LD_clean - LD_corr) as the
   metric, denoising (corrupted run, clean activation patched in); for every site the true
   patching grid (lens.circuits.patching.activation_patching, one vmapped call), AtP, AtP with the QK
   fix (q/k inputs) and AtP* (QK fix + GradDrop, unsigned), compared: Pearson correlation
   of the pair-mean effects, top-k overlap by |effect|, the worst false negatives.
3. Path patching (IOI): every sender head -> the queries of the --receivers heads with the
   largest denoising effect (Wang et al.'s definition, noising, lens.circuits.path_patching).
Writes report.md, report.json (`grid`: per task and site the patching grid, its axes, the
AtP / AtP* grids beside it) and PNGs (heatmaps, AtP-vs-patching scatters) into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

import numpy as np  # noqa: E402

from lens.circuits import patching as Pt  # noqa: E402
from lens.cli import Preset, int_at_least, positive_float  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)

SITES = tuple(Pt.SITES)


# pairs: per task for the grids; perf_prompts: for the "does the model do it" measurement;
# path_pairs: pairs for path patching (0: skipped); layers: keep only the first blocks
# (None: all; smoke: a quick run-through)
PRESETS = {
    # smoke: the first 2 of SmolLM2's 30 blocks (the truncated model does not do the tasks;
    # it exercises every step end to end in under 3 minutes)
    "smoke": Preset(pairs=1, perf_prompts=8, sites=("resid", "heads", "q_input"), tasks=("ioi",), path_pairs=1,
                    heads_per_position=False, layers=2),
    # default: the README's IOI tables (3 pairs, every site, path patching on 2 pairs;
    # 54 min on the loaded 2-core machine).  The README's factual-recall table is the
    # override `--tasks fact --pairs 2 --perf-prompts 111 --sites resid,heads,q_input,k_input`.
    "default": Preset(pairs=3, perf_prompts=120, sites=SITES, tasks=("ioi",), path_pairs=2, heads_per_position=False,
                      layers=None),
}
TEMPLATE = {"ioi": 0, "fact": 1}  # the template of the grids' pairs


def choices_list(allowed):
    """argparse type: a comma-separated, non-empty list of names from `allowed`."""
    def parse(text: str) -> tuple[str, ...]:
        parts = tuple(t.strip() for t in text.split(","))
        bad = [t for t in parts if t not in allowed]
        if not text.strip() or bad:
            raise argparse.ArgumentTypeError(f"must be comma-separated names from {', '.join(allowed)}; "
                                             f"got {text!r}")
        return parts
    return parse


def parse_args(argv=None):
    """The command line, every value checked before any model is loaded."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--model", default="smollm2-135m-instruct", help="embedded name or folder")
    p.add_argument("--pairs", type=int_at_least(1), default=None, help="override the preset's")
    p.add_argument("--layers", type=int_at_least(1), default=None,
                   help="keep only the first N blocks (override the preset's)")
    p.add_argument("--perf-prompts", type=int_at_least(1), default=None, help="override the preset's")
    p.add_argument("--tasks", type=choices_list(("ioi", "fact")), default=None,
                   help="comma-separated tasks (override the preset's)")
    p.add_argument("--sites", type=choices_list(SITES), default=None,
                   help="comma-separated sites (override the preset's)")
    p.add_argument("--receivers", type=int_at_least(1), default=3, help="path patching receiver heads")
    p.add_argument("--topk", type=int_at_least(1), default=10)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--memory-budget", type=positive_float, default=1.0, help="GiB per patch chunk")
    return p.parse_args(argv)


def heatmap(path, panels, axes, title, labels=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    fig, ax = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for a, (name, g) in zip(ax[0], panels.items()):
        signed = g.min() < 0
        lim = np.abs(g).max() or 1.0
        im = a.imshow(g, aspect="auto", cmap="RdBu_r" if signed else "viridis",
                      vmin=-lim if signed else 0, vmax=lim)
        a.set_title(name, fontsize=9)
        a.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        a.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        a.set_ylabel(axes[0])
        a.set_xlabel(axes[1])
        if labels is not None and axes[1] == "position":
            a.set_xticks(range(len(labels)))
            a.set_xticklabels(labels, rotation=90, fontsize=6)
        fig.colorbar(im, ax=a, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def scatter(path, effect, estimates, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, len(estimates), figsize=(3.8 * len(estimates), 3.6), squeeze=False)
    for a, (name, est) in zip(ax[0], estimates.items()):
        x = np.abs(effect) if name == "AtP*" else effect
        a.scatter(x.ravel(), est.ravel(), s=6, alpha=0.6)
        lo, hi = min(x.min(), est.min()), max(x.max(), est.max())
        a.plot([lo, hi], [lo, hi], "k--", lw=0.6)
        a.set_xlabel("|patching effect|" if name == "AtP*" else "patching effect")
        a.set_ylabel(name)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_task(model, tok, task, p: Preset, args, log):
    from lens.circuits import tasks
    from lens.circuits.attribution import atp_star, attribution_patching, effect_stats
    from lens.circuits.path_patching import path_patching

    make = tasks.ioi_pairs if task == "ioi" else tasks.factual_pairs
    pairs = make(tok, p.pairs, seed=args.seed + 1, templates=[TEMPLATE[task]])
    clean, corrupted, correct, wrong = tasks.stack_pairs(pairs)
    metric = Pt.normalized_metric(model, clean, corrupted,
                                  Pt.logit_diff_metric(correct, wrong, clean.shape[1] - 1))
    labels = [tok.decode([t]) for t in clean[0]]
    budget = args.memory_budget * 2**30
    out = {"pairs": [p_.text for p_ in pairs], "tokens": labels,
           "clean_ld": np.asarray(metric.clean).tolist(),
           "corrupted_ld": np.asarray(metric.corrupted).tolist(), "grid": {}, "compare": {}}
    for site in p.sites:
        t0 = time.perf_counter()
        grid = np.asarray(Pt.activation_patching(model, clean, corrupted, metric, site=site,
                                                 memory_budget=budget, progress=True))
        t1 = time.perf_counter()
        atp = np.asarray(attribution_patching(model, clean, corrupted, metric, site=site))
        t2 = time.perf_counter()
        qk = None
        if site in ("q_input", "k_input"):
            qk = np.asarray(attribution_patching(model, clean, corrupted, metric, site=site, qk_fix=True))
        star = np.asarray(atp_star(model, clean, corrupted, metric, site=site))
        t3 = time.perf_counter()
        # normalised: the corrupted (base) run's value is 0, so effect = patched value
        base = np.zeros(grid.shape[:1] + (1,) * (grid.ndim - 1))
        effect, atp_e = grid - base, atp - base
        qk_e = None if qk is None else qk - base
        axes = Pt.grid_axes(site)
        out["grid"][site] = {
            "axes": axes, "patching": grid.mean(0).tolist(), "atp": atp_e.mean(0).tolist(),
            "atp_star": star.mean(0).tolist(), "patching_per_pair": grid.tolist(),
            **({"atp_qk_fix": qk_e.mean(0).tolist()} if qk is not None else {}),
            "seconds": {"patching": t1 - t0, "atp": t2 - t1, "atp_star_and_qk": t3 - t2},
        }
        out["compare"][site] = effect_stats(effect, atp_e, qk_e, star, args.topk)
        panels = {"patching": effect.mean(0), "AtP": atp_e.mean(0)}
        if qk is not None:
            panels["AtP + QK fix"] = qk_e.mean(0)
        panels["AtP* (|.|)"] = star.mean(0)
        heatmap(args.out / f"{task}_{site}.png", panels, axes,
                f"{task}: {site}, denoising, normalised LD, mean of {len(pairs)} pairs", labels)
        ests = {"AtP": atp_e.mean(0)}
        if qk is not None:
            ests["AtP + QK fix"] = qk_e.mean(0)
        ests["AtP*"] = star.mean(0)
        scatter(args.out / f"{task}_{site}_scatter.png", effect.mean(0), ests, f"{task}: {site}")
        c = out["compare"][site]
        log(f"  {task} {site}: patching {t1 - t0:.1f}s, AtP {t2 - t1:.1f}s; r(AtP) "
            f"{c['atp']['pearson']:.3f}, top-{args.topk} overlap {c['atp']['topk_overlap']:.2f}; "
            f"AtP* r(|.|) {c['atp_star']['pearson']:.3f}")
    if p.heads_per_position:
        g = np.asarray(Pt.activation_patching(model, clean, corrupted, metric, site="heads",
                                              per_position=True, memory_budget=budget))
        out["grid"]["heads_per_position"] = {"axes": Pt.grid_axes("heads", True), "patching": g.mean(0).tolist()}
    if task == "ioi" and p.path_pairs and "heads" in out["grid"]:
        heads = np.abs(np.asarray(out["grid"]["heads"]["patching"]))
        top = np.argsort(-heads.ravel())[: args.receivers]
        receivers = [tuple(int(i) for i in np.unravel_index(j, heads.shape)) for j in top]
        n = min(p.path_pairs, len(pairs))
        met = Pt.normalized_metric(model, clean[:n], corrupted[:n],
                                   Pt.logit_diff_metric(correct[:n], wrong[:n], clean.shape[1] - 1))
        t0 = time.perf_counter()
        pg = np.asarray(path_patching(model, clean[:n], corrupted[:n], met, receivers, "q",
                                         direction="noise", memory_budget=budget))
        effect = pg.mean(0) - 1.0  # noising: 1 = the clean run's value
        out["path"] = {"receivers": receivers, "receiver_input": "q", "direction": "noise",
                       "pairs": n, "grid": effect.tolist(), "axes": ["sender layer", "sender head"],
                       "seconds": time.perf_counter() - t0}
        heatmap(args.out / "ioi_path.png", {"path patching effect": effect}, ["layer", "head"],
                f"senders -> queries of {receivers} (noising, normalised LD - 1)")
        order = np.argsort(effect.ravel())[:5]
        out["path"]["top_senders"] = [
            {"sender": [int(i) for i in np.unravel_index(j, effect.shape)], "effect": float(effect.ravel()[j])}
            for j in order]
        log(f"  path patching ({n} pairs) -> {receivers}: {out['path']['seconds']:.1f}s")
    return out


def write_report(out_dir: Path, result: dict):
    lines = [f"# Patching report ({result['model']}, preset {result['preset']})", "",
             "Metric: normalised logit difference (LD - LD_corr) / (LD_clean - LD_corr) at the "
             "last token; denoising (the corrupted run, one clean activation patched in); grids "
             "are means over pairs of one template.  AtP: first-order estimate from one forward + "
             "one backward; QK fix and AtP* (QK fix + GradDrop, unsigned |effect|) per Kramar et "
             "al. 2024.  Machine: shared 2-core CPU, loaded.", "",
             "## Does the model do the task?", "",
             "| task | prompts | clean LD mean (std) | corrupted LD mean | LD > 0 | top-1 |",
             "|---|---|---|---|---|---|"]
    for task, perf in result["performance"].items():
        o = perf["overall"]
        lines.append(f"| {task} | {o['n']} | {o['clean_ld_mean']:.2f} ({o['clean_ld_std']:.2f}) | "
                     f"{o['corrupted_ld_mean']:.2f} | {o['ld_positive']:.3f} | {o['top1']:.3f} |")
    for task, r in result["tasks"].items():
        lines += ["", f"## {task}: {len(r['pairs'])} pairs, e.g. \"{r['pairs'][0]}\"", "",
                  "| site | grid | patching s | AtP s | r(AtP) | top-k AtP (ties) | r(QK fix) | top-k QK | "
                  "r(AtP*, abs) | top-k AtP* (ties) | worst AtP false negative (effect, est, rank) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for site, c in r["compare"].items():
            g = r["grid"][site]
            shape = "x".join(str(s) for s in np.shape(g["patching"]))
            qk = c.get("atp_qk_fix")
            fn = c["atp"]["worst_false_negatives"][0]
            qk_r = "" if qk is None else f"{qk['pearson']:.3f}"
            qk_k = "" if qk is None else f"{qk['topk_overlap']:.2f}"
            lines.append(
                f"| {site} | {shape} | {g['seconds']['patching']:.1f} | {g['seconds']['atp']:.1f} | "
                f"{c['atp']['pearson']:.3f} | {c['atp']['topk_overlap']:.2f} "
                f"({c['atp'].get('topk_overlap_ties', float('nan')):.2f}) | "
                f"{qk_r} | {qk_k} | "
                f"{c['atp_star']['pearson']:.3f} | {c['atp_star']['topk_overlap']:.2f} "
                f"({c['atp_star'].get('topk_overlap_ties', float('nan')):.2f}) | "
                f"{fn['site']} ({fn['effect']:.3f}, {fn['estimate']:.3f}, {fn['estimate_rank']}) |")
        lines += [""] + [f"![{task} {s}]({task}_{s}.png)" for s in r["compare"]]
        if "path" in r:
            pth = r["path"]
            lines += ["", f"Path patching (noising, {pth['pairs']} pairs): senders -> queries of "
                      f"{pth['receivers']}; strongest senders (effect on normalised LD): " +
                      ", ".join(f"{s['sender']} {s['effect']:.3f}" for s in pth["top_senders"]),
                      "", "![path](ioi_path.png)"]
    lines += ["", f"Total wall time {result['seconds']:.0f} s."]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    p = PRESETS[args.preset]
    p = p.replace(**({"pairs": args.pairs} if args.pairs else {}),
                  **({"perf_prompts": args.perf_prompts} if args.perf_prompts else {}),
                  **({"layers": args.layers} if args.layers else {}),
                  **({"tasks": args.tasks} if args.tasks else {}),
                  **({"sites": args.sites} if args.sites else {}))
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    from lens import models
    from lens.circuits import tasks
    from lens.models.core.transformer import first_blocks

    model, tok = models.load(args.model)
    if tok is None:
        raise SystemExit(f"{args.model} has no tokenizer: the tasks need one")
    if p.layers is not None:
        if p.layers > model.config.n_layers:
            raise SystemExit(f"--layers {p.layers} exceeds the model's {model.config.n_layers} blocks")
        model = first_blocks(model, p.layers)
    log = print
    result = {"model": str(args.model) + (f" (first {p.layers} blocks)" if p.layers else ""),
              "preset": args.preset, "config": p.as_dict(),
              "performance": {}, "tasks": {}}
    for task in p.tasks:
        make = tasks.ioi_pairs if task == "ioi" else tasks.factual_pairs
        perf = tasks.performance(model, make(tok, p.perf_prompts, seed=args.seed))
        result["performance"][task] = {k: v for k, v in perf.items() if k != "rows"}
        o = perf["overall"]
        log(f"{task}: {o['n']} prompts, clean LD {o['clean_ld_mean']:.2f}, LD>0 {o['ld_positive']:.3f}, "
            f"top-1 {o['top1']:.3f}")
    for task in p.tasks:
        result["tasks"][task] = run_task(model, tok, task, p, args, log)
        # written after every task, so a long run has its finished tasks on disk
        result["grid"] = {task: r["grid"] for task, r in result["tasks"].items()}
        result["seconds"] = time.perf_counter() - t_start
        (args.out / "report.json").write_text(json.dumps(result, indent=1))
        write_report(args.out, result)
    log(f"wrote {args.out}/report.md ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
