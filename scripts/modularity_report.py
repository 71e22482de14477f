"""report.md, PNGs and report.json of scripts/modularity.py (no model code here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from figures import answer_lines  # scripts/ (modularity.py runs from there)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x




def plot_pruning(report, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for i, (name, res) in enumerate(report["selective_pruning"].items()):
        corpora = [k for k in res["methods"]["ratio"]["records"][0] if isinstance(res["methods"]["ratio"]["records"][0][k], dict)]
        fig, axes = plt.subplots(1, len(corpora), figsize=(4.2 * len(corpora), 3.4), sharey=True)
        total = res["n_neurons"]
        for ax, corpus in zip(np.atleast_1d(axes), corpora):
            for method, style in (("ratio", "-o"), ("forget", "--s")):
                recs = res["methods"][method]["records"]
                xs = [100 * r["neurons_pruned"] / total for r in recs]
                ax.plot(xs, [r[corpus]["top1"] for r in recs], style, label=method)
                if method == "ratio" and "top1_ci95" in recs[0][corpus]:  # 95% interval over rows
                    ax.fill_between(xs, [r[corpus]["top1_ci95"][0] for r in recs],
                                    [r[corpus]["top1_ci95"][1] for r in recs], alpha=0.15)
            draws = res["methods"]["random"]["draws"]
            x = [100 * r["neurons_pruned"] / total for r in draws[0]]
            ys = np.array([[r[corpus]["top1"] for r in d] for d in draws])
            ax.plot(x, ys.mean(0), ":^", label=f"random ({len(draws)} draws)")
            if len(draws) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), alpha=0.2)
            ax.set_title(corpus)
            ax.set_xlabel("% MLP neurons pruned")
        np.atleast_1d(axes)[0].set_ylabel("top-1 accuracy (skip 50 common)")
        np.atleast_1d(axes)[0].legend(fontsize=7)
        fig.suptitle(f"selective pruning, forget = python-code: {name}", fontsize=9)
        fig.tight_layout()
        f = f"pruning_m{i}.png"
        fig.savefig(out / f, dpi=90, bbox_inches="tight")
        plt.close(fig)
        files.append(f)
    return files


def plot_moe(report, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for i, (name, res) in enumerate(report["moefication"].items()):
        if "table" not in res:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.6))
        combos = sorted({(r["split"], r["router"]) for r in res["table"]})
        for split, router in combos:
            rows = sorted((r for r in res["table"] if r["split"] == split and r["router"] == router), key=lambda r: r["fraction"])
            ax.plot([r["fraction"] for r in rows], [r["top1_agreement"] for r in rows],
                    {"weights": "-", "weights_signfree": "-.", "coact": "--", "random": ":"}[split] + {"oracle": "o", "centroid": "s", "mlp": "^"}[router],
                    label=f"{split} / {router}")
        ax.set_xlabel("fraction of experts used per token")
        ax.set_ylabel("top-1 agreement with dense")
        ax.set_title(f"MoEfication: {name}", fontsize=9)
        ax.legend(fontsize=6)
        fig.tight_layout()
        f = f"moefication_m{i}.png"
        fig.savefig(out / f, dpi=90, bbox_inches="tight")
        plt.close(fig)
        files.append(f)
    return files


def plot_dejavu(report, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for i, (name, res) in enumerate(report["contextual_sparsity"].items()):
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for which, style in (("trained", "-"), ("untrained", ":")):
            rec = res["recall"][which]
            ax.plot([r["kept"] for r in rec], [r["neuron_recall"] for r in rec], style + "o", label=f"neurons, {which}")
            ax.plot([r["kept"] for r in rec], [r["head_recall"] for r in rec], style + "s", label=f"heads, {which}")
        ax.set_xlabel("fraction kept (predicted top)")
        ax.set_ylabel("recall of the units that matter")
        ax.set_title(f"Deja Vu predictors: {name}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        f = f"dejavu_m{i}.png"
        fig.savefig(out / f, dpi=90, bbox_inches="tight")
        plt.close(fig)
        files.append(f)
    return files


def _f(x, nd=3):
    return "n/a" if x is None else f"{x:.{nd}f}"


FORGET = "python-code"


def answer(report) -> list[str]:
    """The report's opening: per model, what pruning by the forget/retain ratio did to the forget
    corpus against the retain corpora; a verdict where the model cannot predict the forget
    corpus in the first place (top-1 near 0: nothing to forget)."""
    parts, weak = [], []
    for name, res in report.get("selective_pruning", {}).items():
        rec = res["methods"]["ratio"]["records"]
        first, last = rec[0], rec[-1]
        corpora = [k for k in first if isinstance(first[k], dict)]
        if FORGET not in corpora:
            continue
        retain = [c for c in corpora if c != FORGET]
        drop = lambda c: first[c]["top1"] - last[c]["top1"]  # noqa: E731
        parts.append(f"{name}: pruning {100 * last['neurons_pruned'] / res['n_neurons']:.0f}% of MLP neurons lowers "
                     f"{FORGET} top-1 by {drop(FORGET):.3f} (from {first[FORGET]['top1']:.3f}) and the retain "
                     f"corpora's by {np.mean([drop(c) for c in retain]):.3f} on average")
        if first[FORGET]["top1"] < 0.05:
            weak.append(f"{name} (top-1 {first[FORGET]['top1']:.3f})")
    parts += sweep_answer(report) + sparsity_answer(report)
    if not parts:
        return answer_lines("nothing was run in this report (no section among --sections).")
    why = (f"the unpruned model cannot predict {FORGET} ({', '.join(weak)}), so there is no skill to remove "
           "selectively.") if weak else None
    return answer_lines("; ".join(parts) + ".", why)


def sweep_answer(report) -> list[str]:
    """--layers runs (`fit_sweep`): per model, one clause on how the held-out fits move with the
    training tokens (reference recall and top-k expert agreement at the smallest and largest
    count) and which fits did not stop at their plateau rule."""
    parts = []
    for name, res in report.get("fit_sweep", {}).items():
        fits = res["fits"]
        if not fits:
            continue

        def recall(fit):
            v = [p["held_out_final"]["recall_reference"] for p in fit["predictor_fit"]["per_layer"]]
            return f"{min(v):.3f}-{max(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"

        def agree(fit):
            per = [r["held_out_topk_agreement"] for r in fit["router_fit"]["per_layer"]]
            k = next(iter(per[0]))
            return k, float(np.mean([x for a in per for x in a[k]]))

        (k, a0), (_, a1) = agree(fits[0]), agree(fits[-1])
        unstopped = [f"{what} of layer {r['layer']} at {fit['train_tokens']:,} ({r['stop_reason']})"
                     for fit in fits for what, key in (("router", "router_fit"), ("predictor", "predictor_fit"))
                     for r in fit[key]["per_layer"] if r["stop_reason"] == "max_epochs"]
        counts = " / ".join(f"{f['train_tokens']:,}" for f in fits)
        parts.append(f"{name}, layers {res['layers']} fitted on {counts} training tokens of one "
                     f"{res['tokens_collected']:,}-token collection: the predictors' held-out recall at the reference's "
                     f"definition goes {recall(fits[0])} -> {recall(fits[-1])} and the routers' top-"
                     f"{100 * float(k):.0f}% expert agreement with the |a|-mass oracle (mean over layers and splits) "
                     f"{a0:.2f} -> {a1:.2f}; "
                     + ("every fit stopped by its plateau rule" if not unstopped else
                        "stopped by the epoch limit, not the plateau rule: " + ", ".join(unstopped)))
    return parts


def sparsity_answer(report) -> list[str]:
    """MoEfication / Deja Vu tables: per model, at the largest fraction kept, the per-neuron
    oracle's loss increase against the best split with oracle routing and with its trained
    MLP router; the predictors' reference recall and the loss of running every layer on
    their predicted neurons."""
    parts = []
    for name, moe in report.get("moefication", {}).items():
        if "table" not in moe:
            continue
        f = max(r["fraction"] for r in moe["per_neuron_oracle"])
        neuron = next(r for r in moe["per_neuron_oracle"] if r["fraction"] == f)
        top = max(r["fraction"] for r in moe["table"])
        rows = [r for r in moe["table"] if r["fraction"] == top]
        best = min((r for r in rows if r["router"] == "oracle"), key=lambda r: r["loss_increase"])
        mlp = next(r for r in rows if r["router"] == "mlp" and r["split"] == best["split"])
        parts.append(f"{name}: keeping {100 * f:.0f}% of the MLP neurons per token costs {neuron['loss_increase']:+.3f} "
                     f"nats (per-neuron oracle), {100 * top:.0f}% of the experts {best['loss_increase']:+.2f} with oracle "
                     f"routing (best split: {best['split']}) and {mlp['loss_increase']:+.2f} with its trained router")
    for name, dv in report.get("contextual_sparsity", {}).items():
        ref = dv["recall_reference"]["trained"]
        sparse = [r for r in dv["sparse_forward"] if r["predictor"] == "trained" and r["head_frac"] == 1.0]
        top = max(sparse, key=lambda r: r["neuron_frac"])
        parts.append(f"{name}: the Deja Vu predictors recall {ref['recall']:.3f} of the active neurons (the reference's "
                     f"definition, {100 * ref['classifier_sparsity']:.0f}% predicted on) and running every layer on its "
                     f"predicted {100 * top['neuron_frac']:.0f}% costs {top['loss_increase']:+.2f} nats")
    return parts


SECTIONS = (("selective_pruning", "selective pruning"), ("steering", "steering vs pruned neurons"),
            ("moefication", "MoEfication tables"), ("contextual_sparsity", "Deja Vu tables"))


def markdown(report, figures) -> str:
    a = report["args"]
    lines = ["# Modularity: selective pruning, MoEfication, contextual sparsity", "", *answer(report),
             f"Preset `{report['preset']}`; rows of {a['seq']} tokens; "
             + (f"{a['collect_rows']} rows per corpus for statistics / clustering / training, {a['eval_rows']} "
                "validation rows per corpus for every metric; " if any(report.get(k) for k, _ in SECTIONS) else "")
             + (f"total {report['seconds']['total']:.0f} s wall, {report['seconds'].get('cpu_total', 0):.0f} s CPU "
                f"({os.cpu_count()} CPU cores; 1-min load average at the end "
                f"{report.get('load_avg_1min_at_end', float('nan')):.1f})." if "parts" not in report["seconds"] else
                "joined from parts run apart, each part's own time: "
                + ", ".join(f"{p['total']:.0f} s wall / {p.get('cpu_total', 0):.0f} s CPU" for p in report["seconds"]["parts"])
                + " (a part whose runs were loaded from saved files counts only the loading)."), ""]
    not_run = [what for key, what in SECTIONS if not report.get(key)]
    if not_run:
        lines += [f"Not run in this report (`--sections {','.join(a.get('sections') or [])}`"
                  + (f", `--layers {','.join(map(str, a['layers']))}`" if a.get("layers") else "")
                  + f"): {', '.join(not_run)}.", ""]
    if report.get("selective_pruning"):
        lines += ["## Selective pruning (taker)", "",
              f"Forget = python-code, retain = shakespeare (prose; python-docs evaluated, never retained); "
              f"{100 * a['prune_frac']:.0f}% of all MLP neurons "
              "per step, chosen globally by mean|a| forget / (mean|a| retain + 1e-3) on the current pruned model; "
              f"baselines ({a['random_draws']} draws each): pruning by forget-set activation alone, random pruning of the "
              "same counts. Top-1 / top-10 skip the 50 most common tokens; loss over every token; [a, b] = 95% "
              "interval over rows.", ""]
    for name, res in report["selective_pruning"].items():
        rec0 = res["methods"]["ratio"]["records"]
        corpora = [k for k in rec0[0] if isinstance(rec0[0][k], dict)]
        fs, dd = res.get("first_step", {}), res.get("differential_drop", {})
        lines += [f"### {name}", "", f"Tokens collected: {res.get('tokens_collected')}; evaluated: "
                  f"{res.get('tokens_evaluated')}; statistics in {res.get('compute_dtype', 'float32')}.", ""]
        if res.get("parts"):
            lines += [f"Joined from {len(res['parts'])} parts (draws "
                      + ", ".join(str(p["draw_ids"]) for p in res["parts"]) + "): one study run in parts "
                      "(`--first-draw`), the same ratio run in each.", ""]
        if res.get("plan"):
            from lens.modularity.pruning_study import plan_lines

            lines += [*plan_lines(res["plan"]), ""]
        if fs:
            lines += [f"**First step selective: {'yes' if fs['selective'] else 'no'}** ({fs['definition']}).", ""]
        if dd:
            def rng(v):
                return f"{min(v):.1f} to {max(v):.1f}"
            lines += [f"Differential drop ({dd['definition']}): ratio max {dd['ratio']['max']:.1f}; random "
                      f"{rng([d['max'] for d in dd['random']])}; forget-only {rng([d['max'] for d in dd['forget']])}.", ""]
            lines += ["| step | % pruned | ratio forget top1 [95%] | ratio retain top1 [95%] | random retain top1 (min-max) "
                      "| forget-only retain top1 (min-max) |", "|---|---|---|---|---|---|"]
            ret, fg = res["retain"][0], res["forget"]
            sr, sf = res["baselines"]["random"]["summary"], res["baselines"]["forget"]["summary"]
            for r, a_, b_ in zip(rec0, sr, sf):
                lines.append(f"| {r['step']} | {100 * r['neurons_pruned'] / res['n_neurons']:.0f} | "
                             f"{r[fg]['top1']:.3f} [{r[fg]['top1_ci95'][0]:.3f}, {r[fg]['top1_ci95'][1]:.3f}] | "
                             f"{r[ret]['top1']:.3f} [{r[ret]['top1_ci95'][0]:.3f}, {r[ret]['top1_ci95'][1]:.3f}] | "
                             f"{a_[ret]['min']:.3f}-{a_[ret]['max']:.3f} | {b_[ret]['min']:.3f}-{b_[ret]['max']:.3f} |")
            lines.append("")
        lines += ["| method | step | % pruned | " + " | ".join(f"{c} top1 / top10 / loss" for c in corpora) + " |",
                  "|---|---|---|" + "---|" * len(corpora)]
        rows = [("ratio", r) for r in rec0] + [("forget", r) for r in res["methods"]["forget"]["records"][1:]]
        draws = res["methods"]["random"]["draws"]
        for step in range(1, len(draws[0])):
            mean = {c: {m: float(np.mean([d[step][c][m] for d in draws])) for m in ("top1", "top10", "loss")} for c in corpora}
            rows.append((f"random (mean of {len(draws)})", dict(draws[0][step], **mean)))
        for method, r in rows:
            lines.append(f"| {method} | {r['step']} | {100 * r['neurons_pruned'] / res['n_neurons']:.0f} | "
                         + " | ".join(f"{r[c]['top1']:.3f} / {r[c]['top10']:.3f} / {r[c]['loss']:.2f}" for c in corpora) + " |")
        lines += ["", f"Pruned neurons per layer (ratio): {res['layer_counts']}; saved with models.save and reloaded: "
                  f"max |logit diff| {res['reload_max_abs_logit_diff']:.2e}.", ""]
    if report.get("steering"):
        lines += ["## Steering vector vs pruned neurons", ""]
    for name, s in report["steering"].items():
        sp = s["span"]
        lines += [f"### {name}", "", f"Vector theta0: {s['method']}, at resid_pre[{s['layer']}] (after block "
                  f"{s['source_block']}), |theta0| = {s['theta0_norm']:.1f} (median |x| {s['resid_norm']:.1f}); greedy "
                  f"{s['gen_tokens']}-token replies to {len(s['prompts'])} neutral prompts, `lens.steering.code_score.code_score`.", ""]
        if sp.get("n_directions"):
            lines.append(f"Share of |theta0|^2 in the span of the {sp['n_directions']} most forget-specific pruned neurons' output "
                         f"directions (layers < {s['layer']}): **{sp['share_pruned']:.3f}**; random neurons: "
                         f"{sp['share_random_mean']:.3f} (range {sp['share_random_range'][0]:.3f}-{sp['share_random_range'][1]:.3f}); "
                         f"a random subspace of that size: {sp['share_expected_random_subspace']:.3f}.")
        lines += ["", f"Neurons pruned: {s['neurons_pruned']}; random rows: mean of {s['steer_seeds']} draws (steered range).", "",
                  "| model | code score, unsteered | code score, theta0 added |", "|---|---|---|"]
        for m, vals in s["code_score"].items():
            rng = f" ({vals['steered_range'][0]:.2f}-{vals['steered_range'][1]:.2f})" if "steered_range" in vals else ""
            lines.append(f"| {m} | {vals['unsteered']:.2f} | {vals['steered']:.2f}{rng} |")
        lines.append("")
    if report.get("moefication"):
        lines += ["## MoEfication", ""]
    for name, res in report["moefication"].items():
        if "table" not in res:
            lines += [f"### {name}", "", res.get("skipped", ""), ""]
            continue
        lines += [f"### {name}", "", f"{res['experts_per_layer']} experts of {res['expert_size']} neurons per layer; "
                  f"dense loss {res['dense_loss']:.3f}; co-activation: {res['coact_rule']}; {res['compute']}. "
                  f"Tokens: {res['tokens']}. {fit_line('Routers', res['router_training'])}", "",
                  "| split | router | fraction of experts | loss | top-1 agreement | abs mass kept |", "|---|---|---|---|---|---|"]
        for r in res["table"]:
            lines.append(f"| {r['split']} | {r['router']} | {r['fraction']:.3f} | {r['loss']:.3f} | {r['top1_agreement']:.3f} "
                         f"| {r.get('abs_mass_share', float('nan')):.3f} |")
        lines += ["", "Per-neuron oracle (top |a| x |W_out row| per token, no grouping):", "",
                  "| fraction of neurons | loss | increase | top-1 agreement |", "|---|---|---|---|"]
        for r in res.get("per_neuron_oracle", []):
            lines.append(f"| {r['fraction']:.3f} | {r['loss']:.3f} | {r['loss_increase']:+.3f} | {r['top1_agreement']:.3f} |")
        pl = res.get("per_layer")
        if pl:
            lines += ["", f"One layer MoEfied at a time ({pl['split']} split, {pl['router']} routing, {pl['fraction']:.3f} of "
                      "the experts): loss increase per layer: " + ", ".join(f"{r['loss_increase']:+.3f}" for r in pl["layers"])]
        lines.append("")
    if report.get("contextual_sparsity"):
        lines += ["## Contextual sparsity (Deja Vu)", ""]
    for name, res in report["contextual_sparsity"].items():
        ref = res["recall_reference"]
        lines += [f"### {name}", "", f"Rank {res['rank']} predictors from {res['input']}, trained on the '{res['label']}' "
                  f"neuron label, heads on the top {100 * res['head_label_frac']:.0f}% by output norm; dense loss "
                  f"{res['dense_loss']:.3f}. Tokens: {res['tokens']}. {fit_line('Predictors', res['training'])}", "",
                  "Recall at the reference's definition (" + ref["trained"]["definition"] + "):", "",
                  "| predictor | recall | predicted on | truly on | recall keeping as many as are on |", "|---|---|---|---|---|"]
        for which in ("trained", "untrained"):
            r = ref[which]
            lines.append(f"| {which} | {r['recall']:.3f} | {r['classifier_sparsity']:.3f} | {r['true_sparsity']:.3f} "
                         f"| {r['recall_at_true_count']:.3f} |")
        lines += ["", "Recall of the top-10% |a| neurons within the predicted top fraction:", "",
                  "| predictor | kept | neuron recall | activation mass kept | head recall |", "|---|---|---|---|---|"]
        for which in ("trained", "untrained"):
            for r in res["recall"][which]:
                lines.append(f"| {which} | {r['kept']:.2f} | {r['neuron_recall']:.3f} | {r['mass_kept']:.3f} | {r['head_recall']:.3f} |")
        lines += ["", "| predictor | neurons kept | heads kept | loss | top-1 agreement |", "|---|---|---|---|---|"]
        for r in res["sparse_forward"]:
            lines.append(f"| {r['predictor']} | {r['neuron_frac']:.2f} | {r['head_frac']:.2f} | {r['loss']:.3f} | {r['top1_agreement']:.3f} |")
        lines.append("")
    lines += sweep_lines(report)
    if figures:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)


def sweep_lines(report) -> list[str]:
    """--layers runs (`fit_sweep`): per model, training-token count and layer, the router and
    predictor fits' stop (epoch, reason) and held-out scores at the kept epoch."""
    lines = []
    for name, res in report.get("fit_sweep", {}).items():
        lines += [f"## Routers and predictors of layers {res['layers']} ({name})", "",
                  f"One collection of {res['tokens_collected']:,} tokens, {res['held_out_tokens']:,} held out (the "
                  f"same rows for every count); splits {res['splits']}; collection {res['seconds']['collect']:.0f} s. "
                  f"Not run: {res['not_run']}.", "",
                  "| train tokens | layer | router stop (epoch) | router held-out BCE | top-k expert agreement 25% / 50% "
                  "(per split) | predictor stop (epoch) | recall, reference (predicted on / truly on) "
                  "| recall top-10% at top-10% |", "|---|---|---|---|---|---|---|---|"]
        for fit in res["fits"]:
            for r, p in zip(fit["router_fit"]["per_layer"], fit["predictor_fit"]["per_layer"]):
                agree = " / ".join(",".join(f"{v:.2f}" for v in r["held_out_topk_agreement"][k])
                                   for k in r["held_out_topk_agreement"])
                fin = p["held_out_final"]
                top = next(v for k, v in fin.items() if k.startswith("recall_top"))
                lines.append(f"| {fit['train_tokens']:,} | {r['layer']} | {r['stop_reason']} ({r['epochs']}) | "
                             f"{r['held_out_loss']:.4f} | {agree} | {p['stop_reason']} ({p['epochs']}) | "
                             f"{fin['recall_reference']:.3f} ({fin['predicted_on']:.2f} / {fin['truly_on']:.2f}) | "
                             f"{top:.3f} |")
        lines += ["", *(fit_line(f"{fit['train_tokens']:,} tokens, routers", fit["router_fit"]) + " "
                        + fit_line("predictors", fit["predictor_fit"]) for fit in res["fits"]), ""]
    return lines


