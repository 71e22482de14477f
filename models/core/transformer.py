"""The pure transformer: embed -> lax.scan over stacked blocks -> final norm -> unembed.

`Transformer` is an `eqx.Module` holding its config and weights; calling it runs ONE
sequence.  Batches, padding and sweeps are `jax.vmap` over calls (see README, "Batches
and padding").  Everything a researcher reads or edits goes through `forward`:

    out = model.forward(tokens, attention_mask=mask, edits=Edits(...),
                        capture=Capture(resid=True), kv_cache=cache)
    out.logits, out.activations, out.kv_cache
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from . import layers
from .block import Block, Rotary, block_forward
from .config import ModelConfig
from .interventions import Activations, Capture, Edits, final_part, layer_slice
from .kv_cache import KVCache
from .ranges import range_error


def pad_batch(
    rows: "list[list[int]]",
    pad_id: int = 0,
    side: str = "right",
    length: int | None = None,
) -> tuple[Int[np.ndarray, "B T"], Bool[np.ndarray, "B T"]]:
    """Token lists -> `(tokens [B, T] int32, mask [B, T] bool)`, padded on `side` to
    `length` (default: the longest row) with `pad_id`: THE padding of the library (the
    readers' right padding, `lens.core.capture.pad_prompts`; generation's left padding).  The
    forward never attends to padding and counts positions over real tokens
    (`cumsum(mask) - 1`), so either side gives each row exactly its unpadded result."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("need at least one prompt, each with at least one token")
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right'; got {side!r}")
    longest = max(len(r) for r in rows)
    T = longest if length is None else length
    if T < longest:
        raise ValueError(f"length {T} is shorter than the longest row ({longest} tokens)")
    tokens = np.full((len(rows), T), pad_id, np.int32)
    mask = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        span = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        tokens[i, span] = r
        mask[i, span] = True
    return tokens, mask


class ForwardOutput(eqx.Module):
    logits: Float[Array, "seq vocab"]
    activations: Activations
    kv_cache: KVCache | None


