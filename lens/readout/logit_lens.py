"""Reading the residual stream through the unembedding: the logit lens and the tuned lens.

    logp = lens.readout.logit_lens.logit_lens(model, tokens)              # [n_layers + 1, seq, vocab]
    logp[l]        # resid_pre[l] (what enters block l) through the final norm + unembedding
    logp[-1]       # the final residual: exactly the model's own log-probs
    logp = lens.readout.logit_lens.logit_lens(model, tokens, frozen_scale=True)   # every layer divided
                   # by the divisor the final norm applied to the LAST layer's residual

    tuned = lens.readout.logit_lens.TunedLens.init(model.config)          # zero translators = logit lens
    logp = lens.readout.logit_lens.tuned_lens(model, tuned, tokens)       # same shape

Decoding goes through the model's own `Transformer.unembed_resid` (final norm, unembedding,
its bias and Gemma's logit soft-capping when the config has one), so a lens never
re-implements the head of the model.  Layer l of a lens always means `resid_pre[l]`
(the library's one convention; transformers' `hidden_states[l]` for l < n_layers).

The tuned lens follows AlignmentResearch/tuned-lens (`tuned_lens/nn/lenses.py`): one affine
translator per layer, applied residually `h + (h W^T + b)`, W and b zero-initialised (weight
decay pulls it back to the logit lens, not to zero); the final layer has no translator.
Training (`lens.readout.tuned_lens_fit`) fits it to forward KL(model || lens) at the same position.
Saved as safetensors with the reference's state-dict names (`{i}.weight`, `{i}.bias`) and
its `TunedLensConfig` fields as JSON metadata.
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
class TunedLens(eqx.Module):
    """One affine translator per layer l < n_layers (for resid_pre[l]), torch `Linear`
    layout: `translate(h, l) = h + h @ weight[l].T + bias[l]`."""

    weight: Float[Array, "layers d_model d_model"]
    bias: Float[Array, "layers d_model"]

    @staticmethod
    def init(config: ModelConfig) -> "TunedLens":
        """Zero translators: the tuned lens starts as the logit lens (the reference's init)."""
        d, n = config.d_model, config.n_layers
        return TunedLens(jnp.zeros((n, d, d), jnp.float32), jnp.zeros((n, d), jnp.float32))

    @property
    def n_layers(self) -> int:
        return self.weight.shape[0]

    def translate(self, h: Float[Array, "seq d_model"], layer: Int[Array, ""] | int) -> Float[Array, "seq d_model"]:
        """h + A_l h + b_l in float32 (the residual form: weight decay pulls toward identity)."""
        hf = h.astype(jnp.float32)
        return hf + jnp.einsum("sd,ed->se", hf, self.weight[layer]) + self.bias[layer]

    def translate_stack(self, stack: Float[Array, "layers_plus_1 seq d_model"]) -> Float[Array, "layers_plus_1 seq d_model"]:
        """Translate resid_pre[0..n-1] (each by its own translator); the final residual as is."""
        n = self.n_layers
        moved = jax.vmap(self.translate)(stack[:n], jnp.arange(n))
        return jnp.concatenate([moved, stack[n:].astype(jnp.float32)], axis=0)


def check_lens_fits(model: Transformer, tuned: TunedLens) -> None:
    c = model.config
    if tuned.weight.shape != (c.n_layers, c.d_model, c.d_model) or tuned.bias.shape != (c.n_layers, c.d_model):
        raise ValueError(f"tuned lens of shape {tuple(tuned.weight.shape)} does not fit a model of "
                         f"{c.n_layers} layers x d_model {c.d_model}")


def tuned_lens(
    model: Transformer,
    tuned: TunedLens,
    tokens: Int[Array, " seq"],
    attention_mask: Bool[Array, " seq"] | None = None,
) -> Float[Array, "layers_plus_1 seq vocab"]:
    """float32 log-probs [n_layers + 1, seq, vocab] of the tuned lens; entry n_layers is
    the model's own (no translator), as for `logit_lens`."""
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
    """Write `path` (a .safetensors file): tensors `{i}.weight` [d, d] and `{i}.bias` [d]
    (the reference's `layer_translators.state_dict()` names) and JSON metadata `config`
    with its TunedLensConfig fields plus `info` (training settings, results)."""
    check_lens_fits(model, tuned)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i in range(tuned.n_layers):
        arrays[f"{i}.weight"] = np.asarray(tuned.weight[i], np.float32)
        arrays[f"{i}.bias"] = np.asarray(tuned.bias[i], np.float32)
    config = {"d_model": model.config.d_model, "num_hidden_layers": model.config.n_layers, "bias": True,
              "lens_type": "linear_tuned_lens", "unembed_hash": unembed_hash(model),
              "architecture": model.config.architecture, "vocab_size": model.config.vocab_size}
    meta = {"config": json.dumps(config, sort_keys=True), "info": json.dumps(info or {}, sort_keys=True)}
    save_file(arrays, str(path), metadata=meta)
    return path


def load_tuned_lens(path: str | Path, model: Transformer | None = None) -> tuple[TunedLens, dict]:
    """(TunedLens, metadata) from `save_tuned_lens`'s file; with `model`, refuses a lens
    fitted to another model (different shape or unembedding hash)."""
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
    n, d = int(config["num_hidden_layers"]), int(config["d_model"])
    try:
        weight = np.stack([arrays[f"{i}.weight"] for i in range(n)])
        bias = np.stack([arrays[f"{i}.bias"] for i in range(n)])
    except KeyError as e:
        raise ValueError(f"{path}: missing tensor {e} for {n} layers") from None
    if weight.shape != (n, d, d) or bias.shape != (n, d):
        raise ValueError(f"{path}: tensors {weight.shape} / {bias.shape} do not match its config ({n} x {d})")
    tuned = TunedLens(jnp.asarray(weight, jnp.float32), jnp.asarray(bias, jnp.float32))
    if model is not None:
        check_lens_fits(model, tuned)
        if config.get("unembed_hash") != unembed_hash(model):
            raise ValueError(f"{path}: fitted to another unembedding (hash {config.get('unembed_hash')}, "
                             f"this model {unembed_hash(model)})")
    return tuned, {"config": config, "info": json.loads(meta.get("info", "{}"))}
