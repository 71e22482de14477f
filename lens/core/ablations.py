"""Ablation edits: directions projected out of the residual stream or its writers, and
zero / mean / resample ablation of attention heads, MLP neurons and experts' neurons.
Each returns an `Edits` (lens.core.edits has the conventions; all are re-exported there).

    e = ablate_direction(model, refusal_dir, where="writers")  # Arditi et al.
    e = ablate_heads(model, {3: [0, 5]}, kind="mean", cache=ref_cache)
    e = ablate_neurons(model, {2: [17]}, kind="resample", cache=batch_cache, key=key)
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from lens.core.edit_checks import (CACHE_FIELDS, LayerSpec, check_layers, check_positions, check_vectors,
                                   checked_field, edit_dtype, position_mask)
from lens.models.core.interventions import Activations, Edits
from lens.models.core.ranges import check_index, layer_context, range_error
from lens.models.core.transformer import Transformer


def orthonormal(directions: Float[Array, "n d_model"]) -> Float[Array, "n d_model"]:
    """Orthonormal basis (QR, same span) of the rows; projecting out needs orthonormal rows."""
    q, r = jnp.linalg.qr(jnp.asarray(directions, jnp.float32).T)
    # Keep each basis vector's sign aligned with its input direction (QR's sign is arbitrary).
    return (q * jnp.sign(jnp.where(jnp.diag(r) == 0, 1.0, jnp.diag(r)))).T


def ablate_direction(
    model: Transformer,
    directions: Float[Array, "d_model"] | Float[Array, "n_dirs d_model"],
    layers: LayerSpec = None,
    where: str = "resid",
) -> Edits:
    """Project the span of `directions` out of the residual stream.

    where="resid": out of the residual stream entering each block in `layers` (None = all).
    where="writers": out of everything that writes to the stream, i.e. the embedding
    (resid_ablate at layer 0) and every attention and MLP output (writer_ablate at every
    layer, or only those in `layers`): the stream then never holds the direction at all
    (Arditi et al., "Refusal is mediated by a single direction").
    Directions need not be orthonormal: their span is orthonormalised first.
    """
    directions = check_vectors(model, directions, "direction")
    d = jnp.atleast_2d(jnp.asarray(directions, jnp.float32))
    norms = jnp.linalg.norm(d, axis=-1)
    if not isinstance(norms, jax.core.Tracer) and bool((norms == 0).any()):
        raise ValueError("a direction to ablate has zero norm")
    u = orthonormal(d)
    n, dm = model.config.n_layers, model.config.d_model
    layer_list = check_layers(model, layers)
    sel = jnp.zeros((n, 1, 1), jnp.float32).at[jnp.asarray(layer_list)].set(1.0)
    per_layer = sel * u[None]  # [layers, n_dirs, d_model], zero rows where unused
    dt = edit_dtype(model)
    if where == "resid":
        return Edits(resid_ablate=per_layer.astype(dt))
    if where == "writers":
        first = jnp.zeros((n, u.shape[0], dm), jnp.float32).at[0].set(u)
        return Edits(resid_ablate=first.astype(dt), writer_ablate=per_layer.astype(dt))
    raise ValueError(f"where must be 'resid' or 'writers'; got {where!r}")


def _mask_from(spec, n_layers: int, width: int, what: str) -> np.ndarray:
    """A [layers, width] 0/1 mask from a bool/float array or {layer: [indices]}."""
    if isinstance(spec, Mapping):
        mask = np.zeros((n_layers, width), np.float32)
        for layer, idx in spec.items():
            check_index("layer", layer, n_layers, negative=True, context=layer_context(n_layers))
            idx = np.atleast_1d(np.asarray(idx, np.int64))
            if idx.size and (idx.min() < 0 or idx.max() >= width):
                raise range_error(what, idx, 0, width, f"at layer {layer}")
            mask[int(layer), idx] = 1.0
        return mask
    mask = np.asarray(spec, np.float32)
    if mask.shape != (n_layers, width):
        raise ValueError(f"{what} mask has shape {mask.shape}; expected {(n_layers, width)}")
    return mask


def _source(kind: str, acts, what: str, key, seq_len):
    """The replacement for zero / mean / resample ablation from reference activations.

    acts: [layers, seq, ...] or a batch [batch, layers, seq, ...].  mean: averaged over the
    batch and positions (S = 1).  resample: one random batch element per layer (needs `key`),
    position-aligned, so its seq must equal the edited sequence's.
    """
    if kind == "zero":
        return None
    if acts is None:
        raise ValueError(f"{kind} ablation needs a reference cache holding {what}")
    a = jnp.asarray(acts, jnp.float32)
    axes_after_layers = len(CACHE_FIELDS[what].axes)  # seq and the unit axes
    batched = a.ndim == 2 + axes_after_layers
    if kind == "mean":
        axes = (0, 2) if batched else (1,)
        return jnp.expand_dims(a.mean(axis=axes), 1)
    if kind == "resample":
        if seq_len is not None and a.shape[-axes_after_layers] != seq_len:
            raise ValueError(f"resample source has another sequence length than {seq_len}")
        if not batched:
            return a
        if key is None:
            raise ValueError("resample ablation from a batch of caches needs a PRNG `key`")
        idx = jax.random.randint(key, (a.shape[1],), 0, a.shape[0])
        return a[idx, jnp.arange(a.shape[1])]
    raise ValueError(f"kind must be 'zero', 'mean' or 'resample'; got {kind!r}")


def ablate_heads(
    model: Transformer,
    heads: Bool[Array, "layers heads"] | Mapping[int, Sequence[int]],
    kind: str = "zero",
    cache: Activations | None = None,
    key: Array | None = None,
    positions: int | Sequence[int] | None = None,
    seq_len: int | None = None,
) -> Edits:
    """Zero / mean / resample ablation of attention heads (their output z before W_O).

    heads: a [layers, heads] mask or {layer: [head, ...]}.  mean and resample take the
    replacement from `cache.head_z` ([layers, seq, heads, d_head], or a batch of caches
    [batch, layers, ...]): mean averages over batch and positions; resample uses another
    input's z (a random batch element per layer when a batch is given, with `key`).
    positions None = every position.
    """
    mix, source = _unit_ablation(model, heads, model.config.n_heads, "head", "head_z",
                                 kind, cache, key, positions, seq_len)
    return Edits(head_mix=mix, head_source=source)


def ablate_neurons(
    model: Transformer,
    neurons: Bool[Array, "layers d_mlp"] | Mapping[int, Sequence[int]],
    kind: str = "zero",
    cache: Activations | None = None,
    key: Array | None = None,
    positions: int | Sequence[int] | None = None,
    seq_len: int | None = None,
) -> Edits:
    """Zero / mean / resample ablation of MLP neurons (activations after the nonlinearity
    and gate, before W_out); sources as in `ablate_heads`, from `cache.neurons`."""
    mix, source = _unit_ablation(model, neurons, model.config.d_mlp, "neuron", "neurons",
                                 kind, cache, key, positions, seq_len)
    return Edits(neuron_mix=mix, neuron_source=source)


def ablate_expert_neurons(
    model: Transformer,
    neurons: Bool[Array, "layers experts d_mlp"] | Mapping[int, Mapping[int, Sequence[int]]],
    kind: str = "zero",
    cache: Activations | None = None,
    key: Array | None = None,
    positions: int | Sequence[int] | None = None,
    seq_len: int | None = None,
) -> Edits:
    """Zero / mean / resample ablation of a mixture of experts' neurons, per expert (each
    expert's act(gate) * up before its W_out, models/core/moe.py); sources as in
    `ablate_heads`, from `cache.expert_neurons` ([layers, seq, experts, d_mlp]).

    neurons: a [layers, experts, d_mlp] mask or {layer: {expert: [neuron, ...]}}.  The
    router is untouched: an ablated neuron of an expert that a token does not choose
    changes nothing for that token."""
    c = model.config
    if not c.is_moe:
        raise ValueError("ablate_expert_neurons needs a mixture of experts (n_experts > 0); "
                         "use ablate_neurons for a dense MLP")
    shape = (c.n_layers, c.n_experts, c.d_mlp)
    if isinstance(spec := neurons, Mapping):
        mask = np.zeros(shape, np.float32)
        for layer, per_expert in spec.items():
            check_index("layer", layer, c.n_layers, negative=True, context=layer_context(c.n_layers))
            if not isinstance(per_expert, Mapping):
                raise ValueError("neurons must map layer -> {expert: [neuron, ...]}")
            for expert, idx in per_expert.items():
                check_index("expert", expert, c.n_experts, context=f"at layer {layer}")
                mask[int(layer), int(expert)] = _mask_from({0: idx}, 1, c.d_mlp, "neuron")[0]
    else:
        mask = np.asarray(spec, np.float32)
        if mask.shape != shape:
            raise ValueError(f"expert neuron mask has shape {mask.shape}; expected {shape}")
    mix, source = _unit_ablation(model, mask, None, "expert neuron", "expert_neurons", kind, cache,
                                 key, positions, seq_len)
    return Edits(expert_neuron_mix=mix, expert_neuron_source=source)


def _unit_ablation(model, spec, width, what, field, kind, cache, key, positions, seq_len):
    """(mix [layers, S, *units], source or None) shared by head, neuron and expert-neuron
    ablation (width None: `spec` is already the [layers, *units] mask)."""
    mask = spec if width is None else _mask_from(spec, model.config.n_layers, width, what)
    src_acts = None if cache is None else checked_field(model, cache, field)
    pos = check_positions(positions, seq_len)
    pmask = position_mask(pos, seq_len).reshape((1, -1) + (1,) * (mask.ndim - 1))
    mix = mask[:, None] * pmask
    source = _source(kind, src_acts, field, key, seq_len if kind == "resample" else None)
    dt = edit_dtype(model)
    return jnp.asarray(mix, dt), None if source is None else source.astype(dt)

