"""The data the MoEfication routers and Deja Vu predictors are fitted on, collected once.

    data = collect_sparsity_data(model, rows, onehots=[MOE.expert_onehot(lab)], folder=tmp)
    train_idx, held_out_idx = split_rows(data.row, val_frac=0.1, seed=0)
    data.remove()

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
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lens.modularity import contextual_sparsity as CS
from lens.modularity.neurons import check_neuron_rows
from lens.models.core.interventions import Capture
from lens.models.core.layers import apply_norm
from lens.models.core.transformer import Transformer

LABELS = ("active", "top")


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
    layers: tuple[int, ...] | None = None  # the model layers stored, in order (None: all)

    @property
    def n_tokens(self) -> int:
        return int(self.row.shape[0])

    def remove(self):
        """Delete the memmap folder (when one was written)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def check_layers(model: Transformer, layers) -> tuple[int, ...]:
    """`layers` (None: all; an int or a sequence of ints) as a sorted tuple of distinct
    layer indices in [0, n_layers); a ValueError naming `layers` otherwise."""
    n = model.config.n_layers
    if layers is None:
        return tuple(range(n))
    idx = np.atleast_1d(np.asarray(layers))
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"layers must be a non-empty list of integer layer indices; got {layers!r}")
    bad = [int(i) for i in idx if not 0 <= i < n]
    if bad:
        raise ValueError(f"layers must lie in [0, {n}) (the model has {n} layers); got {bad}")
    if len(set(idx.tolist())) != idx.size:
        raise ValueError(f"layers must be distinct; got {layers!r}")
    return tuple(sorted(int(i) for i in idx))


def active_label(model: Transformer, h2: Float[Array, "seq d_model"], a: Float[Array, "seq d_mlp"], layer_w):
    """The reference's "neuron on" label (module doc): a > 0, or x.g > 0 for a gated MLP."""
    if not model.config.gated_mlp:
        return a > 0
    w_gate, b_gate = layer_w
    g = h2.astype(jnp.float32) @ w_gate.astype(jnp.float32)
    if b_gate is not None:
        g = g + b_gate.astype(jnp.float32)
    return g > 0


def mlp_labels(model, acts, blocks=None):
    """(h2 [layers, seq, d]: what each layer's MLP reads, normed; a [layers, seq, d_mlp]
    float32; on: `active_label` per layer), from one forward's activations; `blocks`: the
    stacked block weights of the captured layers (None: every layer's, `model.blocks`)."""
    c, b = model.config, (model.blocks if blocks is None else blocks)
    mlp_in = acts.resid_pre if c.parallel_residual else acts.resid_mid
    h2 = mlp_in
    if c.pre_norms:
        h2 = jax.vmap(lambda x, w, bb: apply_norm(x, c.norm_kind, w, bb, c.norm_eps)[0])(mlp_in, b.ln2_w, b.ln2_b)
    a = acts.neurons.astype(jnp.float32)
    if not c.gated_mlp:
        return h2, a, a > 0
    return h2, a, jax.vmap(lambda h, aa, w: active_label(model, h, aa, w))(h2, a, (b.W_gate, b.b_gate))


@eqx.filter_jit
def _collect_chunk(model, rows, onehots, label_frac, head_frac, layers):
    """Blocks [0, max(layers)] only (nothing later is read), captures and labels of `layers` only."""
    sel = jnp.asarray(layers)
    b = jax.tree.map(lambda w: w[sel], model.blocks)
    onehots = [oh[sel] for oh in onehots]

    def one(t):
        q, key_valid = model.default_positions(t, None, None, None)
        _, _, acts = model.run_blocks(model.embed_tokens(t, q), q, key_valid, stop=max(layers) + 1,
                                      capture=Capture(resid=True, neurons=True, head_z=True, layers=layers))
        h2, a, on = mlp_labels(model, acts, b)
        top = CS.top_frac_labels(jnp.abs(a), label_frac) > 0
        hn = jnp.linalg.norm(jnp.einsum("lshk,lhkd->lshd", acts.head_z, b.W_O).astype(jnp.float32), axis=-1)
        heads = CS.top_frac_labels(hn, head_frac) > 0
        mass = [jnp.einsum("lsm,lme->lse", jnp.abs(a), oh) for oh in onehots]
        return h2.astype(jnp.float32), acts.resid_pre.astype(jnp.float32), mass, top, on, heads

    return jax.vmap(one)(rows)


def collect_sparsity_data(model: Transformer, rows, onehots=None, predictors: bool = True, folder=None,
                          label_frac: float = 0.1, head_frac: float = 0.3, chunk: int = 4,
                          layers=None) -> SparsityData:
    """One dense pass over `rows` ([N, T] token ids) writing the module doc's arrays for the
    routers (`onehots`: one [layers, d_mlp, E] membership per split; None: skipped) and the
    predictors (`predictors`).  `folder`: where the memmaps go (None: a temporary folder;
    `SparsityData.remove()` deletes it).  Per token of every row (position t predicts t+1
    in the model, but the maps see every position).  `layers`: the layers stored (None:
    all; `check_layers`): array axis 0 follows `SparsityData.layers`."""
    rows = check_neuron_rows(model, rows, "rows")
    layers = check_layers(model, layers)
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

    L, d, m = len(layers), c.d_model, c.d_mlp
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
        h2, x, ms, tp, on, hd = _collect_chunk(model, jnp.asarray(part), onehots, label_frac, head_frac, layers)
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
    return SparsityData(mlp_in, mass, resid, top, active, heads, row, m, folder, layers)


def split_rows(row: np.ndarray, val_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Token indices (train, held-out): a random `val_frac` of the ROWS (at least one) held out."""
    ids = np.unique(row)
    if len(ids) < 2:
        raise ValueError("the held-out split needs at least 2 rows")
    n_val = min(len(ids) - 1, max(1, int(round(val_frac * len(ids)))))
    val_rows = np.random.default_rng(seed).choice(ids, n_val, replace=False)
    is_val = np.isin(row, val_rows)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)

