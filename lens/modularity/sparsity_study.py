"""The MoEfication and Deja Vu studies of `scripts/modularity.py`, as library calls.

    study = SparsityStudy(expert_size=32, fractions=(0.25, 0.5), router_epochs=30, predictor_epochs=20)
    moe, dejavu = run_sparsity_study(model, cluster_rows, fit_rows, eval_rows, study, folder=out)
    sweep = run_fit_sweep(model, cluster_rows, fit_rows, study, layers=[22, 29], token_counts=[4096], folder=out)

or piece by piece:

    splits = moe_splits(model, cluster_rows, expert_size=32, kmeans_iters=6, seed=0)
    fits = fit_sparsity(model, fit_rows, splits, predictors=True, router_cfg, predictor_cfg, rank=64, key=key)
    moe = moe_study(model, splits, fits["routers"], eval_rows, fractions)
    dejavu = dejavu_study(model, fits["predictors"], fits["untrained"], eval_rows, fractions)
    sweep = fit_token_sweep(model, fit_rows, splits, layers=[0, 15], token_counts=[4096], ...)

`fit_sparsity` runs one dense pass over `fit_rows` (`sparsity_data.collect_sparsity_data`: the
routers' and the predictors' data together), trains the MoEfication MLP routers and the Deja
Vu predictors per layer to their plateau rules (`plateau_fit.FitConfig`,
`router_predictor_fit`), and deletes the data.
The studies then evaluate on held-out validation rows: loss and top-1 agreement with the
dense model, the |a| mass kept, the per-neuron oracle, one layer MoEfied at a time, and
the predictors' recall at both definitions.  `fit_token_sweep` fits some layers only, on
nested shares of one collection scored on the same held-out rows (`--layers`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Int

from lens.modularity import contextual_sparsity as CS
from lens.modularity import router_predictor_fit as RPF
from lens.modularity import moefication as MOE
from lens.modularity.plateau_fit import FitConfig
from lens.modularity.resume import rows_digest, tree_digest
from lens.modularity.sparsity_data import LABELS, collect_sparsity_data, split_rows
from lens.modularity.steering import loss_and_agreement
from lens.models.core.transformer import Transformer


def moe_splits(model: Transformer, cluster_rows, expert_size: int, kmeans_iters: int, seed: int = 0,
               active_frac: float = 0.1) -> dict:
    """Expert ids per split: weights (and weights_signfree for a gated MLP), coact (on
    `cluster_rows`), random."""
    splits = {"weights": MOE.split_by_weights(model, expert_size, kmeans_iters)}
    if model.config.gated_mlp:  # |silu(x.g)(x.u)| ignores the sign of u: cluster on features that do too
        splits["weights_signfree"] = MOE.split_by_weights(model, expert_size, kmeans_iters, sign_free=True)
    splits["coact"] = MOE.split_by_coactivation(model, cluster_rows, expert_size, active_frac, kmeans_iters)
    splits["random"] = MOE.split_random(model, expert_size, seed)
    return splits


def fit_sparsity(model: Transformer, fit_rows, splits: dict | None, predictors: bool, router_cfg: FitConfig,
                 predictor_cfg: FitConfig, rank: int, key, label: str = "active", folder=None,
                 progress: bool = False, saved_fits=None) -> dict:
    """Collect once, fit the routers (`splits` not None) and the predictors (`predictors`);
    returns {"routers": [Routers per split] | None, "router_fit": log, "predictors",
    "untrained", "predictor_fit", "tokens_collected", "seconds"}.  `saved_fits`: a folder
    where every layer's fit is saved as it finishes (`router_predictor_fit.SavedFits`, keyed
    by the model's weights and the rows): a stopped run started again collects again (the
    memmaps are not kept) and refits only the layers not yet saved."""
    t0 = time.perf_counter()
    onehots = None if splits is None else [MOE.expert_onehot(lab) for lab in splits.values()]
    saved = None if saved_fits is None else RPF.SavedFits(saved_fits, {
        "model": tree_digest(model), "rows": rows_digest(fit_rows), "collect": "collect_sparsity_data defaults"})
    data = collect_sparsity_data(model, fit_rows, onehots, predictors=predictors, folder=folder)
    out = {"tokens_collected": data.n_tokens, "seconds": {"collect": time.perf_counter() - t0},
           "routers": None, "predictors": None}
    try:
        if splits is not None:
            t0 = time.perf_counter()
            out["routers"], out["router_fit"] = RPF.fit_routers(model, list(splits.values()), data, router_cfg, progress,
                                                                     saved=saved)
            out["seconds"]["routers"] = time.perf_counter() - t0
        if predictors:
            t0 = time.perf_counter()
            r = min(rank, model.config.d_model)
            out["untrained"] = CS.init_predictors(model, r, key)
            out["predictors"], out["predictor_fit"] = RPF.fit_predictors(model, data, predictor_cfg, r, key, label,
                                                                          progress, saved=saved)
            out["seconds"]["predictors"] = time.perf_counter() - t0
    finally:
        data.remove()
    return out


def fit_token_sweep(model: Transformer, fit_rows, splits: dict, layers, token_counts, router_cfg: FitConfig,
                    predictor_cfg: FitConfig, rank: int, key, label: str = "active", folder=None,
                    progress: bool = False, seed: int = 0) -> dict:
    """Routers and predictors for `layers` fitted on growing shares of ONE collection:
    `fit_rows` collected once (`collect_sparsity_data(..., layers=layers)`), one held-out
    split (`split_rows`, router_cfg.val_frac of the rows), and per count in `token_counts`
    (plus every training token) the fits on that many training tokens: whole rows drawn
    at random (`seed`) from the training rows, nested (each count's rows contain the
    smaller counts' rows), all scored on the same held-out rows.  Returns {"layers",
    "tokens_collected", "held_out_tokens", "fits": [{"train_tokens", "router_fit",
    "predictor_fit", "seconds"}], "seconds": {"collect"}}."""
    t0 = time.perf_counter()
    onehots = [MOE.expert_onehot(lab) for lab in splits.values()]
    data = collect_sparsity_data(model, fit_rows, onehots, predictors=True, folder=folder, layers=layers)
    out = {"layers": list(data.layers), "tokens_collected": data.n_tokens,
           "seconds": {"collect": time.perf_counter() - t0}, "fits": []}
    try:
        tr, va = split_rows(data.row, router_cfg.val_frac, router_cfg.seed)
        out["held_out_tokens"] = int(len(va))
        train_rows = np.random.default_rng(seed).permutation(np.unique(data.row[tr]))
        seq = int(np.asarray(fit_rows).shape[1])
        counts = sorted({min(int(n), len(tr)) for n in token_counts} | {len(tr)})
        r = min(rank, model.config.d_model)
        for n in counts:
            sub = np.flatnonzero(np.isin(data.row, train_rows[: max(1, -(-n // seq))]))
            fit = {"train_tokens": int(len(sub)), "seconds": {}}
            t0 = time.perf_counter()
            _, fit["router_fit"] = RPF.fit_routers(model, list(splits.values()), data, router_cfg, progress, split=(sub, va))
            fit["seconds"]["routers"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            _, fit["predictor_fit"] = RPF.fit_predictors(model, data, predictor_cfg, r, key, label, progress,
                                                         split=(sub, va))
            fit["seconds"]["predictors"] = time.perf_counter() - t0
            out["fits"].append(fit)
            if progress:
                print(f"   {len(sub)} train tokens: " + json.dumps({k: round(v) for k, v in fit["seconds"].items()}),
                      flush=True)
    finally:
        data.remove()
    return out


def _dense(model, rows):
    return np.asarray(jax.vmap(model)(jnp.asarray(rows)), np.float32)


def moe_study(model: Transformer, splits: dict, trained: list, eval_rows, fractions, per_layer_frac: float = 0.25) -> dict:
    """Per split x router (oracle, centroid, the trained MLP router) x fraction of experts:
    loss, top-1 agreement with the dense model, |a| mass share; the per-neuron oracle at
    the same fractions; one layer MoEfied at a time (coact split, oracle routing, the
    smallest fraction >= per_layer_frac)."""
    lab0 = next(iter(splits.values()))
    E = int(lab0.max()) + 1
    dense = _dense(model, eval_rows)
    dense_loss, _ = loss_and_agreement(dense, dense, eval_rows)
    table = []
    for (split, lab), mlp in zip(splits.items(), trained):
        routers = {"oracle": None, "centroid": MOE.centroid_routers(model, lab), "mlp": mlp}
        for rname, r in routers.items():
            for f in fractions:
                k = max(1, int(round(f * E)))
                logits = np.asarray(MOE.expert_forward(model, eval_rows, lab, r, k), np.float32)
                loss, agree = loss_and_agreement(logits, dense, eval_rows)
                share = MOE.expert_mass_share(model, eval_rows, lab, r, k)
                table.append({"split": split, "router": rname, "fraction": k / E, "k": k, "loss": loss,
                              "loss_increase": loss - dense_loss, "top1_agreement": agree, "abs_mass_share": share})
    oracle = []
    for f in fractions:
        logits = np.asarray(MOE.neuron_oracle_forward(model, eval_rows, f), np.float32)
        loss, agree = loss_and_agreement(logits, dense, eval_rows)
        oracle.append({"fraction": f, "loss": loss, "loss_increase": loss - dense_loss, "top1_agreement": agree})
    f_layer = min([f for f in fractions if f >= per_layer_frac] or [max(fractions)])
    k_layer = max(1, int(round(f_layer * E)))
    per_layer = []
    for layer in range(model.config.n_layers):
        logits = np.asarray(MOE.expert_forward(model, eval_rows, splits["coact"], None, k_layer, layers=[layer]),
                            np.float32)
        loss, agree = loss_and_agreement(logits, dense, eval_rows)
        per_layer.append({"layer": layer, "loss": loss, "loss_increase": loss - dense_loss, "top1_agreement": agree})
    return {"experts_per_layer": E, "dense_loss": dense_loss, "table": table, "per_neuron_oracle": oracle,
            "per_layer": {"split": "coact", "router": "oracle", "fraction": k_layer / E, "layers": per_layer},
            "oracle_check": "per-neuron oracle at 50% should cost < 0.5 nats; more points to a bug",
            "compute": "mask over neurons (neuron_mix): correct, not a compute saving"}


def dejavu_study(model: Transformer, pred: CS.Predictors, untrained: CS.Predictors, eval_rows, fractions) -> dict:
    """Recall (top-fraction definition: `contextual_sparsity.recall_at`; the reference's:
    `router_predictor_fit.reference_recall`) and the loss with each layer keeping the predicted top
    fraction of its neurons (heads: all, or 30%), trained vs untrained predictors."""
    recall = {"trained": CS.recall_at(model, pred, eval_rows), "untrained": CS.recall_at(model, untrained, eval_rows)}
    reference = {"trained": RPF.reference_recall(model, pred, eval_rows),
                 "untrained": RPF.reference_recall(model, untrained, eval_rows)}
    dense = _dense(model, eval_rows)
    dense_loss, _ = loss_and_agreement(dense, dense, eval_rows)
    sparse = []
    for name, p in (("trained", pred), ("untrained", untrained)):
        for f in fractions:
            for hf in (1.0, 0.3):
                logits = np.asarray(CS.predicted_sparse_forward(model, eval_rows, p, f, hf), np.float32)
                loss, agree = loss_and_agreement(logits, dense, eval_rows)
                sparse.append({"predictor": name, "neuron_frac": f, "head_frac": hf, "loss": loss,
                               "loss_increase": loss - dense_loss, "top1_agreement": agree})
    return {"rank": int(pred.mlp_a.shape[-1]), "dense_loss": dense_loss, "recall": recall,
            "recall_reference": reference, "sparse_forward": sparse,
            "recall_definition": "recall: share of the top-10% |a| neurons inside the predicted top fraction; "
                                 "recall_reference: the reference's (router_predictor_fit.reference_recall)"}


# ------------------------------------------------------------------ the whole study
@dataclasses.dataclass(frozen=True)
class SparsityStudy:
    """What decides the MoEfication / Deja Vu study: experts of `expert_size` neurons (split
    by weights, sign-free weights, co-activation with `kmeans_iters` balanced k-means, and
    at random with `seed`), the fractions of experts / neurons kept in the tables, the
    routers' and predictors' epoch caps (each stops earlier by its plateau rule:
    `plateau_fit.FitConfig`), the predictors' rank and label, and which parts run."""

    expert_size: int = 32
    kmeans_iters: int = 6
    fractions: tuple[float, ...] = (0.25, 0.5)
    router_epochs: int = 30
    predictor_epochs: int = 20
    rank: int = 64
    label: str = "active"
    seed: int = 0
    moefication: bool = True
    dejavu: bool = True

    def __post_init__(self):
        ints = {k: getattr(self, k) for k in ("expert_size", "kmeans_iters", "router_epochs", "predictor_epochs", "rank")}
        bad = {k: v for k, v in ints.items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"SparsityStudy: {bad} must be ints >= 1")
        if not self.fractions or not all(0 < f <= 1 for f in self.fractions):
            raise ValueError(f"SparsityStudy.fractions must be non-empty, each in (0, 1]; got {self.fractions}")
        if self.label not in LABELS:
            raise ValueError(f"SparsityStudy.label must be one of {LABELS}; got {self.label!r}")
        if not (self.moefication or self.dejavu):
            raise ValueError("SparsityStudy: nothing to run (moefication and dejavu both off)")

    def configs(self) -> tuple[FitConfig, FitConfig]:
        return FitConfig.routers(max_epochs=self.router_epochs), FitConfig.predictors(max_epochs=self.predictor_epochs)


