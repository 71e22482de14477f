"""Greedy and sampled generation with the pure KV cache, batched with left padding.

    from .generate import GenerationConfig, chat_prompt, generate
    result = generate(model, [ids_a, ids_b], GenerationConfig(max_new_tokens=32))   # greedy
    result = generate(model, ids, GenerationConfig(64, temperature=0.7, top_p=0.9, seed=1))  # sampled
    result.tokens[i]      # the new ids of prompt i, cut after its first EOS (inclusive)
    result.sequences[i]   # prompt i followed by its new ids

How it runs (two big compiled calls, whatever the number of steps; the forward both run is
`models.generation.decode`: per-layer weight buffers and a per-layer cache, see docs/models.md):
  1. prefill: prompts are LEFT-padded into one [batch, prompt_len] array with a mask;
     `jax.vmap` over the batch of the single-sequence `models.generation.decode.prefill` (the
     blocks scanned, as `model.forward(..., kv_cache=...)` does) fills a cache of `prompt_len + max_new_tokens` slots and yields the first new token
     (prompt_len is the longest prompt rounded up to a multiple of 8, so prompts of nearby
     lengths share one compilation; extra left padding changes no result).
     Padding sits in cache slots with position -1, and positions count real tokens only
     (`cumsum(mask) - 1`), so a padded prompt is computed exactly as it is alone.
  2. decode: ONE jit-compiled `lax.while_loop`, one token per step
     (`models.generation.decode.forward_cached`, layers unrolled), the cache carried through the
     loop and donated (updated in place).  It stops early once every row has emitted
     an EOS.  With `progress` on (a `models.runtime.progress.Progress` or True) the same
     compiled loop runs in chunks of `Progress.chunk` steps so a
     tqdm bar can advance between them (no retracing: the chunk end is a traced value).

Sampling: temperature == 0 is greedy (argmax, first index on ties, as transformers).
Otherwise logits / temperature, then top-k, then top-p (nucleus: the smallest set of
most likely tokens whose mass reaches top_p), in transformers' order, then a categorical
draw.  Row i at step t uses the key fold_in(fold_in(key(seed), row_ids[i]), t) (row_ids
default 0, 1, ...): deterministic for a seed, different rows differ, and row i of a batch
draws exactly as prompt i alone would.

Edits (steering): `edits` is a `models.Edits` whose position axes S are 1, so each field
applies at EVERY position it is given.  steer_prompt: apply it during the prefill (every
prompt token, hence also to the logits that choose the first new token).  steer_generated:
apply it to every generated token fed back in (steps 2..n).  With steer_prompt=False the
first new token comes from the unsteered prompt.  `edits_batched=True` means every field
has an extra leading [batch] axis (one intervention per prompt, e.g. K steering vectors on
K copies of a prompt); otherwise one `Edits` is shared by the whole batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..core.interventions import Edits, check_edits
from .decode import LayerCache, decode_weights, forward_cached, prefill
from ..core.transformer import pad_batch
from ..runtime.progress import Progress

# Padded prompt lengths are rounded up to a multiple of this (fewer recompilations).
_PAD_MULTIPLE = 8

@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """What to generate: length, sampling rule, stop and pad ids (checked at construction).

    max_new_tokens: new tokens per prompt, an int >= 1 (fewer when a row stops on an EOS).
    temperature: 0 = greedy (argmax); > 0 samples (finite).
    top_k (int >= 1) / top_p (in (0, 1]): restrict sampling; ignored when greedy.
    seed: sampling is a deterministic function of (seed, row, step).
    eos_token_ids: stop ids; None = the model config's `eos_token_ids`; () = never stop
        (an int or any sequence of ints is stored as a tuple).
    pad_token_id: id written into left padding and after EOS (never attended to, never
        returned); None = config pad id, else the first EOS, else 0.
    return_logits: also return the float32 logits that chose every new token.

    The checks against a model (context length, id ranges) run in `generate`.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    eos_token_ids: tuple[int, ...] | None = None
    pad_token_id: int | None = None
    return_logits: bool = False

    def __post_init__(self):
        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1; got {self.max_new_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float, np.number)) or not (
            np.isfinite(self.temperature) and self.temperature >= 0
        ):
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy); got {self.temperature!r}")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None; got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None; got {self.top_p}")
        if not is_int(self.seed):
            raise ValueError(f"seed must be an int; got {self.seed!r}")
        if self.eos_token_ids is not None:
            ids = (self.eos_token_ids,) if is_int(self.eos_token_ids) else tuple(self.eos_token_ids)
            if not all(is_int(e) for e in ids):
                raise ValueError(f"eos_token_ids must be ints; got {self.eos_token_ids!r}")
            object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in ids))
        if self.pad_token_id is not None and not is_int(self.pad_token_id):
            raise ValueError(f"pad_token_id must be an int or None; got {self.pad_token_id!r}")


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What `generate` returns; one entry per prompt, in the order given.

    tokens:    new token ids, cut after the first EOS (which is kept).
    sequences: prompt + tokens.
    finished:  whether the row stopped on an EOS (False: it ran to max_new_tokens).
    logits:    only with return_logits=True: float32 [len(tokens[i]), vocab] per prompt,
               the logits that chose each new token (before temperature / top-k / top-p).
    pad_token_id: the id this generation padded with (written after EOS in batches).
    """

    tokens: list[list[int]]
    sequences: list[list[int]]
    finished: list[bool]
    logits: list[np.ndarray] | None = None
    pad_token_id: int | None = None


@dataclasses.dataclass(frozen=True)
class _Sampler:
    """The static part of the sampling rule (each combination compiles once)."""

    greedy: bool
    top_k: int | None
    use_top_p: bool


class _State(eqx.Module):
    """Everything the decode loop carries, batched over rows."""

    cache: LayerCache  # every leaf has a leading [batch] axis
    last: Int[Array, " batch"]  # the token to feed next
    done: Bool[Array, " batch"]  # row has emitted an EOS
    step: Int[Array, ""]  # new tokens produced so far
    out: Int[Array, "batch new"]
    logits: Float[Array, "batch new vocab"] | None
    row_keys: PRNGKeyArray  # [batch]


# --------------------------------------------------------------------------- public API
def generate(
    model,
    prompts,
    config: GenerationConfig,
    *,
    edits: Edits | None = None,
    edits_batched: bool = False,
    steer_prompt: bool = True,
    steer_generated: bool = True,
    row_ids: Sequence[int] | None = None,
    progress: bool | Progress = False,
) -> GenerationResult:
    """Generate up to `config.max_new_tokens` tokens after each prompt (see the module docstring).

    prompts: one prompt (a list / 1-D array of token ids) or a list of them, of any
        lengths; a batch is left-padded internally.  The result always holds a list per
        prompt, so a single prompt's new ids are `result.tokens[0]`.
    config: a `GenerationConfig` (length, sampling, stop / pad ids, return_logits).
    edits / edits_batched / steer_prompt / steer_generated: steering, see module docstring.
    row_ids: the index each row draws its random numbers with (default 0, 1, ...): row i
        samples with the keys of row row_ids[i], so e.g. K steered copies of P prompts can
        each draw exactly as the P prompts alone would (`lens.steering.vectors.generate_with_vectors`).
    progress: a tqdm bar (`Progress`, or a bool), decoding in chunks of `progress.chunk` steps.
    """
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a GenerationConfig; got {type(config).__name__}")
    progress = Progress.of(progress)
    gen, config = config, model.config  # the GenerationConfig; below, `config` is the model's
    max_new_tokens, temperature, top_k, top_p = gen.max_new_tokens, gen.temperature, gen.top_k, gen.top_p
    return_logits = gen.return_logits
    rows = _as_prompts(prompts, config.vocab_size)
    _check_length(config, rows, max_new_tokens)
    if edits is not None:
        # every position axis must be 1 here: the edit applies at every position
        check_edits(edits, config, seq_len=None, batch_dims=int(edits_batched),
                    batch=len(rows) if edits_batched else None)
    eos = list(config.eos_token_ids) if gen.eos_token_ids is None else list(gen.eos_token_ids)
    pad = _pad_id(gen.pad_token_id, config, eos)
    if row_ids is not None and np.shape(row_ids) != (len(rows),):
        raise ValueError(f"row_ids must hold one int per prompt ({len(rows)}); got shape {np.shape(row_ids)}")

    batch, longest = len(rows), max(len(r) for r in rows)
    # Round the padded length up so prompts of nearby lengths reuse one compilation.
    prompt_len = -(-longest // _PAD_MULTIPLE) * _PAD_MULTIPLE
    prompt_len = min(prompt_len, config.max_seq_len - max_new_tokens)
    tokens, mask = pad_batch(rows, pad, side="left", length=prompt_len)

    sampler = _Sampler(
        greedy=temperature == 0,
        top_k=None if top_k is None or top_k >= config.vocab_size else int(top_k),
        use_top_p=top_p is not None and top_p < 1.0,
    )
    params = (
        jnp.asarray(temperature if temperature > 0 else 1.0, jnp.float32),
        jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
        _stop_ids(eos),
        jnp.asarray(pad, jnp.int32),
    )
    edits_axis = 0 if edits_batched else None
    prompt_edits = edits if steer_prompt else None
    decode_edits = edits if steer_generated else None

    weights = decode_weights(model)
    logits, cache = _prefill(
        model, jnp.asarray(tokens), jnp.asarray(mask), prompt_edits, edits_axis,
        prompt_len + max_new_tokens,
    )
    key = jax.random.key(gen.seed)
    ids = jnp.arange(batch, dtype=jnp.int32) if row_ids is None else jnp.asarray(row_ids, jnp.int32)
    state = _start((max_new_tokens, return_logits, sampler, params, key, ids), logits, cache)
    fixed = (model, weights, decode_edits, edits_axis, sampler, params)
    if progress.enabled:
        bar = progress.bar("generate", total=max_new_tokens, unit="tok")
        bar.update(1)
        done_steps = 1
        while done_steps < max_new_tokens and not bool(state.done.all()):
            stop = min(done_steps + progress.chunk, max_new_tokens)
            state = _decode(fixed, state, jnp.asarray(stop))
            bar.update(int(state.step) - done_steps)
            done_steps = int(state.step)
        bar.close()
    else:
        state = _decode(fixed, state, jnp.asarray(max_new_tokens))
    return dataclasses.replace(_collect(rows, state, set(eos)), pad_token_id=pad)


def chat_prompt(tokenizer, user_message: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat, ending with the assistant's generation prompt.

    Uses the tokenizer's chat template, `tokenizer.apply_chat_template(messages,
    add_generation_prompt=True)`: our `models.io.tokenizer.Tokenizer` returns the text, which
    is then encoded without adding special tokens again (the template writes them); a
    transformers tokenizer that returns ids directly is accepted too.
    """
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": user_message})
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if isinstance(rendered, str):
        ids = tokenizer.encode(rendered, add_special_tokens=False)
    elif hasattr(rendered, "keys") and "input_ids" in rendered:
        ids = rendered["input_ids"]
    else:
        ids = rendered
    ids = getattr(ids, "ids", ids)  # a `tokenizers.Encoding`
    return [int(i) for i in ids]


