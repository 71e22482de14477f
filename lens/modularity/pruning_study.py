"""A selective-pruning study with its controls: the ratio method, random pruning and
forget-activation-only pruning (>= 1 draws each), the paper's differential drop and the
verdict on the first step; every run saved as it finishes (`resume`).

    study = PruningStudy(forget="python-code", retain="shakespeare", frac=0.02, steps=1, draws=5)
    result, masks = run_pruning_study(model, forget_rows, retain_rows, evals, skip, study,
                                      folder=out / "pruning_runs_m0", forget_sample=lambda d: rows_d)

`evals` maps corpus name -> int rows [N, seq] (the forget and retain corpora among them);
`forget_sample(d)` gives the forget rows draw d >= 1 of the forget-only baseline collects
its statistics on (draw 0 uses `forget_rows`).  The result dict is scripts/modularity.py's
`selective_pruning` report section (less the save-and-reload check, which is I/O).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np
from jaxtyping import Int

from lens.modularity import pruning as M
from lens.modularity import resume as saved_runs


@dataclasses.dataclass(frozen=True)
class PruningStudy:
    """What decides a study: the corpora's names (forget / retain: keys of `evals`), the share
    of all MLP neurons pruned per step, the steps, the draws of each baseline, the first
    random seed (draw d uses seed + d), the statistics' matmul dtype, the ratio's eps, and
    the first draw's index: a study run as parts (draws 0-2 on one machine, `first_draw=3,
    draws=2` on another) gives the same draws as one run of 5, and `merge_studies` joins
    the parts' report sections."""

    forget: str
    retain: str
    frac: float = 0.02
    steps: int = 1
    draws: int = 5
    seed: int = 0
    compute_dtype: str = "float32"
    eps: float = 1e-3
    first_draw: int = 0

    def __post_init__(self):
        if not isinstance(self.draws, int) or self.draws < 1:
            raise ValueError(f"draws must be an int >= 1; got {self.draws!r}")
        if not isinstance(self.first_draw, int) or self.first_draw < 0:
            raise ValueError(f"first_draw must be an int >= 0; got {self.first_draw!r}")
        if self.forget == self.retain:
            raise ValueError(f"forget and retain must differ; both are {self.forget!r}")
        M.PruningConfig(self.steps, "ratio", self.frac, eps=self.eps, compute_dtype=self.compute_dtype)  # validates


# This project's CPU, for the plan's second time: SmolLM2-135M (2.73e8 FLOPs per token-forward
# at rows of 128) ran ~275 token-forwards per user CPU-second in the 2026-12-07 study with
# statistics and metrics on 1e5 tokens per corpus (2.52e6 token-forwards, mostly metrics:
# the logits over the 49k vocabulary cost more than the statistics' ~400 per CPU-second;
# docs/findings/modularity.md); other models are scaled by their FLOPs.
CPU_FLOPS_PER_CPU_S = 275 * 2.73e8


def study_plan(config, study: PruningStudy, seq: int, forget_tokens: int, retain_tokens: int,
               eval_tokens: dict[str, int], chunk: int = 8, peak_flops: float = 989e12,
               utilisation: float = 0.4) -> dict:
    """The size of `run_pruning_study` before running it, counted from what it runs:

      ratio run      the unpruned evaluation (E = the sum of `eval_tokens`), then per step the
                     statistics on the forget and the retain tokens (F + R) and an evaluation (E)
      random draw    per step an evaluation (the unpruned record is the ratio run's)
      forget draw    per step the statistics on a forget sample (F) and an evaluation

    token-forwards = E + S (F + R + E) + D S E + D S (F + E) for S steps and D draws; FLOPs
    = token-forwards x `lens.core.plan.forward_flops_per_token` (every pass is one forward:
    the statistics' |a| sums and the metrics are a few percent more); bytes of one chunk's
    forward from `lens.core.plan` (shapes by `jax.eval_shape`).  Hours at `peak_flops` x
    `utilisation` (default: one H100 SXM's dense bf16 peak, 40%; the model runs in float32
    unless asked, so read this as a lower bound on a GPU) and, for scale, CPU-hours at
    CPU_FLOPS_PER_CPU_S (this project's machine, measured on SmolLM2-135M)."""
    from lens.core import plan as PL

    sizes = {"seq": seq, "forget_tokens": forget_tokens, "retain_tokens": retain_tokens, "chunk": chunk,
             **{f"eval_tokens[{k}]": v for k, v in eval_tokens.items()}}
    for name, v in sizes.items():
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}")
    if not (peak_flops > 0 and 0 < utilisation <= 1):
        raise ValueError(f"need peak_flops > 0 and 0 < utilisation <= 1; got {peak_flops}, {utilisation}")
    E, F, R, S, D = sum(eval_tokens.values()), forget_tokens, retain_tokens, study.steps, study.draws
    runs = {"ratio": E + S * (F + R + E), "random": D * S * E, "forget": D * S * (F + E)}
    total = sum(runs.values())
    per_token = PL.forward_flops_per_token(config, seq)
    mem = PL.plan(config, {"data": 1, "model": 1}, "forward", batch=chunk, seq=seq)
    cpu_rate = CPU_FLOPS_PER_CPU_S / per_token  # token-forwards per CPU-second
    return {"token_forwards": {**runs, "total": total}, "flops_per_token": per_token, "flops": per_token * total,
            "bytes_per_chunk": {"weights": mem.weights, "activations": mem.activations, "total": mem.total},
            "hours": {"gpu": per_token * total / (peak_flops * utilisation) / 3600,
                      "cpu": total / cpu_rate / 3600},
            "assumed_flops_per_s": peak_flops * utilisation, "cpu_token_forwards_per_cpu_s": cpu_rate,
            "steps": S, "draws": D, **sizes}


def plan_lines(plan: dict) -> list[str]:
    """`study_plan`'s dict as one line of text (stdout and report.md of scripts/modularity.py)."""
    t = plan["token_forwards"]
    return [f"Plan (selective pruning): {t['total']:,} token-forwards (ratio {t['ratio']:,}, random draws "
            f"{t['random']:,}, forget-only draws {t['forget']:,}; {plan['steps']} step(s), {plan['draws']} draws of "
            f"each baseline), {plan['flops'] / 1e15:.3g} PFLOP; {plan['bytes_per_chunk']['total'] / 2**30:.2f} GiB "
            f"per chunk of {plan['chunk']} x {plan['seq']} tokens (lens.core.plan); a FLOP floor of "
            f"{plan['hours']['gpu'] * 60:.2g} GPU-minutes at {plan['assumed_flops_per_s'] / 1e12:.0f} TFLOP/s (a small "
            f"model in small chunks is bound by dispatch there, not FLOPs); ~{plan['hours']['cpu']:.3g} CPU-hours at "
            f"{plan['cpu_token_forwards_per_cpu_s']:.0f} token-forwards per CPU-second (this project's machine)."]


def draw_summary(draws: list[list[dict]], corpora, metric: str = "top1") -> list[dict]:
    """Per step and corpus: the mean, min and max of `metric` over the draws (each draw a
    list of `selective_pruning` records, all with the same steps)."""
    if not draws or len({len(d) for d in draws}) != 1:
        raise ValueError(f"draws must be a non-empty list of equally long record lists; got lengths "
                         f"{[len(d) for d in draws]}")
    out = []
    for step in range(len(draws[0])):
        vals = {c: [d[step][c][metric] for d in draws] for c in corpora}
        out.append({"step": step, "neurons_pruned": draws[0][step]["neurons_pruned"],
                    **{c: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}
                       for c, v in vals.items()}})
    return out


def first_step_selective(records: list[dict], forget: str, retain: str) -> dict:
    """The first step is selective when the forget set's top-1 after it lies below the
    unpruned model's 95% interval AND the retain set's top-1 stays inside its interval."""
    if len(records) < 2:
        raise ValueError("first_step_selective needs the unpruned record and at least one step")
    f0, f1, r0, r1 = records[0][forget], records[1][forget], records[0][retain], records[1][retain]
    forget_hit = f1["top1"] < f0["top1_ci95"][0]
    retain_kept = r0["top1_ci95"][0] <= r1["top1"] <= r0["top1_ci95"][1]
    return {"selective": bool(forget_hit and retain_kept), "forget_below_interval": bool(forget_hit),
            "retain_inside_interval": bool(retain_kept),
            "definition": "after step 1, forget top-1 < the unpruned 95% interval's lower end and retain top-1 "
                          "inside the unpruned 95% interval (intervals over rows)"}


def _records_line(name: str, records: list[dict], corpora, seconds: float) -> str:
    last = records[-1]
    return (f"  {name}: {seconds:.0f} s, step {last['step']}: "
            + ", ".join(f"{c} top1 {last[c]['top1']:.3f}" for c in corpora))


def run_pruning_study(model, forget_rows: Int[np.ndarray, "F seq"], retain_rows: Int[np.ndarray, "R seq"],
                      evals: dict[str, Int[np.ndarray, "N seq"]], skip, study: PruningStudy, folder,
                      forget_sample: Callable[[int], Int[np.ndarray, "F seq"]], label: str = "m0",
                      progress: bool = True) -> tuple[dict, dict]:
    """The ratio run, then `study.draws` draws of each baseline, each saved to
    `folder/<run>.safetensors` as it finishes and loaded instead of rerun when the same
    study is started again (a file saved under other settings or data is refused).
    Returns (the report section, {method: the first run's neuron mask})."""
    for name in (study.forget, study.retain):
        if name not in evals:
            raise ValueError(f"evals must include {name!r} (the forget and retain corpora); it has {sorted(evals)}")
    corpora = list(evals)
    folder = Path(folder)
    n_neurons = int(model.config.n_layers * model.config.d_mlp)
    data_digest = saved_runs.rows_digest(retain_rows, skip, *evals.values())

    def run(name, config, sample, **kw):
        key = {"config": dataclasses.asdict(config), "rows": saved_runs.rows_digest(sample) + data_digest,
               "model": label}
        t0 = time.perf_counter()
        if progress and study.steps > 1:  # a long run shows every step, not only its end
            kw["on_step"] = lambda r: print(_records_line(f"{name} (running)", [r], corpora,
                                                          time.perf_counter() - t0), flush=True)
        out = saved_runs.saved_pruning_run(folder / f"{name}.safetensors", key, lambda: M.selective_pruning(
            model, sample, retain_rows, evals, skip, config, **kw))
        if progress:
            print(_records_line(name, out[0], corpora, time.perf_counter() - t0), flush=True)
        return out

    if progress:
        print(f"  pruning study: {study.frac:.0%} of {n_neurons} neurons x {study.steps} step(s); statistics on "
              f"{np.asarray(forget_rows).size} forget / {np.asarray(retain_rows).size} retain tokens; metrics on "
              + ", ".join(f"{c} {np.asarray(r).size}" for c, r in evals.items())
              + f" tokens; {1 + 2 * study.draws} runs, each saved to {folder} as it finishes", flush=True)
    t0 = time.perf_counter()
    masks = {}
    config = M.PruningConfig(study.steps, "ratio", study.frac, eps=study.eps, chunk=8, compute_dtype=study.compute_dtype)
    recs, masks["ratio"], _ = run("ratio", config, forget_rows)
    seconds = time.perf_counter() - t0
    baselines = {"random": [], "forget": []}
    draw_ids = list(range(study.first_draw, study.first_draw + study.draws))
    for d in draw_ids:
        config = M.PruningConfig(study.steps, "random", study.frac, seed=study.seed + d, chunk=8)
        rec, nm, _ = run(f"random_{d}", config, forget_rows, unpruned_record=recs[0])
        baselines["random"].append(rec)
        masks.setdefault("random", nm)
        # forget-activation-only: draw d collects its statistics on another sample of the forget text
        sample = forget_rows if d == 0 else forget_sample(d)
        config = M.PruningConfig(study.steps, "forget", study.frac, eps=study.eps, chunk=8,
                                 compute_dtype=study.compute_dtype)
        rec, nm, _ = run(f"forget_{d}", config, sample, unpruned_record=recs[0])
        baselines["forget"].append(rec)
        masks.setdefault("forget", nm)
    result = {"eps": study.eps, "neuron_frac_per_step": study.frac, "head_frac_per_step": 0.0, "n_neurons": n_neurons,
              "forget": study.forget, "retain": [study.retain], "compute_dtype": study.compute_dtype,
              "tokens_collected": {"forget": int(np.asarray(forget_rows).size), "retain": int(np.asarray(retain_rows).size)},
              "tokens_evaluated": {c: int(np.asarray(r).size) for c, r in evals.items()},
              "intervals": "95% normal intervals over rows (rows as clusters): *_ci95 in every record",
              "methods": {"ratio": {"records": recs, "seconds": seconds},
                          "forget": {"records": baselines["forget"][0]},  # the first draw's
                          "random": {"draws": baselines["random"]}}}
    result["baselines"] = {
        "random": {"draws": baselines["random"], "summary": draw_summary(baselines["random"], corpora),
                   "what": "the same counts drawn uniformly among live neurons, one seed per draw"},
        "forget": {"draws": baselines["forget"], "summary": draw_summary(baselines["forget"], corpora),
                   "what": "top forget-set mean |a| (no retain term), one forget sample per draw"},
        "n_draws": study.draws, "draw_ids": draw_ids}
    result["differential_drop"] = {
        "ratio": M.differential_drop(recs, study.forget, study.retain),
        "random": [M.differential_drop(r, study.forget, study.retain) for r in baselines["random"]],
        "forget": [M.differential_drop(r, study.forget, study.retain) for r in baselines["forget"]],
        "definition": f"per step: forget top-1 drop % minus retain ({study.retain}) top-1 drop %, each relative "
                      "to the unpruned model; max over pruned steps"}
    result["first_step"] = first_step_selective(recs, study.forget, study.retain)
    result["layer_counts"] = masks["ratio"].sum(1).tolist()
    return result, masks


def _same(a, b, rel: float) -> bool:
    """a == b for JSON-like trees, floats to `rel` relative (0: exact)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k], rel) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= rel * max(abs(a), abs(b))
    return a == b


# What must agree for two parts to be one study (the ratio run's records included).
STUDY_KEYS = ("eps", "neuron_frac_per_step", "n_neurons", "forget", "retain", "compute_dtype", "tokens_collected",
              "tokens_evaluated", "layer_counts")


def merge_studies(parts: list[dict], rel: float = 1e-9) -> dict:
    """One report section from the sections of a study run in parts (`PruningStudy.first_draw`):
    the parts must be the same study (the settings, the tokens and the ratio run's records,
    floats to `rel`: the same code on another machine may sum in another order) with
    disjoint draws; the baselines' draws are joined in draw order and their summaries and
    differential drops computed again.  A section without `draw_ids` (saved before parts
    existed) holds draws 0 .. n_draws - 1.  Each part's draws and plan go under "parts";
    the rest is the first part's."""
    if len(parts) < 2:
        raise ValueError(f"merge_studies needs at least two parts; got {len(parts)}")
    first = parts[0]
    for i, p in enumerate(parts[1:], 1):
        for k in STUDY_KEYS:
            if not _same(first.get(k), p.get(k), 0.0):
                raise ValueError(f"part {i} is another study: {k} {p.get(k)!r} != {first.get(k)!r}")
        if not _same(first["methods"]["ratio"]["records"], p["methods"]["ratio"]["records"], rel):
            raise ValueError(f"part {i} is another study: its ratio run's records differ from part 0's "
                             f"(relative tolerance {rel})")
    draws = {}
    for i, p in enumerate(parts):
        b = p["baselines"]
        ids = b.get("draw_ids", list(range(b["n_draws"])))
        for j, d in enumerate(ids):
            if d in draws:
                raise ValueError(f"draw {d} is in part {draws[d][0]} and in part {i}; the parts' draws must be disjoint")
            draws[d] = (i, b["random"]["draws"][j], b["forget"]["draws"][j])
    ids = sorted(draws)
    rnd, fgt = [draws[d][1] for d in ids], [draws[d][2] for d in ids]
    corpora = list(first["tokens_evaluated"])
    forget, retain = first["forget"], first["retain"][0]
    out = dict(first)
    out["methods"] = {**first["methods"], "random": {"draws": rnd}, "forget": {"records": fgt[0]}}
    out["baselines"] = {
        "random": {**first["baselines"]["random"], "draws": rnd, "summary": draw_summary(rnd, corpora)},
        "forget": {**first["baselines"]["forget"], "draws": fgt, "summary": draw_summary(fgt, corpora)},
        "n_draws": len(ids), "draw_ids": ids}
    out["differential_drop"] = {**first["differential_drop"],
                                "random": [M.differential_drop(r, forget, retain) for r in rnd],
                                "forget": [M.differential_drop(r, forget, retain) for r in fgt]}
    out["parts"] = [{"draw_ids": p["baselines"].get("draw_ids", list(range(p["baselines"]["n_draws"]))),
                     "ratio_seconds": p["methods"]["ratio"].get("seconds"), "plan": p.get("plan")} for p in parts]
    out.pop("plan", None)  # each part's plan counts that part's draws: kept under "parts"
    return out
