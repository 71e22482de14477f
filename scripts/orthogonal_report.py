"""Helpers of scripts/orthogonal_steering.py: plots and report.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from figures import answer_lines, save_figure

READINGS_STAGES = ("effective", "effective_first_order", "target", "last", "last_normed", "logits")


def plots(out: Path, analyses: dict, sweeps: dict, scores: dict) -> list[str]:
    """Cosine histograms per stage and set, degeneracy / effective cosine vs rho, code scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    stages = ("raw", "effective_exact", "effective_first_order", "target", "last", "logits")
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharey=False)
    axes = axes.ravel()
    for ax, st in zip(axes, stages):
        for label, a in analyses.items():
            c = a["cos_matrices"][st]
            off = c[~np.eye(len(c), dtype=bool)]
            ax.hist(off, bins=40, range=(-1, 1), alpha=0.5, label=label)
        ax.set_yscale("log")  # the parallel control piles every pair into one bin
        ax.set_title(st)
        ax.set_xlabel("pairwise cosine")
    axes[0].legend(fontsize=7)
    save_figure(fig, out, "cosine_histograms.png", names)

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
    save_figure(fig, out, "degeneracy_vs_rho.png", names)

    fig, ax = plt.subplots(figsize=(8, 3))
    labels = list(scores)
    ax.bar(range(len(labels)), [scores[k] for k in labels])
    ax.set_xticks(range(len(labels)), labels, rotation=70, fontsize=6)
    ax.set_ylabel("code score")
    ax.set_ylim(0, 1.05)
    save_figure(fig, out, "code_scores.png", names)
    return names


