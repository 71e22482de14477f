"""A pure KV cache: arrays passed into the forward and returned updated.

Slots are filled left to right; `positions[slot]` is the token position stored there,
or -1 for an empty slot or a padding token, which attention then ignores.  Batching is
`jax.vmap` over caches, exactly like the forward.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


class KVCache(eqx.Module):
    k: Float[Array, "layers slots kv_heads d_head"]
    v: Float[Array, "layers slots kv_heads d_head"]
    positions: Int[Array, " slots"]
    length: Int[Array, ""]  # slots written so far = where the next chunk goes

    @classmethod
    def empty(cls, config, slots: int, dtype=jnp.float32) -> "KVCache":
        if slots > config.max_seq_len:
            raise ValueError(f"cache of {slots} slots exceeds the context {config.max_seq_len}")
        shape = (config.n_layers, slots, config.n_kv_heads, config.d_head)
        return cls(
            jnp.zeros(shape, dtype),
            jnp.zeros(shape, dtype),
            jnp.full((slots,), -1, jnp.int32),
            jnp.zeros((), jnp.int32),
        )

    def next_position(self) -> Int[Array, ""]:
        """One past the largest position stored (0 for an empty cache)."""
        return jnp.max(self.positions) + 1

    def with_positions(self, positions: Int[Array, " seq"], valid: Bool[Array, " seq"]):
        """Record the incoming chunk's positions (padding as -1) in its slots."""
        seq = positions.shape[0]
        slots = self.positions.shape[0]
        new = jnp.where(valid, positions, -1).astype(jnp.int32)
        fits = self.length + seq <= slots
        length = eqx.error_if(self.length, ~fits, f"KV cache overflow: {slots} slots")
        pos = jax.lax.dynamic_update_slice(self.positions, new, (length,))
        return KVCache(self.k, self.v, pos, length)

    def advanced(self, kv_layers, seq: int) -> "KVCache":
        k, v = kv_layers
        return KVCache(k, v, self.positions, self.length + seq)
