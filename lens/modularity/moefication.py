"""MoEfication (Zhang et al. 2022, thunlp/MoEfication): a dense MLP split into experts.

    labels = split_by_weights(model, expert_size=32)        # [layers, d_mlp] expert ids
    routers = centroid_routers(model, labels)                # or mlp_routers + train_routers
    logits = expert_forward(model, tokens, labels, routers, k=8)

Splits (each expert exactly `expert_size` neurons, as the reference's balanced k-means):
  "weights"  balanced k-means on the L2-normalised input-weight rows of the neurons (the
             reference's ParamSplit); a gated MLP's row is its gate and up rows
             concatenated, both normalised together.
  "weights_signfree"  the same on features invariant to u -> -u for a gated MLP: |a| =
             |silu(x.g)(x.u)| does not change when a neuron's up row flips sign, so each
             up row is multiplied by sign(u . r), r the top eigenvector of sum_m u_m u_m^T
             (itself unchanged by any row's flip); an ungated MLP: as "weights".
  "coact"    co-activation on real text: the reference counts, per neuron pair, the tokens
             where both are active (ReLU > 0) and partitions that graph with METIS.  Here:
             "active" = a > 0 for an ungated MLP; a gated MLP has no exact zeros, so a
             neuron counts as active when |a| is among the top `active_frac` of that token's
             |a|.  The graph partition is replaced by the same balanced k-means on each
             neuron's L2-normalised co-activation row (neurons that fire with the same
             others land together).
  "random"   consecutive blocks of a random permutation (the control).
Routers score experts from the MLP's normalised input h (ln2 output, divided by ||h||):
  centroid:  h . c_e, c_e = normalised mean of the expert's normalised (gate) rows.
  mlp:       the reference's MLPCenter: Linear(d, E) initialised with the centroids, tanh,
             Linear(E, E) initialised to the identity; trained with BCE-with-logits on each
             expert's activation mass divided by the batch maximum (as the reference).
  oracle:    the true top-k experts by activation mass (an upper bound).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int
from scipy.optimize import linear_sum_assignment

from lens.modularity.neurons import LayerView, check_neuron_rows, masked_forward, top_k_mask
from lens.models.core.interventions import Capture
from lens.models.core.layers import apply_norm
from lens.models.core.transformer import Transformer

SPLITS = ("weights", "weights_signfree", "coact", "random")


# ------------------------------------------------------------------ balanced k-means
def balanced_kmeans(points: Float[np.ndarray, "n f"], n_clusters: int, iters: int = 10) -> Int[np.ndarray, " n"]:
    """Cluster ids in [0, n_clusters), every cluster exactly n / n_clusters points.

    Assignment is the exact balanced one (min total squared distance with equal sizes, a
    linear assignment with each centre repeated n / n_clusters times; KMeansConstrained in
    the reference solves the same problem as a min-cost flow).  Initialisation is
    farthest-point from the point of largest norm, so the result does not depend on the
    order of the points (ties aside): permuting the neurons permutes the labels."""
    x = np.asarray(points, np.float64)
    n = x.shape[0]
    if n_clusters < 1 or n % n_clusters:
        raise ValueError(f"{n} points do not split into {n_clusters} equal clusters")
    size = n // n_clusters
    sq = (x * x).sum(1)
    first = int(np.argmax(sq + 1e-12 * x.sum(1)))  # the small term breaks exact-norm ties
    centres = [x[first]]
    dist = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, n_clusters):
        nxt = int(np.argmax(dist))
        centres.append(x[nxt])
        dist = np.minimum(dist, ((x - x[nxt]) ** 2).sum(1))
    c = np.stack(centres)
    labels = None
    for _ in range(iters):
        d = sq[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]
        _, slot = linear_sum_assignment(np.repeat(d, size, axis=1))
        new = slot // size
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        c = np.stack([x[labels == e].mean(0) for e in range(n_clusters)])
    return labels.astype(np.int32)


def _normalise(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def sign_canonical(rows: Float[np.ndarray, "n f"]) -> Float[np.ndarray, "n f"]:
    """Each row times sign(row . r), r the top eigenvector of sum_m row_m row_m^T (its own
    sign fixed by its largest component).  Flipping any rows' signs leaves the result
    unchanged (r depends only on the outer products); rows orthogonal to r keep theirs."""
    x = np.asarray(rows, np.float64)
    _, vecs = np.linalg.eigh(x.T @ x)
    r = vecs[:, -1]
    r = r * np.sign(r[np.argmax(np.abs(r))])
    s = np.sign(x @ r)
    return (x * np.where(s == 0, 1.0, s)[:, None]).astype(np.float32)


def neuron_weight_rows(model: Transformer, sign_free: bool = False) -> Float[np.ndarray, "layers d_mlp f"]:
    """Each neuron's input weights as a row: W_in[:, m] (f = d_model), or for a gated MLP
    [W_gate[:, m], W_in[:, m]] (f = 2 d_model), L2-normalised (the reference's features).
    sign_free: a gated MLP's up rows through `sign_canonical` first (|a| is unchanged by
    u -> -u, so the features should be too)."""
    b = model.blocks
    rows = np.swapaxes(np.asarray(b.W_in, np.float32), 1, 2)
    if model.config.gated_mlp:
        if sign_free:
            rows = np.stack([sign_canonical(_normalise(r)) for r in rows])
        rows = np.concatenate([np.swapaxes(np.asarray(b.W_gate, np.float32), 1, 2), rows], -1)
    return _normalise(rows)


def _n_experts(model: Transformer, expert_size: int) -> int:
    d = model.config.d_mlp
    if expert_size < 1 or d % expert_size:
        raise ValueError(f"d_mlp = {d} is not a multiple of expert_size = {expert_size}")
    return d // expert_size


def split_by_weights(model: Transformer, expert_size: int = 32, iters: int = 10,
                     sign_free: bool = False) -> Int[np.ndarray, "layers d_mlp"]:
    """Expert ids per neuron: balanced k-means on the normalised input-weight rows
    (sign_free: the features `neuron_weight_rows(model, sign_free=True)`)."""
    e = _n_experts(model, expert_size)
    return np.stack([balanced_kmeans(r, e, iters) for r in neuron_weight_rows(model, sign_free)])


def split_random(model: Transformer, expert_size: int = 32, seed: int = 0) -> Int[np.ndarray, "layers d_mlp"]:
    """Expert ids per neuron: equal blocks of a random permutation, per layer."""
    e = _n_experts(model, expert_size)
    rng = np.random.default_rng(seed)
    d = model.config.d_mlp
    return np.stack([np.argsort(rng.permutation(d)) // (d // e) for _ in range(model.config.n_layers)]).astype(np.int32)


@eqx.filter_jit
def _coact_chunk(model, rows, active_frac):
    def one(t):
        a = model.forward(t, capture=Capture(neurons=True)).activations.neurons.astype(jnp.float32)
        if model.config.gated_mlp:
            k = max(1, int(round(active_frac * a.shape[-1])))
            thresh = jax.lax.top_k(jnp.abs(a), k)[0][..., -1:]
            on = jnp.abs(a) >= thresh
        else:
            on = a > 0
        on = on.astype(jnp.float32)
        return jnp.einsum("lsm,lsn->lmn", on, on)

    return jax.vmap(one)(rows).sum(0)


def coactivation(model: Transformer, rows, active_frac: float = 0.1, chunk: int = 4) -> Float[np.ndarray, "layers d_mlp d_mlp"]:
    """Per layer, how many tokens of `rows` have both neurons active (see the module doc)."""
    rows = check_neuron_rows(model, rows)
    if not 0 < active_frac <= 1:
        raise ValueError(f"active_frac must be in (0, 1]; got {active_frac}")
    total = None
    for i in range(0, len(rows), chunk):
        part = np.asarray(_coact_chunk(model, jnp.asarray(rows[i:i + chunk]), active_frac), np.float64)
        total = part if total is None else total + part
    return total


def split_by_coactivation(model: Transformer, rows, expert_size: int = 32, active_frac: float = 0.1,
                          iters: int = 10) -> Int[np.ndarray, "layers d_mlp"]:
    """Expert ids per neuron: balanced k-means on the normalised co-activation rows."""
    e = _n_experts(model, expert_size)
    co = coactivation(model, rows, active_frac)
    return np.stack([balanced_kmeans(_normalise(c), e, iters) for c in co])


def check_labels(model: Transformer, labels) -> np.ndarray:
    """Expert ids [layers, d_mlp], every expert of every layer the same size."""
    lab = np.asarray(labels)
    c = model.config
    if lab.shape != (c.n_layers, c.d_mlp) or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be integer [{c.n_layers}, {c.d_mlp}]; got {lab.dtype} {lab.shape}")
    e = int(lab.max()) + 1
    counts = np.stack([np.bincount(row, minlength=e) for row in lab])
    if lab.min() < 0 or (counts != counts[0, 0]).any():
        raise ValueError("labels must give every expert of every layer the same number of neurons")
    return lab.astype(np.int32)


def expert_onehot(labels) -> Float[Array, "layers d_mlp experts"]:
    """[layers, d_mlp, E] membership matrix (the reference's `patterns`)."""
    lab = np.asarray(labels)
    return jnp.asarray(np.eye(int(lab.max()) + 1, dtype=np.float32)[lab])


# ------------------------------------------------------------------ routers
class Routers(eqx.Module):
    """One router per layer: scores [seq, E] = tanh(h_n W1^T) W2^T (w2 None: h_n W1^T),
    h_n the MLP input divided by its L2 norm."""

    w1: Float[Array, "layers experts d_model"]
    w2: Float[Array, "layers experts experts"] | None = None



def router_scores(w1: Float[Array, "experts d"], w2: Float[Array, "experts experts"] | None,
                  h: Float[Array, "seq d"]) -> Float[Array, "seq experts"]:
    """One layer's router: tanh(h_n W1^T) W2^T, or h_n W1^T without W2 (h_n = h / ||h||)."""
    hn = h.astype(jnp.float32)
    hn = hn / jnp.maximum(jnp.linalg.norm(hn, axis=-1, keepdims=True), 1e-12)
    s = hn @ w1.T
    return s if w2 is None else jnp.tanh(s) @ w2.T


def expert_centroids(model: Transformer, labels) -> Float[np.ndarray, "layers experts d_model"]:
    """Normalised mean of each expert's normalised input rows (the gate rows of a gated
    MLP, the part of the neuron that reads the input direction)."""
    lab = check_labels(model, labels)
    w = np.asarray(model.blocks.W_gate if model.config.gated_mlp else model.blocks.W_in, np.float32)
    rows = _normalise(np.swapaxes(w, 1, 2))
    e = int(lab.max()) + 1
    cent = np.stack([[rows[layer][lab[layer] == i].mean(0) for i in range(e)] for layer in range(len(lab))])
    return _normalise(cent).astype(np.float32)


def centroid_routers(model: Transformer, labels) -> Routers:
    return Routers(jnp.asarray(expert_centroids(model, labels)))


def mlp_routers(model: Transformer, labels) -> Routers:
    """The reference MLP router before training: W1 = centroids, W2 = identity."""
    cent = expert_centroids(model, labels)
    eye = np.broadcast_to(np.eye(cent.shape[1], dtype=np.float32), (cent.shape[0],) + (cent.shape[1],) * 2)
    return Routers(jnp.asarray(cent), jnp.asarray(eye))


@eqx.filter_jit
def _expert_logits(model, rows, onehot, routers, k, active):
    w1 = None if routers is None else routers.w1
    w2 = None if routers is None else routers.w2

    def mask_fn(p, view: LayerView):
        w1_l, w2_l, onehot_l, active_l = p
        if w1_l is None:  # the oracle: the experts holding the most activation mass
            scores = jnp.abs(view.neurons.astype(jnp.float32)) @ onehot_l
        else:
            scores = router_scores(w1_l, w2_l, view.mlp_in)
        keep = top_k_mask(scores, k)[:, jnp.argmax(onehot_l, -1)]
        return keep | ~active_l, None

    return jax.vmap(lambda t: masked_forward(model, t, mask_fn, (w1, w2, onehot, active)))(rows)


def _active_layers(model: Transformer, layers) -> np.ndarray:
    n = model.config.n_layers
    if layers is None:
        return np.ones(n, bool)
    idx = np.atleast_1d(np.asarray(layers))
    if idx.size == 0 or not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"layers must be non-empty indices in [0, {n}); got {layers}")
    active = np.zeros(n, bool)
    active[idx] = True
    return active


