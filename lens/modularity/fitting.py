"""Routers (MoEfication) and predictors (Deja Vu) trained to a stated plateau on many tokens.

    data = collect_sparsity_data(model, rows, onehots=[MOE.expert_onehot(lab)], folder=tmp)
    routers, rlog = fit_routers(model, labels_list, data, FitConfig.routers())
    pred, plog = fit_predictors(model, data, FitConfig.predictors(), rank=64, key=key)
    rec = reference_recall(model, pred, eval_rows, label="active")

One dense forward over the training rows (in chunks of rows) writes, per layer and token,
what the routers and predictors read and what they are trained to output:
  mlp_in   [layers, N, d_model]   the MLP's normalised input (ln2 output), float32
  resid    [layers, N, d_model]   the residual entering the block, float32
  mass     [layers, N, S, E]      each expert's sum |a| for each of S splits, float32
  top      [layers, N, d_mlp/8]   bit-packed: |a| in the token's top `label_frac`
  active   [layers, N, d_mlp/8]   bit-packed: the neuron is ON (the reference's label, below)
  heads    [layers, N, heads]     a head's ||z_h W_O[h]|| in the token's top `head_frac`
  row      [N]                    the token's row (the held-out split is by row)
into numpy memmaps under `folder` (memory stays one chunk of rows + one layer's slice).

"Active" (FMInference/DejaVu, sparse_predictor/trainer_mlp.py `generate_label`: label =
activation > 0 on OPT's ReLU MLP): a > 0 for an ungated MLP (GELU / ReLU: the same as
pre-activation > 0); for a gated MLP a = act(x.g) (x.u) has no "off" state of its own and
its sign follows u, so the neuron counts as on when its gate is on its ReLU-like side,
x.g > 0 (act(x.g) > 0 for SiLU / GELU gates).

Training is per layer (the reference trains one predictor per layer; a layer's inputs come
from the dense run, so the layers are independent): mini-batches drawn from the training
rows, one compiled `lax.scan` per epoch, an evaluation on the held-out rows after every
epoch, the best epoch's parameters kept, stopping by `PlateauRule`:
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
import shutil
import tempfile
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
from lens.models.core.interventions import Capture
from lens.models.core.layers import apply_norm
from lens.models.core.transformer import Transformer

LABELS = ("active", "top")


# ------------------------------------------------------------------ the plateau rule
@dataclasses.dataclass(frozen=True)
class PlateauRule:
    """When to stop: after the eval at which `patience` evals in a row have not improved on
    the best so far by at least `min_delta` (relative to |best| when `relative`), or at the
    first eval that reaches `target` (mode "max": >= target; "min": <= target)."""

    mode: str = "max"
    min_delta: float = 0.0
    patience: int = 5
    target: float | None = None
    relative: bool = False

    def __post_init__(self):
        if self.mode not in ("max", "min"):
            raise ValueError(f"PlateauRule.mode must be 'max' or 'min'; got {self.mode!r}")
        if self.patience < 1 or self.min_delta < 0:
            raise ValueError(f"PlateauRule: patience >= 1 and min_delta >= 0; got {self.patience}, {self.min_delta}")

    def improves(self, value: float, best: float) -> bool:
        delta = self.min_delta * (abs(best) if self.relative else 1.0)
        return value > best + delta if self.mode == "max" else value < best - delta

    def reached(self, value: float) -> bool:
        if self.target is None:
            return False
        return value >= self.target if self.mode == "max" else value <= self.target

    def scan(self, values) -> dict:
        """Where this rule stops on a whole curve: {"stop": index or None, "best": index of
        the best value up to the stop, "reason": "target" | "plateau" | None}.  Index 0 is
        the first eval (in the fits below: the start, before any step)."""
        best_i, waited = 0, 0
        for i, v in enumerate(values):
            v = float(v)
            if i == 0:
                pass
            elif self.improves(v, float(values[best_i])):
                best_i, waited = i, 0
            else:
                waited += 1
            if self.reached(v):
                return {"stop": i, "best": best_i, "reason": "target"}
            if waited >= self.patience:
                return {"stop": i, "best": best_i, "reason": "plateau"}
        return {"stop": None, "best": best_i, "reason": None}


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Mini-batch training of one kind of per-layer map (see the module doc)."""

    rule: PlateauRule
    max_epochs: int
    batch: int
    lr: float
    weight_decay: float = 0.0
    val_frac: float = 0.1
    seed: int = 0

    @staticmethod
    def routers(max_epochs: int = 30, batch: int = 512, lr: float = 0.01, patience: int = 3,
                min_delta: float = 1e-3) -> "FitConfig":
        """Adam(0.01) as the reference; stop when held-out loss has not fallen by 0.1% in 3 epochs."""
        return FitConfig(PlateauRule("min", min_delta, patience, None, relative=True), max_epochs, batch, lr)

    @staticmethod
    def predictors(max_epochs: int = 20, batch: int = 256, lr: float = 1e-3, patience: int = 5,
                   target: float = 0.99) -> "FitConfig":
        """AdamW(weight decay 0.01) as the reference; its stop rule (5 epochs, recall > 0.99).
        lr 1e-3 and batch 256 (the reference: 1e-4, 1,024 on 400k tokens: ~7,800 steps)."""
        return FitConfig(PlateauRule("max", 0.0, patience, target), max_epochs, batch, lr, weight_decay=0.01)

    def __post_init__(self):
        if self.max_epochs < 1 or self.batch < 1 or not 0 < self.val_frac < 1 or self.lr <= 0:
            raise ValueError(f"FitConfig: max_epochs, batch >= 1, lr > 0, val_frac in (0, 1); got {self}")


