"""Vmapped steering sweeps that run the shared prefix of layers once.

Adding a vector before block l leaves blocks 0..l-1 untouched, so for every vector,
coefficient and prompt the residual stream entering block l is the same.  `sweep_vectors` runs
the prefix once per prompt (incrementally, so every steered layer's entry point costs one
pass in total), then `jax.vmap`s only blocks l..n-1 over vectors x coefficients x prompts,
and (option `last_only`) unembeds only each prompt's last real token: the unembedding of a
49k vocabulary is a third of a small model's compute per position.

    res = lens.sweep_vectors(model, prompts, vectors, coeffs=[0, 4, 8], layers=[6, 12])
    res.kl             # [K, C, L, P]   KL(steered || unsteered) at the last token
    res.logprob_delta  # [K, C, L, P, T] log p(target) steered - unsteered

The K axis is processed in chunks sized from a memory budget (a tqdm bar counts them);
the last chunk is zero-padded so every chunk reuses one compilation.  `mesh=` shards the
vector axis (and optionally the prompts) over devices: see lens/sharding.py.

`run_edits` / `add_vectors` do the same for any K-stacked `Edits` whose layers before
some layer are all zero.
"""

from __future__ import annotations

import math
from typing import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int
from tqdm.auto import tqdm

from lens import edits as E
from models.interventions import Edits
from models.transformer import Transformer


class SweepResult(eqx.Module):
    """Arrays indexed [K vectors, C coefficients, L layers, P prompts, (seq,) ...].

    With last_only the seq axis is absent (each prompt's last real token).  logits and
    activations are None unless asked for.  kl is KL(steered || unsteered) in nats;
    logprob_delta is log p_steered(t) - log p_unsteered(t) for each target token t.
    """

    kl: Float[Array, "K C L P *seq"]
    logprob_delta: Float[Array, "K C L P *seq T"] | None
    logits: Float[Array, "K C L P *seq vocab"] | None
    base_logits: Float[Array, "P *seq vocab"]
    activations: Float[Array, "K C L P seq d_model"] | None
    layers: tuple = eqx.field(static=True)