def expert_forward(model: Transformer, tokens, labels, routers: Routers | None, k: int,
                   layers=None) -> Float[Array, "*batch seq vocab"]:
    """Logits with only the top-k experts per token (per layer) active; routers None =
    the oracle's choice; layers: the layers MoEfied (None: all; the rest stay dense).
    A mask over neurons: correct, not a compute saving."""
    lab = check_labels(model, labels)
    e = int(lab.max()) + 1
    if not 1 <= k <= e:
        raise ValueError(f"k must be in [1, {e}]; got {k}")
    rows = check_neuron_rows(model, tokens)
    single = np.asarray(tokens).ndim == 1
    active = jnp.asarray(_active_layers(model, layers))
    out = _expert_logits(model, jnp.asarray(rows), expert_onehot(lab), routers, jnp.asarray(k, jnp.int32), active)
    return out[0] if single else out


def neuron_importance_weights(model: Transformer) -> Float[np.ndarray, "layers d_mlp"]:
    """||W_out row|| per neuron: how far one unit of its activation moves the residual."""
    return np.linalg.norm(np.asarray(model.blocks.W_out, np.float32), axis=-1)


@eqx.filter_jit
def _neuron_oracle_logits(model, rows, wnorm, k):
    def mask_fn(w_l, view: LayerView):
        return top_k_mask(jnp.abs(view.neurons.astype(jnp.float32)) * w_l, k), None

    return jax.vmap(lambda t: masked_forward(model, t, mask_fn, wnorm))(rows)


