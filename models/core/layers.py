"""Stateless building blocks shared by every family: norms, rotary, attention, MLP.

Each function handles ONE sequence; batching is `jax.vmap` by the caller.  Norms and
softmax compute in float32 and cast back, so bf16 weights change matmul precision only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from .config import ModelConfig, NormKind, RopeScaling

# Masked attention scores use the most negative finite float rather than -inf, so a
# query that sees no key at all (a padding query) gets a uniform softmax, not NaN.
MASKED_SCORE = float(jnp.finfo(jnp.float32).min)


def apply_norm(
    x: Float[Array, "*batch d"],
    kind: NormKind,
    gamma: Float[Array, "d"] | None,
    beta: Float[Array, "d"] | None = None,
    eps: float = 0.0,
    scale_edit: tuple[Array, Array | None] | None = None,
) -> tuple[Float[Array, "*batch d"], Float[Array, "*batch"]]:
    """LayerNorm `gamma * (Px)/sigma + beta` or RMSNorm `gamma * x/rms`; returns (output,
    divisor).  Same arguments in the same order as `lens.geometry.apply_norm` (which
    returns the output alone); the forward always passes the config's eps.

    Gemma's `(1 + w)` gain is folded into `gamma` at load time, so one formula serves
    every family and the geometry code sees exactly the gain the model applies.
    scale_edit = (mix [S], source [S] or None): the divisor becomes
    `s + mix * (source - s)` ("freeze the norm scale" from another run when mix = 1; what
    TransformerLens calls hook_scale), and the returned divisor is the one used.
    """
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    if kind == "layer":
        xf = xf - xf.mean(-1, keepdims=True)
    scale = jnp.sqrt(jnp.mean(xf * xf, axis=-1) + eps)
    if scale_edit is not None:
        mix, source = scale_edit
        source = jnp.zeros_like(scale) if source is None else source.astype(jnp.float32)
        scale = scale + mix.astype(jnp.float32) * (source - scale)
    y = xf / scale[..., None]
    if gamma is not None:
        y = y * gamma.astype(jnp.float32)
    if beta is not None:
        y = y + beta.astype(jnp.float32)
    return y.astype(dtype), scale


def rope_inv_freq(dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies as transformers computes them for its rotary `dim`:
    `theta ** -(arange(0, dim, 2) / dim)`, ceil(dim / 2) of them, turning twice as many
    channels (dim + 1 for an odd dim; none for dim = 0)."""
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / max(dim, 1)
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # Llama 3: keep high frequencies, divide low ones by `factor`, blend in between.
    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor
    high_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(
    positions: Int[Array, " seq"], inv_freq: np.ndarray
) -> tuple[Float[Array, "seq rot"], Float[Array, "seq rot"]]:
    """cos/sin of shape [seq, rotary_dim] in transformers' "rotate_half" layout."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(
    x: Float[Array, "seq heads d_head"],
    cos: Float[Array, "seq rot"],
    sin: Float[Array, "seq rot"],
) -> Float[Array, "seq heads d_head"]:
    """Rotate the first `rot` channels of every head (all of them unless partial rotary)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated_half = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    xf = x_rot.astype(jnp.float32)
    out = xf * cos[:, None, :] + rotated_half.astype(jnp.float32) * sin[:, None, :]
    return jnp.concatenate([out.astype(x.dtype), x_pass], axis=-1)


def attention_allowed(
    query_pos: Int[Array, " q"],
    key_pos: Int[Array, " k"],
    window: Int[Array, ""] | int | None,
) -> Bool[Array, "q k"]:
    """Which keys each query may attend to.

    Keys with position < 0 are empty cache slots or padding.  Causality and the sliding
    window are decided by positions, not by slot order, so left/right padding and a KV
    cache all use this one rule: 0 <= key_pos <= query_pos and query_pos - key_pos < window.
    """
    allowed = (key_pos[None, :] >= 0) & (key_pos[None, :] <= query_pos[:, None])
    if window is not None:
        allowed = allowed & (query_pos[:, None] - key_pos[None, :] < window)
    return allowed


def attention_weights(
    q: Float[Array, "q heads d_head"],
    k: Float[Array, "k kv_heads d_head"],
    allowed: Bool[Array, "q k"],
    scale: float,
    softcap: float | None = None,
) -> Float[Array, "heads q k"]:
    """Softmax attention pattern (float32), grouped-query aware.  softcap (Gemma 2): the
    scaled scores become `softcap * tanh(score / softcap)` before masking, as transformers'
    eager attention does."""
    n_heads, n_kv = q.shape[1], k.shape[1]
    group = n_heads // n_kv
    qg = q.reshape(q.shape[0], n_kv, group, q.shape[2])
    scores = jnp.einsum("qkgd,Kkd->kgqK", qg, k, preferred_element_type=jnp.float32) * scale
    scores = scores.reshape(n_heads, q.shape[0], k.shape[0])
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(allowed[None], scores, MASKED_SCORE)
    return jax.nn.softmax(scores, axis=-1)


def attend(
    pattern: Float[Array, "heads q k"], v: Float[Array, "k kv_heads d_head"]
) -> Float[Array, "q heads d_head"]:
    """Mix values by the pattern: z[q, h] = sum_k pattern[h, q, k] v[k, kv(h)]."""
    n_heads, n_kv = pattern.shape[0], v.shape[1]
    group = n_heads // n_kv
    pg = pattern.reshape(n_kv, group, pattern.shape[1], pattern.shape[2]).astype(v.dtype)
    z = jnp.einsum("kgqK,Kkd->qkgd", pg, v)
    return z.reshape(z.shape[0], n_heads, z.shape[-1])


def activation_fn(name: str):
    """The MLP nonlinearity by its transformers name."""
    if name == "silu":
        return jax.nn.silu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unknown activation {name!r}")


def inv_freqs_for(config: ModelConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """(global inv_freq, local inv_freq or None) for the config's rotary settings."""
    # `rotary_dim` is transformers' frequency `dim` (0 = no rotation, odd = one more channel
    # than dim is turned: see ModelConfig.rotated_channels); None = the whole head.
    rot = config.d_head if config.rotary_dim is None else config.rotary_dim
    global_f = rope_inv_freq(rot, config.rope_theta, config.rope_scaling)
    local_f = None
    if config.rope_local_theta is not None:
        # Gemma 3 applies rope scaling to the global layers only.
        local_f = rope_inv_freq(rot, config.rope_local_theta, None)
    return global_f, local_f