def fit_line(what: str, fit: dict) -> str:
    """One sentence on a lens.modularity.router_predictor_fit run: its rule, epochs and steps."""
    c = fit["criterion"]
    rule = (f"{c['metric']}: stop when {c['patience']} epochs in a row do not improve on the best by "
            f"> {c['min_delta']:g}{' (relative)' if c['relative'] else ''}"
            + (f", or at {c['target']:g}" if c["target"] is not None else "") + f", at most {c['max_epochs']} epochs")
    return (f"{what}: {fit['tokens']['train']:,} train / {fit['tokens']['held_out']:,} held-out tokens, batch "
            f"{fit['batch']}, lr {fit['lr']:g}; {rule}; epochs per layer {fit['epochs']['min']}-{fit['epochs']['max']} "
            f"(median {fit['epochs']['median']:g}), {fit['steps_total']:,} steps in all, stops {fit['stop_reasons']}.")


def write_report(report: dict, out: Path) -> None:
    """report.json, the figures and report.md of `report` into the folder `out`."""
    out = Path(out)
    figures = plot_pruning(report, out) + plot_moe(report, out) + plot_dejavu(report, out)
    report = _jsonable(report)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report, figures))


def render(out: Path) -> str:
    """report.md (and the figures) again from the folder's report.json, e.g. after the
    renderer changed; returns the markdown."""
    out = Path(out)
    report = json.loads((out / "report.json").read_text())
    figures = plot_pruning(report, out) + plot_moe(report, out) + plot_dejavu(report, out)
    text = markdown(report, figures)
    (out / "report.md").write_text(text)
    return text