def neuron_oracle_forward(model: Transformer, tokens, frac: float) -> Float[Array, "*batch seq vocab"]:
    """Logits keeping, per token and layer, only the round(frac * d_mlp) neurons with the
    largest |a| * ||W_out row|| (no grouping into experts: the per-neuron oracle, the
    best any expert split of the same size could hope for by this score)."""
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1]; got {frac}")
    rows = check_neuron_rows(model, tokens)
    single = np.asarray(tokens).ndim == 1
    k = max(1, int(round(frac * model.config.d_mlp)))
    out = _neuron_oracle_logits(model, jnp.asarray(rows), jnp.asarray(neuron_importance_weights(model)),
                                jnp.asarray(k, jnp.int32))
    return out[0] if single else out


def expert_mass_share(model: Transformer, tokens, labels, routers: Routers | None, k: int, chunk: int = 4) -> float:
    """The share of sum |a| (over tokens, layers and neurons of the DENSE forward) that lies
    in the top-k experts each router picks per token and layer (routers None: the oracle,
    which picks by that mass).  1 = the chosen experts hold every neuron's activation."""
    lab = check_labels(model, labels)
    e = int(lab.max()) + 1
    if not 1 <= k <= e:
        raise ValueError(f"k must be in [1, {e}]; got {k}")
    rows = check_neuron_rows(model, tokens)
    onehot = expert_onehot(lab)
    kept = total = 0.0
    for i in range(0, len(rows), chunk):
        k_sum, a_sum = _mass_sums(model, jnp.asarray(rows[i:i + chunk]), onehot, routers, jnp.asarray(k, jnp.int32))
        kept, total = kept + float(k_sum), total + float(a_sum)
    return kept / max(total, 1e-30)


