"""Constructors for `models.Edits`: interventions as data, validated before any compute.

Every function here returns an `Edits` (a pytree of per-layer arrays, leading axis
[layers] = the model's n_layers) that `model.forward(tokens, edits=...)` consumes; the
order in which a block applies them is documented in models/core/interventions.py.  Unused
layers hold zeros (a zero vector adds nothing, a zero direction removes nothing, a zero
mix keeps the activation), so edits at different layers share one shape and a sweep is
`jax.vmap` over a K-stacked `Edits` (`stack_edits`).

Position axes S are 1 (every position) or seq (chosen positions; the others get zeros).

Errors are raised HERE, before any forward: a vector of the wrong width, a NaN/inf, a layer
out of range, a position beyond the sequence, a cache from a different model or shape.

    e = edits.add(model, v, layers=6, coeff=4.0)                     # steer
    e = edits.ablate_direction(model, refusal_dir, where="writers")  # Arditi et al.
    e = edits.ablate_heads(model, {3: [0, 5]}, kind="mean", cache=ref_cache)
    e = edits.patch(model, clean_cache, site="resid", layers=[4], positions=[7])
    e = edits.custom(model, Clamp(direction, value), layers=[6])     # any pure fn of x
    batch = edits.stack_edits([e1, e2, e3])                          # [K, layers, ...]
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from lens.models.core.interventions import (
    PATCH_SITES,
    SITES,
    Activations,
    Edits,
    ResidFn,
    check_resid_fn,
    combine_two,
    fields_set,
    site_widths,
)
from lens.models.core.interventions import check_edits as _check
from lens.models.core.ranges import check_index, layer_context, position_context, range_error
from lens.models.core.interventions import first_edited_layer as _first
from lens.models.core.transformer import Transformer

LayerSpec = int | Sequence[int] | None


# ------------------------------------------------------------------ validation helpers
def check_layers(model: Transformer, layers: LayerSpec, n: int | None = None) -> list[int]:
    """Normalise `layers` (int, list, None = all) to a list of in-range ints (negatives count
    from the end); raise ValueError for an out-of-range index."""
    n = model.config.n_layers if n is None else n
    if layers is None:
        return list(range(n))
    out = []
    for layer in [layers] if np.ndim(layers) == 0 else list(np.asarray(layers).ravel()):
        out.append(check_index("layer", layer, n, negative=True, context=layer_context(n)))
    if len(set(out)) != len(out):
        raise ValueError(f"repeated layer index in {out}")
    return out


def check_positions(positions: int | Sequence[int] | None, seq_len: int | None) -> list[int] | None:
    """Normalise positions (None = every position) to in-range ints, given the sequence length."""
    if positions is None:
        return None
    if seq_len is None:
        raise ValueError("chosen positions need seq_len (the length of the tokens edited)")
    out = []
    for p in [positions] if np.ndim(positions) == 0 else list(np.asarray(positions).ravel()):
        out.append(check_index("position", p, seq_len, negative=True, context=position_context(seq_len)))
    return out


def check_vectors(model: Transformer, vectors, name: str = "vector") -> np.ndarray | Array:
    """Check the last axis is d_model and (when concrete) every value is finite."""
    d = model.config.d_model
    shape = tuple(np.shape(vectors))
    if len(shape) == 0 or shape[-1] != d:
        raise ValueError(f"{name} has shape {shape}; its last axis must be d_model={d}")
    if not isinstance(vectors, jax.core.Tracer):
        bad = ~np.isfinite(np.asarray(vectors, np.float32))
        if bad.any():
            raise ValueError(f"{name} contains {int(bad.sum())} NaN/inf values")
    return vectors


def _position_mask(positions: list[int] | None, seq_len: int | None) -> np.ndarray:
    """[S] 0/1 mask: S = 1 for every position, else seq_len with ones at `positions`."""
    if positions is None:
        return np.ones((1,), np.float32)
    mask = np.zeros((seq_len,), np.float32)
    mask[positions] = 1.0
    return mask


def _dtype(model: Transformer):
    return model.embed.dtype


# ------------------------------------------------------------------ constructors
def add(
    model: Transformer,
    vectors: Float[Array, "d_model"] | Float[Array, "n_layers_chosen d_model"],
    layers: LayerSpec,
    coeff: float = 1.0,
    positions: int | Sequence[int] | None = None,
    seq_len: int | None = None,
) -> Edits:
    """Add `coeff * vector` to the residual stream entering each block in `layers`.

    One vector [d_model] is added at every chosen layer; a stack [len(layers), d_model]
    gives each layer its own.  positions None = every position (S = 1), else only those
    positions of a `seq_len`-token sequence.  Returns Edits(resid_add [layers, S, d_model]).
    """
    layer_list = check_layers(model, layers)
    vectors = check_vectors(model, vectors)
    pos = check_positions(positions, seq_len)
    v = jnp.asarray(vectors, jnp.float32)
    if v.ndim == 1:
        v = jnp.broadcast_to(v, (len(layer_list), v.shape[0]))
    if v.ndim != 2 or v.shape[0] != len(layer_list):
        raise ValueError(
            f"vectors of shape {tuple(np.shape(vectors))} do not match {len(layer_list)} layers"
        )
    mask = jnp.asarray(_position_mask(pos, seq_len))
    out = jnp.zeros((model.config.n_layers, mask.shape[0], model.config.d_model), jnp.float32)
    out = out.at[jnp.asarray(layer_list)].set(coeff * v[:, None, :] * mask[None, :, None])
    return Edits(resid_add=out.astype(_dtype(model)))


def custom(model: Transformer, fn: Callable, layers: LayerSpec) -> Edits:
    """The escape hatch: `fn(x, layer, positions)` replaces the residual stream entering each
    block in `layers`, after that layer's data edits (patch, ablate, add: steps 1-3 of the
    order in models/core/interventions.py), before the block runs.

    fn(x: [seq, d_model], layer: int32 [], positions: int32 [seq]) -> [seq, d_model] must be
    pure JAX.  Make it an `eqx.Module` whose ARRAY fields are its parameters (other fields
    `eqx.field(static=True)`): the Edits is then a pytree that jits once and vmaps over K
    parameter sets, e.g. K clamp values or K SAE features in one compile:

        class Clamp(eqx.Module):           # set the component along unit `u` to `value`
            u: Float[Array, "d_model"]
            value: Float[Array, ""]
            def __call__(self, x, layer, positions):
                return x + (self.value - x @ self.u)[:, None] * self.u

        e = edits.custom(model, Clamp(u, jnp.float32(3.0)), layers=[6])
        logits = model(tokens, edits=e)
        stacked = jax.vmap(lambda v: edits.custom(model, Clamp(u, v), layers=[6]))(values)
        many = lens.run_edits(model, tokens, stacked)       # [K, seq, vocab], one compile

    Checked here: the layers, and (on shapes only) that fn maps a [seq, d_model] residual to
    the same shape.  Not supported in generation (refused there).
    """
    layer_list = check_layers(model, layers)
    if not callable(fn):
        raise TypeError(f"custom: fn must be callable (x, layer, positions) -> x; got {type(fn).__name__}")
    edit = ResidFn(fn, tuple(layer_list))
    check_resid_fn(edit, model.config.n_layers)
    d = model.config.d_model
    x = jax.ShapeDtypeStruct((3, d), _dtype(model))
    try:
        out = eqx.filter_eval_shape(lambda f, x: f(x, jnp.int32(layer_list[0]), jnp.arange(3, dtype=jnp.int32)),
                                    fn, x)
    except Exception as e:
        raise TypeError(f"custom: fn(x [seq, {d}], layer, positions [seq]) failed on shapes: "
                        f"{type(e).__name__}: {e}") from None
    if getattr(out, "shape", None) != (3, d):
        raise ValueError(f"custom: fn must return the residual's shape (seq, {d}); for a (3, {d}) "
                         f"input it returned {getattr(out, 'shape', type(out).__name__)}")
    return Edits(resid_fn=edit)


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
    dt = _dtype(model)
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
    axes_after_layers = len(_CACHE_FIELDS[what].axes)  # seq and the unit axes
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
    src_acts = None if cache is None else _checked_field(model, cache, field)
    pos = check_positions(positions, seq_len)
    pmask = _position_mask(pos, seq_len).reshape((1, -1) + (1,) * (mask.ndim - 1))
    mix = mask[:, None] * pmask
    source = _source(kind, src_acts, field, key, seq_len if kind == "resample" else None)
    dt = _dtype(model)
    return jnp.asarray(mix, dt), None if source is None else source.astype(dt)


# cache field -> a patch site reading it (its axes after [layers, seq], whether it is layered)
_CACHE_FIELDS = {s.field: s for s in PATCH_SITES.values()}


def _checked_field(model: Transformer, cache: Activations, field: str) -> Array:
    """cache.<field>, checked against the model's shapes (a cache from another model fails)."""
    a = getattr(cache, field, None)
    if a is None:
        raise ValueError(f"the cache holds no {field}: capture it (Capture flag) in the source run")
    return _checked_shape(model, a, field, f"cache.{field}")