def merge_reports(parts: list[dict]) -> dict:
    """One report from the reports of a selective-pruning study run in parts (`--first-draw`):
    the same models, only the selective_pruning section, each model's sections joined by
    `lens.modularity.pruning_study.merge_studies` (which refuses parts of different studies
    or with overlapping draws).  args are the first part's with the joined draw count;
    `seconds` keeps each part's (a part that loaded its saved runs counts only that)."""
    from lens.modularity.pruning_study import merge_studies

    first = parts[0]
    for i, p in enumerate(parts):
        if p["models"] != first["models"]:
            raise ValueError(f"part {i} ran {p['models']}, part 0 {first['models']}")
        other = [k for k in ("steering", "moefication", "contextual_sparsity", "fit_sweep") if p.get(k)]
        if other or not p.get("selective_pruning"):
            raise ValueError(f"part {i}: only selective-pruning reports merge; it holds {other or 'no pruning'}")
    sp = {name: merge_studies([p["selective_pruning"][name] for p in parts]) for name in first["models"]}
    n = {s["baselines"]["n_draws"] for s in sp.values()}.pop()
    return {**first, "args": {**first["args"], "random_draws": n, "first_draw": 0},
            "selective_pruning": sp, "seconds": {"parts": [p["seconds"] for p in parts]},
            "merged_from": [p["args"].get("out") for p in parts]}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="report.md of a scripts/modularity.py run again, from its report.json; "
                                 "with --merge, one report from the parts of a study run with --first-draw")
    ap.add_argument("out", type=Path, help="the run's --out folder (holds report.json); with --merge, the new folder")
    ap.add_argument("--merge", type=Path, action="append", default=None, metavar="FOLDER",
                    help="a part's --out folder (repeat for every part; at least two)")
    a = ap.parse_args()
    if a.merge is not None:
        if len(a.merge) < 2:
            ap.error("--merge: give every part's folder, at least two")
        missing = [str(f) for f in a.merge if not (f / "report.json").is_file()]
        if missing:
            ap.error(f"--merge: no report.json in {', '.join(missing)}")
        try:
            merged = merge_reports([json.loads((f / "report.json").read_text()) for f in a.merge])
        except ValueError as e:
            ap.error(f"--merge: {e}")
        a.out.mkdir(parents=True, exist_ok=True)
        write_report(merged, a.out)
    print(f"wrote {a.out / 'report.md'} ({len(render(a.out).splitlines())} lines)")