@eqx.filter_jit
def _mass_sums(model, rows, onehot, routers, k):
    h, a = _mlp_inputs_and_abs(model, rows)  # [B, L, S, d], [B, L, S, m]
    mass = jnp.einsum("blsm,lme->blse", a, onehot)
    if routers is None:
        scores = mass
    else:
        per_layer = jax.vmap(router_scores)
        scores = jax.vmap(per_layer, in_axes=(None, None, 0))(routers.w1, routers.w2, h)
    return (mass * top_k_mask(scores, k)).sum(), a.sum()


# ------------------------------------------------------------------ router training
@eqx.filter_jit
def _mlp_inputs_and_abs(model, rows):
    """Per row: the MLP's normalised input h [layers, seq, d] and |a| [layers, seq, d_mlp],
    from one plain forward."""
    c = model.config

    def one(t):
        acts = model.forward(t, capture=Capture(resid=True, neurons=True)).activations
        mlp_in = acts.resid_pre if c.parallel_residual else acts.resid_mid
        b = model.blocks
        h = jax.vmap(lambda x, w, bb: apply_norm(x, c.norm_kind, w, bb, c.norm_eps)[0])(mlp_in, b.ln2_w, b.ln2_b)
        return h, jnp.abs(acts.neurons.astype(jnp.float32))

    return jax.vmap(one)(rows)