def _checked_shape(model: Transformer, a, field: str, what: str) -> Array:
    c = model.config
    widths = site_widths(c)
    tail = tuple(widths[t] for t in _CACHE_FIELDS[field].axes[1:])
    layered = _CACHE_FIELDS[field].layered
    shape = tuple(np.shape(a))
    lead = 1 + int(layered)  # [layers,] seq
    ok = len(shape) in (lead + len(tail), lead + 1 + len(tail))
    ok = ok and shape[len(shape) - len(tail):] == tail
    ok = ok and (not layered or shape[-2 - len(tail)] == c.n_layers)
    if not ok:
        raise ValueError(
            f"{what} has shape {shape}, which does not fit this model "
            f"([batch,] {'layers=%d, ' % c.n_layers if layered else ''}seq"
            f"{''.join(', %d' % t for t in tail)}): a cache from a different model?"
        )
    return a


def patch(
    model: Transformer,
    cache: Activations | None,
    site: str = "resid",
    layers: LayerSpec = None,
    positions: int | Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    source: Float[Array, "layers seq ..."] | None = None,
    seq_len: int | None = None,
) -> Edits:
    """Activation patching: replace activations with another run's (`cache`), per layer,
    position and (for the per-head sites) head.

    site:
      "resid"     resid_pre of the chosen layers (what enters the block);
      "heads"     head z before W_O;            "neurons"  MLP activations;
      "expert_neurons"  a mixture of experts' neurons, every expert (models/core/moe.py);
      "attn_out" / "mlp_out"  what the attention / MLP sub-block writes;
      "q_input" / "k_input" / "v_input"  the residual that head h's query / key / value
                  reads (before ln1; path patching, Wang et al. 2022, Goldowsky-Dill et al.
                  2023).  The source defaults to the cache's resid_pre at that layer (what
                  the head would have read in that run).  With grouped-query attention,
                  keys and values are per KV HEAD: heads= then indexes kv heads;
      "ln1_scale" / "ln2_scale" / "final_scale"  the norm's divisor taken from the source
                  run ("freezing the norm scale"; final_scale has no layers).
    source: an explicit array of the cache field's shape ([layers, seq, ...], [seq] for
    final_scale) instead of `cache` (path patching builds its own).  The cache is one
    sequence's and must come from this model with the same sequence length as the patched
    run (`seq_len`, defaulting to the cache's).  Positions None = all; heads None = all.
    """
    if site not in PATCH_SITES:
        raise ValueError(f"site must be one of {sorted(PATCH_SITES)}; got {site!r}")
    spec = PATCH_SITES[site]
    field, base, unit, layered = spec.field, spec.base, spec.unit, spec.layered
    if source is not None:
        src = _checked_shape(model, source, field, "source")
    elif cache is None:
        raise ValueError("patch needs a cache or an explicit source=")
    else:
        src = _checked_field(model, cache, field)
    c = model.config
    if np.ndim(src) != len(spec.axes) + int(layered):
        raise ValueError(f"patch takes one sequence's activations; {field} is {np.shape(src)}")
    cache_seq = np.shape(src)[1 if layered else 0]
    if seq_len is not None and seq_len != cache_seq:
        raise ValueError(
            f"cache sequence length {cache_seq} != patched sequence length {seq_len}"
        )
    if not isinstance(src, jax.core.Tracer) and not np.isfinite(np.asarray(src)).all():
        raise ValueError(f"{field} contains NaN/inf")
    if heads is not None and unit is None:
        raise ValueError(f"heads= applies to the per-head sites only (heads, q_input, "
                         f"k_input, v_input); not to {site!r}")
    pos_sel = np.zeros((cache_seq,), np.float32)
    pos = check_positions(positions, cache_seq)
    pos_sel[slice(None) if pos is None else pos] = 1.0
    if layered:
        layer_sel = np.zeros((c.n_layers,), np.float32)
        layer_sel[check_layers(model, layers)] = 1.0
        mix = layer_sel[:, None] * pos_sel[None, :]  # [layers, seq]
    elif layers is not None:
        raise ValueError("site 'final_scale' has no layers (it is the final norm's)")
    else:
        mix = pos_sel
    mix_axes = SITES[f"{base}_mix"].axes
    if len(mix_axes) == 3:  # expert neurons: every expert's every neuron
        mix = mix[..., None, None] * np.ones([site_widths(c)[a] for a in mix_axes[1:]], np.float32)
    if len(mix_axes) == 2:  # a unit axis: heads, kv heads or neurons
        width = site_widths(c)[mix_axes[1]]
        unit_sel = np.ones((width,), np.float32)
        if heads is not None:
            h = np.atleast_1d(np.asarray(heads))
            if h.size == 0:
                raise ValueError(f"heads is empty for site {site!r}: name at least one")
            if h.min() < 0 or h.max() >= width:
                raise range_error("head", h, 0, width, f"at site {site!r}")
            unit_sel[:] = 0.0
            unit_sel[h] = 1.0
        mix = mix[..., None] * unit_sel
    dt = _dtype(model)
    return Edits(**{f"{base}_mix": jnp.asarray(mix, dt), f"{base}_source": jnp.asarray(src, dt)})