# ------------------------------------------------------------------ collection
@dataclasses.dataclass
class SparsityData:
    """Per-layer training data (numpy arrays or memmaps; see the module doc)."""

    mlp_in: np.ndarray | None
    mass: np.ndarray | None
    resid: np.ndarray | None
    top: np.ndarray | None
    active: np.ndarray | None
    heads: np.ndarray | None
    row: np.ndarray
    d_mlp: int
    folder: Path | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.row.shape[0])

    def remove(self):
        """Delete the memmap folder (when one was written)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def active_label(model: Transformer, h2: Float[Array, "seq d_model"], a: Float[Array, "seq d_mlp"], layer_w):
    """The reference's "neuron on" label (module doc): a > 0, or x.g > 0 for a gated MLP."""
    if not model.config.gated_mlp:
        return a > 0
    w_gate, b_gate = layer_w
    g = h2.astype(jnp.float32) @ w_gate.astype(jnp.float32)
    if b_gate is not None:
        g = g + b_gate.astype(jnp.float32)
    return g > 0


def _mlp_labels(model, acts):
    """(h2 [layers, seq, d]: what each layer's MLP reads, normed; a [layers, seq, d_mlp]
    float32; on: `active_label` per layer), from one forward's activations."""
    c, b = model.config, model.blocks
    mlp_in = acts.resid_pre if c.parallel_residual else acts.resid_mid
    h2 = mlp_in
    if c.pre_norms:
        h2 = jax.vmap(lambda x, w, bb: apply_norm(x, c.norm_kind, w, bb, c.norm_eps)[0])(mlp_in, b.ln2_w, b.ln2_b)
    a = acts.neurons.astype(jnp.float32)
    if not c.gated_mlp:
        return h2, a, a > 0
    return h2, a, jax.vmap(lambda h, aa, w: active_label(model, h, aa, w))(h2, a, (b.W_gate, b.b_gate))


@eqx.filter_jit
def _collect_chunk(model, rows, onehots, label_frac, head_frac):
    b = model.blocks

    def one(t):
        acts = model.forward(t, capture=Capture(resid=True, neurons=True, head_z=True)).activations
        h2, a, on = _mlp_labels(model, acts)
        top = CS.top_frac_labels(jnp.abs(a), label_frac) > 0
        hn = jnp.linalg.norm(jnp.einsum("lshk,lhkd->lshd", acts.head_z, b.W_O).astype(jnp.float32), axis=-1)
        heads = CS.top_frac_labels(hn, head_frac) > 0
        mass = [jnp.einsum("lsm,lme->lse", jnp.abs(a), oh) for oh in onehots]
        return h2.astype(jnp.float32), acts.resid_pre.astype(jnp.float32), mass, top, on, heads

    return jax.vmap(one)(rows)