# ----------------------------------------------------------------------- validation
def _as_prompts(prompts, vocab: int) -> list[list[int]]:
    """A single prompt or a batch of them -> list of non-empty int lists, range-checked."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts must be token ids, not text (encode it with the tokenizer)")
    if hasattr(prompts, "ndim"):  # numpy / jax array
        arr = np.asarray(prompts)
        if arr.ndim not in (1, 2):
            raise ValueError(f"prompt array must be [seq] or [batch, seq]; got shape {arr.shape}")
        prompts = arr.tolist() if arr.ndim == 2 else [arr.tolist()]
    else:
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if all(isinstance(t, (int, np.integer)) for t in prompts):
            prompts = [prompts]
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)):
            raise TypeError(f"prompt {i} is text; pass token ids")
        arr = np.asarray(p)
        if arr.ndim != 1:
            raise ValueError(f"prompt {i} must be a flat list of token ids; got {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"prompt {i} is empty (generation needs a token to condition on)")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"prompt {i} must hold integer token ids; got dtype {arr.dtype}")
        if arr.min() < 0 or arr.max() >= vocab:
            raise ValueError(
                f"prompt {i} has a token id out of range [0, {vocab}): "
                f"min {arr.min()}, max {arr.max()}"
            )
        rows.append([int(t) for t in arr])
    return rows


def _check_length(config, rows, max_new_tokens):
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > config.max_seq_len:
        raise ValueError(
            f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context of {config.max_seq_len}"
        )


def _stop_ids(eos: list[int]) -> Int[Array, " n"]:
    """EOS ids padded with -1 (never emitted) to a multiple of 4, at least 4: changing
    the stop ids then rarely changes a shape, so it rarely recompiles."""
    size = max(4, -(-len(eos) // 4) * 4)
    return jnp.asarray(eos + [-1] * (size - len(eos)), jnp.int32)


def _pad_id(pad_token_id, config, eos) -> int:
    for candidate in (pad_token_id, config.pad_token_id, eos[0] if eos else None, 0):
        if candidate is not None:
            if not 0 <= candidate < config.vocab_size:
                raise ValueError(f"pad_token_id {candidate} out of range [0, {config.vocab_size})")
            return int(candidate)
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------- the compiled parts
def _sample(
    logits: Float[Array, " vocab"],
    key: PRNGKeyArray,
    temperature: Float[Array, ""],
    top_p: Float[Array, ""],
    sampler: _Sampler,
) -> Int[Array, ""]:
    """One token from one row's logits (greedy, or temperature -> top-k -> top-p)."""
    if sampler.greedy:
        return jnp.argmax(logits).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if sampler.top_k is not None:
        kth = jax.lax.top_k(logits, sampler.top_k)[0][-1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampler.use_top_p:
        # Keep the most likely tokens until their mass reaches top_p (the first always).
        sorted_logits = jnp.sort(logits)[::-1]
        probs = jax.nn.softmax(sorted_logits)
        mass_before = jnp.cumsum(probs) - probs
        n_keep = jnp.sum(mass_before < top_p)
        threshold = sorted_logits[jnp.maximum(n_keep - 1, 0)]
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def _choose(state: _State, logits, sampler, params) -> _State:
    """Pick each row's next token from `logits` [batch, vocab] and record it at `step`."""
    temperature, top_p, eos, pad = params
    keys = jax.vmap(lambda k: jax.random.fold_in(k, state.step))(state.row_keys)
    token = jax.vmap(_sample, in_axes=(0, 0, None, None, None))(
        logits, keys, temperature, top_p, sampler
    )
    token = jnp.where(state.done, pad, token)
    done = state.done | (token[:, None] == eos[None, :]).any(-1)
    out = jax.lax.dynamic_update_slice(state.out, token[:, None], (0, state.step))
    saved = state.logits
    if saved is not None:
        saved = jax.lax.dynamic_update_slice(
            saved, logits[:, None].astype(saved.dtype), (0, state.step, 0)
        )
    return _State(state.cache, token, done, state.step + 1, out, saved, state.row_keys)


@eqx.filter_jit
def _prefill(model, tokens, mask, edits, edits_axis, slots: int):
    """Run the left-padded prompts into fresh caches: (last-position logits, caches).
    Left padding puts every prompt's last real token at the end: only it is unembedded."""

    def one(tokens, mask, edits):
        return prefill(model, tokens, mask, slots, edits)

    return jax.vmap(one, in_axes=(0, 0, edits_axis))(tokens, mask, edits)


@eqx.filter_jit(donate="all-except-first")
def _start(fixed, logits, cache) -> _State:
    """The decode loop's initial state, with the first new token chosen from `logits`.

    Kept apart from `_prefill` so that a new sampling rule recompiles only small pieces;
    `logits` and `cache` are donated (the cache moves into the state without a copy)."""
    max_new, return_logits, sampler, params, key, row_ids = fixed
    batch, vocab = logits.shape
    saved = jnp.zeros((batch, max_new, vocab), jnp.float32) if return_logits else None
    state = _State(
        cache=cache,
        last=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool),
        step=jnp.zeros((), jnp.int32),
        out=jnp.zeros((batch, max_new), jnp.int32),
        logits=saved,
        row_keys=jax.vmap(lambda i: jax.random.fold_in(key, i))(row_ids),
    )
    return _choose(state, logits, sampler, params)