def freeze_norm_scale(model: Transformer, cache: Activations, norms: Sequence[str] = ("ln1", "ln2", "final"),
                      layers: LayerSpec = None, positions: int | Sequence[int] | None = None) -> Edits:
    """Every chosen norm's divisor taken from `cache` (TransformerLens' frozen hook_scale):
    the model then acts linearly on the residual stream through those norms."""
    parts = []
    for norm in norms:
        if norm not in ("ln1", "ln2", "final"):
            raise ValueError(f"norms must be among 'ln1', 'ln2', 'final'; got {norm!r}")
        parts.append(patch(model, cache, f"{norm}_scale", None if norm == "final" else layers,
                           positions))
    return combine(*parts)


# ------------------------------------------------------------------ combining, stacking
def stack_edits(edits: Iterable[Edits]) -> Edits:
    """K edits -> one Edits with a leading [K] axis, ready for
    `jax.vmap(lambda e: model(tokens, edits=e))(stacked)` or `lens.core.sweep.sweep_edits`.

    A field set by only some of the edits is filled with its neutral value in the others
    (zeros: nothing added, no direction removed, mix 0), so different kinds of edit (an
    ablation, a patch, a vector) stack into one sweep.  A field set by several edits must
    have the same shape in each."""
    edits = list(edits)
    if not edits:
        raise ValueError("stack_edits needs at least one Edits")
    fields = {}
    for e in edits:
        for site in fields_set(e):
            fields.setdefault(site.name, set()).add(tuple(np.shape(getattr(e, site.name))))
    differ = {name: sorted(shapes) for name, shapes in fields.items() if len(shapes) > 1}
    if differ:
        raise ValueError(f"stack_edits: field shapes differ across edits: {differ}")

    def filled(e: Edits, name: str):
        a = getattr(e, name)
        if a is not None:
            return a
        like = next(getattr(o, name) for o in edits if getattr(o, name) is not None)
        return jnp.zeros(np.shape(like), like.dtype)

    fns = [e.resid_fn for e in edits]
    stacked_fn = None
    if any(f is not None for f in fns):
        if any(f is None for f in fns):
            raise ValueError("stack_edits: a custom edit (resid_fn) must be set in every edit or in "
                             "none (a function has no neutral value to fill in)")
        if len({jax.tree.structure(f) for f in fns}) > 1:
            raise ValueError("stack_edits: the custom edits differ in structure (function type, "
                             "layers or static fields); only their array parameters may differ")
        stacked_fn = jax.tree.map(lambda *a: jnp.stack(a), *fns)
    return Edits(**{name: jnp.stack([filled(e, name) for e in edits]) for name in fields},
                 resid_fn=stacked_fn)