def collect_sparsity_data(model: Transformer, rows, onehots=None, predictors: bool = True, folder=None,
                          label_frac: float = 0.1, head_frac: float = 0.3, chunk: int = 4) -> SparsityData:
    """One dense pass over `rows` ([N, T] token ids) writing the module doc's arrays for the
    routers (`onehots`: one [layers, d_mlp, E] membership per split; None: skipped) and the
    predictors (`predictors`).  `folder`: where the memmaps go (None: a temporary folder;
    `SparsityData.remove()` deletes it).  Per token of every row (position t predicts t+1
    in the model, but the maps see every position)."""
    rows = check_neuron_rows(model, rows, "rows")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    if not (0 < label_frac <= 1 and 0 < head_frac <= 1):
        raise ValueError(f"label_frac and head_frac must be in (0, 1]; got {label_frac}, {head_frac}")
    c = model.config
    n_rows, seq = rows.shape
    n = n_rows * seq
    onehots = tuple(jnp.asarray(o) for o in (onehots or ()))
    folder = Path(tempfile.mkdtemp(prefix="sparsity_")) if folder is None else Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def mm(name, shape, dtype):
        return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

    L, d, m = c.n_layers, c.d_model, c.d_mlp
    packed = (m + 7) // 8
    mlp_in = mm("mlp_in", (L, n, d), np.float32) if onehots else None
    mass = mm("mass", (L, n, len(onehots), onehots[0].shape[-1]), np.float32) if onehots else None
    resid = mm("resid", (L, n, d), np.float32) if predictors else None
    top = mm("top", (L, n, packed), np.uint8) if predictors else None
    active = mm("active", (L, n, packed), np.uint8) if predictors else None
    heads = mm("heads", (L, n, c.n_heads), np.uint8) if predictors else None
    row = np.repeat(np.arange(n_rows, dtype=np.int32), seq)
    for i in range(0, n_rows, chunk):
        part = rows[i:i + chunk]
        h2, x, ms, tp, on, hd = _collect_chunk(model, jnp.asarray(part), onehots, label_frac, head_frac)
        lo, hi = i * seq, (i + len(part)) * seq

        def tokens_major(v):  # [B, L, S, ...] -> [L, B*S, ...]
            v = np.asarray(v)
            return np.moveaxis(v, 1, 0).reshape((L, -1) + v.shape[3:])

        if onehots:
            mlp_in[:, lo:hi] = tokens_major(h2)
            mass[:, lo:hi] = np.stack([tokens_major(x_) for x_ in ms], axis=2)
        if predictors:
            resid[:, lo:hi] = tokens_major(x)
            top[:, lo:hi] = np.packbits(tokens_major(tp), axis=-1)
            active[:, lo:hi] = np.packbits(tokens_major(on), axis=-1)
            heads[:, lo:hi] = tokens_major(hd)
    return SparsityData(mlp_in, mass, resid, top, active, heads, row, m, folder)