class RouterSet(eqx.Module):
    """Routers of several splits trained together (one frozen forward serves them all)."""

    routers: tuple[Routers, ...]


class RouterLoss(eqx.Module):
    """loss_fn for lens.training.train.train: the reference's BCE-with-logits between each router's
    scores and its experts' activation mass / the batch maximum (per layer), averaged over
    tokens and experts, summed over layers and splits.  The model is frozen."""

    model: Transformer
    onehots: tuple[Array, ...]

    def __call__(self, rset: RouterSet, rows):
        h, a = jax.lax.stop_gradient(_mlp_inputs_and_abs(self.model, rows[:, :-1]))
        total = 0.0
        for routers, onehot in zip(rset.routers, self.onehots):
            mass = jnp.einsum("blsm,lme->blse", a, onehot)  # each expert's activation mass
            target = mass / jnp.maximum(mass.max(axis=(0, 2, 3), keepdims=True), 1e-12)
            # h [batch, layers, seq, d] -> scores [batch, layers, seq, E], each layer its router
            per_layer = jax.vmap(router_scores)
            score = jax.vmap(per_layer, in_axes=(None, None, 0))(routers.w1, routers.w2, h)
            bce = jnp.maximum(score, 0) - score * target + jnp.log1p(jnp.exp(-jnp.abs(score)))
            total = total + bce.mean(axis=(0, 2, 3)).sum()
        return total


def train_routers(model: Transformer, labels_list, train_rows, val_rows, cfg, out_dir, progress: bool = False):
    """The reference MLP routers, one per split in `labels_list`, trained together through
    `lens.training.train.train` with Adam at cfg.lr (the reference: Adam(0.01)); returns (list of
    Routers, log)."""
    import optax

    from lens.training.train import TrainOptions, train

    labs = [check_labels(model, lab) for lab in labels_list]
    rset = RouterSet(tuple(mlp_routers(model, lab) for lab in labs))
    digest = [int((lab.astype(np.int64) * (1 + np.arange(lab.size)).reshape(lab.shape)).sum() % 1_000_003) for lab in labs]
    result = train(rset, train_rows, val_rows, cfg, out_dir,
                   TrainOptions(loss_fn=RouterLoss(model, tuple(expert_onehot(lab) for lab in labs)),
                                opt=optax.adam(cfg.lr), rows_config=model.config, progress=progress,
                                run_info={"router": "moefication-mlp", "labels_digest": digest}))
    return list(result.model.routers), result.log
