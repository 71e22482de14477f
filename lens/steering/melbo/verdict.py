"""The main job's answer where it counts: which reading decides (declared before anything is
measured), the readings of the vectors that WRITE CODE beside the others, every headline
number over several MELBO seeds, the geometry's own prediction of the raw degeneracy, and
the report's lead sentences.  scripts/orthogonal_steering.py is the command line.

The decisive reading (`DECISIVE`, written to the run's folder before training starts):
the residual PR at the next-token logits, found vectors over random orthogonal controls
with the found norms.  Why this one and not the others:
  * raw PR mixes a shared component with few distinct effects, and part of the shared
    component is FORCED by the objective (every vector is trained to reproduce theta0's
    target-layer effect), so a low raw PR is expected whether or not the vectors are
    distinct;
  * the specific (centred) PR counts vectors that carry different AMOUNTS of that same
    shared direction as distinct directions of variation, so it reads the forced component
    again (it is the lower of the two whenever the amounts vary);
  * the residual PR projects the shared direction out whatever each vector's amount of it:
    what is left is what the vectors do beyond theta0's effect, i.e. whether they are few
    distinct effects;
  * the logits, because behaviour (writing code) is decided there; the target stage is
    where the objective acts and the shared part is forced.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from jaxtyping import Bool, Float

from lens.steering.code_score import code_score
from lens.steering.melbo import decompose

DECISIVE = {
    "name": "residual_participation_ratio/logits: found over random control",
    "stage": "logits",
    "reading": "residual_participation_ratio",
    "reason": ("the shared component is forced by the objective (every vector reproduces "
               "theta0's target effect), so raw PR and shared share cannot show degeneracy; the specific (centred) PR "
               "counts different amounts of that shared direction as distinct variation; the residual PR projects the "
               "shared direction out whatever each vector's amount, so it reads what the vectors do beyond theta0's "
               "effect; at the logits, where behaviour is decided. A ratio near 1 = as distinct as random orthogonal "
               "vectors; well below 1 = few distinct effects."),
}
READINGS = ("shared_share", "specific_participation_ratio", "residual_participation_ratio", "participation_ratio")
BEHAVIOUR_STAGES = ("effective", "target", "last", "logits")


def score_vectors(model, prompts: Sequence[Sequence[int]], vecs: Float[np.ndarray, "K d_model"], layer: int, *,
                  max_new_tokens: int, decode: Callable[[list[int]], str], gen_batch: int
                  ) -> tuple[Float[np.ndarray, "K P"], list[list[str]]]:
    """Every vector's greedy replies to every prompt (steered at `layer`), scored by
    `lens.steering.code_score` (1 = the reply holds real Python): (scores [K, P], texts)."""
    from lens.steering.melbo.experiment import steered_texts

    v = np.asarray(vecs, np.float32)
    texts = steered_texts(model, prompts, v, layer, max_new_tokens, decode, gen_batch)
    p = len(prompts)
    rows = [texts[i * p : (i + 1) * p] for i in range(len(v))]
    return np.array([[code_score(t) for t in r] for r in rows], np.float64).reshape(len(v), p), rows


def writes_code(scores: Float[np.ndarray, "K P"], min_replies: int) -> Bool[np.ndarray, " K"]:
    """A vector writes code when at least `min_replies` of its replies hold real Python."""
    if min_replies < 1:
        raise ValueError(f"min_replies must be >= 1; got {min_replies}")
    return np.asarray(scores).sum(axis=1) >= min_replies


def behaviour_readings(readings: dict, writes: Bool[np.ndarray, " K"], rule: str,
                       stages: Sequence[str] = BEHAVIOUR_STAGES) -> dict:
    """The four readings (shared share, specific PR, residual PR, raw PR) of the code-writing
    vectors, of the others and of all, per stage, each beside random controls of the SAME
    size n (the first n of each control draw: controls are exchangeable), from the pooled
    Grams of `lens.steering.melbo.stages.answer` (`found_gram`, `control_grams`).  A group
    with fewer than 2 vectors has `readings: None`.  Ratios found / control mean are given
    for the PRs (1 = as distinct as random orthogonal vectors)."""
    w = np.asarray(writes, bool)
    groups = {"code_writing": np.flatnonzero(w), "other": np.flatnonzero(~w), "all": np.arange(len(w))}
    out: dict = {"rule": rule}
    for name, idx in groups.items():
        n = int(idx.size)
        if n < 2:
            out[name] = {"n": n, "readings": None}
            continue
        per_stage = {}
        for st in stages:
            found = decompose.subset_readings(readings["found_gram"][st], idx.tolist())
            ctrl = [decompose.subset_readings(g, list(range(n))) for g in readings["control_grams"][st]]
            cell = {}
            for r in READINGS:
                cv = np.array([c[r] for c in ctrl])
                cell[r] = {"found": found[r], "control_mean": float(cv.mean()), "control_min": float(cv.min()),
                           "control_max": float(cv.max())}
                if r != "shared_share" and cv.mean() > 0:
                    cell[r]["found_over_control"] = found[r] / float(cv.mean())
            per_stage[st] = cell
        out[name] = {"n": n, "readings": per_stage}
    return out


def headline(readings: dict, writes: Bool[np.ndarray, " K"], scores: Float[np.ndarray, "K P"],
             losses: Float[np.ndarray, "K steps"], norms: Float[np.ndarray, " K"], theta0_norm: float,
             d_model: int, control_means: dict | None = None) -> dict:
    """One MELBO seed's headline numbers (flat, JSON-able).  `control_means` ({stage:
    {reading: mean}}): the controls to divide by (another seed's, when this seed's readings
    were computed without controls); default: `readings`' own."""
    def ctrl(stage, r):
        if control_means is not None:
            return control_means[stage][r]
        return readings[r][stage]["control_mean"]

    k = len(norms)
    out = {"k": k, "k_over_d": k / d_model,
           "code_writing_vectors": int(np.sum(writes)), "code_rate": float(np.mean(writes)),
           "code_score_mean": float(np.mean(scores)),
           "loss_last_mean": float(np.mean(losses[:, -1])), "loss_first_mean": float(np.mean(losses[:, 0])),
           "norm_over_theta0": float(np.mean(norms) / theta0_norm),
           "effective_cosine_mean": decompose.gram_cosine_mean(readings["found_gram"]["effective"])}
    for st in ("effective", "target", "logits"):
        for r in READINGS:
            f = readings[r][st]["found"]
            out[f"{r}/{st}"] = f
            if r != "shared_share":
                c = ctrl(st, r)
                out[f"{r}/{st}/over_control"] = f / c if c > 0 else float("nan")
                out[f"{r}/{st}/over_k"] = f / k
    return out


