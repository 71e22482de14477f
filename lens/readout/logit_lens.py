"""Reading the residual stream through the unembedding: the logit lens and the tuned lens.

    logp = lens.readout.logit_lens.logit_lens(model, tokens)              # [n_layers + 1, seq, vocab]
    logp[l]        # resid_pre[l] (what enters block l) through the final norm + unembedding
    logp[-1]       # the final residual: exactly the model's own log-probs
    logp = lens.readout.logit_lens.logit_lens(model, tokens, frozen_scale=True)   # every layer divided
                   # by the divisor the final norm applied to the LAST layer's residual

    tuned = lens.readout.logit_lens.TunedLens.init(model.config)          # zero translators = logit lens
    logp = lens.readout.logit_lens.tuned_lens(model, tuned, tokens)       # same shape
    sub = lens.readout.logit_lens.TunedLens.init(model.config, layers=(5, 15, 25))  # translators for 3 layers
    logp = lens.readout.logit_lens.tuned_lens(model, sub, tokens)         # [4, seq, vocab]: 5, 15, 25, output

Decoding goes through the model's own `Transformer.unembed_resid` (final norm, unembedding,
its bias and Gemma's logit soft-capping when the config has one), so a lens never
re-implements the head of the model.  Layer l of a lens always means `resid_pre[l]`
(the library's one convention; transformers' `hidden_states[l]` for l < n_layers).

The tuned lens follows AlignmentResearch/tuned-lens (`tuned_lens/nn/lenses.py`): one affine
translator per layer, applied residually `h + (h W^T + b)`, W and b zero-initialised (weight
decay pulls it back to the logit lens, not to zero); the final layer has no translator.
A lens may hold translators for a subset of layers only (`TunedLens.init(config, layers)`):
it then reads, is trained and scored at, and is saved for those layers alone.
Training (`lens.readout.tuned_lens_fit`) fits it to forward KL(model || lens) at the same position.
Saved as safetensors with the reference's state-dict names (`{l}.weight`, `{l}.bias`, l the
model layer) and its `TunedLensConfig` fields plus the lens's `layers` as JSON metadata.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int
from safetensors.numpy import load_file, save_file

from lens.models.core.config import ModelConfig
from lens.models.core.interventions import Capture, Edits
from lens.models.core.ranges import check_index, layer_context
from lens.models.core.transformer import Transformer


# ------------------------------------------------------------------------- decoding
def decode(
    model: Transformer,
    x: Float[Array, "seq d_model"],
    scale: Float[Array, " seq"] | None = None,
) -> Float[Array, "seq vocab"]:
    """Residual -> float32 logits through the model's final norm and unembedding.

    scale: None = the norm's own divisor of `x`; else this divisor instead (the final
    norm's `final_scale` edit with mix 1, i.e. "frozen" statistics)."""
    edits = None
    if scale is not None:
        edits = Edits(final_scale_mix=jnp.ones(x.shape[:1], jnp.float32),
                      final_scale_source=scale.astype(jnp.float32))
    return model.unembed_resid(x, edits=edits)[0]


def residual_stack(
    model: Transformer,
    tokens: Int[Array, " seq"],
    attention_mask: Bool[Array, " seq"] | None = None,
) -> tuple[Float[Array, "layers_plus_1 seq d_model"], Float[Array, "seq vocab"], Float[Array, " seq"]]:
    """(resid_pre[0..n_layers-1] and the final residual stacked [n_layers + 1, seq, d],
    the model's logits, the final norm's divisor) from one forward."""
    out = model.forward(tokens, attention_mask, capture=Capture(resid=True, norms=True))
    acts = out.activations
    stack = jnp.concatenate([acts.resid_pre, acts.final_norm_in[None]], axis=0)
    return stack, out.logits, acts.final_scale


def logit_lens(
    model: Transformer,
    tokens: Int[Array, " seq"],
    attention_mask: Bool[Array, " seq"] | None = None,
    frozen_scale: bool = False,
) -> Float[Array, "layers_plus_1 seq vocab"]:
    """float32 log-probs [n_layers + 1, seq, vocab]: entry l decodes resid_pre[l], entry
    n_layers the final residual (= the model's own log-probs).  One forward, then one
    vmapped decode over the layer axis.

    frozen_scale=False: each layer's residual is normed with its own statistics (what
    the reference logit lens does).  True: every layer is divided by the final layer's
    divisor (LayerNorm still centres each layer's vector itself), so entry l is linear in
    resid_pre[l] and the layers differ only by what was written, not by their norm."""
    stack, _, final_scale = residual_stack(model, tokens, attention_mask)
    scale = final_scale if frozen_scale else None
    logits = jax.vmap(lambda x: decode(model, x, scale))(stack)
    return jax.nn.log_softmax(logits, axis=-1)


