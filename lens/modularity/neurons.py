"""What the modularity tools share: token rows checked against a model with neurons, and
the one "sparse" forward.

  check_neuron_rows(model, rows, name)   rows [N, T] or [T] -> int32 [N, T] (refused: ids, length, attn-only)
  chunks(rows, chunk)                    [N, T] -> slices of `chunk` rows
  masked_forward(model, tokens, mask_fn, params)   [seq] -> logits [seq, vocab] with per-layer unit masks
  LayerView                              what a mask function sees at one layer
  top_k_mask(scores, k)                  [*rows, n] -> bool [*rows, n], exactly k True per row

`masked_forward` is the one "sparse" forward of this package (MoEfication experts and
Deja Vu predictors use it): per layer it asks a mask function which neurons / heads to
keep, given what the block sees in THIS run (so masks at layer l depend on the sparse
outputs of layers < l, as in a real sparse model), and applies them as neuron_mix /
head_mix edits.  It computes the dense block and then masks: correct, not faster.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from lens.core.stats import ranks
from lens.models.core import layers as model_layers
from lens.models.core.block import Rotary, block_forward
from lens.models.core.interventions import Capture, Edits
from lens.models.core.transformer import Transformer


# ------------------------------------------------------------------ input checks
def check_neuron_rows(model: Transformer, rows, name: str = "tokens") -> np.ndarray:
    """Token rows [N, T] (or one row [T]) as int32, refused with a clear message when the
    ids, the length or the shape do not fit `model`."""
    a = np.asarray(rows)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} must be token rows [N, T] with N, T >= 1; got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be integer token ids; got dtype {a.dtype}")
    vocab = model.config.vocab_size
    if a.min() < 0 or a.max() >= vocab:
        raise ValueError(f"{name}: token id out of range [0, {vocab}): min {a.min()}, max {a.max()}")
    if a.shape[1] > model.config.max_seq_len:
        raise ValueError(f"{name}: rows of {a.shape[1]} tokens exceed the context {model.config.max_seq_len}")
    if model.config.attn_only:
        raise ValueError("this model has no MLP (attn_only): it has no neurons to score")
    return a.astype(np.int32)


def chunks(rows: np.ndarray, chunk: int):
    """`rows` in consecutive slices of `chunk` rows (the last may be shorter)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    for i in range(0, len(rows), chunk):
        yield rows[i:i + chunk]


# ------------------------------------------------------------------ masked forward
MaskFn = Callable[..., tuple[Array | None, Array | None]]


class LayerView(NamedTuple):
    """What a mask function sees at one layer of THIS run (all [seq, ...])."""

    layer: Array  # the layer index (traced)
    resid_pre: Float[Array, "seq d_model"]
    mlp_in: Float[Array, "seq d_model"]  # the MLP's normalised input (ln2 output)
    neurons: Float[Array, "seq d_mlp"]  # the dense activations (what an oracle would see)
    head_out_norm: Float[Array, "seq heads"]  # || z_h W_O[h] || per head


def masked_forward(model: Transformer, tokens: Int[Array, " seq"], mask_fn: MaskFn, params) -> Float[Array, "seq vocab"]:
    """Logits of one sequence where, at each layer l, `mask_fn(params_l, view)` returns
    (neuron keep [seq, d_mlp] or None, head keep [seq, heads] or None) and the block is run
    with the dropped units zero-ablated (neuron_mix / head_mix = 1 - keep).  `params` is a
    pytree with a leading [layers] axis (scanned with the weights).  The dense block is
    run once to build the view, then again with the masks (so: no compute saved)."""
    c = model.config
    tokens = model.check_tokens(tokens)
    qpos, valid = model.default_positions(tokens, None, None, None)
    x = model.embed_tokens(tokens, qpos)
    rot: Rotary = model.rotary(qpos)
    key_pos = jnp.where(valid, qpos, -1)
    local = None if c.local_layers is None else jnp.asarray(c.local_layers)
    capture = Capture(resid=True, head_z=True, neurons=True)

    def step(h, xs):
        block, is_local, p, layer = xs
        _, _, acts = block_forward(c, block, h, qpos, key_pos=key_pos, rotary=rot, is_local=is_local, capture=capture)
        mlp_in = acts.resid_pre if c.parallel_residual else acts.resid_mid
        h2, _ = model_layers.apply_norm(mlp_in, c.norm_kind, block.ln2_w, block.ln2_b, c.norm_eps)
        head_out = jnp.einsum("shk,hkd->shd", acts.head_z, block.W_O)
        view = LayerView(layer, acts.resid_pre, h2, acts.neurons,
                         jnp.linalg.norm(head_out.astype(jnp.float32), axis=-1))
        keep_n, keep_h = mask_fn(p, view)
        edits = Edits(neuron_mix=None if keep_n is None else 1.0 - keep_n.astype(jnp.float32),
                      head_mix=None if keep_h is None else 1.0 - keep_h.astype(jnp.float32))
        h, _, _ = block_forward(c, block, h, qpos, key_pos=key_pos, rotary=rot, is_local=is_local, edits=edits)
        return h, None

    x, _ = jax.lax.scan(step, x, (model.blocks, local, params, jnp.arange(c.n_layers)))
    return model.unembed_resid(x)[0]


def top_k_mask(scores: Float[Array, "*rows n"], k) -> Bool[Array, "*rows n"]:
    """True at each row's k highest scores, exactly k per row (ties to the lower index).
    k may be traced: the mask is rank < k, so one compilation serves every k."""
    return ranks(-scores, ties="ordinal") < k