class Transformer(eqx.Module):
    config: ModelConfig = eqx.field(static=True)
    embed: Float[Array, "vocab d_model"]
    pos_embed: Float[Array, "ctx d_model"] | None
    blocks: Block  # every leaf stacked on a leading [layers] axis
    final_norm_w: Float[Array, "d_model"]
    final_norm_b: Float[Array, "d_model"] | None
    unembed: Float[Array, "vocab d_model"] | None  # None: tied to `embed`
    unembed_b: Float[Array, " vocab"] | None = None

    def __hash__(self):
        # `jax.jit(model)` hashes the function it wraps; a module holding arrays has no hash.
        # Say so, with the idiom, instead of "unhashable type: 'jaxlib._jax.ArrayImpl'".
        # (Making it hashable would let jax.jit bake every weight into the program as a
        # constant: a huge, slow compile for a real model.)
        try:
            return super().__hash__()
        except TypeError:
            raise TypeError(
                "jax.jit(model) cannot wrap the model itself (its weights are arrays, not a "
                "hashable function). Pass the model as an argument instead:\n"
                "    run = jax.jit(lambda model, tokens: model(tokens))   # once\n"
                "    logits = run(model, tokens)                          # compiles once per shape\n"
                "or use eqx.filter_jit(model)(tokens).  The same holds for model.forward: "
                "jax.jit(lambda model, tokens: model.forward(tokens, ...))."
            ) from None

    # ----------------------------------------------------------------- public API
    def __call__(
        self,
        tokens: Int[Array, " seq"],
        attention_mask: Bool[Array, " seq"] | None = None,
        positions: Int[Array, " seq"] | None = None,
        edits: Edits | None = None,
    ) -> Float[Array, "seq vocab"]:
        """Logits for one sequence (float32).  `attention_mask` False marks padding."""
        return self.forward(tokens, attention_mask, positions, edits).logits

    def forward(
        self,
        tokens: Int[Array, " seq"],
        attention_mask: Bool[Array, " seq"] | None = None,
        positions: Int[Array, " seq"] | None = None,
        edits: Edits | None = None,
        capture: Capture = Capture(),
        kv_cache: KVCache | None = None,
    ) -> ForwardOutput:
        """The full forward with edits, captures and an optional KV cache.

        positions default to `cumsum(attention_mask) - 1` (or, with a cache, continue from
        the cache's last position), so left- and right-padded sequences get the same
        positions as unpadded ones.  Padding tokens are never attended to.
        """
        tokens = self.check_tokens(tokens)
        query_pos, key_valid = self.default_positions(tokens, attention_mask, positions, kv_cache)
        x = self.embed_tokens(tokens, query_pos)
        x, kv_cache, acts = self.run_blocks(
            x, query_pos, key_valid, edits=edits, capture=capture, kv_cache=kv_cache
        )
        logits, final = self.unembed_resid(x, capture, edits)
        acts = eqx.tree_at(
            lambda a: (a.final_norm_in, a.final_norm_out, a.final_scale),
            acts,
            final,
            is_leaf=lambda v: v is None,
        )
        return ForwardOutput(logits, acts, kv_cache)

    # ------------------------------------------------------------- the pieces
    def check_tokens(self, tokens, ids_checked: bool = False) -> Int[Array, " seq"]:
        """Shape/dtype checks (static, so they run even under jit) and an id-range check.

        JAX clamps out-of-range gathers silently; here an id < 0 or >= vocab is a
        ValueError when the ids are concrete and an `eqx.error_if` runtime error under jit.
        ids_checked=True: the caller already range-checked these ids on the host, so no
        `eqx.error_if` is added (it is a host callback, and JAX's persistent compilation
        cache never stores a program with one).
        """
        if not hasattr(tokens, "dtype") or not hasattr(tokens, "ndim"):
            tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(
                f"tokens must be one sequence of shape [seq]; got shape {tuple(tokens.shape)} "
                "(batch with jax.vmap)"
            )
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be integer ids; got dtype {tokens.dtype}")
        if tokens.shape[0] == 0:
            raise ValueError("tokens is empty")
        if tokens.shape[0] > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {tokens.shape[0]} tokens exceeds the model's context of "
                f"{self.config.max_seq_len}"
            )
        vocab = self.config.vocab_size
        if not isinstance(tokens, jax.core.Tracer):
            t = np.asarray(tokens)
            if t.min() < 0 or t.max() >= vocab:
                raise ValueError(
                    f"token id out of range [0, {vocab}): min {t.min()}, max {t.max()}"
                )
        tokens = jnp.asarray(tokens, jnp.int32)
        if ids_checked:
            return tokens
        return eqx.error_if(
            tokens, (tokens < 0) | (tokens >= vocab), f"token id out of range [0, {vocab})"
        )

    def default_positions(self, tokens, attention_mask, positions, kv_cache):
        """(query positions, key validity) with padding marked by position -1 for keys."""
        seq = tokens.shape[0]
        if attention_mask is None:
            valid = jnp.ones((seq,), bool)
        else:
            if attention_mask.shape != tokens.shape:
                raise ValueError(
                    f"attention_mask shape {attention_mask.shape} != tokens shape {tokens.shape}"
                )
            valid = jnp.asarray(attention_mask, bool)
        if positions is None:
            start = 0 if kv_cache is None else kv_cache.next_position()
            positions = start + jnp.cumsum(valid.astype(jnp.int32)) - 1
            positions = jnp.maximum(positions, 0)
            if kv_cache is None:
                # in [0, seq) and seq <= max_seq_len (checked statically): nothing to check
                # at run time (and no host callback in the compiled program)
                return positions, valid
        else:
            if positions.shape != tokens.shape:
                raise ValueError(f"positions shape {positions.shape} != tokens shape {tokens.shape}")
            positions = jnp.asarray(positions, jnp.int32)
        positions = eqx.error_if(
            positions,
            (positions < 0) | (positions >= self.config.max_seq_len),
            f"position out of range [0, {self.config.max_seq_len})",
        )
        return positions, valid

    def embed_tokens(self, tokens: Int[Array, " seq"], positions: Int[Array, " seq"]):
        """Residual stream entering block 0 (embedding, scaled / plus learned positions)."""
        x = self.embed[tokens]
        if self.config.embed_scale != 1.0:
            # Gemma rounds the sqrt(d_model) factor to the weight dtype before multiplying.
            x = x * jnp.asarray(self.config.embed_scale, x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed[positions]
        return x

    def rotary(self, positions: Int[Array, " seq"]) -> Rotary:
        if self.config.positional != "rope":
            return Rotary(None, None)
        global_f, local_f = layers.inv_freqs_for(self.config)
        cos, sin = layers.rope_tables(positions, global_f)
        if local_f is None:
            return Rotary(cos, sin)
        lcos, lsin = layers.rope_tables(positions, local_f)
        return Rotary(cos, sin, lcos, lsin)

    def prefix(
        self,
        tokens: Int[Array, " seq"],
        attention_mask: Bool[Array, " seq"] | None = None,
        stop: int = 0,
        ids_checked: bool = False,
    ) -> tuple[Float[Array, "seq d_model"], Int[Array, " seq"], Bool[Array, " seq"]]:
        """The unedited residual entering block `stop` (resid_pre[stop]; stop = n_layers:
        before the final norm), with the query positions and key validity that the rest of
        the forward needs: `x, qpos, valid = model.prefix(t, m, l)` then
        `model.run_blocks(x, qpos, valid, start=l, edits=e)` equals `model.forward(t, m,
        edits=e)` whenever e does nothing before layer l.  THE split of the forward used by
        sweeps, MELBO, steering and `lens.resid_at`: the prefix runs once, the suffix K times.
        ids_checked: see `check_tokens` (callers that range-checked the ids on the host)."""
        n = self.config.n_layers
        if not 0 <= stop <= n:
            raise range_error("prefix stop", stop, 0, n + 1, f"(a model of {n} layers; {n} = every block)")
        tokens = self.check_tokens(tokens, ids_checked)
        query_pos, key_valid = self.default_positions(tokens, attention_mask, None, None)
        x = self.embed_tokens(tokens, query_pos)
        if stop > 0:
            x, _, _ = self.run_blocks(x, query_pos, key_valid, stop=stop)
        return x, query_pos, key_valid

    def run_blocks(
        self,
        x: Float[Array, "seq d_model"],
        query_pos: Int[Array, " seq"],
        key_valid: Bool[Array, " seq"],
        start: int = 0,
        stop: int | None = None,
        edits: Edits | None = None,
        capture: Capture = Capture(),
        kv_cache: KVCache | None = None,
    ) -> tuple[Float[Array, "seq d_model"], KVCache | None, Activations]:
        """Scan blocks [start, stop) over the residual stream `x`.

        Splitting at a layer lets a sweep run the shared prefix once and vmap only the
        rest.  `edits` are given for EVERY layer (as for `forward`) and sliced here to the
        blocks run; the final norm's edits are left to `unembed_resid`.  Captures cover
        the blocks run (layer axis = stop - start), or exactly `capture.layers` (absolute
        indices, in that order; each must be inside [start, stop)).
        """
        n = self.config.n_layers
        stop = n if stop is None else stop
        if not 0 <= start < stop <= n:
            raise ValueError(f"block range [{start}, {stop}) is not inside [0, {n})")
        custom = None if edits is None else edits.resid_fn  # not scanned: bound per block
        edits = layer_slice(edits, start, stop)
        blocks = jax.tree.map(lambda w: w[start:stop], self.blocks)
        local = self.config.local_layers
        is_local = None if local is None else jnp.asarray(local[start:stop])
        rot = self.rotary(query_pos)

        if kv_cache is None:
            key_pos = jnp.where(key_valid, query_pos, -1)
            kv_layers, write_index = None, None
        else:
            if (start, stop) != (0, n):
                raise ValueError("a KV cache needs every block run: start=0, stop=n_layers")
            kv_cache = kv_cache.with_positions(query_pos, key_valid)
            key_pos, write_index = kv_cache.positions, kv_cache.length
            kv_layers = (kv_cache.k, kv_cache.v)

        def block(h, xs):
            block, local_l, edits_l, kv_l, index = xs
            if custom is not None:
                edits_l = dataclasses.replace(edits_l, resid_fn=custom.at(start + index, query_pos))
            return block_forward(
                self.config, block, h, query_pos, key_pos=key_pos, rotary=rot, is_local=local_l,
                edits=edits_l, capture=capture, kv=kv_l, write_index=write_index,
            )

        xs = (blocks, is_local, edits, kv_layers, jnp.arange(stop - start))
        if capture.layers is None:
            def step(h, xs):
                h, kv_l, acts = block(h, xs)
                return h, (kv_l, acts)

            x, (kv_layers, acts) = jax.lax.scan(step, x, xs)
        else:
            x, kv_layers, acts = self._scan_chosen_layers(block, x, xs, capture.layers, start, stop)
        if kv_cache is not None:
            kv_cache = kv_cache.advanced(kv_layers, x.shape[0])
        return x, kv_cache, acts

    def _scan_chosen_layers(self, block, x, xs, chosen, start, stop):
        """The scan, keeping only the `chosen` layers' captures: each block writes its
        captures into slot `chosen.index(layer)` of a carried buffer (a spare last slot
        for the others), so only len(chosen) layers are ever held."""
        outside = [layer for layer in chosen if not start <= layer < stop]
        if outside:
            raise ValueError(f"Capture(layers=...) holds layers {outside} outside the blocks "
                             f"run [{start}, {stop})")
        slot = np.full((stop - start,), len(chosen), np.int32)
        for i, layer in enumerate(chosen):
            slot[layer - start] = i
        slot = jnp.asarray(slot)
        first = jax.tree.map(lambda a: a[0], xs)
        shapes = jax.eval_shape(lambda h: block(h, first)[2], x)
        buffers = jax.tree.map(lambda a: jnp.zeros((len(chosen) + 1,) + a.shape, a.dtype), shapes)

        def step(carry, xs):
            h, buffers = carry
            h, kv_l, acts = block(h, xs)
            i = slot[xs[-1]]
            buffers = jax.tree.map(
                lambda b, a: jax.lax.dynamic_update_index_in_dim(b, a, i, 0), buffers, acts)
            return (h, buffers), kv_l

        (x, buffers), kv_layers = jax.lax.scan(step, (x, buffers), xs)
        return x, kv_layers, jax.tree.map(lambda b: b[: len(chosen)], buffers)

    def unembed_resid(
        self, x: Float[Array, "seq d_model"], capture: Capture = Capture(),
        edits: Edits | None = None,
    ) -> tuple[Float[Array, "seq vocab"], tuple]:
        """Final norm and unembedding; logits in float32.  `edits`: only the final norm's
        fields are read (final_scale_mix / _source)."""
        c = self.config
        final = final_part(edits)
        scale_edit = None if final is None else (final.final_scale_mix, final.final_scale_source)
        y, scale = layers.apply_norm(x, c.norm_kind, self.final_norm_w, self.final_norm_b,
                                     c.norm_eps, scale_edit)
        w_u = self.embed if self.unembed is None else self.unembed
        logits = jnp.einsum("sd,vd->sv", y, w_u, preferred_element_type=jnp.float32)
        if self.unembed_b is not None:
            logits = logits + self.unembed_b.astype(jnp.float32)
        if c.final_logit_softcap is not None:
            logits = c.final_logit_softcap * jnp.tanh(logits / c.final_logit_softcap)
        final = (x, y, scale) if capture.norms else (None, None, None)
        return logits, final

    @property
    def W_U(self) -> Float[Array, "vocab d_model"]:
        """The unembedding matrix (the embedding when tied)."""
        return self.embed if self.unembed is None else self.unembed


def first_blocks(model: Transformer, n: int) -> Transformer:
    """The model with only its first `n` blocks, then its own final norm and unembedding (a
    model of its own: `first_blocks(m, n)(tokens)` is `m.unembed_resid` of the residual
    after block n - 1).  The config follows: `n_layers = n` and Gemma's per-layer
    `local_layers` (sliding-window vs global) cut to the blocks kept, so each kept block
    keeps its window and its rotary theta."""
    c = model.config
    if not isinstance(n, int) or not 1 <= n <= c.n_layers:
        raise ValueError(f"n must be an int in [1, n_layers={c.n_layers}], got {n!r}")
    local = None if c.local_layers is None else tuple(c.local_layers[:n])
    config = dataclasses.replace(c, n_layers=n, local_layers=local)
    # config is a static field (eqx.tree_at cannot replace it): rebuild the module
    return dataclasses.replace(model, config=config, blocks=jax.tree.map(lambda w: w[:n], model.blocks))