def split_rows(row: np.ndarray, val_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Token indices (train, held-out): a random `val_frac` of the ROWS (at least one) held out."""
    ids = np.unique(row)
    if len(ids) < 2:
        raise ValueError("the held-out split needs at least 2 rows")
    n_val = min(len(ids) - 1, max(1, int(round(val_frac * len(ids)))))
    val_rows = np.random.default_rng(seed).choice(ids, n_val, replace=False)
    is_val = np.isin(row, val_rows)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# ------------------------------------------------------------------ the generic per-layer fit
@functools.partial(jax.jit, static_argnames=("loss_fn", "opt", "n", "bs"))
def _epoch(p, state, key, train_data, loss_fn, opt, n, bs):
    """One epoch: a random permutation of the n training tokens in n // bs batches of bs."""
    perm = jax.random.permutation(key, n)[: (n // bs) * bs].reshape(n // bs, bs)

    def step(carry, idx):
        p, state = carry
        loss, g = jax.value_and_grad(loss_fn)(p, *(a[idx] for a in train_data))
        upd, state = opt.update(g, state, p)
        return (optax.apply_updates(p, upd), state), loss

    (p, state), losses = jax.lax.scan(step, (p, state), perm)
    return p, state, losses.mean()


def _fit_layer(params, loss_fn, eval_fn, train_data, val_data, cfg: FitConfig, opt, key):
    """Train one layer's params; returns (best params, log).  train_data / val_data: tuples
    of arrays with a leading token axis; loss_fn(params, *batch) -> scalar (the same object
    for every layer: one compilation); eval_fn(params, *val_data) -> (the rule's metric,
    dict of extras).  Eval 0 is the start."""
    n = int(train_data[0].shape[0])
    bs = min(cfg.batch, n)
    nb = n // bs

    def epoch(p, state, k):
        return _epoch(p, state, k, train_data, loss_fn, opt, n, bs)

    state = opt.init(params)
    metric, extras = eval_fn(params, *val_data)
    curve, extra_curve, train_loss = [float(metric)], [extras], []
    best, best_i = params, 0
    stop = {"stop": None, "best": 0, "reason": None}
    for e in range(cfg.max_epochs):
        key, sub = jax.random.split(key)
        params, state, tl = epoch(params, state, sub)
        metric, extras = eval_fn(params, *val_data)
        curve.append(float(metric))
        extra_curve.append(extras)
        train_loss.append(float(tl))
        stop = cfg.rule.scan(curve)
        if stop["best"] != best_i:
            best, best_i = params, stop["best"]
        if stop["stop"] is not None:
            break
    return best, {"epochs": len(curve) - 1, "steps": (len(curve) - 1) * nb, "steps_per_epoch": nb,
                  "best_epoch": best_i, "plateau_epoch": stop["stop"], "stop_reason": stop["reason"] or "max_epochs",
                  "held_out": curve, "held_out_extras": extra_curve, "train_loss": train_loss}


def _summary(logs: list[dict], rule: PlateauRule, cfg: FitConfig, metric: str, n_train: int, n_val: int) -> dict:
    ep = [g["epochs"] for g in logs]
    return {"criterion": {"metric": metric, **dataclasses.asdict(rule), "max_epochs": cfg.max_epochs,
                          "keeps": "the best held-out epoch's parameters"},
            "batch": cfg.batch, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
            "tokens": {"train": n_train, "held_out": n_val, "held_out_split": f"{cfg.val_frac:.0%} of the rows"},
            "epochs": {"min": min(ep), "median": float(np.median(ep)), "max": max(ep)},
            "steps_total": int(sum(g["steps"] for g in logs)),
            "stop_reasons": {r: sum(g["stop_reason"] == r for g in logs) for r in ("target", "plateau", "max_epochs")},
            "per_layer": logs}


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


def fit_routers(model: Transformer, labels_list, data: SparsityData, cfg: FitConfig | None = None,
                progress: bool = False) -> tuple[list[MOE.Routers], dict]:
    """The reference MLP routers (`moefication.mlp_routers` init), one per split in
    `labels_list` (in the order of `data.mass`'s split axis), trained per layer to
    `cfg.rule` on `data` (held-out: BCE in batches of `cfg.batch`)."""
    cfg = cfg or FitConfig.routers()
    if data.mlp_in is None:
        raise ValueError("data has no router arrays: collect_sparsity_data(..., onehots=...)")
    init = [MOE.mlp_routers(model, MOE.check_labels(model, lab)) for lab in labels_list]
    if len(init) != data.mass.shape[2]:
        raise ValueError(f"labels_list has {len(init)} splits; data.mass has {data.mass.shape[2]}")
    tr, va = split_rows(data.row, cfg.val_frac, cfg.seed)
    opt = optax.adam(cfg.lr)
    vb = min(cfg.batch, len(va))

    def eval_fn(p, h, mass):
        return float(_router_val_loss(p, h, mass, vb)), {}

    out_w1, out_w2, logs = [], [], []
    for layer in range(model.config.n_layers):
        p = (tuple(r.w1[layer] for r in init), tuple(r.w2[layer] for r in init))
        h, mass = np.asarray(data.mlp_in[layer]), np.asarray(data.mass[layer])
        best, log = _fit_layer(p, _router_loss, eval_fn,
                               (jnp.asarray(h[tr]), jnp.asarray(mass[tr])), (jnp.asarray(h[va]), jnp.asarray(mass[va])),
                               cfg, opt, jax.random.key(cfg.seed + layer))
        out_w1.append(best[0])
        out_w2.append(best[1])
        logs.append(log)
        if progress:
            print(f"    router layer {layer}: {log['epochs']} epochs, {log['stop_reason']}, held-out {log['held_out'][-1]:.4f}")
    routers = [MOE.Routers(jnp.stack([w[s] for w in out_w1]), jnp.stack([w[s] for w in out_w2]))
               for s in range(len(init))]
    return routers, _summary(logs, cfg.rule, cfg, "held-out router BCE (sum over splits)", len(tr), len(va))


# ------------------------------------------------------------------ predictors
def recall_counts(logits: Float[Array, "tokens n"], labels) -> Float[Array, "3"]:
    """[sum(label & (logit >= 0)), sum(label), sum(logit >= 0)]: the reference's recall
    (sigmoid(logit) >= 0.5 is predicted on) = first / second; its classifier sparsity =
    third / size."""
    y = labels.astype(bool)
    on = logits >= 0
    return jnp.stack([(y & on).sum(), y.sum(), on.sum()]).astype(jnp.float32)


def _pred_loss(p, x, yn, yh, d_mlp):
    ma, mb, ha, hb = p
    yn = jnp.unpackbits(yn, axis=-1, count=d_mlp).astype(jnp.float32)
    yh = yh.astype(jnp.float32)
    return CS._weighted_bce(CS.layer_logits(ma, mb, x), yn) + CS._weighted_bce(CS.layer_logits(ha, hb, x), yh)


def fit_predictors(model: Transformer, data: SparsityData, cfg: FitConfig | None = None, rank: int = 64,
                   key=None, label: str = "active", progress: bool = False) -> tuple[CS.Predictors, dict]:
    """Deja Vu predictors (`contextual_sparsity.init_predictors` at `rank`) trained per
    layer to `cfg.rule` on `data`: neurons on `label` ("active": the reference's label;
    "top": |a| in the token's top label_frac), heads on the top head_frac; the rule reads
    the held-out neuron recall at the reference's definition (`recall_counts`)."""
    cfg = cfg or FitConfig.predictors()
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}; got {label!r}")
    if data.resid is None:
        raise ValueError("data has no predictor arrays: collect_sparsity_data(..., predictors=True)")
    key = jax.random.key(cfg.seed) if key is None else key
    init = CS.init_predictors(model, rank, key)
    tr, va = split_rows(data.row, cfg.val_frac, cfg.seed)
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

    fields = ("mlp_a", "mlp_b", "head_a", "head_b")
    out, logs = {f: [] for f in fields}, []
    for layer in range(model.config.n_layers):
        p = tuple(getattr(init, f)[layer] for f in fields)
        x = np.asarray(data.resid[layer])  # layer_logits divides by its RMS
        yn, yh = np.asarray(labels[layer]), np.asarray(data.heads[layer])
        best, log = _fit_layer(p, loss_fn, eval_fn, (jnp.asarray(x[tr]), jnp.asarray(yn[tr]), jnp.asarray(yh[tr])),
                               (jnp.asarray(x[va]), jnp.asarray(yn[va]), jnp.asarray(yh[va])), cfg, opt,
                               jax.random.fold_in(key, layer))
        for f, v in zip(fields, best):
            out[f].append(v)
        logs.append(log)
        if progress:
            print(f"    predictor layer {layer}: {log['epochs']} epochs, {log['stop_reason']}, recall {log['held_out'][-1]:.3f}")
    pred = CS.Predictors(*(jnp.stack(out[f]) for f in fields))
    summary = _summary(logs, cfg.rule, cfg, f"held-out neuron recall, reference definition, label '{label}'",
                       len(tr), len(va))
    summary["label"] = label
    return pred, summary


@eqx.filter_jit
def _ref_recall_chunk(model, pred, rows):
    def one(t):
        acts = model.forward(t, capture=Capture(resid=True, neurons=True)).activations
        _, _, on = _mlp_labels(model, acts)
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
