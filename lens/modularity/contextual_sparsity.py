"""Contextual sparsity (Deja Vu, Liu et al. 2023, FMInference/DejaVu sparse_predictor).

    pred = init_predictors(model, rank=64, key=jax.random.key(0))
    pred, log = train_predictors(model, pred, train_rows, val_rows, cfg, out_dir)
    recall = recall_at(model, pred, rows, fractions=(0.1, 0.2, 0.3))
    logits = predicted_sparse_forward(model, tokens, pred, neuron_frac=0.2, head_frac=0.3)

Per layer, two low-rank linear maps (d -> r -> d_mlp and d -> r -> heads, no
nonlinearity, as the reference's `Linear(d, D), Linear(D, 4d)`) read the residual entering
the block, divided by its RMS (so one scale fits every layer), and predict which units
matter for THIS token:
  neurons: the top `label_frac` of the token's |a| (the reference's OPT has ReLU and labels
           a > 0; a GELU / SwiGLU neuron is never exactly off, so "matters" = large |a|);
  heads:   the top `head_frac` (30%) of the heads by ||z_h W_O[h]||.
Trained with the reference's weighted BCE (weight = positive share + 0.005 on negatives,
1 - weight on positives) through `lens.training.train.train`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lens.modularity.neurons import LayerView, check_neuron_rows, masked_forward, top_k_mask
from lens.models.core.interventions import Capture
from lens.models.core.transformer import Transformer


class Predictors(eqx.Module):
    """Per-layer low-rank predictors (leading [layers] axis on every weight)."""

    mlp_a: Float[Array, "layers d_model rank"]
    mlp_b: Float[Array, "layers rank d_mlp"]
    head_a: Float[Array, "layers d_model rank"]
    head_b: Float[Array, "layers rank heads"]


def init_predictors(model: Transformer, rank: int, key) -> Predictors:
    """Random init (PyTorch Linear's uniform(+-1/sqrt(fan_in)), as the reference)."""
    c = model.config
    if rank < 1:
        raise ValueError(f"rank must be >= 1; got {rank}")
    ks = jax.random.split(key, 4)

    def u(k, shape, fan_in):
        return jax.random.uniform(k, shape, jnp.float32, -1, 1) / np.sqrt(fan_in)

    hr = min(rank, c.n_heads * 4)
    return Predictors(u(ks[0], (c.n_layers, c.d_model, rank), c.d_model), u(ks[1], (c.n_layers, rank, c.d_mlp), rank),
                      u(ks[2], (c.n_layers, c.d_model, hr), c.d_model), u(ks[3], (c.n_layers, hr, c.n_heads), hr))


def _rms_normed(x):
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


def layer_logits(a, b, x: Float[Array, "seq d_model"]) -> Float[Array, "seq n"]:
    """One layer's predictor: (x / rms(x)) A B."""
    return _rms_normed(x) @ a @ b


def top_frac_labels(values: Float[Array, "seq n"], frac: float) -> Float[Array, "seq n"]:
    """1.0 at each row's top ceil(frac * n) values."""
    k = max(1, int(np.ceil(frac * values.shape[-1])))
    return top_k_mask(values, k).astype(jnp.float32)


@eqx.filter_jit
def _views(model, rows):
    """Per row: resid_pre [layers, seq, d], |a| [layers, seq, d_mlp], head norms [layers, seq, heads]."""
    def one(t):
        acts = model.forward(t, capture=Capture(resid=True, neurons=True, head_z=True)).activations
        out = jnp.einsum("lshk,lhkd->lshd", acts.head_z, model.blocks.W_O)
        return acts.resid_pre, jnp.abs(acts.neurons.astype(jnp.float32)), jnp.linalg.norm(out.astype(jnp.float32), axis=-1)

    return jax.vmap(one)(rows)


def _weighted_bce(logits, y):
    """The reference's loss: BCE with weight w = mean(y) + 0.005 on negatives, 1 - w on positives."""
    w = y.mean() + 0.005
    weight = y * (1 - w) + w
    bce = jnp.maximum(logits, 0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return (weight * bce).mean()


class PredictorLoss(eqx.Module):
    """loss_fn for lens.training.train.train (the model is frozen; labels from its dense run)."""

    model: Transformer
    label_frac: float = eqx.field(static=True)
    head_frac: float = eqx.field(static=True)

    def __call__(self, pred: Predictors, rows):
        x, a, hn = jax.lax.stop_gradient(_views(self.model, rows[:, :-1]))
        per = jax.vmap(layer_logits)  # over layers: x [layers, seq, d] -> [layers, seq, n]
        yn = top_frac_labels(a, self.label_frac)
        yh = top_frac_labels(hn, self.head_frac)
        ln = jax.vmap(per, in_axes=(None, None, 0))(pred.mlp_a, pred.mlp_b, x)
        lh = jax.vmap(per, in_axes=(None, None, 0))(pred.head_a, pred.head_b, x)
        n_layers = x.shape[1]
        mlp = sum(_weighted_bce(ln[:, i], yn[:, i]) for i in range(n_layers))
        head = sum(_weighted_bce(lh[:, i], yh[:, i]) for i in range(n_layers))
        return mlp + head


def train_predictors(model: Transformer, pred: Predictors, train_rows, val_rows, cfg, out_dir,
                     label_frac: float = 0.1, head_frac: float = 0.3, progress: bool = False):
    """Train with AdamW (weight decay 0.01, as the reference) through `lens.training.train.train`."""
    import optax

    from lens.training.train import TrainOptions, train

    opt = optax.adamw(cfg.lr, weight_decay=0.01)
    result = train(pred, train_rows, val_rows, cfg, out_dir,
                   TrainOptions(loss_fn=PredictorLoss(model, label_frac, head_frac), opt=opt,
                                rows_config=model.config, progress=progress,
                                run_info={"predictor": "dejavu", "label_frac": label_frac, "head_frac": head_frac,
                                          "rank": int(pred.mlp_a.shape[-1])}))
    return result.model, result.log


@eqx.filter_jit
def _recall_sums(model, pred, rows, fractions, label_frac, head_frac):
    x, a, hn = _views(model, rows)
    b, n_layers = x.shape[0], x.shape[1]
    x = x.reshape((b * n_layers,) + x.shape[2:])  # treat (row, layer) pairs alike; weights per layer
    a = a.reshape((b * n_layers,) + a.shape[2:])
    hn = hn.reshape((b * n_layers,) + hn.shape[2:])
    idx = jnp.tile(jnp.arange(n_layers), b)
    ln = jax.vmap(lambda i, xi: layer_logits(pred.mlp_a[i], pred.mlp_b[i], xi))(idx, x)
    lh = jax.vmap(lambda i, xi: layer_logits(pred.head_a[i], pred.head_b[i], xi))(idx, x)
    yn, yh = top_frac_labels(a, label_frac), top_frac_labels(hn, head_frac)
    out = []
    for f in fractions:
        kept_n = top_frac_labels(ln, f)
        kept_h = top_frac_labels(lh, f)
        out.append(jnp.stack([(kept_n * yn).sum(), yn.sum(), (kept_n * a).sum(), a.sum(),
                              (kept_h * yh).sum(), yh.sum()]))
    return jnp.stack(out)


def recall_at(model: Transformer, pred: Predictors, rows, fractions=(0.05, 0.1, 0.2, 0.3, 0.5),
              label_frac: float = 0.1, head_frac: float = 0.3, chunk: int = 4) -> list[dict]:
    """For each kept fraction f (the predicted top f of the units per token): recall of the
    labelled neurons, share of the |a| mass kept, recall of the labelled heads."""
    rows = check_neuron_rows(model, rows)
    fr = tuple(float(f) for f in fractions)
    tot = None
    for i in range(0, len(rows), chunk):
        s = np.asarray(_recall_sums(model, pred, jnp.asarray(rows[i:i + chunk]), fr, label_frac, head_frac), np.float64)
        tot = s if tot is None else tot + s
    return [{"kept": f, "neuron_recall": t[0] / t[1], "mass_kept": t[2] / t[3], "head_recall": t[4] / t[5]}
            for f, t in zip(fr, tot)]


@eqx.filter_jit
def _sparse_logits(model, pred, rows, neuron_frac, head_frac):
    c = model.config
    kn = jnp.maximum(1, jnp.ceil(neuron_frac * c.d_mlp)).astype(jnp.int32)
    kh = jnp.maximum(1, jnp.ceil(head_frac * c.n_heads)).astype(jnp.int32)

    def mask_fn(p, view: LayerView):
        ma, mb, ha, hb = p
        return top_k_mask(layer_logits(ma, mb, view.resid_pre), kn), top_k_mask(layer_logits(ha, hb, view.resid_pre), kh)

    params = (pred.mlp_a, pred.mlp_b, pred.head_a, pred.head_b)
    return jax.vmap(lambda t: masked_forward(model, t, mask_fn, params))(rows)


def predicted_sparse_forward(model: Transformer, tokens, pred: Predictors, neuron_frac: float,
                             head_frac: float = 1.0) -> Float[Array, "*batch seq vocab"]:
    """Logits when each layer keeps only the predicted top `neuron_frac` of its neurons and
    `head_frac` of its heads per token (1.0 = all), the rest zero-ablated."""
    if not (0 < neuron_frac <= 1 and 0 < head_frac <= 1):
        raise ValueError("neuron_frac and head_frac must be in (0, 1]")
    rows = check_neuron_rows(model, tokens)
    out = _sparse_logits(model, pred, jnp.asarray(rows), jnp.float32(neuron_frac), jnp.float32(head_frac))
    return out[0] if np.asarray(tokens).ndim == 1 else out