def seed_spread(records: list[dict]) -> dict:
    """{quantity: {"per_seed", "mean", "min", "max", "n"}} over the seeds' headline records."""
    out = {}
    for key in records[0]:
        vals = [r[key] for r in records]
        a = np.asarray(vals, np.float64)
        out[key] = {"per_seed": vals, "mean": float(np.nanmean(a)), "min": float(np.nanmin(a)),
                    "max": float(np.nanmax(a)), "n": int(a.size)}
    return out


def lead(summary: dict) -> list[str]:
    """The answer in at most three sentences, numbers with their spread over seeds."""
    sp = summary["seed_spread"]
    dec = summary["decisive_reading"]
    key = f"{dec['reading']}/{dec['stage']}"
    n_seeds = sp[key]["n"]
    k = summary["k_vectors"]

    def rng(q, fmt=".2f"):
        s = sp[q]
        return f"{s['mean']:{fmt}} (seeds {s['min']:{fmt}}-{s['max']:{fmt}})"

    ratio = sp[f"{key}/over_control"]["mean"]
    verdict = ("as distinct as random orthogonal vectors" if ratio >= 0.8 else
               "fewer distinct effects than random orthogonal vectors")
    s1 = (f"Decisive reading (declared in advance), the residual PR at the logits: {k} found vectors reach "
          f"{rng(key, '.1f')} of a ceiling {k - 1}, {rng(key + '/over_control')} x random orthogonal controls "
          f"over {n_seeds} MELBO seeds: beyond the shared direction they are {verdict}.")
    br = summary["behaviour_readings"]
    cw = br["code_writing"]
    if cw["readings"] is not None:
        r = cw["readings"]["logits"]["residual_participation_ratio"]
        s2 = (f"The {cw['n']} code-writing vectors alone (seed {summary['seed']}): residual PR {r['found']:.1f} vs "
              f"{r['control_mean']:.1f} for {cw['n']} random controls; {rng('code_writing_vectors', '.0f')} of "
              f"{k} vectors write code ({br['rule']}).")
    else:
        s2 = (f"Only {rng('code_writing_vectors', '.0f')} of {k} vectors write code ({br['rule']}), too few for "
              "readings of the code-writing vectors alone.")
    rows, k10 = summary["closed_form_pr_vs_k"], summary["closed_form_pr"].get("k_at_10x")
    s3 = (f"Normalisation alone (mean effective cosine c = {summary['closed_form_pr']['mean_cosine']:.3f} at seed "
          f"{summary['seed']}; over seeds {rng('effective_cosine_mean', '.3f')}) predicts a raw PR of "
          f"{_row(rows, k)['closed_form']:.1f} at K = {k} (measured {_row(rows, k)['measured']:.1f}) and a 10x raw "
          f"degeneracy from K = {k10} on (K = 800: {k_over(rows, 800):.1f}x, K = 1,558: {k_over(rows, 1558):.1f}x).")
    return [s1, s2, s3]


def _row(rows: list[dict], k: int) -> dict:
    return next(r for r in rows if r["k"] == k)


def k_over(rows: list[dict], k: int) -> float:
    """The closed form's degeneracy K / PR at K = k (a row of report.json's `closed_form_pr_vs_k`)."""
    return k / _row(rows, k)["closed_form"]
