"""Routers (MoEfication) and predictors (Deja Vu) trained per layer to a stated plateau on many tokens.

    data = collect_sparsity_data(model, rows, onehots=[MOE.expert_onehot(lab)], folder=tmp)
    routers, rlog = fit_routers(model, labels_list, data, FitConfig.routers())
    pred, plog = fit_predictors(model, data, FitConfig.predictors(), rank=64, key=key)
    rec = reference_recall(model, pred, eval_rows)

The data: `lens.modularity.sparsity_data` (one dense pass, memmapped per layer); the
loop and its stop rules: `lens.modularity.plateau_fit` (`PlateauRule`, `FitConfig`):
  routers     the reference's BCE-with-logits on mass / batch max; held-out loss must fall
              by >= `min_delta` (relative) within `patience` epochs; at most 30 epochs
              (thunlp/MoEfication trains its MLP routers 30 epochs).
  predictors  the reference's weighted BCE; held-out recall at the reference's definition
              (DejaVu trainer_mlp.py `evaluate`: predicted on = sigmoid(logit) >= 0.5,
              recall = sum(label & predicted) / sum(label)) must rise within 5 epochs, or
              reach 0.99; at most 20 epochs (the reference's `train`: early_stop_waiting = 5,
              base_acc > 0.99, args.epochs = 20).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from lens.modularity import contextual_sparsity as CS
from lens.modularity import moefication as MOE
from lens.modularity.neurons import check_neuron_rows, top_k_mask
from lens.modularity.plateau_fit import FitConfig, fit_layer, fit_summary
from lens.modularity.resume import rows_digest, saved_result
from lens.modularity.sparsity_data import LABELS, SparsityData, mlp_labels, split_rows
from lens.models.core.interventions import Capture
from lens.models.core.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class SavedFits:
    """Each layer's fit saved to `folder` as it finishes (`lens.modularity.resume.saved_result`)
    and loaded instead of refitted when a stopped run starts again.  `key`: what decides the
    fits besides what the fit adds itself (the kind, the layer, the FitConfig, the held-out
    split, the split labels / rank / label / PRNG key): the model's and the collected rows'
    digests (`resume.tree_digest`, `resume.rows_digest`)."""

    folder: Path
    key: dict


def _layer_fit(saved: SavedFits | None, name: str, key: dict, fit):
    """fit() -> (arrays, log), or the saved layer's (arrays, log) under `key`."""
    if saved is None:
        return fit()
    arrays, info = saved_result(Path(saved.folder) / f"{name}.safetensors", {**saved.key, **key},
                                lambda: (lambda a, log: (a, {"log": log}))(*fit()))
    return arrays, info["log"]


# ------------------------------------------------------------------ routers
def _router_bce(w1, w2, h, mass):
    """Sum over splits of the reference's loss for one layer: h [B, d], mass [B, S, E]."""
    total = 0.0
    for s in range(len(w1)):
        score = MOE.router_scores(w1[s], w2[s], h)
        target = mass[:, s] / jnp.maximum(mass[:, s].max(), 1e-12)
        bce = jnp.maximum(score, 0) - score * target + jnp.log1p(jnp.exp(-jnp.abs(score)))
        total = total + bce.mean()
    return total


def _router_loss(p, h, mass):
    return _router_bce(p[0], p[1], h, mass)


