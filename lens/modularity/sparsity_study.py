"""The MoEfication and Deja Vu studies of `scripts/modularity.py`, as library calls.

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

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from lens.modularity import contextual_sparsity as CS
from lens.modularity import router_predictor_fit as RPF
from lens.modularity import moefication as MOE
from lens.modularity.plateau_fit import FitConfig
from lens.modularity.resume import rows_digest, tree_digest
from lens.modularity.sparsity_data import collect_sparsity_data, split_rows
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
