"""The main job's experiment steps that are not the MELBO-ortho training itself
(scripts/orthogonal_steering.py is their command line): resuming a checkpoint, the
batched-vs-sequential comparison, steered generations scored as code, behaviour per
vector, and the report's summary record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

from lens.models.generation.generate import GenerationConfig
from lens.steering import vectors
from lens.steering.code_score import code_score
from lens.steering.melbo import behaviour as mb
from lens.steering.melbo.analysis import SteeredEffects, analyse_vectors
from lens.steering.melbo.problem import MelboProblem
from lens.steering.melbo.objectives import OrthoConfig
from lens.steering.melbo.train import MelboResult, MelboRunConfig, melbo_ortho

# Rescaled and random-control generations: at most this many (the found vectors: all of
# gen_vectors, for the per-vector behaviour).
GEN_CONTROLS = 16
# The report's stage names -> `analyse_vectors`' keys.
STAGE_KEYS = {"raw": "raw", "effective": "effective_exact", "effective_first_order": "effective_first_order",
              "target": "target", "last": "last", "logits": "logits"}


def resume_checkpoint(ckpt: Path, meta: dict, theta0: Float[np.ndarray, "d_model"]) -> MelboResult:
    """The vectors and losses of a MELBO-ortho checkpoint (`lens.steering.vectors` file with
    extras theta0 and losses), refused (SystemExit naming every difference) when it was
    trained under other settings `meta` or another theta0: such vectors must not be mixed
    into this run."""
    saved_vectors, saved_meta = vectors.load_vectors(ckpt)
    saved = vectors.load_extras(ckpt)
    changed = {k: (saved_meta.get(k), v) for k, v in meta.items() if saved_meta.get(k) != v}
    if changed or not np.array_equal(saved["theta0"], theta0):
        what = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in changed.items()) or "theta0 differs"
        raise SystemExit(f"--resume: {ckpt} was trained with other settings ({what}); "
                         "resume with the same flags, or use a new --out")
    return MelboResult(saved_vectors, saved["losses"])


def mode_comparison(problem: MelboProblem, analysis_problem: MelboProblem, theta0: Float[np.ndarray, "d_model"],
                    found: MelboResult, found_effects: SteeredEffects, *, k: int, steps: int, lr: float,
                    block: int, seed: int, n_seeds: int, chunk: int) -> dict:
    """Batched vs sequential MELBO-ortho, like with like: runs of the FIRST `k` vectors
    (later vectors are constrained by more earlier ones and reach higher losses, so they
    are not compared with a first group) at `n_seeds` seeds, in both modes.

    Sequential: fresh runs at seeds seed, seed+1, ...  Batched (block `block`): at `seed`
    the main run's first k vectors (a batched run of k is exactly those: blocks are
    orthogonalised in index order, so a vector never depends on later ones), at the other
    seeds fresh runs.  Same seed = same initial vectors in both modes, and vector 0 of a
    seed is trained identically (a block's first vector is the sequential step): its
    max |difference| between the modes is reported.  Per quantity: both modes' mean and
    max-min spread over seeds (the run-to-run spread), and whether |difference| <= spread."""
    kk = k
    cfg = OrthoConfig(steps=steps, lr=lr)
    stats = ("effective_exact", "target", "last", "logits")
    seeds = [seed + i for i in range(n_seeds)]

    def row(vecs, losses, analysis, s):
        r = {"seed": s, "loss_first": float(losses[:, 0].mean()), "loss_last": float(losses[:, -1].mean()),
             "norm_mean": float(np.linalg.norm(vecs, axis=1).mean())}
        for st in stats:
            r[f"{st}_cos_mean"] = analysis[st]["cos_mean"]
            r[f"{st}_degeneracy"] = analysis[st]["degeneracy_factor"]
        return r

    runs = {"sequential": [], "batched": []}
    first = {}
    for s in seeds:
        for mode in ("sequential", "batched"):
            if mode == "batched" and s == seed:
                res = MelboResult(found.vectors[:kk], found.losses[:kk])
                e = found_effects
                eff = SteeredEffects(e.target[:kk], e.last[:kk], e.logits[:kk], e.base_logits,
                                     e.first_share_target[:kk], e.first_share_last[:kk])
                a = analyse_vectors(analysis_problem, res.vectors, effects=eff)
            else:
                res = melbo_ortho(problem, jnp.asarray(theta0), kk, cfg,
                                  run=MelboRunConfig(mode=mode, block_size=block, seed=s, progress=True))
                a = analyse_vectors(analysis_problem, res.vectors, chunk=chunk)
            runs[mode].append(row(res.vectors, res.losses, a, s))
            if s == seed:
                first[mode] = np.asarray(res.vectors[0])
    summary = {}
    for key in runs["sequential"][0]:
        if key == "seed":
            continue
        seq = np.array([r[key] for r in runs["sequential"]])
        bat = np.array([r[key] for r in runs["batched"]])
        spread, bspread = float(seq.max() - seq.min()), float(bat.max() - bat.min())
        diff = float(bat.mean() - seq.mean())
        summary[key] = {"sequential_mean": float(seq.mean()), "sequential_spread": spread,
                        "batched_mean": float(bat.mean()), "batched_spread": bspread, "difference": diff,
                        "within_spread": bool(abs(diff) <= max(spread, 1e-12)),
                        "within_pooled_spread": bool(abs(diff) <= max(spread, bspread, 1e-12))}
    v0 = float(np.abs(first["batched"] - first["sequential"]).max() / np.abs(first["sequential"]).max())
    return {"k_per_run": kk, "seeds": seeds, "runs": runs, "summary": summary,
            "vector0_max_rel_diff": v0,
            "note": f"the first {kk} vectors at seeds {seeds} in each mode (batched: block {block}; at seed "
                    f"{seed} the main run's first {kk}). 'within_spread': |batched mean - sequential mean| <= "
                    "the sequential max-min spread over seeds; 'within_pooled_spread': <= the larger of the two "
                    f"modes' spreads. Vector 0 (same init, trained alike in both modes): max |difference| / max |v| "
                    f"= {v0:.1e}."}


def steered_texts(model, prompts: Sequence[Sequence[int]], vecs: Float[np.ndarray, "K d_model"], layer: int,
                  max_new_tokens: int, decode: Callable[[list[int]], str], gen_batch: int) -> list[str]:
    """Greedy generations of every prompt under every vector (added at `layer` on every
    prompt and generated token), vector-major; calls of gen_batch // len(prompts) vectors,
    so every call of a run reuses ONE compiled prefill/decode."""
    per_call = max(1, gen_batch // len(prompts))
    out = vectors.generate_with_vectors(model, prompts, np.asarray(vecs, np.float32), layer,
                                        GenerationConfig(max_new_tokens), vectors_per_call=per_call)
    rows = vectors.new_token_lists(out.reshape(-1, out.shape[-1]), model.config.eos_token_ids)
    return [decode(row) for row in rows]


def scored_generations(model, tok, prompts: Sequence[Sequence[int]], theta0: Float[np.ndarray, "d_model"],
                       found: Float[np.ndarray, "K d_model"], random_control: Float[np.ndarray, "K d_model"],
                       layer: int, *, gen_vectors: int, max_new_tokens: int, gen_batch: int,
                       decode: Callable[[list[int]], str]) -> tuple[list[dict], dict[str, float]]:
    """Greedy generations steered by: the first `gen_vectors` found vectors, as many (at most
    GEN_CONTROLS) random controls and found vectors rescaled to |theta0|, theta0, theta0 at
    the found mean norm, nothing; (samples, {label: mean code score over the prompts})."""
    norms = np.linalg.norm(found, axis=1)
    g = gen_vectors
    gc = min(g, len(found), GEN_CONTROLS)  # every found vector is scored; controls need fewer
    steer = {f"found_{i}": found[i] for i in range(min(g, len(found)))}
    steer |= {f"foundrescaled_{i}": found[i] / norms[i] * np.linalg.norm(theta0) for i in range(gc)}
    steer |= {f"random_{i}": random_control[i] for i in range(gc)}
    steer |= {"base": theta0, "base_at_found_norm": theta0 / np.linalg.norm(theta0) * norms.mean(),
              "unsteered": np.zeros_like(theta0)}
    rows = [p for _ in steer for p in prompts]
    labels = [lab for lab in steer for _ in prompts]
    print(f"generating {len(rows)} rows x {max_new_tokens} tokens")
    texts = steered_texts(model, prompts, list(steer.values()), layer, max_new_tokens, decode, gen_batch)
    samples, per = [], {lab: [] for lab in steer}
    for lab, p, text in zip(labels, rows, texts):
        sc = code_score(text)
        per[lab].append(sc)
        samples.append({"label": lab, "prompt": tok.decode(p) if tok is not None else str(p[:8]),
                        "text": text, "code": sc})
    return samples, {lab: float(np.mean(v)) for lab, v in per.items()}


def behaviour_per_vector(found: Float[np.ndarray, "K d_model"], scores: dict[str, float], readings: dict, *,
                         gen_vectors: int, n_prompts: int, max_new_tokens: int) -> dict | None:
    """Do vectors whose (centred) effects are close also write code alike?  The first
    `gen_vectors` found vectors, clustered by specific effect at the target and logit
    stages (`lens.steering.melbo.behaviour`); None with fewer than 4 scored vectors.
    `n_prompts`: the prompts each score averages (for the record)."""
    g = min(gen_vectors, len(found))
    if g < 4:
        return None
    per_vec = np.array([scores[f"found_{i}"] for i in range(g)])
    grams = readings["found_gram"]
    n_clusters = max(2, g // 8)
    return {"code_score": per_vec.tolist(), "n_prompts": n_prompts,
            "choices": (f"code score = mean over {n_prompts} greedy replies of "
                        f"{max_new_tokens} tokens; clusters: average linkage on 1 - cosine of the specific "
                        f"(centred) effects, cut into max(2, K/8) = {n_clusters}; nulls: 1000 shuffles of the scores"),
            **{st: mb.behaviour_vs_effect(grams[st][:g, :g], per_vec, n_clusters, n_perm=1000)
               for st in ("target", "logits")}}


def raw_cosine_max_abs(theta0: Float[np.ndarray, "d_model"], found: Float[np.ndarray, "K d_model"]) -> float:
    """max |cos| between distinct rows of [theta0; found] (float64): 0 for exactly orthogonal vectors."""
    all_raw = np.concatenate([theta0[None], found]).astype(np.float64)
    u = all_raw / np.linalg.norm(all_raw, axis=1, keepdims=True)
    return float(np.abs(u @ u.T - np.eye(len(u))).max())


def mean_score(scores: dict[str, float], prefix: str) -> float | None:
    """The mean of the scores whose label starts with `prefix` (None without any)."""
    vals = [v for k, v in scores.items() if k.startswith(prefix)]
    return float(np.mean(vals)) if vals else None


def summary_record(*, model_name: str, source: int, target: int, n_layers: int, objective_positions: str,
                   theta0, found: MelboResult, x_norm: float, calib: dict, analyses: dict, sweeps: dict,
                   rho_grid, scores: dict, comparison, behaviour, readings: dict, timing: dict) -> dict:
    """The main job's report.json record (before plots and peak memory are added)."""
    V = found.vectors
    norms = np.linalg.norm(V, axis=1)
    f = analyses["found"]
    sk = STAGE_KEYS
    return {
        "model": model_name, "source_layer": source, "target_layer": target, "k_vectors": int(len(V)),
        "objective_positions": objective_positions,
        "layer_choice": (f"source = residual after block {source} of {n_layers} (~1/4 depth), target = after block "
                         f"{target} (~1/2 depth), as the original's 8 and 16 of Qwen1.5-1.8B's 24 (1/3, 2/3): early "
                         "enough that the steered change passes through many blocks before the target, "
                         "late enough that the residual already carries formed features; --source/--target "
                         "override"),
        "raw_cosine_max_abs": raw_cosine_max_abs(theta0, V),
        "norms": {"base": float(np.linalg.norm(theta0)), "found_mean": float(norms.mean()),
                  "found_min": float(norms.min()), "found_max": float(norms.max()),
                  "found_over_base": float(norms.mean() / np.linalg.norm(theta0)),
                  "median_source_resid": x_norm},
        "base_vector": {k: v for k, v in calib.items() if k != "examples"},
        "effective_cosine_mean": {"exact": f["effective_exact"]["cos_mean"],
                                  "first_order": f["effective_first_order"]["cos_mean"],
                                  "closed_form_at_mean_rho": f["closed_form_cosine"],
                                  "rho_mean": f["rho_mean"]},
        "downstream_cosine_mean": {"target": f["target"]["cos_mean"], "last": f["last"]["cos_mean"],
                                   "logits": f["logits"]["cos_mean"]},
        # Effects leave out position 0 (the attention-sink token); this is the share of the
        # found vectors' |effect|^2 that sits there, and what the training objective weighs.
        "first_token_effect_share": f["first_token_share"],
        "participation_ratio": {k: f[v]["participation_ratio"] for k, v in sk.items()},
        "degeneracy_factor": {k: f[v]["degeneracy_factor"] for k, v in sk.items()},
        "clusters": {k: f[v]["clusters"] for k, v in sk.items()},
        "logit_similarity": {"kl_pairwise_mean": f["logit_kl_pairwise_mean"],
                             "topk_overlap_mean": f["logit_topk_overlap_mean"]},
        "rho_grid": rho_grid,
        "effective_cosine_vs_rho": sweeps["found"]["effective_cosine_vs_rho"],
        "degeneracy_vs_rho": sweeps["found"]["degeneracy_vs_rho"],
        "downstream_cosine_vs_rho": sweeps["found"]["downstream_cosine_vs_rho"],
        "closed_form_vs_rho": sweeps["found"]["closed_form"],
        "controls": {name: {k: a[v]["degeneracy_factor"] for k, v in sk.items()} | {
            "cos_mean": {k: a[v]["cos_mean"] for k, v in sk.items()}}
            for name, a in analyses.items() if name != "found"},
        "random_control_sweep": sweeps["random_control"],
        "code_score": {"base": scores.get("base"), "ortho_mean": mean_score(scores, "found_"),
                       "ortho_rescaled_to_base_mean": mean_score(scores, "foundrescaled_"),
                       "random_control": mean_score(scores, "random_"),
                       "base_rescaled_to_found": scores.get("base_at_found_norm"),
                       "unsteered": scores.get("unsteered"), "per_vector": scores},
        "loss": {"first_step_mean": float(found.losses[:, 0].mean()),
                 "last_step_mean": float(found.losses[:, -1].mean())},
        "mode_comparison": comparison,
        "behaviour_per_vector": behaviour,
        # The two readings (see README): shared component vs few distinct effects.
        "shared_share": readings["shared_share"],
        "specific_participation_ratio": readings["specific_participation_ratio"],
        "residual_participation_ratio": readings["residual_participation_ratio"],
        "participation_ratio_per_token": readings["participation_ratio"],
        "shared_cos_theta0": readings["shared_cos_theta0"],
        "control_spread": readings["control_spread"],
        "closed_form_per_token": readings["closed_form_per_token"],
        "readings_choices": readings["choices"],
        **({"pr_vs_k": readings["pr_vs_k"]} if "pr_vs_k" in readings else {}),
        "timing_s": timing,
    }
