"""Steering vectors from contrastive prompts, and their storage.

All three methods read the residual stream entering block `layer` (resid_pre[layer], the
site where `edits.add` / `sweep_vectors` add vectors), running only the blocks before it.

- `actadd`: ActAdd (Turner et al. 2023): activations of prompt A minus prompt B at one
  position (default the last token), at several positions ([n_pos, d_model]), or the mean
  over positions.
- `mean_difference`: CAA (Rimsky et al. 2024) / difference of means over N contrastive
  pairs.  reduce="last" (default) uses each prompt's last real token, as CAA does with the
  answer letter: the token where the behaviour is decided, and not diluted by the shared
  prefix; reduce="mean" averages each prompt over its real (unpadded) tokens.
- `pca_of_differences`: principal components of the N per-pair differences (RepE),
  centred, each sign-aligned with the mean difference; also returns the explained
  variance ratios.

Vectors are saved with safetensors (never pickle) plus metadata:

    save_vectors("love.safetensors", v, {"model": "smollm2-135m-instruct", "layer": 15,
                 "site": "resid_pre", "method": "caa"})
    v, meta = load_vectors("love.safetensors")   # meta["norm"]: the vectors' L2 norms
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from lens.capture import last_real_index, resid_at
from models.transformer import Transformer

REQUIRED_METADATA = ("model", "layer", "site", "method")


def _batch(tokens, mask):
    t = np.asarray(tokens)
    t = t[None] if t.ndim == 1 else t
    m = np.ones(t.shape, bool) if mask is None else np.asarray(mask, bool).reshape(t.shape)
    if not m.any(axis=1).all():
        raise ValueError("a prompt has no real tokens (attention_mask all False)")
    return t, m


def _reduce(x: Float[Array, "N seq d"], mask: np.ndarray, reduce: str) -> Float[Array, "N d"]:
    if reduce == "last":
        return x[jnp.arange(x.shape[0]), last_real_index(mask)]
    if reduce == "mean":
        w = jnp.asarray(mask, x.dtype)[..., None]
        return (x * w).sum(1) / w.sum(1)
    raise ValueError(f"reduce must be 'last' or 'mean'; got {reduce!r}")


def actadd(
    model: Transformer,
    tokens_a: Int[Array, " seq_a"],
    tokens_b: Int[Array, " seq_b"],
    layer: int,
    position: int | Sequence[int] | str = -1,
) -> Float[Array, "d_model"] | Float[Array, "n_pos d_model"]:
    """ActAdd: resid_pre[layer](A) - resid_pre[layer](B).

    position: an int (default -1, the last token) -> [d_model]; a list of positions ->
    [n_pos, d_model] (the original ActAdd adds these to the first n_pos positions; the
    prompts must then have the same length); "mean" -> the difference of the two prompts'
    mean activations over positions.
    """
    xa = resid_at(model, tokens_a, layer)
    xb = resid_at(model, tokens_b, layer)
    if isinstance(position, str):
        if position != "mean":
            raise ValueError(f"position must be an int, a list of ints or 'mean'; got {position!r}")
        return xa.mean(0) - xb.mean(0)
    if np.ndim(position) == 0:
        for n in (xa.shape[0], xb.shape[0]):
            if not -n <= int(position) < n:
                raise ValueError(f"position {position} is beyond a sequence of {n} tokens")
        return xa[int(position)] - xb[int(position)]
    pos = np.asarray(position)
    if xa.shape[0] != xb.shape[0]:
        raise ValueError("per-position ActAdd needs prompts of the same length (pad them)")
    if pos.min() < -xa.shape[0] or pos.max() >= xa.shape[0]:
        raise ValueError(f"positions {pos} beyond a sequence of {xa.shape[0]} tokens")
    return xa[pos] - xb[pos]


def pair_differences(
    model: Transformer,
    positive: Int[Array, "N seq"],
    negative: Int[Array, "N seq"],
    layer: int,
    positive_mask: Bool[Array, "N seq"] | None = None,
    negative_mask: Bool[Array, "N seq"] | None = None,
    reduce: str = "last",
) -> Float[Array, "N d_model"]:
    """Per-pair differences positive_i - negative_i of the reduced resid_pre[layer]."""
    tp, mp = _batch(positive, positive_mask)
    tn, mn = _batch(negative, negative_mask)
    if tp.shape[0] != tn.shape[0]:
        raise ValueError(f"{tp.shape[0]} positive prompts vs {tn.shape[0]} negative ones")
    xp = _reduce(resid_at(model, tp, layer, mp), mp, reduce)
    xn = _reduce(resid_at(model, tn, layer, mn), mn, reduce)
    return xp - xn


def mean_difference(
    model: Transformer,
    positive: Int[Array, "N seq"],
    negative: Int[Array, "N seq"],
    layer: int,
    positive_mask: Bool[Array, "N seq"] | None = None,
    negative_mask: Bool[Array, "N seq"] | None = None,
    reduce: str = "last",
) -> Float[Array, "d_model"]:
    """CAA / mean difference: mean over pairs of (positive - negative) at resid_pre[layer]
    (reduce "last": each prompt's last real token; "mean": its mean over real tokens)."""
    return pair_differences(model, positive, negative, layer, positive_mask, negative_mask,
                            reduce).mean(0)


def pca_of_differences(
    model: Transformer,
    positive: Int[Array, "N seq"],
    negative: Int[Array, "N seq"],
    layer: int,
    n_components: int = 1,
    positive_mask: Bool[Array, "N seq"] | None = None,
    negative_mask: Bool[Array, "N seq"] | None = None,
    reduce: str = "last",
) -> tuple[Float[Array, "n_components d_model"], Float[Array, " n_components"]]:
    """Unit principal directions of the centred per-pair differences, each signed so the
    mean difference projects positively, and their explained-variance ratios."""
    diffs = pair_differences(model, positive, negative, layer, positive_mask, negative_mask,
                             reduce)
    n = diffs.shape[0]
    if not 1 <= n_components <= min(n, diffs.shape[1]):
        raise ValueError(f"n_components={n_components} needs 1 <= it <= min(N={n}, d_model)")
    centred = diffs - diffs.mean(0)
    _, s, vt = jnp.linalg.svd(centred, full_matrices=False)
    comps = vt[:n_components]
    sign = jnp.sign(comps @ diffs.mean(0))
    comps = comps * jnp.where(sign == 0, 1.0, sign)[:, None]
    var = s**2
    return comps, (var / jnp.maximum(var.sum(), 1e-30))[:n_components]


def save_vectors(
    path: str | Path,
    vectors: Float[Array, "*n d_model"],
    metadata: dict,
) -> None:
    """Write vectors to a .safetensors file (tensor "vectors") with metadata: model, layer,
    site, method are required; "norm" (the L2 norm of each vector) is added; any other
    JSON-serialisable keys are kept."""
    v = np.asarray(vectors, np.float32)
    if v.ndim not in (1, 2):
        raise ValueError(f"vectors must be [d_model] or [n, d_model]; got {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("vectors contain NaN/inf")
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"metadata lacks {missing} (required: {list(REQUIRED_METADATA)})")
    from safetensors.numpy import save_file

    meta = {k: json.dumps(val) for k, val in metadata.items()}
    meta["norm"] = json.dumps(np.linalg.norm(v, axis=-1).tolist())
    save_file({"vectors": np.ascontiguousarray(v)}, str(path), metadata=meta)


def load_vectors(path: str | Path) -> tuple[Float[np.ndarray, "*n d_model"], dict]:
    """(vectors, metadata) from a file written by `save_vectors` (safetensors only)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path.name}: steering vectors are stored as .safetensors only")
    with safe_open(str(path), framework="numpy") as f:
        if "vectors" not in f.keys():
            raise ValueError(f"{path.name} holds no 'vectors' tensor")
        v = f.get_tensor("vectors")
        raw = f.metadata() or {}
    meta = {k: json.loads(val) for k, val in raw.items()}
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ValueError(f"{path.name}: metadata lacks {missing}")
    return v, meta


# ------------------------------------------------------------------ steered generation
def generate_with_vectors(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    vectors: Float[Array, "K d_model"],
    layer: int,
    max_new_tokens: int,
    coeff: float = 1.0,
    **sampling,
) -> Int[np.ndarray, "K P max_new_tokens"]:
    """Generate from every prompt under each of K steering vectors at once.

    Vector k times `coeff` is added to the residual stream entering block `layer` at every
    prompt and generated position (`edits.add`); the K x P rows (vector-major) run as ONE
    `models.generate.generate` call with per-row (vmapped) edits, so one compiled prefill
    and decode serve them all.  Row (k, p) equals a separate `generate(model, prompts[p],
    edits=edits.add(model, vectors[k], layer, coeff))` (tested).  `sampling`: generate's
    keyword arguments (temperature, top_k, top_p, seed, eos_token_ids, ...).  Returns int32
    [K, P, max_new_tokens]: each row's new tokens, -1 after its EOS (kept) or where
    decoding stopped early."""
    from lens import edits as E
    from models.generate import generate

    vectors = E.check_vectors(model, np.atleast_2d(np.asarray(vectors, np.float32)))
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [K, d_model]; got {vectors.shape}")
    E.check_layers(model, layer)
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts given")
    K, P = vectors.shape[0], len(prompts)
    stacked = E.stack_edits([E.add(model, v, layer, coeff) for v in vectors])  # [K, ...]
    per_row = jax.tree.map(lambda a: jnp.repeat(a, P, axis=0), stacked)  # [K * P, ...]
    rows = [p for _ in range(K) for p in prompts]
    res = generate(model, rows, max_new_tokens, edits=per_row, edits_batched=True, **sampling)
    out = np.full((K * P, max_new_tokens), -1, np.int32)
    for i, toks in enumerate(res.tokens):
        out[i, : len(toks)] = toks
    return out.reshape(K, P, max_new_tokens)


def reply_mean_difference(
    model: Transformer,
    prompts_a: Sequence[Sequence[int]],
    prompts_b: Sequence[Sequence[int]],
    layer: int,
    n_tokens: int,
) -> Float[np.ndarray, "d_model"]:
    """CAA over the model's OWN replies ("reply CAA"): each prompt's greedy reply of
    `n_tokens` is appended and resid_pre[layer] averaged over the positions that PREDICT
    the reply (the last prompt token and the first n_tokens - 1 reply tokens); the mean
    over prompts a minus the mean over prompts b.  With code requests vs prose requests
    this is the "I am starting to write code" state, which steers far better than CAA at
    the last prompt token alone (the main job's calibration table)."""
    from lens.capture import pad_prompts
    from models.generate import generate

    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1; got {n_tokens}")

    def reply_resid(prompts):
        prompts = [list(p) for p in prompts]
        replies = generate(model, prompts, n_tokens, eos_token_ids=[]).tokens
        toks, mask = pad_prompts([p + list(r) for p, r in zip(prompts, replies)])
        x = np.asarray(resid_at(model, toks, layer, mask))
        return np.stack([x[i, len(p) - 1: len(p) - 1 + n_tokens].mean(0) for i, p in enumerate(prompts)])

    return reply_resid(prompts_a).mean(0) - reply_resid(prompts_b).mean(0)
