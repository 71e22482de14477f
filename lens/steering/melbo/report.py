"""The main job's report.json record, built from its phases' results (no model calls):
the closed form beside the measured PR vs K, the behaviour rule, one MELBO seed's
headline from its per-stage readings, and the assembled summary with its lead sentences.
scripts/orthogonal_steering.py runs the phases and writes the files.

    cf = report.closed_form_summary(readings, rho_mean=0.75)     # K = 2..K, 800, 1,558
    summary = report.main_job_summary(record, closed_form=cf, behaviour_readings=..., ...)
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Bool, Float

from lens.steering.melbo import decompose, verdict

# The width of the original's model (Qwen1.5-1.8B): K is also reported as K / d against it.
ORIGINAL_D = 2048
# The original's K (800 vectors; 1,558 in its longer run): where the closed form is extrapolated to.
ORIGINAL_KS = (800, 1558)


def closed_form_summary(readings: dict, rho_mean: float) -> dict:
    """The geometry's prediction beside the measurement at the effective stage
    (`decompose.closed_form_pr_vs_k`): K = 2..K measured (subsets of the found vectors),
    extrapolated to the original's K = 800 and 1,558; the closed-form pair cosine and its
    degeneracy at a few rho (this run's mean, 1, 2).  `readings`: `stages.answer`'s record
    (its `found_gram`, `effective_unit_cos` and `control_grams`).  The returned dict holds
    the per-K list under "rows" (report.json's `closed_form_pr_vs_k`)."""
    from lens import geometry

    g = readings["found_gram"]["effective"]
    k = len(g)
    ks = list(range(2, k + 1)) if k <= 64 else sorted(set(np.geomspace(2, k, 24).astype(int).tolist()) | {k})
    cf = decompose.closed_form_pr_vs_k(g, readings["effective_unit_cos"], ks, extrapolate=ORIGINAL_KS,
                                       control_gram=readings["control_grams"]["effective"][0])
    at_rho = []
    for rho in (rho_mean, 1.0, 2.0):
        c = float(geometry.orthogonal_pair_cosine_closed_form(rho))
        pr = {kk: float(geometry.equicorrelated_participation_ratio(kk, c)) for kk in ORIGINAL_KS}
        at_rho.append({"rho": rho, "pair_cosine_closed_form": c, "degeneracy_at_800": 800 / pr[800],
                       "degeneracy_at_1558": 1558 / pr[1558], "k_at_10x": geometry.k_at_degeneracy(c, 10.0)})
    cf["at_rho"] = at_rho
    cf["note"] = ("closed_form: lens.geometry.equicorrelated_participation_ratio(k, c) at the measured mean effective "
                  "cosine c of all K found vectors (effective stage, readings prompts, pooled over tokens); lo / hi: at "
                  "the 95% / 5% quantiles of the per-token mean cosine; measured: raw PR of the first k found vectors "
                  "(effective stage). at_rho: the idealised pair cosine (no gain) at rho = this run's mean, 1 and 2: the "
                  "original's rho is not known here (its model's residual norms were not measured), so the "
                  "extrapolation to K = 800 / 1,558 is at this run's c and bracketed by these")
    return cf


def code_writing_rule(min_replies: int, tokens: int, n_prompts: int) -> str:
    """How "writes code" is decided, in words (report.json's behaviour_readings.rule)."""
    return (f"a vector writes code when >= {min_replies} of its greedy replies ({tokens} "
            f"tokens) to {n_prompts} non-coding prompts hold real Python (lens.steering.code_score)")


def control_means(readings: dict) -> dict:
    """{stage: {reading: control mean}} of `stages.answer`'s record: what the other MELBO
    seeds' readings (computed without controls) are divided by."""
    return {st: {r: readings[r][st]["control_mean"] for r in verdict.READINGS} for st in readings["shared_share"]}


def found_only_readings(stage_readings: dict) -> dict:
    """`stages.stage_readings`' record (found vectors, no controls) in the shape
    `verdict.headline` reads: {reading: {stage: {"found": point}}, "found_gram": {stage: gram}}."""
    rd = {r: {st: {"found": stage_readings[st][r]["point"]} for st in stage_readings} for r in verdict.READINGS}
    rd["found_gram"] = {st: stage_readings[st]["gram"] for st in stage_readings}
    return rd


def behaviour_samples(texts: list[list[str]], scores: Float[np.ndarray, "K P"]) -> list[dict]:
    """generations.jsonl rows of the behaviour scoring: one per found vector and prompt."""
    return [{"label": f"behaviour_found_{i}", "prompt": str(j), "text": txt, "code": float(scores[i, j])}
            for i, row in enumerate(texts) for j, txt in enumerate(row)]


def main_job_summary(record: dict, *, closed_form: dict, behaviour_readings: dict,
                     behaviour_scores: Float[np.ndarray, "K P"], writes: Bool[np.ndarray, " K"],
                     seed_records: list[dict], seed: int, d_model: int) -> dict:
    """report.json's record: `experiment.summary_record`'s `record` plus the decisive reading,
    K / d (also against the original's d = 2,048), the closed form vs K (`closed_form`, from
    `closed_form_summary`; its "rows" are moved to `closed_form_pr_vs_k`), the behaviour
    readings and scores, every seed's headline and their spread, and the lead sentences
    (`verdict.lead`).  `seed_records`: one `verdict.headline` record per MELBO seed, each
    with its "seed"."""
    k = int(record["k_vectors"])
    cf = dict(closed_form)
    rows = cf.pop("rows")
    summary = dict(record)
    summary |= {
        "decisive_reading": verdict.DECISIVE, "seed": seed, "d_model": d_model, "k_over_d": k / d_model,
        "original_d": ORIGINAL_D, "k_at_original_d_ratio": round(k / d_model * ORIGINAL_D),
        "closed_form_pr_vs_k": rows, "closed_form_pr": cf, "behaviour_readings": behaviour_readings,
        "behaviour_scores": {"per_vector": behaviour_scores.sum(axis=1).tolist(),
                             "n_prompts": int(behaviour_scores.shape[1]), "writes_code": writes.tolist()},
        "seed_records": seed_records,
        "seed_spread": verdict.seed_spread([{key: v for key, v in r.items() if key != "seed"} for r in seed_records]),
    }
    summary["lead"] = verdict.lead(summary)
    return summary