@functools.partial(jax.jit, static_argnames="vb")
def _router_val_loss(p, h, mass, vb):
    """The held-out loss in batches of vb (the target's batch maximum as in training)."""
    n = (h.shape[0] // vb) * vb
    hb, mb = h[:n].reshape(-1, vb, h.shape[-1]), mass[:n].reshape((-1, vb) + mass.shape[1:])
    return jnp.mean(jax.lax.map(lambda xs: _router_bce(p[0], p[1], *xs), (hb, mb)))


def topk_agreement(scores: Float[Array, "tokens experts"], mass: Float[Array, "tokens experts"], k: int) -> Float[Array, ""]:
    """Mean over tokens of |router's top k  &  the mass oracle's top k| / k: the share of
    the experts the oracle (largest sum |a|) would pick that the router picks too."""
    return (top_k_mask(scores, k) & top_k_mask(mass, k)).sum(-1).mean() / k


@functools.partial(jax.jit, static_argnames="k")
def _router_agreement(p, h, mass, k):
    return jnp.stack([topk_agreement(MOE.router_scores(p[0][s], p[1][s], h), mass[:, s], k) for s in range(len(p[0]))])


def _layers_and_split(data: SparsityData, cfg: FitConfig, split):
    layers = tuple(range(data.mlp_in.shape[0] if data.mlp_in is not None else data.resid.shape[0])) \
        if data.layers is None else tuple(data.layers)
    if split is None:
        return layers, split_rows(data.row, cfg.val_frac, cfg.seed)
    tr, va = (np.asarray(i, np.int64) for i in split)
    if tr.size == 0 or va.size == 0 or np.intersect1d(tr, va).size or max(tr.max(), va.max()) >= data.n_tokens:
        raise ValueError(f"split must be (train, held-out) token indices: non-empty, disjoint, < {data.n_tokens}")
    return layers, (tr, va)


def fit_routers(model: Transformer, labels_list, data: SparsityData, cfg: FitConfig | None = None,
                progress: bool = False, split=None, fractions=(0.25, 0.5),
                saved: SavedFits | None = None) -> tuple[list[MOE.Routers], dict]:
    """The reference MLP routers (`moefication.mlp_routers` init), one per split in
    `labels_list` (in the order of `data.mass`'s split axis), trained per layer to
    `cfg.rule` on `data` (held-out: BCE in batches of `cfg.batch`).  Only `data.layers`
    are fitted (the others keep the init).  `split`: (train, held-out) token indices
    (None: `split_rows` with cfg.val_frac, cfg.seed).  Each layer's log also has, at the
    kept epoch, `held_out_topk_agreement` {fraction of experts: [per split]} (`topk_agreement`).
    `saved`: each layer's fit saved as it finishes, reused when the run starts again."""
    cfg = cfg or FitConfig.routers()
    if data.mlp_in is None:
        raise ValueError("data has no router arrays: collect_sparsity_data(..., onehots=...)")
    init = [MOE.mlp_routers(model, MOE.check_labels(model, lab)) for lab in labels_list]
    if len(init) != data.mass.shape[2]:
        raise ValueError(f"labels_list has {len(init)} splits; data.mass has {data.mass.shape[2]}")
    layers, (tr, va) = _layers_and_split(data, cfg, split)
    opt = optax.adam(cfg.lr)
    n_exp = int(data.mass.shape[-1])
    vb = min(cfg.batch, len(va))

    def eval_fn(p, h, mass):
        return float(_router_val_loss(p, h, mass, vb)), {}

    out_w1 = [list(r.w1) for r in init]
    out_w2 = [list(r.w2) for r in init]
    logs = []
    n_split = len(init)
    fixed = {"fit": "router", "config": dataclasses.asdict(cfg), "split": rows_digest(tr, va),
             "labels": rows_digest(*labels_list), "fractions": list(fractions)}
    for pos, layer in enumerate(layers):
        def fit():
            p = (tuple(r.w1[layer] for r in init), tuple(r.w2[layer] for r in init))
            h, mass = np.asarray(data.mlp_in[pos]), np.asarray(data.mass[pos])
            hv, mv = jnp.asarray(h[va]), jnp.asarray(mass[va])
            best, log = fit_layer(p, _router_loss, eval_fn, (jnp.asarray(h[tr]), jnp.asarray(mass[tr])), (hv, mv),
                                  cfg, opt, jax.random.key(cfg.seed + layer))
            log = {"layer": layer, **log, "held_out_loss": log["held_out"][log["best_epoch"]],
                   "held_out_topk_agreement": {
                       str(f): np.asarray(_router_agreement(best, hv, mv, max(1, round(f * n_exp))), np.float64).tolist()
                       for f in fractions}}
            return {**{f"w1_{s}": best[0][s] for s in range(n_split)}, **{f"w2_{s}": best[1][s] for s in range(n_split)}}, log

        arrays, log = _layer_fit(saved, f"router_layer{layer:03d}", {**fixed, "layer": layer}, fit)
        for s in range(n_split):
            out_w1[s][layer], out_w2[s][layer] = jnp.asarray(arrays[f"w1_{s}"]), jnp.asarray(arrays[f"w2_{s}"])
        logs.append(log)
        if progress:
            print(f"    router layer {layer}: {log['epochs']} epochs, {log['stop_reason']}, held-out {log['held_out'][-1]:.4f}")
    routers = [MOE.Routers(jnp.stack(out_w1[s]), jnp.stack(out_w2[s])) for s in range(len(init))]
    summary = fit_summary(logs, cfg.rule, cfg, "held-out router BCE (sum over splits)", len(tr), len(va))
    summary["layers"] = list(layers)
    return routers, summary


# ------------------------------------------------------------------ predictors
def recall_counts(logits: Float[Array, "tokens n"], labels) -> Float[Array, "3"]:
    """[sum(label & (logit >= 0)), sum(label), sum(logit >= 0)]: the reference's recall
    (sigmoid(logit) >= 0.5 is predicted on) = first / second; its classifier sparsity =
    third / size."""
    y = labels.astype(bool)
    on = logits >= 0
    return jnp.stack([(y & on).sum(), y.sum(), on.sum()]).astype(jnp.float32)


def top_recall_counts(logits: Float[Array, "tokens n"], labels, k: int) -> Float[Array, "2"]:
    """[sum(label & in the token's top-k logits), sum(label)]: the top-fraction recall
    (`contextual_sparsity.recall_at`'s definition, labels = |a| in the top 10%) = first / second."""
    y = labels.astype(bool)
    return jnp.stack([(y & top_k_mask(logits, k)).sum(), y.sum()]).astype(jnp.float32)


def _pred_loss(p, x, yn, yh, d_mlp):
    ma, mb, ha, hb = p
    yn = jnp.unpackbits(yn, axis=-1, count=d_mlp).astype(jnp.float32)
    yh = yh.astype(jnp.float32)
    return CS._weighted_bce(CS.layer_logits(ma, mb, x), yn) + CS._weighted_bce(CS.layer_logits(ha, hb, x), yh)


def fit_predictors(model: Transformer, data: SparsityData, cfg: FitConfig | None = None, rank: int = 64,
                   key=None, label: str = "active", progress: bool = False, split=None,
                   top_frac: float = 0.1, saved: SavedFits | None = None) -> tuple[CS.Predictors, dict]:
    """Deja Vu predictors (`contextual_sparsity.init_predictors` at `rank`) trained per
    layer to `cfg.rule` on `data`: neurons on `label` ("active": the reference's label;
    "top": |a| in the token's top label_frac), heads on the top head_frac; the rule reads
    the held-out neuron recall at the reference's definition (`recall_counts`).  Only
    `data.layers` are fitted (the others keep the init); `split` as in `fit_routers`.  Each
    layer's log also has `held_out_final` at the kept epoch: the reference's recall of the
    "active" label with the share predicted on and the share truly on, and the recall of
    the "top" label within each token's `top_frac` highest logits (`top_recall_counts`).
    `saved`: each layer's fit saved as it finishes, reused when the run starts again."""
    cfg = cfg or FitConfig.predictors()
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}; got {label!r}")
    if data.resid is None:
        raise ValueError("data has no predictor arrays: collect_sparsity_data(..., predictors=True)")
    key = jax.random.key(cfg.seed) if key is None else key
    init = CS.init_predictors(model, rank, key)
    layers, (tr, va) = _layers_and_split(data, cfg, split)
    opt = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)
    m = data.d_mlp
    labels = data.active if label == "active" else data.top

    loss_fn = functools.partial(_pred_loss, d_mlp=m)

    @jax.jit
    def _eval(p, x, yn, yh):
        ln = CS.layer_logits(p[0], p[1], x)
        counts = recall_counts(ln, jnp.unpackbits(yn, axis=-1, count=m))
        return counts, _pred_loss(p, x, yn, yh, m)

    def eval_fn(p, x, yn, yh):
        counts, loss = _eval(p, x, yn, yh)
        counts = np.asarray(counts, np.float64)
        return counts[0] / max(counts[1], 1.0), {"classifier_sparsity": counts[2] / (x.shape[0] * m),
                                                   "true_sparsity": counts[1] / (x.shape[0] * m), "loss": float(loss)}

    k_top = max(1, round(top_frac * m))

    @jax.jit
    def _final(p, x, y_active, y_top):
        ln = CS.layer_logits(p[0], p[1], x)
        return (recall_counts(ln, jnp.unpackbits(y_active, axis=-1, count=m)),
                top_recall_counts(ln, jnp.unpackbits(y_top, axis=-1, count=m), k_top))

    fields = ("mlp_a", "mlp_b", "head_a", "head_b")
    out, logs = {f: list(getattr(init, f)) for f in fields}, []
    fixed = {"fit": "predictor", "config": dataclasses.asdict(cfg), "split": rows_digest(tr, va), "rank": rank,
             "label": label, "top_frac": top_frac, "prng_key": rows_digest(jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key)}
    for pos, layer in enumerate(layers):
        def fit():
            p = tuple(getattr(init, f)[layer] for f in fields)
            x = np.asarray(data.resid[pos])  # layer_logits divides by its RMS
            yn, yh = np.asarray(labels[pos]), np.asarray(data.heads[pos])
            xv = jnp.asarray(x[va])
            best, log = fit_layer(p, loss_fn, eval_fn, (jnp.asarray(x[tr]), jnp.asarray(yn[tr]), jnp.asarray(yh[tr])),
                                  (xv, jnp.asarray(yn[va]), jnp.asarray(yh[va])), cfg, opt, jax.random.fold_in(key, layer))
            ref, top = (np.asarray(c, np.float64) for c in _final(
                best, xv, jnp.asarray(np.asarray(data.active[pos])[va]), jnp.asarray(np.asarray(data.top[pos])[va])))
            size = len(va) * m
            log = {"layer": layer, **log, "held_out_final": {
                "recall_reference": ref[0] / max(ref[1], 1.0), "predicted_on": ref[2] / size, "truly_on": ref[1] / size,
                f"recall_top{top_frac:g}_at_top{top_frac:g}": top[0] / max(top[1], 1.0)}}
            return dict(zip(fields, best)), log

        arrays, log = _layer_fit(saved, f"predictor_layer{layer:03d}", {**fixed, "layer": layer}, fit)
        for f in fields:
            out[f][layer] = jnp.asarray(arrays[f])
        logs.append(log)
        if progress:
            print(f"    predictor layer {layer}: {log['epochs']} epochs, {log['stop_reason']}, recall {log['held_out'][-1]:.3f}")
    pred = CS.Predictors(*(jnp.stack(out[f]) for f in fields))
    summary = fit_summary(logs, cfg.rule, cfg, f"held-out neuron recall, reference definition, label '{label}'",
                          len(tr), len(va))
    summary["label"] = label
    summary["layers"] = list(layers)
    return pred, summary