def combine(*edits: Edits) -> Edits:
    """Merge edits into one forward: vectors are summed, ablation directions concatenated;
    any other field (mix/source, a custom edit) may be set by one of them only (`models.core.interventions`
    declares which field is which)."""
    out = {}
    for e in edits:
        for site in fields_set(e):
            v = getattr(e, site.name)
            out[site.name] = v if site.name not in out else combine_two(site.name, out[site.name], v)
        if e.resid_fn is not None:
            if "resid_fn" in out:
                raise ValueError("combine: two custom edits (resid_fn); compose them in one function")
            out["resid_fn"] = e.resid_fn
    return Edits(**out)


def check_edits(model: Transformer, edits: Edits | None, seq_len: int, batch_dims: int = 0) -> None:
    """Raise a clear ValueError if `edits` does not fit this model and a `seq_len`-token
    sequence (after `batch_dims` leading stacked axes), or holds NaN/inf (the rules are
    derived from the site declarations in `models.core.interventions`)."""
    if edits is not None:
        _check(edits, model.config, seq_len, batch_dims)


def first_edited_layer(model: Transformer, edits: Edits, batch_dims: int = 1) -> int:
    """The first layer at which the (K-stacked) edits do anything; n_layers if they only
    edit the final norm, -1 if nothing is set (`models.core.interventions.first_edited_layer`)."""
    return _first(edits, model.config.n_layers, batch_dims)
