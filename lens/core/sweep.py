"""Vmapped steering sweeps that run the shared prefix of layers once.

Adding a vector before block l leaves blocks 0..l-1 untouched, so for every vector,
coefficient and prompt the residual stream entering block l is the same.  `sweep_vectors` runs
the prefix once per prompt (incrementally, so every steered layer's entry point costs one
pass in total), then `jax.vmap`s only blocks l..n-1 over vectors x coefficients x prompts,
and (option `last_only`) unembeds only each prompt's last real token: the unembedding of a
49k vocabulary is a third of a small model's compute per position.

    res = lens.sweep_vectors(model, prompts, vectors, coeffs=[0, 4, 8], layers=[6, 12])
    res = lens.sweep_vectors(model, prompts, vectors, layers=[6],
                             config=SweepConfig(keep_logits=True, memory_budget=4e9, progress=False))
    res.kl             # [K, C, L, P]   KL(steered || unsteered) at the last token
    res.logprob_delta  # [K, C, L, P, T] log p(target) steered - unsteered

The K axis is processed in chunks sized from a memory budget (a tqdm bar counts them);
the last chunk is zero-padded so every chunk reuses one compilation.  `SweepConfig.mesh`
shards the vector axis (and optionally the prompts) over devices: see lens/core/sharding.py.
The research question (prompts, vectors, coeffs, layers, positions, targets) is spelled out
at the call; how it runs and what it keeps (chunking, memory, mesh, progress, last_only,
keep_logits, capture_layer) is one `SweepConfig`.

Every steered run goes through `Edits` (the vectors become `edits.add` edits inside the
vmap) and the one split of the forward (`Transformer.prefix` / `run_blocks`).
`sweep_edits` sweeps any K-stacked `Edits` (ablations, patches, additions) the same way,
the prefix before their first edited layer computed once; `run_edits` / `add_vectors`
return the logits of such K edited runs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from lens.core import edits as E
from lens.core.capture import last_real_index, resid_at
from lens.core.stats import kl_divergence
from lens.models.core.interventions import Edits, final_part
from lens.models.core.transformer import Transformer
from lens.models.runtime.progress import Progress


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


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """How a sweep runs and what it keeps (`sweep_vectors`, `sweep_edits`); checked at construction.

    last_only: evaluate only each prompt's last real token (no seq axis in the results).
    keep_logits: also return the steered logits.
    capture_layer: also return the residual stream leaving this block (`sweep_vectors` only).
    chunk_size: vectors (or edits) per compiled call; None = as many as fit `memory_budget`.
    memory_budget: bytes one chunk's tail may use (> 0), when chunk_size is None.
    mesh: a `jax.sharding.Mesh` sharding each chunk (`sweep_vectors` only; lens/core/sharding.py).
    progress: a tqdm bar over chunks (a bool or a `models.runtime.progress.Progress`).
    """

    last_only: bool = True
    keep_logits: bool = False
    capture_layer: int | None = None
    chunk_size: int | None = None
    memory_budget: float = 2**30
    mesh: "jax.sharding.Mesh | None" = None
    progress: bool | Progress = False  # the library default (models.runtime.progress)

    def __post_init__(self):
        object.__setattr__(self, "progress", Progress.of(self.progress))
        for name in ("last_only", "keep_logits"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"SweepConfig.{name} must be a bool; got {getattr(self, name)!r}")
        for name in ("chunk_size", "capture_layer"):
            v = getattr(self, name)
            low = 1 if name == "chunk_size" else 0
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low):
                raise ValueError(f"SweepConfig.{name} must be None or an int >= {low}; got {v!r}")
        if not (isinstance(self.memory_budget, (int, float, np.number)) and self.memory_budget > 0):
            raise ValueError(f"SweepConfig.memory_budget must be a number of bytes > 0; got {self.memory_budget!r}")


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


def _unembed(model, x, mask, last_only, edits=None):
    if last_only:
        x = x[last_real_index(mask)][None]
        edits = _final_at(edits, last_real_index(mask))
    logits, _ = model.unembed_resid(x, edits=edits)
    return logits[0] if last_only else logits


def _final_at(edits, index):
    """The final norm's edits at one position (those with S = seq are indexed)."""
    if edits is None or final_part(edits) is None:
        return edits
    f = final_part(edits)
    pick = lambda a: a if a is None or a.shape[0] == 1 else a[index][None]  # noqa: E731
    return Edits(final_scale_mix=pick(f.final_scale_mix), final_scale_source=pick(f.final_scale_source))


@eqx.filter_jit
def _prefix(model, tokens, mask, layers, last_only):
    """Entry streams of each steered layer [L, P, seq, d] and the unsteered logits."""

    def one(t, m):
        x, qpos, valid = model.prefix(t, m)
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