def _prepare(model, tokens, attention_mask):
    t = jnp.asarray(tokens, jnp.int32)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2:
        raise ValueError(f"prompts must be [P, seq] token ids; got shape {t.shape}")
    v = model.config.vocab_size
    tn = np.asarray(t)
    if tn.min() < 0 or tn.max() >= v:
        raise ValueError(f"token id out of range [0, {v})")
    m = jnp.ones(t.shape, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    if m.shape != t.shape:
        raise ValueError(f"attention_mask {m.shape} != prompts {t.shape}")
    return t, m


def _last_index(mask: Bool[Array, " seq"]) -> Int[Array, ""]:
    return jnp.max(jnp.where(mask, jnp.arange(mask.shape[0]), -1))


def _unembed(model, x, mask, last_only):
    if last_only:
        x = x[_last_index(mask)][None]
    logits, _ = model.unembed_resid(x)
    return logits[0] if last_only else logits


@eqx.filter_jit
def _prefix(model, tokens, mask, layers, last_only):
    """Entry streams of each steered layer [L, P, seq, d] and the unsteered log-probs."""

    def one(t, m):
        qpos, valid = model.default_positions(t, m, None, None)
        x = model.embed_tokens(t, qpos)
        entries, at = [], 0
        for layer in layers:
            if layer > at:
                x, _, _ = model.run_blocks(x, qpos, valid, start=at, stop=layer)
                at = layer
            entries.append(x)
        if at < model.config.n_layers:
            x, _, _ = model.run_blocks(x, qpos, valid, start=at)
        return jnp.stack(entries), _unembed(model, x, m, last_only)

    entries, logits = jax.vmap(one)(tokens, mask)
    return jnp.swapaxes(entries, 0, 1), logits


@eqx.filter_jit
def _tail(model, entries, tokens, mask, vectors, coeffs, pos_mask, base_logits, targets,
          layers, last_only, keep_logits, capture_layer):
    """Steered tails for one chunk of vectors: every output [k, C, L, P, ...]."""
    n = model.config.n_layers
    base_logp = jax.nn.log_softmax(base_logits, axis=-1)

    def one(layer, x, t, m, v, c, blp):
        qpos, valid = model.default_positions(t, m, None, None)
        # identical to Edits(resid_add=...) at `layer` (block step 3: x + resid_add)
        x = x + (c * v[None, :] * pos_mask[:, None]).astype(x.dtype)
        act = None
        if capture_layer is not None and capture_layer >= layer:
            x, _, _ = model.run_blocks(x, qpos, valid, start=layer, stop=capture_layer + 1)
            act = x
            if capture_layer + 1 < n:
                x, _, _ = model.run_blocks(x, qpos, valid, start=capture_layer + 1)
        else:
            x, _, _ = model.run_blocks(x, qpos, valid, start=layer)
        logits = _unembed(model, x, m, last_only)
        logp = jax.nn.log_softmax(logits, axis=-1)
        kl = jnp.sum(jnp.exp(logp) * (logp - blp), axis=-1)
        delta = None if targets is None else (logp - blp)[..., targets]
        return kl, delta, logits if keep_logits else None, act

    outs = []
    for li, layer in enumerate(layers):
        f = lambda x, t, m, v, c, blp: one(layer, x, t, m, v, c, blp)  # noqa: E731
        f = jax.vmap(f, in_axes=(0, 0, 0, None, None, 0))  # prompts
        f = jax.vmap(f, in_axes=(None, None, None, None, 0, None))  # coefficients
        f = jax.vmap(f, in_axes=(None, None, None, 0, None, None))  # vectors
        kl, delta, logits, act = f(entries[li], tokens, mask, vectors, coeffs, base_logp)
        if capture_layer is not None and capture_layer < layer:
            # filled with the unsteered stream by `sweep_vectors` (steering starts after it)
            act = jnp.zeros(kl.shape[:3] + entries.shape[-2:], entries.dtype)
        outs.append((kl, delta, logits, act))
    stack = lambda *xs: None if xs[0] is None else jnp.stack(xs, axis=2)  # noqa: E731
    return tuple(stack(*[o[i] for o in outs]) for i in range(4))


def chunk_size_for(
    model: Transformer, n_coeffs: int, n_layers: int, n_prompts: int, seq: int,
    last_only: bool, keep_logits: bool, capture: bool, memory_budget: float,
) -> int:
    """How many vectors fit one chunk: a rough upper bound on the bytes one vector's tail
    needs (activations of one block live at a time inside the scan, plus the outputs)."""
    c = model.config
    per_pos = 4 * (6 * c.d_model + 3 * c.d_mlp + 4 * c.n_heads * c.d_head + 2 * c.n_heads * seq)
    out_pos = 1 if last_only else seq
    per_prompt = seq * per_pos + out_pos * c.vocab_size * 4 * (3 + int(keep_logits))
    per_prompt += seq * c.d_model * 4 * int(capture)
    per_vector = n_coeffs * n_layers * n_prompts * per_prompt
    return max(1, int(memory_budget // per_vector))


def sweep_vectors(
    model: Transformer,
    prompts: Int[Array, "P seq"],
    vectors: Float[Array, "K d_model"],
    coeffs: Sequence[float] | Float[Array, " C"] = (1.0,),
    layers: int | Sequence[int] = 0,
    attention_mask: Bool[Array, "P seq"] | None = None,
    positions: int | Sequence[int] | None = None,
    last_only: bool = True,
    targets: Sequence[int] | Int[Array, " T"] | None = None,
    keep_logits: bool = False,
    capture_layer: int | None = None,
    chunk_size: int | None = None,
    memory_budget: float = 2**30,
    mesh: "jax.sharding.Mesh | None" = None,
    progress: bool = True,
) -> SweepResult:
    """Steer every prompt with every (vector, coefficient, layer) and measure the effect.

    Each vector times each coefficient is added to the residual stream entering each
    block in `layers`, at every position (or only `positions`), exactly as
    `Edits(resid_add=...)` would.  Returns a `SweepResult` of arrays [K, C, L, P, ...]:
    KL to the unsteered run, log-prob changes of `targets`, optionally the logits and the
    residual stream leaving block `capture_layer` ([.., seq, d_model]; for layers steered
    after it this is the unsteered stream).  last_only evaluates only each prompt's last
    real token (attention_mask False marks padding).  K is chunked so one chunk's tail
    fits `memory_budget` bytes (or `chunk_size` vectors); `mesh` shards the chunk.
    """
    tokens, mask = _prepare(model, prompts, attention_mask)
    P, seq = tokens.shape
    vectors = E.check_vectors(model, jnp.atleast_2d(jnp.asarray(vectors, jnp.float32)))
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [K, d_model]; got {vectors.shape}")
    layer_list = tuple(sorted(E.check_layers(model, layers)))
    pos = E.check_positions(positions, seq)
    pos_mask = jnp.asarray(E._position_mask(pos, seq))
    coeffs = jnp.atleast_1d(jnp.asarray(coeffs, jnp.float32))
    if not np.isfinite(np.asarray(coeffs)).all():
        raise ValueError("coeffs contain NaN/inf")
    tgt = None
    if targets is not None:
        tgt = jnp.atleast_1d(jnp.asarray(targets, jnp.int32))
        if np.asarray(tgt).min() < 0 or np.asarray(tgt).max() >= model.config.vocab_size:
            raise ValueError("target token id out of range")
    if capture_layer is not None:
        capture_layer = E.check_layers(model, capture_layer)[0]

    K = vectors.shape[0]
    if chunk_size is None:
        chunk_size = chunk_size_for(model, len(coeffs), len(layer_list), P, seq, last_only,
                                    keep_logits, capture_layer is not None, memory_budget)
    chunk = min(chunk_size, K)
    place = lambda name, a: a  # noqa: E731
    to_host = np.asarray
    if mesh is not None:
        from lens import sharding

        chunk = sharding.round_chunk(chunk, mesh)
        place = lambda name, a: sharding.place(name, a, mesh)  # noqa: E731
        to_host = sharding.to_host

    entries, base_logits = _prefix(model, place("prompts", tokens), place("prompts", mask),
                                   layer_list, last_only)
    if capture_layer is not None and any(capture_layer < l for l in layer_list):
        unsteered_act = _unsteered_stream(model, tokens, mask, capture_layer)
    args = [place("entries", entries), place("prompts", tokens), place("prompts", mask)]
    outs = []
    n_chunks = math.ceil(K / chunk)
    for i in tqdm(range(n_chunks), desc="sweep", unit="chunk", disable=not progress):
        v = vectors[i * chunk:(i + 1) * chunk]
        if v.shape[0] < chunk:
            v = jnp.concatenate([v, jnp.zeros((chunk - v.shape[0], v.shape[1]), v.dtype)])
        res = _tail(model, *args, place("vectors", v), coeffs, pos_mask,
                    place("prompts", base_logits), tgt, layer_list, last_only, keep_logits,
                    capture_layer)
        outs.append(tuple(None if a is None else to_host(a) for a in res))
    cat = lambda i: None if outs[0][i] is None else np.concatenate([o[i] for o in outs])[:K]  # noqa: E731
    kl, delta, logits, act = (cat(i) for i in range(4))
    if capture_layer is not None:
        for li, layer in enumerate(layer_list):
            if capture_layer < layer:
                act[:, :, li] = np.asarray(unsteered_act)[None, None]
    return SweepResult(jnp.asarray(kl), None if delta is None else jnp.asarray(delta),
                       None if logits is None else jnp.asarray(logits),
                       jnp.asarray(base_logits), None if act is None else jnp.asarray(act),
                       layer_list)


def _unsteered_stream(model, tokens, mask, layer):
    from lens.capture import resid_at

    return resid_at(model, tokens, layer + 1, mask)


# ------------------------------------------------------------------ general stacked edits
def first_edited_layer(edits: Edits) -> int:
    """The first layer at which a K-stacked Edits does anything (n_layers if none).

    Needs concrete arrays.  A layer counts as edited when it adds a nonzero vector,
    ablates a nonzero direction, or mixes with a nonzero weight.
    """
    firsts = []
    for name in ("resid_add", "resid_ablate", "resid_mix", "head_mix", "neuron_mix",
                 "writer_ablate"):
        a = getattr(edits, name)
        if a is None:
            continue
        a = np.asarray(a)
        nz = np.nonzero(np.moveaxis(a, 1, 0).reshape(a.shape[1], -1).any(axis=1))[0]
        firsts.append(nz[0] if nz.size else a.shape[1])
    return int(min(firsts)) if firsts else -1


@eqx.filter_jit
def _run_stacked(model, tokens, mask, edits, start):
    def one(t, m):
        qpos, valid = model.default_positions(t, m, None, None)
        x = model.embed_tokens(t, qpos)
        if start > 0:
            x, _, _ = model.run_blocks(x, qpos, valid, stop=start)
        tail = jax.tree.map(lambda a: a[:, start:], edits)

        def steered(e):
            y, _, _ = model.run_blocks(x, qpos, valid, start=start, edits=e)
            return model.unembed_resid(y)[0]

        return jax.vmap(steered)(tail)

    return jnp.swapaxes(jax.vmap(one)(tokens, mask), 0, 1)


def run_edits(
    model: Transformer,
    tokens: Int[Array, " seq"] | Int[Array, "P seq"],
    edits: Edits,
    attention_mask: Bool[Array, "*P seq"] | None = None,
) -> Float[Array, "K *P seq vocab"]:
    """Logits of K edited forwards (edits stacked with a leading [K] axis, `stack_edits`),
    computing the layers before the first edited one once for all K."""
    t, m = _prepare(model, tokens, attention_mask)
    E.check_edits(model, edits, t.shape[1], batch_dims=1)
    start = first_edited_layer(edits)
    if start < 0:
        raise ValueError("run_edits needs stacked edits with at least one field set")
    n = model.config.n_layers
    start = min(start, n - 1)
    logits = _run_stacked(model, t, m, edits, start)  # [K, P, seq, vocab]
    return logits[:, 0] if np.ndim(tokens) == 1 else logits


def add_vectors(
    model: Transformer,
    tokens: Int[Array, " seq"] | Int[Array, "P seq"],
    vectors: Float[Array, "K d_model"],
    layer: int,
    coeff: float = 1.0,
    attention_mask: Bool[Array, "*P seq"] | None = None,
) -> Float[Array, "K *P seq vocab"]:
    """Logits [K, seq, vocab] (or [K, P, seq, vocab]) with each vector times `coeff`
    added to the residual stream entering block `layer` at every position.

    Built from `edits.add` stacked over K and `run_edits` (the prefix runs once)."""
    vectors = E.check_vectors(model, jnp.atleast_2d(jnp.asarray(vectors, jnp.float32)))
    E.check_layers(model, layer)
    stacked = jax.vmap(lambda v: E.add(model, v, layer, coeff))(vectors)  # K-stacked Edits
    return run_edits(model, tokens, stacked, attention_mask)
