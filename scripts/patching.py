"""Activation, attribution and path patching on IOI and factual recall: grids, heatmaps,
AtP / AtP* against true patching.

    .venv/bin/python scripts/patching.py --out runs/patching --preset default   # heads, 52 pairs x 2
    .venv/bin/python scripts/patching.py --out runs/patching_smoke --preset smoke   # < 3 min
    .venv/bin/python scripts/patching.py --out runs/patching_paper --preset paper   # every site: hours on CPU

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
import sys
import time
from pathlib import Path

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

import numpy as np  # noqa: E402

from lens.circuits import patching as Pt  # noqa: E402
from lens.cli import Preset, int_at_least, positive_float  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patching_report import heatmap, scatter, write_report  # noqa: E402

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)

SITES = tuple(Pt.SITES)


# pairs: per task and corruption, spread over ALL the task's templates (grids whose axis is a
# position are kept per template and laid side by side); perf_prompts: the "does the model do
# it" measurement; path_pairs: pairs for path patching (0: skipped); layers: keep only the
# first blocks (None: all; smoke: a quick run-through); boot: bootstrap resamples of pairs
PRESETS = {
    # smoke: the first 2 of SmolLM2's 30 blocks (the truncated model does not do the tasks;
    # it exercises every step end to end in under 3 minutes: the verdict says so)
    "smoke": Preset(pairs=4, perf_prompts=8, sites=("resid", "heads"), tasks=("ioi",),
                    corruptions=("s2", "abc"), path_pairs=2, heads_per_position=False, layers=2, boot=100),
    # default: what fits this 2-core CPU: 52 pairs (13 per IOI template) x both corruptions,
    # the head grid (the roles live there) and path patching on 4 pairs
    "default": Preset(pairs=52, perf_prompts=120, sites=("heads",), tasks=("ioi",), corruptions=("s2", "abc"),
                      path_pairs=4, heads_per_position=False, layers=None, boot=1000),
    # paper: every site and path patching on all 52 pairs (hours on this CPU: see
    # docs/findings/patching_ioi.md for the timings and the projection; an accelerator run)
    "paper": Preset(pairs=52, perf_prompts=120, sites=SITES, tasks=("ioi",), corruptions=("s2", "abc"),
                    path_pairs=52, heads_per_position=False, layers=None, boot=1000),
}
CORRUPTIONS = {"ioi": ("s2", "abc"), "fact": ("country",)}


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
    p.add_argument("--path-pairs", type=int_at_least(0), default=None,
                   help="pairs for path patching, spread over the length groups (0: skip; override the preset's)")
    p.add_argument("--tasks", type=choices_list(("ioi", "fact")), default=None,
                   help="comma-separated tasks (override the preset's)")
    p.add_argument("--sites", type=choices_list(SITES), default=None,
                   help="comma-separated sites (override the preset's)")
    p.add_argument("--corruptions", type=choices_list(("s2", "abc", "country")), default=None,
                   help="comma-separated corruptions (override the preset's; fact has only 'country')")
    p.add_argument("--receivers", type=int_at_least(1), default=3, help="path patching receiver heads")
    p.add_argument("--topk", type=int_at_least(1), default=10)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--memory-budget", type=positive_float, default=1.0, help="GiB per patch chunk")
    return p.parse_args(argv)


# ------------------------------------------------------------------ pairs and statistics
class Pooled:
    """Per-pair grids of one site over template groups.  A grid without a position axis is
    pooled over all pairs; one with a position axis (prompts of different templates may differ
    in length) is kept per length group and the groups' grids are laid side by side along
    the position axis.  Bootstrap resamples pairs WITHIN each group (stratified)."""

    def __init__(self, per_template: list[np.ndarray], positional: bool):
        self.groups, self.positional = per_template, positional

    def mean(self, groups=None) -> np.ndarray:
        groups = self.groups if groups is None else groups
        if self.positional:
            return np.concatenate([g.mean(0) for g in groups], axis=-1)
        return np.concatenate(groups, axis=0).mean(0)

    def resample(self, rng) -> list[np.ndarray]:
        return [g[rng.integers(0, len(g), len(g))] for g in self.groups]

    def per_pair(self) -> np.ndarray | None:
        return None if self.positional else np.concatenate(self.groups, axis=0)


def interval(samples: np.ndarray) -> list:
    """The 95% percentile interval over the leading (bootstrap) axis."""
    lo, hi = np.nanpercentile(samples, [2.5, 97.5], axis=0)
    return [np.round(lo, 5).tolist(), np.round(hi, 5).tolist()]


def boot_compare(effect: Pooled, estimates: dict, k: int, B: int, seed: int) -> dict:
    """Bootstrap 95% intervals of Pearson r and top-k overlap of each estimate against the
    patching effect (resampling pairs within templates, the same resample for all)."""
    from lens.circuits.attribution import compare_estimate

    rng = np.random.default_rng(seed)
    out = {name: {"pearson": [], "topk_overlap": []} for name in estimates}
    for _ in range(B):
        idx = [rng.integers(0, len(g), len(g)) for g in effect.groups]
        e = effect.mean([g[i] for g, i in zip(effect.groups, idx)])
        for name, est in estimates.items():
            a = est.mean([g[i] for g, i in zip(est.groups, idx)])
            c = compare_estimate(np.abs(e) if name == "atp_star" else e, a, k, n_false_negatives=0)
            out[name]["pearson"].append(c["pearson"])
            out[name]["topk_overlap"].append(c["topk_overlap"])
    return {name: {m: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))]
                   for m, v in d.items()} for name, d in out.items()}


def ranked(grid: np.ndarray, lo: np.ndarray, hi: np.ndarray, names, n: int = 8) -> list[dict]:
    """The n cells of largest |effect|, sign kept, each with its bootstrap interval."""
    flat = np.asarray(grid).ravel()
    order = np.argsort(-np.abs(flat), kind="stable")[:n]
    return [{"cell": names(int(j)), "effect": float(flat[j]), "interval": [float(np.ravel(lo)[j]),
                                                                           float(np.ravel(hi)[j])]}
            for j in order]


def run_corruption(model, tok, task, corruption, p: Preset, args, log):
    """Every grid of one task under one corruption, pooled over the task's templates."""
    from lens.circuits import tasks
    from lens.circuits.attribution import atp_star, attribution_patching, compare_estimate

    if task == "ioi":
        pairs = tasks.ioi_pairs(tok, p.pairs, seed=args.seed + 1, corruption=corruption)
    else:
        pairs = tasks.factual_pairs(tok, p.pairs, seed=args.seed + 1)
    budget = args.memory_budget * 2**30
    groups = []  # one per prompt LENGTH: templates of equal length stack (one compile each)
    for n_tok in sorted({len(q.clean) for q in pairs}):
        members = [q for q in pairs if len(q.clean) == n_tok]
        clean, corrupted, correct, wrong = tasks.stack_pairs(members)
        metric = Pt.normalized_metric(model, clean, corrupted,
                                      Pt.logit_diff_metric(correct, wrong, clean.shape[1] - 1))
        temps = sorted({q.template for q in members})
        tag = "t" + "/".join(str(t) for t in temps)
        words = [sorted({tok.decode([int(c[i])]) for c in clean}) for i in range(n_tok)]
        groups.append(dict(template=temps, clean=clean, corrupted=corrupted, correct=correct, wrong=wrong,
                           metric=metric,
                           labels=[f"{tag}:{w[0] if len(w) == 1 else '*'}" for w in words]))
    labels = [lab for g in groups for lab in g["labels"]]
    B = p.boot
    out = {"corruption": corruption, "n_pairs": len(pairs), "templates": sorted({q.template for q in pairs}),
           "length_groups": [g["template"] for g in groups],
           "pairs": [q.text for q in pairs],
           "clean_ld": [float(v) for g in groups for v in np.asarray(g["metric"].clean)],
           "corrupted_ld": [float(v) for g in groups for v in np.asarray(g["metric"].corrupted)],
           "position_labels": labels, "grid": {}, "compare": {}, "ranked": {}}
    for site in p.sites:
        positional = Pt.grid_axes(site)[-1] == "position"
        per = {"patching": [], "atp": [], "atp_qk_fix": [], "atp_star": []}
        secs = {"patching": 0.0, "atp": 0.0, "atp_star_and_qk": 0.0}
        for g in groups:
            args_ = (model, g["clean"], g["corrupted"], g["metric"])
            t0 = time.perf_counter()
            per["patching"].append(np.asarray(Pt.activation_patching(*args_, site=site, memory_budget=budget,
                                                                     progress=False)))
            t1 = time.perf_counter()
            per["atp"].append(np.asarray(attribution_patching(*args_, site=site)))
            t2 = time.perf_counter()
            if site in ("q_input", "k_input"):
                per["atp_qk_fix"].append(np.asarray(attribution_patching(*args_, site=site, qk_fix=True)))
            per["atp_star"].append(np.asarray(atp_star(*args_, site=site)))
            secs["patching"] += t1 - t0
            secs["atp"] += t2 - t1
            secs["atp_star_and_qk"] += time.perf_counter() - t2
        pooled = {k: Pooled(v, positional) for k, v in per.items() if v}
        rng = np.random.default_rng(args.seed)
        boots = {k: [] for k in pooled}
        for _ in range(B):
            idx = [rng.integers(0, len(g), len(g)) for g in per["patching"]]
            for k, pl in pooled.items():
                boots[k].append(pl.mean([g[i] for g, i in zip(pl.groups, idx)]))
        axes = Pt.grid_axes(site)
        means = {k: pl.mean() for k, pl in pooled.items()}
        cell = {k: {"mean": np.round(means[k], 5).tolist(), "interval_95": interval(np.stack(boots[k]))}
                for k in pooled}
        pp = pooled["patching"].per_pair()
        out["grid"][site] = {"axes": axes, "patching": cell["patching"]["mean"],
                             "patching_interval_95": cell["patching"]["interval_95"],
                             **{k: cell[k]["mean"] for k in pooled if k != "patching"},
                             **{f"{k}_interval_95": cell[k]["interval_95"] for k in pooled if k != "patching"},
                             **({"patching_per_pair": np.round(pp, 5).tolist()} if pp is not None else {}),
                             "seconds": secs}
        comp = {"atp": compare_estimate(means["patching"], means["atp"], args.topk)}
        if "atp_qk_fix" in means:
            comp["atp_qk_fix"] = compare_estimate(means["patching"], means["atp_qk_fix"], args.topk)
        comp["atp_star"] = compare_estimate(np.abs(means["patching"]), means["atp_star"], args.topk)
        ci = boot_compare(pooled["patching"], {k: pooled[k] for k in comp}, args.topk, max(20, B // 5), args.seed)
        for k in comp:
            comp[k]["pearson_interval_95"] = ci[k]["pearson"]
            comp[k]["topk_overlap_interval_95"] = ci[k]["topk_overlap"]
        out["compare"][site] = comp
        shape = means["patching"].shape
        lo, hi = (np.asarray(v) for v in cell["patching"]["interval_95"])
        name = (lambda j: f"L{np.unravel_index(j, shape)[0]} {labels[np.unravel_index(j, shape)[1]]}") \
            if positional else (lambda j: f"L{np.unravel_index(j, shape)[0]}.H{np.unravel_index(j, shape)[1]}")
        out["ranked"][site] = ranked(means["patching"], lo, hi, name)
        panels = {"patching": means["patching"], "AtP": means["atp"]}
        if "atp_qk_fix" in means:
            panels["AtP + QK fix"] = means["atp_qk_fix"]
        panels["AtP* (|.|)"] = means["atp_star"]
        heatmap(args.out / f"{task}_{corruption}_{site}.png", panels, axes,
                f"{task} ({corruption} corruption): {site}, denoising, mean of {len(pairs)} pairs over "
                f"{len(out['templates'])} templates ({len(groups)} prompt lengths)", labels if positional else None)
        ests = {"AtP": means["atp"]}
        if "atp_qk_fix" in means:
            ests["AtP + QK fix"] = means["atp_qk_fix"]
        ests["AtP*"] = means["atp_star"]
        scatter(args.out / f"{task}_{corruption}_{site}_scatter.png", means["patching"], ests,
                f"{task} ({corruption}): {site}")
        c = comp["atp"]
        log(f"  {task}/{corruption} {site}: patching {secs['patching']:.1f}s, AtP {secs['atp']:.1f}s; r(AtP) "
            f"{c['pearson']:.3f} {np.round(c['pearson_interval_95'], 3).tolist()}, top-{args.topk} overlap "
            f"{c['topk_overlap']:.2f} {np.round(c['topk_overlap_interval_95'], 2).tolist()}")
    if task == "ioi" and "heads" in out["grid"]:
        heads = np.asarray(out["grid"]["heads"]["patching"])
        top = [tuple(int(i) for i in np.unravel_index(j, heads.shape))
               for j in np.argsort(-np.abs(heads).ravel(), kind="stable")[:max(8, args.receivers)]]
        from lens.circuits.head_roles import head_roles

        roles = head_roles(model, [(g["clean"], g["correct"], g["wrong"]) for g in groups], top)
        for r in roles:
            r["denoising_effect"] = float(heads[tuple(r["head"])])
        out["head_roles"] = roles
        if p.path_pairs:
            out["path"] = path_section(model, groups, roles, p, args, budget, log, task, corruption)
    return out


def path_section(model, groups, roles, p, args, budget, log, task, corruption) -> dict:
    """Path patching, senders -> receivers' queries (noising), receivers chosen by ROLE:
    the top heads by |denoising effect| that attend from END to IO (name-mover signature),
    else the top heads by |effect|; then the all-senders completeness check per receiver."""
    from lens.circuits.path_patching import (additivity_sums, completeness_meaning, path_completeness,
                                             path_patching, path_shares)

    movers = [tuple(r["head"]) for r in roles if r["attn_end_to_io"] > r["attn_end_to_s"]
              and r["attn_end_to_io"] > 0.1 and r["head"][0] > 0]
    chosen = "END->IO attention > 0.1 and > END->S, among the top heads by |effect|"
    if not movers:
        movers = [tuple(r["head"]) for r in roles if r["head"][0] > 0]
        chosen = "no head attends END->IO: the top heads by |denoising effect| (layer > 0)"
    receivers = movers[: args.receivers]
    t0 = time.perf_counter()
    per, comp = [], {f"L{l}.H{h}": {"all_senders": [], "receiver_input": [], "base": []} for l, h in receivers}
    joint = {"all_senders": [], "receiver_input": [], "base": []}
    for g, n in zip(groups, path_shares(p.path_pairs, [len(g["clean"]) for g in groups])):
        if n <= 0:
            continue
        met = Pt.normalized_metric(model, g["clean"][:n], g["corrupted"][:n],
                                   Pt.logit_diff_metric(g["correct"][:n], g["wrong"][:n], g["clean"].shape[1] - 1))
        per.append(np.asarray(path_patching(model, g["clean"][:n], g["corrupted"][:n], met, receivers, "q",
                                            direction="noise", memory_budget=budget)) - 1.0)
        for l, h in receivers:
            r = path_completeness(model, g["clean"][:n], g["corrupted"][:n], met, [(l, h)], "q", "noise")
            for k in r:
                comp[f"L{l}.H{h}"][k] += np.asarray(r[k]).tolist()
        r = path_completeness(model, g["clean"][:n], g["corrupted"][:n], met, receivers, "q", "noise")
        for k in r:
            joint[k] += np.asarray(r[k]).tolist()
    pg = np.concatenate(per)  # [P, L, H], noising: 0 = the clean run's value
    # the last token (END, where the metric and the receivers' query are read) is the same
    # in clean and corrupted prompts: then the completeness fraction is ~1 by construction
    ends_match = all(bool((np.asarray(g["clean"])[:, -1] == np.asarray(g["corrupted"])[:, -1]).all())
                     for g in groups)
    rng = np.random.default_rng(args.seed)
    boots = np.stack([pg[rng.integers(0, len(pg), len(pg))].mean(0) for _ in range(p.boot)])
    effect = pg.mean(0)
    lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)
    completeness = {}
    for key, r in comp.items():
        a, o, b = (np.asarray(r[k]) for k in ("all_senders", "receiver_input", "base"))
        frac = lambda idx: float((a[idx] - b[idx]).mean() / ((o[idx] - b[idx]).mean() or np.nan))  # noqa: E731
        fb = [frac(rng.integers(0, len(a), len(a))) for _ in range(p.boot)]
        f = frac(np.arange(len(a)))
        own = float((o - b).mean())
        completeness[key] = {
            "fraction_explained": f, "fraction_interval_95": [float(np.nanpercentile(fb, 2.5)),
                                                              float(np.nanpercentile(fb, 97.5))],
            "all_senders_effect": float((a - b).mean()), "receiver_input_effect": own,
            "meaning": completeness_meaning(f, own, ends_match)}
    a, o, b = (np.asarray(joint[k]) for k in ("all_senders", "receiver_input", "base"))
    additivity = {"receivers": [list(r) for r in receivers], "all_senders_effect": float((a - b).mean()),
                  "receiver_input_effect": float((o - b).mean()),
                  **additivity_sums(effect, receivers),
                  "meaning": "the per-sender grid adds up to the all-senders effect only if the senders act "
                             "independently; a sum near 0 beside a large all-senders effect means the effect "
                             "needs several senders at once (no single cell shows it)"}
    names = lambda j: "L{}.H{}".format(*np.unravel_index(j, effect.shape))  # noqa: E731
    out = {"receivers": [list(r) for r in receivers], "receiver_choice": chosen, "receiver_input": "q",
           "direction": "noise", "pairs": int(len(pg)), "grid": np.round(effect, 5).tolist(),
           "grid_interval_95": [np.round(lo, 5).tolist(), np.round(hi, 5).tolist()],
           "axes": ["sender layer", "sender head"], "top_senders": ranked(effect, lo, hi, names),
           "path_completeness": completeness, "additivity": additivity, "seconds": time.perf_counter() - t0}
    heatmap(args.out / f"{task}_{corruption}_path.png", {"path patching effect": effect}, ["layer", "head"],
            f"senders -> queries of {receivers} ({corruption}, noising, normalised LD - 1, {len(pg)} pairs)")
    log(f"  path patching ({len(pg)} pairs) -> {receivers}: {out['seconds']:.1f}s; completeness "
        + ", ".join(f"{k} {v['fraction_explained']:.2f}" for k, v in completeness.items()))
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    p = PRESETS[args.preset]
    p = p.replace(**({"pairs": args.pairs} if args.pairs else {}),
                  **({"perf_prompts": args.perf_prompts} if args.perf_prompts else {}),
                  **({"path_pairs": args.path_pairs} if args.path_pairs is not None else {}),
                  **({"layers": args.layers} if args.layers else {}),
                  **({"tasks": args.tasks} if args.tasks else {}),
                  **({"sites": args.sites} if args.sites else {}),
                  **({"corruptions": args.corruptions} if args.corruptions else {}))
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
        result["tasks"][task] = {}
        for corruption in [c for c in p.corruptions if c in CORRUPTIONS[task]] or CORRUPTIONS[task][:1]:
            result["tasks"][task][corruption] = run_corruption(model, tok, task, corruption, p, args, log)
            # written after every corruption, so a long run has its finished parts on disk
            result["grid"] = {t: {c: r["grid"] for c, r in by.items()} for t, by in result["tasks"].items()}
            result["n_pairs"] = {t: {c: r["n_pairs"] for c, r in by.items()} for t, by in result["tasks"].items()}
            result["corruptions"] = {t: list(by) for t, by in result["tasks"].items()}
            result["path_completeness"] = {t: {c: r["path"]["path_completeness"] for c, r in by.items() if "path" in r}
                                           for t, by in result["tasks"].items()}
            result["seconds"] = time.perf_counter() - t_start
            (args.out / "report.json").write_text(json.dumps(result, indent=1))
            write_report(args.out, result)
    log(f"wrote {args.out}/report.md ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