def run_sparsity_study(model: Transformer, cluster_rows: Int[np.ndarray, "C seq"], fit_rows: Int[np.ndarray, "F seq"],
                       eval_rows: Int[np.ndarray, "E seq"], study: SparsityStudy, folder,
                       progress: bool = True) -> tuple[dict, dict]:
    """The splits clustered on `cluster_rows`, the routers and predictors fitted on `fit_rows`
    (one collection, memmapped under folder/sparsity_data; every layer's fit saved to
    folder/sparsity_fits as it finishes: a stopped run resumes), the tables on `eval_rows`.
    Returns (the `moefication` report section or {} or {"skipped": why}, the
    `contextual_sparsity` section or {})."""
    c, folder = model.config, Path(folder)
    want_moe = study.moefication
    moe = {}
    if want_moe and c.d_mlp % study.expert_size:
        want_moe = False
        moe = {"skipped": f"d_mlp {c.d_mlp} is not a multiple of expert_size {study.expert_size}"}
    t0 = time.perf_counter()
    splits = moe_splits(model, cluster_rows, study.expert_size, study.kmeans_iters, study.seed) if want_moe else None
    t_split = time.perf_counter() - t0
    if progress and splits:
        print(f"   splits {list(splits)} in {t_split:.0f} s", flush=True)
    rcfg, pcfg = study.configs()
    fits = fit_sparsity(model, fit_rows, splits, study.dejavu, rcfg, pcfg, study.rank, jax.random.key(study.seed),
                        study.label, folder=folder / "sparsity_data", progress=progress,
                        saved_fits=folder / "sparsity_fits")
    if progress:
        print(f"   fitted on {fits['tokens_collected']} tokens: " + json.dumps({k: round(v) for k, v in fits["seconds"].items()}),
              flush=True)
    sizes = {"fit_tokens": fits["tokens_collected"], "evaluated": int(np.asarray(eval_rows).size)}
    if want_moe:
        t0 = time.perf_counter()
        moe = moe_study(model, splits, fits["routers"], eval_rows, study.fractions)
        moe |= {"expert_size": study.expert_size, "tokens": sizes, "router_training": fits["router_fit"],
                "split_seconds": t_split, "fit_seconds": fits["seconds"], "eval_seconds": time.perf_counter() - t0,
                "coact_rule": "gated: |a| in the token's top 10%; ungated: a > 0"}
    dv = {}
    if study.dejavu:
        dv = dejavu_study(model, fits["predictors"], fits["untrained"], eval_rows, study.fractions)
        dv |= {"label": study.label, "head_label_frac": 0.3, "input": "resid_pre / rms", "tokens": sizes,
               "training": fits["predictor_fit"], "fit_seconds": fits["seconds"]}
    return moe, dv