# ------------------------------------------------------------------------ tuned lens
def check_layers(layers, n_layers: int) -> tuple[int, ...] | None:
    """`layers` (iterable of layer indices, or None = every layer) as a strictly increasing
    tuple of ints in [0, n_layers), or None when it names every layer (the canonical full
    lens).  ValueError in the library's range wording (`models.core.ranges`) for an index
    out of range, and for repeated or unsorted indices; outside jit."""
    if layers is None:
        return None
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise ValueError(f"layers must be ints; got {layer!r}")
        out.append(check_index("layer", layer, n_layers, context=layer_context(n_layers)))
    if not out:
        raise ValueError("layers must name at least one layer; got none")
    if any(a >= b for a, b in zip(out, out[1:])):
        raise ValueError(f"layers must be distinct and increasing; got {out}")
    return None if out == list(range(n_layers)) else tuple(out)


class TunedLens(eqx.Module):
    """One affine translator per lens layer (for resid_pre[l]), torch `Linear` layout:
    `translate(h, i) = h + h @ weight[i].T + bias[i]`, translator i for model layer
    `layer_indices[i]`.

    layers: None = every layer (translator i is layer i, the reference's lens); else the
    model layers the translators belong to (strictly increasing, static), e.g. (5, 15, 25):
    a lens fitted on a subset, which only reads (and is only scored at) those layers."""

    weight: Float[Array, "lens_layers d_model d_model"]
    bias: Float[Array, "lens_layers d_model"]
    layers: tuple[int, ...] | None = eqx.field(static=True, default=None)

    @staticmethod
    def init(config: ModelConfig, layers=None) -> "TunedLens":
        """Zero translators: the tuned lens starts as the logit lens (the reference's init);
        one per layer, or one per entry of `layers` (`check_layers`: ValueError out of range)."""
        layers = check_layers(layers, config.n_layers)
        d, n = config.d_model, config.n_layers if layers is None else len(layers)
        return TunedLens(jnp.zeros((n, d, d), jnp.float32), jnp.zeros((n, d), jnp.float32), layers)

    @property
    def n_layers(self) -> int:
        """How many translators (= lens layers)."""
        return self.weight.shape[0]

    @property
    def layer_indices(self) -> tuple[int, ...]:
        """The model layer of each translator."""
        return tuple(range(self.n_layers)) if self.layers is None else self.layers

    def translate(self, h: Float[Array, "seq d_model"], i: Int[Array, ""] | int) -> Float[Array, "seq d_model"]:
        """h + A_i h + b_i in float32 with translator i (model layer `layer_indices[i]`;
        the residual form: weight decay pulls toward identity)."""
        hf = h.astype(jnp.float32)
        return hf + jnp.einsum("sd,ed->se", hf, self.weight[i]) + self.bias[i]

    def translate_stack(self, stack: Float[Array, "layers_plus_1 seq d_model"]) -> Float[Array, "lens_layers_plus_1 seq d_model"]:
        """From a model's full residual stack [n_layers + 1, ...]: the lens layers' residuals,
        each translated by its own translator, then the final residual as is."""
        picked = stack[np.asarray(self.layer_indices)]
        moved = jax.vmap(self.translate)(picked, jnp.arange(self.n_layers))
        return jnp.concatenate([moved, stack[-1:].astype(jnp.float32)], axis=0)


def check_lens_fits(model: Transformer, tuned: TunedLens) -> None:
    """ValueError unless `tuned` fits `model`: its layers in range and one [d, d] / [d]
    translator per lens layer (every layer when `tuned.layers` is None)."""
    c = model.config
    if tuned.layers is not None:
        check_layers(tuned.layers, c.n_layers)
    n = c.n_layers if tuned.layers is None else len(tuned.layers)
    if tuned.weight.shape != (n, c.d_model, c.d_model) or tuned.bias.shape != (n, c.d_model):
        raise ValueError(f"tuned lens of shape {tuple(tuned.weight.shape)} (layers "
                         f"{'all' if tuned.layers is None else list(tuned.layers)}) does not fit a model of "
                         f"{c.n_layers} layers x d_model {c.d_model}")