def _steered(model, start, x, t, m, e, blp, targets, last_only, keep_logits, capture_layer):
    """One edited run of one prompt from the stream `x` entering block `start` (e does
    nothing before it): KL to the unsteered log-probs `blp`, target deltas, logits, and the
    stream leaving block `capture_layer`."""
    n = model.config.n_layers
    qpos, valid = model.default_positions(t, m, None, None)
    act = None
    if start == n:  # edits of the final norm only
        pass
    elif capture_layer is not None and capture_layer >= start:
        x, _, _ = model.run_blocks(x, qpos, valid, start=start, stop=capture_layer + 1, edits=e)
        act = x
        if capture_layer + 1 < n:
            x, _, _ = model.run_blocks(x, qpos, valid, start=capture_layer + 1, edits=e)
    else:
        x, _, _ = model.run_blocks(x, qpos, valid, start=start, edits=e)
    logits = _unembed(model, x, m, last_only, e)
    logp = jax.nn.log_softmax(logits, axis=-1)
    kl = kl_divergence(logp, blp)
    delta = None if targets is None else (logp - blp)[..., targets]
    return kl, delta, logits if keep_logits else None, act


@eqx.filter_jit
def _tail(model, entries, tokens, mask, vectors, coeffs, positions, base_logits, targets,
          layers, last_only, keep_logits, capture_layer):
    """Steered tails for one chunk of vectors: every output [k, C, L, P, ...].  Each
    (vector, coefficient) becomes an `edits.add` edit inside the vmap."""
    base_logp = jax.nn.log_softmax(base_logits, axis=-1)
    seq = tokens.shape[1]

    outs = []
    for li, layer in enumerate(layers):
        def one(x, t, m, v, c, blp, layer=layer):
            e = E.add(model, v, layer, coeff=c, positions=positions, seq_len=seq)
            return _steered(model, layer, x, t, m, e, blp, targets, last_only, keep_logits,
                            capture_layer)

        f = jax.vmap(one, in_axes=(0, 0, 0, None, None, 0))  # prompts
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
    *,
    coeffs: Sequence[float] | Float[Array, " C"] = (1.0,),
    layers: int | Sequence[int] = 0,
    positions: int | Sequence[int] | None = None,
    targets: Sequence[int] | Int[Array, " T"] | None = None,
    attention_mask: Bool[Array, "P seq"] | None = None,
    config: SweepConfig = SweepConfig(),
) -> SweepResult:
    """Steer every prompt with every (vector, coefficient, layer) and measure the effect.

    Each vector times each coefficient is added to the residual stream entering each
    block in `layers`, at every position (or only `positions`), exactly as
    `Edits(resid_add=...)` would.  Returns a `SweepResult` of arrays [K, C, L, P, ...]:
    KL to the unsteered run, log-prob changes of `targets`, optionally the logits and the
    residual stream leaving block `capture_layer` ([.., seq, d_model]; for layers steered
    after it this is the unsteered stream).  attention_mask False marks padding.
    `config` (a `SweepConfig`): last_only evaluates only each prompt's last real token; K is
    chunked so one chunk's tail fits `memory_budget` bytes (or `chunk_size` vectors); `mesh`
    shards the chunk.
    """
    if not isinstance(config, SweepConfig):
        raise TypeError(f"config must be a SweepConfig; got {type(config).__name__}")
    last_only, keep_logits, capture_layer = config.last_only, config.keep_logits, config.capture_layer
    chunk_size, mesh = config.chunk_size, config.mesh
    tokens, mask = _prepare(model, prompts, attention_mask)
    P, seq = tokens.shape
    vectors = E.check_vectors(model, jnp.atleast_2d(jnp.asarray(vectors, jnp.float32)))
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [K, d_model]; got {vectors.shape}")
    layer_list = tuple(sorted(E.check_layers(model, layers)))
    pos = E.check_positions(positions, seq)
    pos = None if pos is None else tuple(pos)
    coeffs = jnp.atleast_1d(jnp.asarray(coeffs, jnp.float32))
    if not np.isfinite(np.asarray(coeffs)).all():
        raise ValueError("coeffs contain NaN/inf")
    tgt = _targets(model, targets)
    if capture_layer is not None:
        capture_layer = E.check_layers(model, capture_layer)[0]

    K = vectors.shape[0]
    if chunk_size is None:
        chunk_size = chunk_size_for(model, len(coeffs), len(layer_list), P, seq, last_only,
                                    keep_logits, capture_layer is not None, config.memory_budget)
    chunk = min(chunk_size, K)
    place = lambda name, a: a  # noqa: E731
    to_host = np.asarray
    if mesh is not None:
        from lens.core import sharding

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
    for i in config.progress.bar("sweep", iterable=range(n_chunks), unit="chunk"):
        v = vectors[i * chunk:(i + 1) * chunk]
        if v.shape[0] < chunk:
            v = jnp.concatenate([v, jnp.zeros((chunk - v.shape[0], v.shape[1]), v.dtype)])
        res = _tail(model, *args, place("vectors", v), coeffs, pos,
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
    return resid_at(model, tokens, layer + 1, mask)


# ------------------------------------------------------------------ general stacked edits
class EditsSweep(eqx.Module):
    """`sweep_edits` output, arrays indexed [K edits, P prompts, (seq,) ...] as in
    `SweepResult` without the coefficient and layer axes; `start` is the first edited
    layer (the prefix before it ran once)."""

    kl: Float[Array, "K P *seq"]
    logprob_delta: Float[Array, "K P *seq T"] | None
    logits: Float[Array, "K P *seq vocab"] | None
    base_logits: Float[Array, "P *seq vocab"]
    start: int = eqx.field(static=True)


@eqx.filter_jit
def _edits_tail(model, entry, tokens, mask, edits, base_logits, targets, start, last_only,
                keep_logits):
    base_logp = jax.nn.log_softmax(base_logits, axis=-1)

    def one(x, t, m, e, blp):
        return _steered(model, start, x, t, m, e, blp, targets, last_only, keep_logits, None)[:3]

    f = jax.vmap(one, in_axes=(0, 0, 0, None, 0))  # prompts
    return jax.vmap(f, in_axes=(None, None, None, 0, None))(entry, tokens, mask, edits, base_logp)


def sweep_edits(
    model: Transformer,
    prompts: Int[Array, "P seq"],
    edits: Edits,
    *,
    targets: Sequence[int] | Int[Array, " T"] | None = None,
    attention_mask: Bool[Array, "P seq"] | None = None,
    config: SweepConfig = SweepConfig(),
) -> EditsSweep:
    """Run every prompt under each of K stacked edits (`edits.stack_edits`: additions,
    ablations, patches, norm freezing, any mix) and measure the effect as `sweep_vectors`
    does: KL to the unedited run, log-prob changes of `targets`, optionally the logits.
    The blocks before the first edited layer run once per prompt; K is chunked (the last
    chunk padded with copies of edit 0, one compilation).  Position axes of the edits must
    be 1 or the prompts' (padded) length.  `config`: a `SweepConfig` without mesh or
    capture_layer (last_only, keep_logits, chunk_size, memory_budget, progress)."""
    if not isinstance(config, SweepConfig):
        raise TypeError(f"config must be a SweepConfig; got {type(config).__name__}")
    if config.mesh is not None or config.capture_layer is not None:
        raise ValueError("sweep_edits supports neither SweepConfig.mesh nor capture_layer (sweep_vectors does)")
    last_only, keep_logits, chunk_size = config.last_only, config.keep_logits, config.chunk_size
    tokens, mask = _prepare(model, prompts, attention_mask)
    P, seq = tokens.shape
    E.check_edits(model, edits, seq, batch_dims=1)
    start = E.first_edited_layer(model, edits)
    if start < 0:
        raise ValueError("sweep_edits needs stacked edits with at least one field set")
    tgt = _targets(model, targets)
    K = jax.tree.leaves(edits)[0].shape[0]
    if chunk_size is None:
        chunk_size = chunk_size_for(model, 1, 1, P, seq, last_only, keep_logits, False, config.memory_budget)
    chunk = min(chunk_size, K)
    entry, base_logits = _prefix(model, tokens, mask, (start,), last_only)
    entry = entry[0]
    outs = []
    for i in config.progress.bar("sweep", iterable=range(math.ceil(K / chunk)), unit="chunk"):
        e = jax.tree.map(lambda a: a[i * chunk:(i + 1) * chunk], edits)
        used = jax.tree.leaves(e)[0].shape[0]
        if used < chunk:
            e = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[:1], chunk - used, 0)]), e)
        res = _edits_tail(model, entry, tokens, mask, e, base_logits, tgt, start, last_only,
                          keep_logits)
        outs.append(tuple(None if a is None else np.asarray(a)[:used] for a in res))
    cat = lambda i: None if outs[0][i] is None else jnp.asarray(np.concatenate([o[i] for o in outs]))  # noqa: E731
    return EditsSweep(cat(0), cat(1), cat(2), base_logits, start)


def _targets(model, targets):
    if targets is None:
        return None
    tgt = jnp.atleast_1d(jnp.asarray(targets, jnp.int32))
    if np.asarray(tgt).min() < 0 or np.asarray(tgt).max() >= model.config.vocab_size:
        raise ValueError("target token id out of range")
    return tgt


def run_edits(
    model: Transformer,
    tokens: Int[Array, " seq"] | Int[Array, "P seq"],
    edits: Edits,
    attention_mask: Bool[Array, "*P seq"] | None = None,
) -> Float[Array, "K *P seq vocab"]:
    """Logits of K edited forwards (edits stacked with a leading [K] axis, `stack_edits`),
    computing the layers before the first edited one once for all K (`sweep_edits`)."""
    chunk = jax.tree.leaves(edits)[0].shape[0] if jax.tree.leaves(edits) else 1
    res = sweep_edits(model, tokens, edits, attention_mask=attention_mask,
                      config=SweepConfig(last_only=False, keep_logits=True, chunk_size=chunk, progress=False))
    return res.logits[:, 0] if np.ndim(tokens) == 1 else res.logits


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
