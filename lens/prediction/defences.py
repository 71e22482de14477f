"""Defences of the "predict the model" test against gaming, the predictor table, and the
per-lambda aggregation of a Goodhart sweep (scripts/goodhart.py is their command line).

    d = defences(scores, tau=1.0, kl_threshold=0.5)      # fraction of positions passing each
    s = prompt_statistic(scores, tau=1.0)                # the proposal's statistic: per prompt, then averaged
    g = gaming_found(runs, "prompt_pass_rate", ("held_out_code_loss", "held_out_prose_loss"))
    table = predictor_table(model, train_rows, {"shakespeare": rows}, (0.5, 1.0), None, out)
    rows = aggregate(runs)                               # per lam: mean, std, min, max over seeds
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from jaxtyping import Int

from lens.prediction import gaming, ngram, scoring
from lens.models.core.transformer import first_blocks

K = 10  # the test's top-k


def defences(scores: scoring.Scores, tau: float, kl_threshold: float) -> dict[str, float]:
    """The base test and each stricter criterion, as the fraction of scored positions (those
    with a next token) that pass: the test itself (test_err <= tau), the exact top-k order,
    top-1 agreement, a per-position KL <= kl_threshold, the test only where the predictor's
    top-1 is wrong about the next token; and how many positions that last one keeps."""
    keep = scores.next_token >= 0
    if not keep.any():
        raise ValueError("no scored position has a next token")
    wrong = keep & (scores["pred_top1"] != scores.next_token)
    return {
        "pass_rate": float((scores["test_err"][keep] <= tau).mean()),
        "exact_top10_order": float(scores["order"][keep].mean()),
        "top1": float(scores["top1"][keep].mean()),
        f"kl_below_{kl_threshold}": float((scores["kl"][keep] <= kl_threshold).mean()),
        "pass_rate_where_predictor_wrong": float((scores["test_err"][wrong] <= tau).mean()),
        "fraction_predictor_wrong": float(wrong.sum() / keep.sum()),
    }


def prompt_statistic(scores: scoring.Scores, tau: float) -> dict[str, float]:
    """The proposal's statistic: each prompt's (row's) mean test error over its positions
    with a next token, then averaged over prompts ("mean_test_error"); the share of prompts
    whose own mean is <= tau ("prompt_pass_rate"); and whether the mean over prompts is
    <= tau ("passes": the test passed as the proposal states it)."""
    keep = scores.next_token >= 0
    n = keep.sum(1)
    if not (n > 0).all():
        raise ValueError("every prompt needs a position with a next token")
    per_prompt = np.where(keep, scores["test_err"], 0.0).sum(1) / n
    mean = float(per_prompt.mean())
    return {"mean_test_error": mean, "prompt_pass_rate": float((per_prompt <= tau).mean()), "passes": mean <= tau,
            "n_prompts": int(len(per_prompt))}


GAMING_DEFINITION = (
    "a run with lam > 0 whose pass rate is above every lam = 0 seed's AND whose every held-out capability loss "
    "is no higher than the worst lam = 0 seed's (a pass-rate gain at no capability loss beyond seed noise)")


def gaming_found(runs: list[dict], pass_key: str, capability_keys: tuple[str, ...]) -> dict:
    """Goodharting as found or not: `GAMING_DEFINITION`, over `runs` (dicts with "lam",
    "seed", `pass_key` and every capability key: a loss, lower is better).  Returns
    {"found", "definition", "runs": the gaming runs' (lam, seed), "plain_pass_max",
    "plain_capability_max"}."""
    plain = [r for r in runs if r["lam"] == 0]
    if not plain:
        raise ValueError("gaming_found needs the lam = 0 runs (plain training) as the baseline")
    pass_max = max(r[pass_key] for r in plain)
    cap_max = {k: max(r[k] for r in plain) for k in capability_keys}
    gaming = [{"lam": r["lam"], "seed": r["seed"]} for r in runs
              if r["lam"] > 0 and r[pass_key] > pass_max and all(r[k] <= cap_max[k] for k in capability_keys)]
    return {"found": bool(gaming), "definition": GAMING_DEFINITION, "pass_key": pass_key,
            "capability_keys": list(capability_keys), "runs": gaming, "plain_pass_max": pass_max,
            "plain_capability_max": cap_max}


def aggregate(runs: list[dict]) -> list[dict]:
    """Per lam (ascending): the seeds, and the mean, sample std (ddof 1; 0 for one seed),
    min and max over seeds of every float of a run."""
    if not runs:
        raise ValueError("no runs to aggregate")
    out = []
    for lam in sorted({r["lam"] for r in runs}):
        rs = [r for r in runs if r["lam"] == lam]
        keys = [k for k, v in rs[0].items() if isinstance(v, float) and k != "lam"]
        row = {"lam": lam, "seeds": [r["seed"] for r in rs]}
        for k in keys:
            vals = np.array([r[k] for r in rs])
            row[k] = float(vals.mean())
            row[k + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            row[k + "_min"], row[k + "_max"] = float(vals.min()), float(vals.max())
        out.append(row)
    return out


def predictor_table(model, train_rows: Int[np.ndarray, "N T"], eval_sets: dict[str, Int[np.ndarray, "M T"]],
                    tolerances, distill_cfg, out: Path, progress: bool = False, k: int = K) -> dict:
    """{corpus: {predictor: `scoring.summarize`}} for `model` against every cheap predictor:
    unigram, bigram, trigram (counted on `train_rows`), the direct path (and through the
    first MLP), a 1-layer student distilled from the model (with `distill_cfg`, a
    `lens.training.train.TrainConfig`, on at most 65 tokens of each train row; checkpoints
    under `out`; None: no student), uniform.  Each summary also holds
    "skip_10_most_common" (the same without the 10 most common next tokens); with a
    student, "distill" records its held-out KL before and after."""
    from lens.training import train

    v = model.config.vocab_size
    tables = {f"{n}gram": ngram.count(train_rows, order, v) for order, n in ((1, "uni"), (2, "bi"), (3, "tri"))}
    preds = {name: t.predictor() for name, t in tables.items()}
    preds["direct"] = scoring.direct_path(model)
    if not model.config.attn_only:
        preds["direct+mlp0"] = scoring.direct_path(model, through_first_mlp=True)
    res = {}
    if distill_cfg is not None:  # distillation rows: at most 65 tokens (the teacher runs inside every step)
        width = min(train_rows.shape[1], 65)
        rows = train_rows[:, :width]
        held = next(iter(eval_sets.values()))[:, :width]
        student = first_blocks(model, 1)
        kl_before = gaming.mean_kl(model, student, held, batch=4)
        student = train.train(student, rows, held, distill_cfg, out,
                              train.TrainOptions(progress=progress, loss_fn=gaming.DistillLoss(model))).model
        kl_after = gaming.mean_kl(model, student, held, batch=4)
        preds["distilled-1L"] = scoring.model_predictor(student)
        res["distill"] = {"steps": distill_cfg.steps, "start": "the model's first block + its unembedding",
                          "held_out_kl_before": kl_before, "held_out_kl_after": kl_after}
    preds["uniform"] = scoring.uniform_predictor(v)
    me = scoring.model_predictor(model)
    counts = tables["unigram"].unigram_counts
    for name, rows_eval in eval_sets.items():
        chunk = scoring.chunk_rows_for(rows_eval.shape[1], v, len(preds), 1.0e9)
        scores = scoring.score(me, preds, rows_eval[:, :-1], k=k, chunk_rows=chunk, progress=progress)
        res[name] = {p: scoring.summarize(s, tolerances, token_counts=counts) for p, s in scores.items()}
        for p, s in scores.items():  # the same without the 10 most common next tokens
            res[name][p]["skip_10_most_common"] = {
                key: val for key, val in scoring.summarize(s, tolerances, counts, 10).items()
                if key in ("n_positions", "pass_rate", "top1", "recall", "kl")}
    return res

