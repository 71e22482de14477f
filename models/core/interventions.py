"""Interventions and captures as DATA, consumed by the pure forward.

`Edits` is a pytree of per-layer arrays (leading axis = layers) that the forward scans
over together with the stacked weights.  A field left as None costs nothing and is not
even traced; a field given as an array jit-compiles once per shape, and a sweep over K
interventions is `jax.vmap` over a K-stacked `Edits`.  No Python callbacks, no strings.

Each field is declared ONCE below, with its axes and its role as data on the field
(`SITES`); validation (`check_edits`), combining, stacking, "first edited layer",
slicing to a range of blocks and generation's position check are derived from that
declaration.  The activation-patching sites (`PATCH_SITES`: the Activations field each
reads, the Edits pair it writes; axes, unit and layering derived) are declared here
too.  Adding a site = one declaration here + the line in models/core/block.py (or
models/core/transformer.py for the final norm) where it applies.

Order inside block l (documented because it matters when edits are combined):
  1. resid_pre[l] patched:   x <- x + resid_mix * (resid_source - x)
  2. directions ablated:     x <- x - sum_i (x . u_i) u_i         (u_i = resid_ablate rows)
  3. vectors added:          x <- x + resid_add
  3b. the custom edit:       x <- fn(x, layer, positions)  (resid_fn, a `ResidFn`: the escape
                             hatch for edits that read the live activation, at its layers only)
  then the block runs; inside it
  4. ln1's divisor mixed with a source run's:  s <- s + ln1_scale_mix * (ln1_scale_source - s)
  5. per-head q/k/v INPUT patched (path patching): the residual that head h's query (key,
     value) reads, before ln1, is x + q_input_mix[.., h] * (q_input_source - x), normed
     with its OWN divisor (what the head would have read in the source run).  Grouped-
     query attention: keys and values are per KV head, so k_input / v_input mix over
     kv_heads (one K/V input serves every query head of its group).
  6. head outputs z (before W_O) mixed:   z <- z + head_mix * (head_source - z)
  7. attention output patched:            a <- a + attn_out_mix * (attn_out_source - a)
  8. ln2's divisor mixed (as 4).
  9. MLP neurons mixed:                   n <- n + neuron_mix * (neuron_source - n)
     (a mixture of experts: every expert's neurons [S, experts, d_mlp], before the router
     weight: n <- n + expert_neuron_mix * (expert_neuron_source - n); models/core/moe.py)
 10. MLP output patched:                  m <- m + mlp_out_mix * (mlp_out_source - m)
 11. each writer (attention output, MLP output) has `writer_ablate` directions removed.
  After the last block: the final norm's divisor mixed (final_scale_mix / _source; no
  layer axis).
A `*_source` left None means zeros, so `mix = 1` with no source is zero-ablation; mean
ablation, resample ablation and activation patching differ only in the source given.
Position axes `S` are either 1 (every position) or the sequence length.

The custom edit (`resid_fn`) is the one field that is a function, not an array: a `ResidFn`
holding a pure function `fn(x [seq, d_model], layer int32 [], positions int32 [seq]) ->
[seq, d_model]` and the static tuple of layers where it applies.  `fn` is a pytree (an
`eqx.Module` whose array fields are its parameters; other fields `eqx.field(static=True)`),
so an Edits holding it jit-compiles once per structure and vmaps over K stacked parameter
sets (`lens.core.edits.stack_edits`).  It has no [layers] axis: the forward binds the layer
index and the query positions (`ResidFn.at`) for each block it runs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .ranges import check_index

# The axis vocabulary of the sites.  "S": positions, 1 (every position) or seq; "n": a
# free count (ablated directions, concatenated by `combine`); the rest are model widths.
_WIDTHS = ("d_model", "heads", "kv_heads", "d_head", "d_mlp", "experts")


class Site(NamedTuple):
    """One Edits field: its axes after the [layers] axis, its role, whether it has a
    [layers] axis at all (the final norm's fields do not)."""

    name: str
    axes: tuple[str, ...]
    role: str  # "add" (summed), "ablate" (directions, concatenated), "mix", "source"
    layered: bool

    @property
    def edits_something(self) -> bool:
        """A nonzero value changes the forward by itself (a source alone does not)."""
        return self.role != "source"


def _site(axes: str, role: str, layered: bool = True):
    return eqx.field(default=None, metadata={"site": (tuple(axes.split()), role, layered)})


class ResidFn(eqx.Module):
    """A custom edit of the residual stream entering each block of `layers` (step 3b):
    x <- fn(x, layer, positions), after the data edits of that layer, before the block.

    fn(x: [seq, d_model], layer: int32 [], positions: int32 [seq]) -> [seq, d_model], pure
    and traceable; a pytree whose array leaves are its parameters (vmap over them)."""

    fn: Callable
    layers: tuple[int, ...] = eqx.field(static=True)

    def at(self, layer: Int[Array, ""], positions: Int[Array, " seq"]) -> "BoundResidFn":
        """This edit bound to one block (what that block's `edit_resid` calls)."""
        return BoundResidFn(self.fn, self.layers, layer, positions)


class BoundResidFn(eqx.Module):
    """A `ResidFn` with the block's layer index and query positions bound (inside the scan)."""

    fn: Callable
    layers: tuple[int, ...] = eqx.field(static=True)
    layer: Int[Array, ""]
    positions: Int[Array, " seq"]

    def __call__(self, x: Float[Array, "seq d_model"]) -> Float[Array, "seq d_model"]:
        def edited(x):
            y = self.fn(x, self.layer, self.positions)
            if getattr(y, "shape", None) != x.shape:
                raise ValueError(f"the custom edit's function returned shape "
                                 f"{getattr(y, 'shape', type(y).__name__)}; it must return the "
                                 f"residual's shape {x.shape} (seq, d_model)")
            return y.astype(x.dtype)

        chosen = jnp.isin(self.layer, jnp.asarray(self.layers, jnp.int32))
        # The layer index is not batched by a vmap over edits or prompts, so this stays a
        # real branch: fn runs only at its layers.
        return jax.lax.cond(chosen, edited, lambda x: x, x)


class Edits(eqx.Module):
    """Every intervention of one forward; all fields optional, leading axis = layers
    (except the final norm's).  The order in which they apply: the module docstring."""

    resid_mix: Float[Array, "layers S"] | None = _site("S", "mix")
    resid_source: Float[Array, "layers S d_model"] | None = _site("S d_model", "source")
    resid_ablate: Float[Array, "layers n d_model"] | None = _site("n d_model", "ablate")
    resid_add: Float[Array, "layers S d_model"] | None = _site("S d_model", "add")
    ln1_scale_mix: Float[Array, "layers S"] | None = _site("S", "mix")
    ln1_scale_source: Float[Array, "layers S"] | None = _site("S", "source")
    q_input_mix: Float[Array, "layers S heads"] | None = _site("S heads", "mix")
    q_input_source: Float[Array, "layers S d_model"] | None = _site("S d_model", "source")
    k_input_mix: Float[Array, "layers S kv_heads"] | None = _site("S kv_heads", "mix")
    k_input_source: Float[Array, "layers S d_model"] | None = _site("S d_model", "source")
    v_input_mix: Float[Array, "layers S kv_heads"] | None = _site("S kv_heads", "mix")
    v_input_source: Float[Array, "layers S d_model"] | None = _site("S d_model", "source")
    head_mix: Float[Array, "layers S heads"] | None = _site("S heads", "mix")
    head_source: Float[Array, "layers S heads d_head"] | None = _site("S heads d_head", "source")
    attn_out_mix: Float[Array, "layers S"] | None = _site("S", "mix")
    attn_out_source: Float[Array, "layers S d_model"] | None = _site("S d_model", "source")
    ln2_scale_mix: Float[Array, "layers S"] | None = _site("S", "mix")
    ln2_scale_source: Float[Array, "layers S"] | None = _site("S", "source")
    neuron_mix: Float[Array, "layers S d_mlp"] | None = _site("S d_mlp", "mix")
    neuron_source: Float[Array, "layers S d_mlp"] | None = _site("S d_mlp", "source")
    expert_neuron_mix: Float[Array, "layers S experts d_mlp"] | None = _site("S experts d_mlp", "mix")
    expert_neuron_source: Float[Array, "layers S experts d_mlp"] | None = _site(
        "S experts d_mlp", "source")
    mlp_out_mix: Float[Array, "layers S"] | None = _site("S", "mix")
    mlp_out_source: Float[Array, "layers S d_model"] | None = _site("S d_model", "source")
    writer_ablate: Float[Array, "layers n d_model"] | None = _site("n d_model", "ablate")
    final_scale_mix: Float[Array, " S"] | None = _site("S", "mix", layered=False)
    final_scale_source: Float[Array, " S"] | None = _site("S", "source", layered=False)
    resid_fn: ResidFn | None = None  # step 3b; a function, not a site (see the module docstring)

    def mixed(self, x: Array, base: str, mix_axes: int = 0) -> Array:
        """x + {base}_mix * ({base}_source - x) (source None = zeros), the mix broadcast
        over x's trailing axes; x unchanged when the mix is None."""
        mix = getattr(self, f"{base}_mix")
        if mix is None:
            return x
        source = getattr(self, f"{base}_source")
        source = jnp.zeros_like(x) if source is None else source.astype(x.dtype)
        mix = mix.astype(x.dtype)
        mix = mix.reshape(mix.shape + (1,) * (x.ndim - mix.ndim))
        return x + mix * (source - x)


SITES: dict[str, Site] = {
    f.name: Site(f.name, *f.metadata["site"]) for f in dataclasses.fields(Edits) if "site" in f.metadata
}


def fields_set(edits: Edits) -> list[Site]:
    """The sites an Edits sets (not None), in declaration order."""
    return [s for s in SITES.values() if getattr(edits, s.name) is not None]


def layer_slice(edits: Edits | None, start: int = 0, stop: int | None = None) -> Edits | None:
    """The edits of blocks [start, stop): layered fields sliced on their [layers] axis, the
    final norm's fields dropped (the final norm reads them itself).  Used by every split
    of the forward (`Transformer.run_blocks`); stacked edits are sliced inside their vmap."""
    if edits is None:
        return None
    return Edits(**{s.name: getattr(edits, s.name)[start:stop]
                    for s in fields_set(edits) if s.layered})


def final_part(edits: Edits | None) -> Edits | None:
    """Only the final norm's fields (None if it sets none)."""
    if edits is None:
        return None
    out = {s.name: getattr(edits, s.name) for s in fields_set(edits) if not s.layered}
    return Edits(**out) if out else None


def first_edited_layer(edits: Edits, n_layers: int, batch_dims: int = 0) -> int:
    """The first layer at which (any of the `batch_dims`-stacked) edits do anything:
    n_layers when they edit nothing before the final norm (or are all zero), -1 when no
    field is set.  Needs concrete arrays.  A layer counts as edited when a field that
    edits by itself (add, ablate, mix; not a source) is nonzero there."""
    sites = fields_set(edits)
    if not sites and edits.resid_fn is None:
        return -1
    first = n_layers if edits.resid_fn is None else min(n_layers, *edits.resid_fn.layers)
    for s in sites:
        if s.layered and s.edits_something:
            a = np.asarray(getattr(edits, s.name))
            per_layer = np.moveaxis(a, batch_dims, 0).reshape(a.shape[batch_dims], -1).any(axis=1)
            nz = np.nonzero(per_layer)[0]
            if nz.size:
                first = min(first, int(nz[0]))
    return first


def combine_two(name: str, a: Array, b: Array) -> Array:
    """How two edits of the same field merge: vectors summed, ablated directions
    concatenated on their "n" axis; a mix or source may be set by one edit only."""
    site = SITES[name]
    if site.role == "add":
        return a + b
    if site.role == "ablate":
        axis = site.axes.index("n") - len(site.axes)
        return jnp.concatenate([a, b], axis=axis)
    raise ValueError(f"combine: {name} is set by more than one edit")


def site_widths(config) -> dict[str, int]:
    return {"d_model": config.d_model, "heads": config.n_heads, "kv_heads": config.n_kv_heads,
            "d_head": config.d_head, "d_mlp": config.d_mlp, "experts": config.n_experts}


# Sites a model must have the part for: a mixture of experts has no dense MLP neurons, a
# dense model no expert neurons, a model without pre-norms (OLMo 2) no ln1 / ln2 divisor.
def _missing_part(name: str, config) -> str | None:
    moe = getattr(config, "n_experts", 0) > 0
    if name.startswith("neuron_") and moe:
        return "a mixture of experts has no dense MLP neurons (use expert_neuron_mix)"
    if name.startswith("expert_neuron_") and not moe:
        return "this model has no experts (n_experts = 0; use neuron_mix)"
    if name.startswith(("ln1_scale", "ln2_scale")) and not getattr(config, "pre_norms", True):
        return "this model has no norm before attention / the MLP (pre_norms=False)"
    return None


def check_edits(edits: Edits, config, seq_len: int | None, batch_dims: int = 0,
                batch: int | None = None, check_values: bool = True) -> None:
    """Raise a clear ValueError if `edits` does not fit a model of `config`.

    seq_len: the edited sequence's length (position axes may be 1 or seq_len); None =
    generation, where every position axis must be 1.  batch_dims leading stacked axes
    are skipped (their length must be `batch` when given).  check_values: NaN/inf check
    of concrete arrays.  A `*_source` without its `*_mix` is refused (it would do nothing)."""
    if not isinstance(edits, Edits):
        raise TypeError(f"edits must be a models.Edits; got {type(edits).__name__}")
    widths = site_widths(config)
    n = config.n_layers
    if edits.resid_fn is not None:
        check_resid_fn(edits.resid_fn, n, generation=seq_len is None)
    for site in fields_set(edits):
        name, a = site.name, getattr(edits, site.name)
        full = tuple(a.shape)
        if batch is not None and (len(full) < 1 or full[0] != batch):
            raise ValueError(f"edits_batched=True: edits.{name} needs a leading axis of {batch} "
                             f"(one per prompt); got shape {full}")
        shape = full[batch_dims:]
        missing = _missing_part(name, config)
        if missing:
            raise ValueError(f"edits.{name}: {missing}")
        if site.role == "source" and getattr(edits, name[: -len("source")] + "mix") is None:
            raise ValueError(f"edits.{name} is set but {name[: -len('source')]}mix is not "
                             "(a source without a mix changes nothing)")
        if site.layered:
            if len(shape) < 1 or shape[0] != n:
                hint = "" if batch_dims else " (a leading batch axis needs edits_batched=True)"
                raise ValueError(f"edits.{name} needs a layer axis of {n}; got shape {full}{hint}")
            shape = shape[1:]
        if len(shape) != len(site.axes):
            raise ValueError(f"edits.{name} has shape {full}; expected "
                             f"({'layers, ' if site.layered else ''}{', '.join(site.axes)})")
        for got, axis in zip(shape, site.axes):
            if axis == "S":
                if seq_len is None and got != 1:
                    raise ValueError(f"edits.{name} must have position axis S = 1 for generation "
                                     f"(applied at every position); got shape {full}")
                if seq_len is not None and got not in (1, seq_len):
                    raise ValueError(f"edits.{name}: position axis {got} is neither 1 nor the "
                                     f"sequence length {seq_len}")
            elif axis in widths and got != widths[axis]:
                raise ValueError(f"edits.{name} has shape {full}; expected {axis}={widths[axis]}")
        if check_values and not isinstance(a, jax.core.Tracer):
            if not np.isfinite(np.asarray(a, np.float32)).all():
                raise ValueError(f"edits.{name} contains NaN/inf")


def check_resid_fn(custom, n_layers: int, generation: bool = False) -> None:
    """Raise a clear error if `custom` is not a ResidFn for a model of `n_layers` layers."""
    if not isinstance(custom, ResidFn):
        raise TypeError(f"edits.resid_fn must be a ResidFn (lens.core.edits.custom builds one); "
                        f"got {type(custom).__name__}")
    if generation:
        raise ValueError("edits.resid_fn (a custom edit) is not supported in generation yet: "
                         "use it with model.forward / lens.run_edits / sweep_edits")
    if not callable(custom.fn):
        raise TypeError(f"edits.resid_fn.fn must be callable; got {type(custom.fn).__name__}")
    if not custom.layers:
        raise ValueError("edits.resid_fn.layers is empty: name the layers it edits")
    for layer in custom.layers:
        check_index("edits.resid_fn: layer", layer, n_layers, context=f"(the model has {n_layers} layers)")


@dataclasses.dataclass(frozen=True)
class Capture:
    """Which activations a forward returns (static: each combination compiles once).

    A plain forward uses `Capture()` with every flag off and pays nothing.  The attention
    pattern ([layers, heads, seq, seq]) is off by default since it dominates memory.
    `layers`: capture only these layers, in the order given (the per-layer fields then
    have a leading axis of len(layers)); None = every layer.  Only those layers are ever
    materialised: a dataset statistic over one layer does not hold all of them.
    """

    resid: bool = False  # resid_pre, resid_mid, resid_post
    sublayers: bool = False  # attn_out, mlp_out (what each sub-block writes)
    head_z: bool = False  # per-head attention output before W_O, [layers, seq, heads, d_head]
    neurons: bool = False  # MLP hidden activations after the nonlinearity (and gate)
    norms: bool = False  # what each norm divided by, and the final norm's input/output
    attn_pattern: bool = False
    qkv: bool = False  # per-head q [.., heads, d_head], k / v [.., kv_heads, d_head] (before rotary)
    layers: tuple[int, ...] | None = None
    # mixture of experts: router logits, combining weights, chosen experts (`Activations`)
    router: bool = False

    def __post_init__(self):
        if self.layers is not None:
            # a tuple of Python ints: hashable, so each choice compiles once
            layers = tuple(int(layer) for layer in np.atleast_1d(np.asarray(self.layers)))
            if len(set(layers)) != len(layers):
                raise ValueError(f"Capture(layers=...): repeated layer in {layers}")
            object.__setattr__(self, "layers", layers)

    @classmethod
    def all(cls, attn_pattern: bool = True) -> "Capture":
        return cls(True, True, True, True, True, attn_pattern, True, router=True)


class Activations(eqx.Module):
    """Captured activations; a field is None unless its Capture flag was set.

    resid_pre[l] is what enters block l (equals transformers' hidden_states[l]);
    resid_mid[l] is after attention (for parallel-residual models, x + attn_out);
    resid_post[l] is what leaves block l.  norm scales are the divisors sigma(x) / rms(x)
    (the divisor actually used, after any freezing edit).  q / k / v: after the projection
    (bias, q/k norm), before rotary.  A mixture of experts (models/core/moe.py) fills
    expert_neurons (every expert's neurons, computed densely, before the router weight)
    instead of neurons, and with Capture(router=True) router_logits (float32),
    expert_weights (the combining weights, zero outside the top k) and chosen_experts
    (the top-k expert ids, descending probability).  With `Capture(layers=...)` the [layers] axis holds
    the chosen layers in the order given.
    """

    resid_pre: Float[Array, "layers seq d_model"] | None = None
    resid_mid: Float[Array, "layers seq d_model"] | None = None
    resid_post: Float[Array, "layers seq d_model"] | None = None
    attn_out: Float[Array, "layers seq d_model"] | None = None
    mlp_out: Float[Array, "layers seq d_model"] | None = None
    head_z: Float[Array, "layers seq heads d_head"] | None = None
    neurons: Float[Array, "layers seq d_mlp"] | None = None
    attn_pattern: Float[Array, "layers heads seq seq"] | None = None
    ln1_scale: Float[Array, "layers seq"] | None = None
    ln2_scale: Float[Array, "layers seq"] | None = None
    q: Float[Array, "layers seq heads d_head"] | None = None
    k: Float[Array, "layers seq kv_heads d_head"] | None = None
    v: Float[Array, "layers seq kv_heads d_head"] | None = None
    expert_neurons: Float[Array, "layers seq experts d_mlp"] | None = None
    router_logits: Float[Array, "layers seq experts"] | None = None
    expert_weights: Float[Array, "layers seq experts"] | None = None
    chosen_experts: Array | None = None  # int32 [layers, seq, experts_per_token]
    final_norm_in: Float[Array, "seq d_model"] | None = None
    final_norm_out: Float[Array, "seq d_model"] | None = None
    final_scale: Float[Array, " seq"] | None = None


class PatchSite(NamedTuple):
    """An activation-patching site: the `Activations` field its source is read from and the
    `Edits` field pair it writes (`{base}_mix` / `{base}_source`).  Everything else is
    derived from the Edits declaration: the source's axes after [layers] (`axes`), the mix's
    unit axis (`unit`: "heads" / "kv_heads" where a patch may pick heads, else None) and
    whether the site has a [layers] axis (`layered`)."""

    name: str
    field: str
    base: str

    @property
    def axes(self) -> tuple[str, ...]:
        """The source's axes after [layers]: ("S", ...) with S = positions."""
        return SITES[f"{self.base}_source"].axes

    @property
    def unit(self) -> str | None:
        mix = SITES[f"{self.base}_mix"].axes
        return mix[1] if len(mix) == 2 and mix[1] in ("heads", "kv_heads") else None

    @property
    def layered(self) -> bool:
        return SITES[f"{self.base}_mix"].layered


# Declared ONCE: every patching tool (lens.core.edits.patch, lens.circuits.patching) reads
# this table.  The q/k/v inputs read resid_pre: what the head would have read in that run.
PATCH_SITES: dict[str, PatchSite] = {
    name: PatchSite(name, field, base) for name, field, base in (
        ("resid", "resid_pre", "resid"),
        ("heads", "head_z", "head"),
        ("neurons", "neurons", "neuron"),
        ("expert_neurons", "expert_neurons", "expert_neuron"),
        ("attn_out", "attn_out", "attn_out"),
        ("mlp_out", "mlp_out", "mlp_out"),
        ("q_input", "resid_pre", "q_input"),
        ("k_input", "resid_pre", "k_input"),
        ("v_input", "resid_pre", "v_input"),
        ("ln1_scale", "ln1_scale", "ln1_scale"),
        ("ln2_scale", "ln2_scale", "ln2_scale"),
        ("final_scale", "final_scale", "final_scale"),
    )
}