def run_fit_sweep(model: Transformer, cluster_rows: Int[np.ndarray, "C seq"], fit_rows: Int[np.ndarray, "F seq"],
                  study: SparsityStudy, layers, token_counts, folder, progress: bool = True) -> dict:
    """`fit_token_sweep` of `layers` on the splits clustered on `cluster_rows`: the report's
    `fit_sweep` section (the loss tables need every layer and are not run)."""
    if model.config.d_mlp % study.expert_size:
        raise ValueError(f"d_mlp {model.config.d_mlp} is not a multiple of expert_size {study.expert_size}")
    t0 = time.perf_counter()
    splits = moe_splits(model, cluster_rows, study.expert_size, study.kmeans_iters, study.seed)
    t_split = time.perf_counter() - t0
    rcfg, pcfg = study.configs()
    sweep = fit_token_sweep(model, fit_rows, splits, layers, token_counts, rcfg, pcfg, study.rank,
                            jax.random.key(study.seed), study.label, folder=Path(folder) / "sparsity_data",
                            progress=progress, seed=study.seed)
    return {**sweep, "splits": list(splits), "expert_size": study.expert_size, "rank": study.rank,
            "label": study.label, "split_seconds": t_split,
            "not_run": "the MoEfication / Deja Vu loss tables (they need every layer's router / predictor)"}