def _summary_lines(summary: dict) -> list[str]:
    """The raw table (after the answer): K / degeneracy factor per stage next to the random
    control (orthogonal to theta0, same norms), and the code scores."""
    k, deg = summary["k_vectors"], summary["degeneracy_factor"]
    ctrl = summary["controls"].get("random_control", {})
    n = summary["norms"]
    L = ["## Raw table", "",
         "Caution: raw PR mixes the shared component (forced by the objective) with few distinct effects; "
         "the decisive reading above separates them.", "",
         f"{k} MELBO-ortho vectors, orthogonal to theta0 and to each other in storage (max |cos| "
         f"{summary['raw_cosine_max_abs']:.1e}), |theta| {n['found_mean']:.1f} = {n['found_over_base']:.2f} x "
         f"|theta0| (rho = |theta| / median |x_s| = {summary['effective_cosine_mean']['rho_mean']:.2f}).", "",
         "| stage | degeneracy K/PR (found) | distinct vectors K/degeneracy | random control degeneracy | mean cos (found) |",
         "|---|---|---|---|---|"]
    cos = {"raw": 0.0, "effective": summary["effective_cosine_mean"]["exact"],
           "effective_first_order": summary["effective_cosine_mean"]["first_order"],
           **summary["downstream_cosine_mean"]}
    for st in ("raw", "effective", "effective_first_order", "target", "last", "logits"):
        c = ctrl.get(st)
        L.append(f"| {st} | {deg[st]:.2f} | {k / deg[st]:.1f} of {k} | {'' if c is None else f'{c:.2f}'} | "
                 f"{cos.get(st, float('nan')):.3f} |")
    cs = summary["code_score"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    L += ["", f"Code score (share of greedy replies to non-coding prompts that hold real Python): theta0 "
          f"{fmt(cs['base'])}, found vectors {fmt(cs['ortho_mean'])} (rescaled to |theta0|: "
          f"{fmt(cs['ortho_rescaled_to_base_mean'])}), random control {fmt(cs['random_control'])}, theta0 at the "
          f"found norm {fmt(cs['base_rescaled_to_found'])}, unsteered {fmt(cs['unsteered'])}.", ""]
    return L


def readings_lines(ans: dict) -> list[str]:
    """The table of both readings per stage (`lens.steering.melbo.stages.answer`'s dict): shared
    component (shared share) vs few distinct effects (specific PR; residual PR: the shared
    direction projected out whatever each vector's amount of it), found vs random controls
    (mean and range over seeds), then the closed form and the choices."""
    L = ["| stage | raw PR found (90% CI) | control (mean, seed range) | shared share found | control | "
         "specific PR found (ceiling K-1) | control | residual PR found (ceiling K-1) | control | "
         "cos(shared, theta0 effect) |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda r, d: (f"{r['found']:.{d}f} ({r['found_lo']:.{d}f}-{r['found_hi']:.{d}f})",  # noqa: E731
                        f"{r['control_mean']:.{d}f} ({r['control_min']:.{d}f}-{r['control_max']:.{d}f})")
    for stage, pr in ans["participation_ratio"].items():
        a, b = fmt(pr, 1)
        c, d = fmt(ans["shared_share"][stage], 2)
        e, f = fmt(ans["specific_participation_ratio"][stage], 1)
        g, h = fmt(ans["residual_participation_ratio"][stage], 1) if "residual_participation_ratio" in ans else ("", "")
        L.append(f"| {stage} | {a} | {b} | {c} | {d} | {e} | {f} | {g} | {h} | "
                 f"{ans['shared_cos_theta0'][stage]['found']:.2f} |")
    cf = ans["closed_form_per_token"]
    L += ["", f"Closed form pooled per token {cf['pooled_per_token']:.4f} vs {cf['at_mean_rho']:.4f} at the mean rho "
          f"{cf['mean_rho']:.3f}. Choices: `{json.dumps(ans['choices'])}`", ""]
    return L


def behaviour_lines(b: dict | None) -> list[str]:
    """Do vectors with close effects write code alike (lens.steering.melbo.behaviour)?"""
    if not b:
        return []
    sc = np.asarray(b["code_score"])
    L = ["## Behaviour per vector", "",
         f"Code score of each of {len(sc)} found vectors: mean {sc.mean():.2f}, {int((sc > 0).sum())} of {len(sc)} "
         f"wrote some code. {b['choices']}.", "",
         "| stage | clusters (sizes) | mean score per cluster | within-cluster mean abs diff (null 5-95%, p) | "
         "across (null, p) | Spearman(specific cos, score similarity) (null, p) |", "|---|---|---|---|---|---|"]
    for st in ("target", "logits"):
        r = b[st]

        def cell(x):
            return f"{x['value']:.3f} ({x['null_lo']:.3f}-{x['null_hi']:.3f}, p {x['p']:.3f})"

        L.append(f"| {st} | {r['n_clusters']} ({', '.join(map(str, r['cluster_sizes']))}) | "
                 f"{', '.join(f'{m:.2f}' for m in r['cluster_mean_score'])} | {cell(r['within_abs_diff'])} | "
                 f"{cell(r['across_abs_diff'])} | {cell(r['spearman_cos_vs_similarity'])} |")
    return L + [""]


def _readings_lines(summary: dict) -> list[str]:
    """The main report's readings section, from report.json's keys."""
    if "shared_share" not in summary:
        return []
    ans = {"participation_ratio": summary["participation_ratio_per_token"], "choices": summary["readings_choices"],
           **{k: summary[k] for k in ("shared_share", "specific_participation_ratio", "residual_participation_ratio",
                                      "shared_cos_theta0", "closed_form_per_token") if k in summary}}
    return ["## Both readings: shared component or few distinct effects?", "", *readings_lines(ans)]


def answer(summary: dict, calib: dict | None = None) -> list[str]:
    """The report's opening: how many of the K vectors are distinct in effect, at each stage,
    against the random control; a verdict on the behaviour numbers when theta0 never made the
    model write code (then the code scores can only show that nothing writes code)."""
    k, deg = summary["k_vectors"], summary["degeneracy_factor"]
    ctrl = summary["controls"].get("random_control", {})
    stages = [("effective", "after the norm"), ("target", "at the target layer"), ("logits", "in the logits")]
    parts = [f"{k / deg[st]:.1f} {where}" + (f" (random control {k / ctrl[st]:.1f})" if ctrl.get(st) else "")
             for st, where in stages if st in deg]
    text = (f"the {k} MELBO-ortho vectors, orthogonal in storage, act as this many distinct directions: "
            + ", ".join(parts) + ".")
    return answer_lines(text) + behaviour_verdict(summary, calib)


def behaviour_verdict(summary: dict, calib: dict | None = None) -> list[str]:
    """A verdict when theta0 never made the model write code: the code scores are then only a
    pipeline check."""
    lines = []
    base = summary.get("code_score", {}).get("base")
    no_code = (calib is not None and calib.get("calibrated") and not calib.get("wrote_code")) or base == 0
    if no_code:
        lines += ["**Verdict on behaviour: pipeline check only.** theta0 never made the model write code on "
                  "these prompts (code score 0), so the code scores below cannot tell vectors apart; the "
                  "geometry above does not depend on it.", ""]
    return lines


def write_markdown(out: Path, summary: dict, analyses: dict, settings: dict, samples: list[dict],
                   calib: dict | None = None) -> None:
    """report.md: settings, base-vector calibration, the key numbers per set and stage, the
    batched vs sequential comparison, timings, plots, a few generations."""
    L = [f"# Orthogonal steering vectors: how distinct are they? ({summary['model']})", ""]
    # The answer first: the decisive reading with its seed spread (lead_lines); reports of
    # older runs without it open with the degeneracy per stage (answer).
    L += (lead_lines(summary) + behaviour_verdict(summary, calib)) if "lead" in summary else answer(summary, calib)
    L += _summary_lines(summary)
    L += _readings_lines(summary)
    L += behaviour_lines(summary.get("behaviour_per_vector"))
    L += ["## Settings", "", "```", json.dumps(settings, indent=1), "```", ""]
    L += ["## Key numbers", ""]
    for k in ("source_layer", "target_layer", "layer_choice", "k_vectors", "raw_cosine_max_abs", "norms",
              "effective_cosine_mean", "downstream_cosine_mean", "first_token_effect_share",
              "degeneracy_factor", "code_score",
              "timing_s"):
        val = summary[k]
        if k == "code_score":
            val = {a: b for a, b in val.items() if a != "per_vector"}
        L.append(f"- **{k}**: `{json.dumps(val)}`")
    if calib is not None:
        L += ["", "## Base vector theta0: calibration", ""]
        if calib.get("calibrated"):
            verdict = ("the model wrote code" if calib.get("wrote_code") else
                       "NO design / rho made the model write code on these prompts; theta0 falls back to "
                       "'reply' at the smallest rho (the least destructive); its code score is therefore 0 and "
                       "the code scores below can only show that nothing writes code")
            L += [f"Chosen: **{calib['design']}** at rho {calib['rho']} ({verdict}). "
                  "Designs: 'reply' = CAA over the first reply positions of the model's own replies to "
                  "code vs prose requests; 'last' = CAA at the last prompt token. "
                  f"cos(reply, last) = {calib.get('cos_reply_last', float('nan')):.3f}.", "",
                  "| design | rho | norm | code score |", "|---|---|---|---|"]
            L += [f"| {r['design']} | {r['rho']} | {r['norm']:.1f} | {r['code_score']:.2f} |" for r in calib["table"]]
            L += ["", "One reply per setting (a code reply where there is one):", ""]
            for key, text in calib.get("examples", {}).items():
                L.append(f"- *{key}*: {text.replace(chr(10), ' ⏎ ')[:200]}")
        else:
            L.append(f"Not calibrated: {calib['design']} at --base-rho {calib['rho']}.")
    mc = summary.get("mode_comparison")
    if mc:
        L += ["", "## Batched vs sequential MELBO-ortho", "", mc["note"], "",
              "| quantity | sequential mean | sequential spread | batched mean | batched spread | diff | within seq. spread | within pooled spread |",
              "|---|---|---|---|---|---|---|---|"]
        for key, r in mc["summary"].items():
            L.append(f"| {key} | {r['sequential_mean']:.4g} | {r['sequential_spread']:.3g} | {r['batched_mean']:.4g} | "
                     f"{r['batched_spread']:.3g} | {r['difference']:.3g} | {r['within_spread']} | {r['within_pooled_spread']} |")
        L += ["", "Per run:", "", "| mode | seed | loss first / last | norm mean | degeneracy target / last / logits |",
              "|---|---|---|---|---|"]
        for mode, rows in mc["runs"].items():
            L += [f"| {mode} | {r['seed']} | {r['loss_first']:.2f} / {r['loss_last']:.2f} | {r['norm_mean']:.2f} | "
                  f"{r['target_degeneracy']:.2f} / {r['last_degeneracy']:.2f} / {r['logits_degeneracy']:.2f} |"
                  for r in rows]
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


def readings_plot(path: Path, ans: dict) -> None:
    """Shared share and specific PR per stage, found (bootstrap CI) vs control (seed range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = [s for s in READINGS_STAGES if s in ans["shared_share"]]
    x = np.arange(len(st))
    panels = [("shared_share", "shared share of effect energy"), ("specific_participation_ratio", "specific (centred) PR"),
              ("residual_participation_ratio", "residual PR (shared direction projected out)")]
    panels = [(k, t) for k, t in panels if k in ans]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    for (key, title), ax in zip(panels, axes):
        f = [ans[key][s]["found"] for s in st]
        err = [[f[i] - ans[key][s]["found_lo"] for i, s in enumerate(st)],
               [ans[key][s]["found_hi"] - f[i] for i, s in enumerate(st)]]
        ax.errorbar(x - 0.08, f, yerr=err, fmt="o-", label="found (90% bootstrap CI)")
        c = [ans[key][s]["control_mean"] for s in st]
        cerr = [[c[i] - ans[key][s]["control_min"] for i, s in enumerate(st)],
                [ans[key][s]["control_max"] - c[i] for i, s in enumerate(st)]]
        ax.errorbar(x + 0.08, c, yerr=cerr, fmt="s--", label="random control (seed range)")
        ax.set_xticks(x, st, rotation=30, ha="right")
        ax.set_title(title)
        ax.legend()
    save_figure(fig, path.parent, path.name, [])


def k_curve_plot(path: Path, curve: dict) -> None:
    """Raw and specific PR of the first K vectors against K, found vs control, per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = ("target", "last", "logits")
    fig, axes = plt.subplots(1, len(st), figsize=(13, 4))
    for ax, name in zip(axes, st):
        for who, style in (("found", "o-"), ("control", "s--")):
            c = curve[name][who]
            ax.plot(c["k"], c["participation_ratio"], style, label=f"{who}: raw PR")
            ax.plot(c["k"], c["specific_participation_ratio"], style, alpha=0.5, label=f"{who}: specific PR")
            if "residual_participation_ratio" in c:
                ax.plot(c["k"], c["residual_participation_ratio"], style, alpha=0.3, label=f"{who}: residual PR")
        ks = curve[name]["found"]["k"]
        ax.plot(ks, [k - 1 for k in ks], ":", c="grey", label="ceiling K - 1")
        ax.set_xlabel("K (first K vectors)")
        ax.set_title(f"distinct effects at {name}")
        ax.legend(fontsize=7)
    save_figure(fig, path.parent, path.name, [])


def closed_form_plot(path: Path, rows: list[dict], cf: dict) -> None:
    """Raw PR vs K at the effective stage: the closed form at the measured mean cosine (band:
    per-token 5-95%), the measured PR of the first K found vectors and of a control draw,
    extrapolated to the original's K; the ceiling PR = K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = np.array([r["k"] for r in rows], float)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.fill_between(k, [r["closed_form_lo"] for r in rows], [r["closed_form_hi"] for r in rows], alpha=0.2,
                    label="closed form, per-token cosine 5-95%")
    ax.plot(k, [r["closed_form"] for r in rows], "-", label=f"closed form at c = {cf['mean_cosine']:.3f}")
    m = [(r["k"], r["measured"], r["control_measured"]) for r in rows if r["measured"] is not None]
    if m:
        ax.plot([a for a, _, _ in m], [b for _, b, _ in m], "o", ms=3, label="measured, first K found")
        if m[0][2] is not None:
            ax.plot([a for a, _, _ in m], [c for _, _, c in m], "s", ms=3, alpha=0.6, label="measured, random control")
    ax.plot(k, k, ":", c="grey", label="PR = K (orthogonal)")
    ax.plot(k, k / 10, "--", c="grey", lw=0.8, label="10x degeneracy")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("raw PR after the norm (effective stage)")
    ax.set_title(f"normalisation alone: 10x from K = {cf.get('k_at_10x')}")
    ax.legend(fontsize=7)
    save_figure(fig, path.parent, path.name, [])


def lead_lines(summary: dict) -> list[str]:
    """The answer first (at most three sentences), then the decisive reading's declaration,
    the seed spread of the headline numbers, the closed form and the behaviour readings."""
    if "lead" not in summary:
        return []
    dec = summary["decisive_reading"]
    L = ["## The answer", "", " ".join(summary["lead"]), "",
         f"Decisive reading, declared before the run: **{dec['name']}**. Why: {dec['reason']}", "",
         "### Headline numbers over MELBO seeds (mean, min-max)", "", "| quantity | mean | min | max | seeds |",
         "|---|---|---|---|---|"]
    for key, v in summary["seed_spread"].items():
        L.append(f"| {key} | {v['mean']:.4g} | {v['min']:.4g} | {v['max']:.4g} | {v['n']} |")
    cf = summary["closed_form_pr"]
    L += ["", f"K = {summary['k_vectors']} of d = {summary['d_model']} (K/d = {summary['k_over_d']:.3f}; at the "
          f"original's d = {summary['original_d']} that is K = {summary['k_at_original_d_ratio']}).", "",
          "### The geometry's prediction: raw PR after the norm vs K", "",
          f"Closed form `K^2 / ((1 + (K-1)c)^2 + (K-1)(1-c)^2)` at the measured mean effective cosine c = "
          f"{cf['mean_cosine']:.4f} (per-token 5-95%: {cf['unit_cosine_p5']:.4f}-{cf['unit_cosine_p95']:.4f}); "
          f"10x raw degeneracy from K = {cf.get('k_at_10x')} (per-token range {cf.get('k_at_10x_range')}).", "",
          "| K | closed form (range) | measured found | measured control |", "|---|---|---|---|"]
    fmt = lambda x: "" if x is None else f"{x:.2f}"  # noqa: E731
    for r in summary["closed_form_pr_vs_k"]:
        if r["k"] in (2, 4, 8, 16, 32, 64, 128, 256, 512, 800, 1558) or r["k"] == summary["k_vectors"]:
            L.append(f"| {r['k']} | {r['closed_form']:.2f} ({r['closed_form_lo']:.2f}-{r['closed_form_hi']:.2f}) | "
                     f"{fmt(r['measured'])} | {fmt(r['control_measured'])} |")
    L += ["", "At other rho (idealised pair cosine, no gain): " + "; ".join(
        f"rho {a['rho']:.2f}: c {a['pair_cosine_closed_form']:.3f}, K = 800 {a['degeneracy_at_800']:.1f}x, "
        f"K = 1,558 {a['degeneracy_at_1558']:.1f}x, 10x from K = {a['k_at_10x']}" for a in cf["at_rho"]) + ". "
        + cf["note"] + ".", ""]
    br = summary["behaviour_readings"]
    L += ["### Readings by behaviour", "", f"Rule: {br['rule']}." + (f" {br['stopping']}." if br.get("stopping") else ""),
          "", "| group | n | stage | shared share (control) | specific PR (control) | residual PR (control) | "
          "raw PR (control) |", "|---|---|---|---|---|---|---|"]
    for g in ("code_writing", "other", "all"):
        grp = br[g]
        if grp["readings"] is None:
            L.append(f"| {g} | {grp['n']} | (fewer than 2 vectors) | | | | |")
            continue
        for st, cell in grp["readings"].items():
            c = [f"{cell[r]['found']:.2f} ({cell[r]['control_mean']:.2f})" for r in
                 ("shared_share", "specific_participation_ratio", "residual_participation_ratio", "participation_ratio")]
            L.append(f"| {g} | {grp['n']} | {st} | " + " | ".join(c) + " |")
    return L + [""]