def tuned_lens(
    model: Transformer,
    tuned: TunedLens,
    tokens: Int[Array, " seq"],
    attention_mask: Bool[Array, " seq"] | None = None,
) -> Float[Array, "layers_plus_1 seq vocab"]:
    """float32 log-probs [lens layers + 1, seq, vocab] of the tuned lens: entry i reads model
    layer `tuned.layer_indices[i]` (every layer for a full lens, as `logit_lens`), the last
    entry is the model's own (no translator)."""
    check_lens_fits(model, tuned)
    stack, _, _ = residual_stack(model, tokens, attention_mask)
    logits = jax.vmap(lambda x: decode(model, x.astype(stack.dtype)))(tuned.translate_stack(stack))
    return jax.nn.log_softmax(logits, axis=-1)


# ----------------------------------------------------------------------- save / load
def unembed_hash(model: Transformer) -> str:
    """A short hash of the unembedding and final-norm weights (what the lens was fitted to)."""
    h = hashlib.sha256()
    for a in (model.W_U, model.final_norm_w, model.final_norm_b):
        if a is not None:
            h.update(np.ascontiguousarray(np.asarray(a, np.float32)).tobytes())
    return h.hexdigest()[:16]


def save_tuned_lens(tuned: TunedLens, path: str | Path, model: Transformer, info: dict | None = None) -> Path:
    """Write `path` (a .safetensors file): tensors `{l}.weight` [d, d] and `{l}.bias` [d]
    named by MODEL layer l (for a full lens the reference's `layer_translators.state_dict()`
    names) and JSON metadata `config` with its TunedLensConfig fields, `layers` (the model
    layers the file has translators for; every layer for a full lens), plus `info`
    (training settings, results).  A subset lens is not a reference file (the reference
    expects every layer); `load_tuned_lens` reads both."""
    check_lens_fits(model, tuned)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, layer in enumerate(tuned.layer_indices):
        arrays[f"{layer}.weight"] = np.asarray(tuned.weight[i], np.float32)
        arrays[f"{layer}.bias"] = np.asarray(tuned.bias[i], np.float32)
    config = {"d_model": model.config.d_model, "num_hidden_layers": model.config.n_layers, "bias": True,
              "layers": list(tuned.layer_indices),
              "lens_type": "linear_tuned_lens", "unembed_hash": unembed_hash(model),
              "architecture": model.config.architecture, "vocab_size": model.config.vocab_size}
    meta = {"config": json.dumps(config, sort_keys=True), "info": json.dumps(info or {}, sort_keys=True)}
    save_file(arrays, str(path), metadata=meta)
    return path


def load_tuned_lens(path: str | Path, model: Transformer | None = None) -> tuple[TunedLens, dict]:
    """(TunedLens, metadata) from `save_tuned_lens`'s file; with `model`, refuses a lens
    fitted to another model (different shape or unembedding hash).  The translators are
    placed by the file's `layers` (absent: every layer, a reference file); a tensor for a
    layer not listed, or a listed layer without its tensors, is a ValueError, so a subset
    lens never lands on the wrong layers."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tuned lens file")
    with safe_open(str(path), "numpy") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path}: not a tuned lens file (no 'config' metadata)")
    config = json.loads(meta["config"])
    arrays = load_file(str(path))
    n_model, d = int(config["num_hidden_layers"]), int(config["d_model"])
    listed = [int(x) for x in config.get("layers", range(n_model))]
    try:
        layers = check_layers(listed, n_model)
    except ValueError as e:
        raise ValueError(f"{path}: its config's layers: {e}") from None
    extra = sorted(set(arrays) - {f"{x}.{k}" for x in listed for k in ("weight", "bias")})
    if extra:
        raise ValueError(f"{path}: tensors {extra} for layers its config does not list ({listed})")
    try:
        weight = np.stack([arrays[f"{x}.weight"] for x in listed])
        bias = np.stack([arrays[f"{x}.bias"] for x in listed])
    except KeyError as e:
        raise ValueError(f"{path}: missing tensor {e} for its layers {listed}") from None
    n = len(listed)
    if weight.shape != (n, d, d) or bias.shape != (n, d):
        raise ValueError(f"{path}: tensors {weight.shape} / {bias.shape} do not match its config ({n} x {d})")
    tuned = TunedLens(jnp.asarray(weight, jnp.float32), jnp.asarray(bias, jnp.float32), layers)
    if model is not None:
        check_lens_fits(model, tuned)
        if config.get("unembed_hash") != unembed_hash(model):
            raise ValueError(f"{path}: fitted to another unembedding (hash {config.get('unembed_hash')}, "
                             f"this model {unembed_hash(model)})")
    return tuned, {"config": config, "info": json.loads(meta.get("info", "{}"))}
