"""Activation capture: `run_with_cache` and helpers reading the typed `Activations` cache.

    logits, cache = lens.run_with_cache(model, tokens)
    cache.resid_pre[l]     # [seq, d_model], what enters block l (= HF hidden_states[l])
    per_head = lens.head_outputs(model, cache)   # [layers, seq, heads, d_model]

The cache is `models.Activations`, a pytree of arrays with a leading [layers] axis (plus
a leading [batch] axis when `tokens` is a batch); fields whose `Capture` flag is off are
None and cost nothing.  The forward is jitted once per (shapes, Capture) combination.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from lens.core.edits import check_edits
from lens.models.core.interventions import Activations, Capture, Edits
from lens.models.core.ranges import check_index, layer_context, range_error
from lens.models.core.transformer import Transformer, pad_batch

DEFAULT_CAPTURE = Capture(resid=True, sublayers=True, head_z=True, neurons=True, norms=True)


def pad_prompts(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists into `(tokens [P, T] int32, mask [P, T] bool)`: the batch form
    every batched reader here takes (padding is never attended to, and positions count real
    tokens only, so a padded prompt reads exactly as it would alone).  `models.pad_batch`
    with side="right"."""
    return pad_batch(prompts, pad_id, side="right")


def last_real_index(mask: Bool[Array, "*batch seq"]) -> Int[Array, "*batch"]:
    """Index of each sequence's last real (unpadded) token, for left or right padding:
    THE "last token" of every reader here (sweeps, CAA, MELBO analysis)."""
    m = jnp.asarray(mask, bool)
    return jnp.max(jnp.where(m, jnp.arange(m.shape[-1]), -1), axis=-1)


@eqx.filter_jit
def _forward(model, tokens, mask, edits, capture):
    def one(t, m):
        out = model.forward(t, attention_mask=m, edits=edits, capture=capture)
        return out.logits, out.activations

    if tokens.ndim == 1:
        return one(tokens, mask)
    return jax.vmap(one, in_axes=(0, None if mask is None else 0))(tokens, mask)


def run_with_cache(
    model: Transformer,
    tokens: Int[Array, " seq"] | Int[Array, "batch seq"],
    capture: Capture = DEFAULT_CAPTURE,
    attention_mask: Bool[Array, " seq"] | Bool[Array, "batch seq"] | None = None,
    edits: Edits | None = None,
) -> tuple[Float[Array, "*batch seq vocab"], Activations]:
    """Logits and the captured activations of one sequence (or a batch, vmapped).

    capture: which activations to keep (default: residual streams, sub-layer outputs,
    per-head z, neurons and norm scales; the attention pattern and q/k/v are left out
    unless `Capture(attn_pattern=True)` / `Capture(qkv=True)`).  `Capture(...,
    layers=[...])` returns only those layers, in the order given (the others are never
    materialised).  edits: optional interventions (validated first), so
    a cache can be taken from an edited run.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim not in (1, 2):
        raise ValueError(f"tokens must be [seq] or [batch, seq]; got {tokens.shape}")
    check_edits(model, edits, tokens.shape[-1])
    mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)
    if mask is not None and mask.shape != tokens.shape:
        raise ValueError(f"attention_mask {mask.shape} != tokens {tokens.shape}")
    if not np.all((np.asarray(tokens) >= 0) & (np.asarray(tokens) < model.config.vocab_size)):
        raise ValueError(f"token id out of range [0, {model.config.vocab_size})")
    if capture.layers is not None:
        n = model.config.n_layers
        for layer in capture.layers:
            check_index("Capture(layers=...): layer", layer, n, context=layer_context(n))
    return _forward(model, tokens, mask, edits, capture)


def head_outputs(
    model: Transformer, cache_or_z: Activations | Float[Array, "*batch layers seq heads d_head"]
) -> Float[Array, "*batch layers seq heads d_model"]:
    """Each head's write to the residual stream, z_h @ W_O[h] (without the output bias).

    Summed over heads plus b_O this is `attn_out` (for models without a post-attention
    norm).  Takes the cache (needs head_z) or the z array itself.
    """
    z = cache_or_z.head_z if isinstance(cache_or_z, Activations) else cache_or_z
    if z is None:
        raise ValueError("the cache holds no head_z: capture with Capture(head_z=True)")
    c = model.config
    if tuple(z.shape[-4:]) != (c.n_layers, z.shape[-3], c.n_heads, c.d_head):
        raise ValueError(f"head_z of shape {z.shape} does not fit this model")
    return jnp.einsum("...lshk,lhkd->...lshd", z, model.blocks.W_O.astype(z.dtype))


def head_output(
    model: Transformer, cache: Activations, layer: int, head: int
) -> Float[Array, "*batch seq d_model"]:
    """One head's write to the residual stream at one layer: z[layer, :, head] @ W_O."""
    z = cache.head_z
    if z is None:
        raise ValueError("the cache holds no head_z: capture with Capture(head_z=True)")
    c = model.config
    check_index("layer", layer, c.n_layers, context=layer_context(c.n_layers))
    check_index("head", head, c.n_heads, context=f"(the model has {c.n_heads} heads)")
    return jnp.einsum("...sk,kd->...sd", z[..., layer, :, head, :], model.blocks.W_O[layer, head])


@eqx.filter_jit
def _resid_at(model, tokens, mask, layer, ids_checked: bool = False):
    def one(t, m):
        return model.prefix(t, m, layer, ids_checked=ids_checked)[0]

    return jax.vmap(one)(tokens, mask)


def resid_at(
    model: Transformer,
    tokens: Int[Array, "batch seq"] | Int[Array, " seq"],
    layer: int,
    attention_mask: Bool[Array, "batch seq"] | None = None,
) -> Float[Array, "*batch seq d_model"]:
    """The residual stream entering block `layer` (resid_pre[layer]; layer = n_layers gives
    the final stream before the last norm), running only the blocks before it."""
    n = model.config.n_layers
    if not 0 <= layer <= n:
        raise range_error("layer", layer, 0, n + 1, f"(resid_pre of {n} blocks, and {n} = the final stream)")
    t = jnp.asarray(tokens, jnp.int32)
    single = t.ndim == 1
    t = t[None] if single else t
    m = jnp.ones(t.shape, bool) if attention_mask is None else jnp.asarray(attention_mask, bool).reshape(t.shape)
    checked = not isinstance(t, jax.core.Tracer)
    if checked:  # on the host, so the compiled prefix has no callback (persistently cached)
        ids = np.asarray(t)
        if ids.min() < 0 or ids.max() >= model.config.vocab_size:
            raise ValueError(f"token id out of range [0, {model.config.vocab_size}): "
                             f"min {ids.min()}, max {ids.max()}")
    x = _resid_at(model, t, m, layer, checked)
    return x[0] if single else x