@eqx.filter_jit
def _ref_recall_chunk(model, pred, rows):
    def one(t):
        acts = model.forward(t, capture=Capture(resid=True, neurons=True)).activations
        _, _, on = mlp_labels(model, acts)
        logits = jax.vmap(CS.layer_logits)(pred.mlp_a, pred.mlp_b, acts.resid_pre)
        k = jnp.maximum(on.sum(-1, keepdims=True), 1)  # as many as are truly on, per token
        ranked = top_k_mask(logits, k) & on
        return jnp.concatenate([recall_counts(logits, on), ranked.sum()[None].astype(jnp.float32)])

    return jax.vmap(one)(rows).sum(0)


def reference_recall(model: Transformer, pred: CS.Predictors, rows, chunk: int = 4) -> dict:
    """On `rows`: the reference's recall of the "active" label (module doc) by the
    predictor's sigmoid >= 0.5, its classifier sparsity (share predicted on), the true
    sparsity (share on), and the recall when the predictor instead keeps, per token, as many
    neurons as are truly on (its top-|on| logits: independent of the threshold)."""
    rows = check_neuron_rows(model, rows)
    tot = np.zeros(4)
    for i in range(0, len(rows), chunk):
        tot += np.asarray(_ref_recall_chunk(model, pred, jnp.asarray(rows[i:i + chunk])), np.float64)
    size = rows.size * model.config.n_layers * model.config.d_mlp
    return {"recall": tot[0] / max(tot[1], 1), "classifier_sparsity": tot[2] / size, "true_sparsity": tot[1] / size,
            "recall_at_true_count": tot[3] / max(tot[1], 1),
            "definition": "FMInference/DejaVu sparse_predictor/trainer_mlp.py evaluate(): label = activation > 0 "
                          "(gated MLP: gate pre-activation > 0), predicted on = sigmoid(logit) >= 0.5, "
                          "recall = sum(label & predicted) / sum(label), pooled over tokens and layers"}
