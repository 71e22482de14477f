"""Constructors for `models.Edits`: interventions as data, validated before any compute.

Every function here returns an `Edits` (a pytree of per-layer arrays, leading axis
[layers] = the model's n_layers) that `model.forward(tokens, edits=...)` consumes; the
order in which a block applies them is documented in models/core/interventions.py.  Unused
layers hold zeros (a zero vector adds nothing, a zero direction removes nothing, a zero
mix keeps the activation), so edits at different layers share one shape and a sweep is
`jax.vmap` over a K-stacked `Edits` (`stack_edits`).

Position axes S are 1 (every position) or seq (chosen positions; the others get zeros).

The ablation constructors live in lens.core.ablations and the argument checks in
lens.core.edit_checks; both are re-exported here, so `edits.<name>` reaches every builder.

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

from typing import Callable, Iterable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lens.core.ablations import (  # noqa: F401  re-exported: the ablation constructors are edits too
    ablate_direction,
    ablate_expert_neurons,
    ablate_heads,
    ablate_neurons,
    orthonormal,
)
from lens.core.edit_checks import (  # noqa: F401  check_* re-exported (callers validate their own edits)
    LayerSpec,
    check_layers,
    check_positions,
    check_vectors,
    checked_field,
    checked_shape,
    edit_dtype,
    position_mask,
)
from lens.models.core.interventions import (PATCH_SITES, SITES, Activations, Edits, ResidFn, check_resid_fn, combine_two,
                                            fields_set, site_widths)
from lens.models.core.ranges import range_error
from lens.models.core.interventions import check_edits as _check
from lens.models.core.interventions import first_edited_layer as _first
from lens.models.core.transformer import Transformer


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
    mask = jnp.asarray(position_mask(pos, seq_len))
    out = jnp.zeros((model.config.n_layers, mask.shape[0], model.config.d_model), jnp.float32)
    out = out.at[jnp.asarray(layer_list)].set(coeff * v[:, None, :] * mask[None, :, None])
    return Edits(resid_add=out.astype(edit_dtype(model)))


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
    x = jax.ShapeDtypeStruct((3, d), edit_dtype(model))
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
        src = checked_shape(model, source, field, "source")
    elif cache is None:
        raise ValueError("patch needs a cache or an explicit source=")
    else:
        src = checked_field(model, cache, field)
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
    dt = edit_dtype(model)
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