@eqx.filter_jit(donate="all-except-first")
def _decode(fixed, state: _State, stop) -> _State:
    """Decode one token per step until `stop` tokens exist or every row is done.  The
    state (with the cache) is donated: the loop updates the cache buffers in place."""
    model, weights, edits, edits_axis, sampler, params = fixed

    def one(cache, token, edits):
        return forward_cached(model, weights, token[None], jnp.ones((1,), bool), cache, edits)

    def body(s: _State) -> _State:
        logits, cache = jax.vmap(one, in_axes=(0, 0, edits_axis))(s.cache, s.last, edits)
        return _choose(eqx.tree_at(lambda t: t.cache, s, cache), logits, sampler, params)

    def cond(s: _State):
        return (s.step < jnp.minimum(stop, s.out.shape[1])) & ~jnp.all(s.done)

    return jax.lax.while_loop(cond, body, state)


def _collect(rows, state: _State, eos: set[int]) -> GenerationResult:
    out = np.asarray(state.out)
    n_steps = int(state.step)
    all_logits = None if state.logits is None else np.asarray(state.logits)
    tokens, sequences, finished, logits = [], [], [], []
    for i, prompt in enumerate(rows):
        new = out[i, :n_steps].tolist()
        stop = next((j + 1 for j, t in enumerate(new) if t in eos), None)
        finished.append(stop is not None)
        new = new if stop is None else new[:stop]
        tokens.append(new)
        sequences.append(prompt + new)
        if all_logits is not None:
            logits.append(all_logits[i, : len(new)])
    return GenerationResult(tokens, sequences, finished, logits if all_logits is not None else None)
