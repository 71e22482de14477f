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

Other named arrays of a run (losses, a base vector) can travel in the same file:
`save_vectors(..., extras={"losses": L})`, read back with `load_extras`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from lens.core.capture import last_real_index, resid_at
from lens.models.core.transformer import Transformer
from lens.models.generation.generate import GenerationConfig
from lens.models.runtime.progress import Progress
from lens.models.core.ranges import check_index, position_context, range_error

REQUIRED_METADATA = ("model", "layer", "site", "method")


def _batch(tokens, mask, tokenizer=None):
    if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str)):
        if tokenizer is None:
            raise TypeError("prompts given as text need tokenizer=tok (or pass int32 token arrays)")
        if mask is not None:
            raise ValueError("a mask is built from text prompts; pass no mask with them")
        batch = tokenizer.to_batch([tokens] if isinstance(tokens, str) else list(tokens))
        return np.asarray(batch.tokens), np.asarray(batch.mask)
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
            check_index("position", position, n, negative=True, context=position_context(n))
        return xa[int(position)] - xb[int(position)]
    pos = np.asarray(position)
    if xa.shape[0] != xb.shape[0]:
        raise ValueError("per-position ActAdd needs prompts of the same length (pad them)")
    if pos.min() < -xa.shape[0] or pos.max() >= xa.shape[0]:
        raise range_error("positions", pos, -xa.shape[0], xa.shape[0], position_context(xa.shape[0]))
    return xa[pos] - xb[pos]


def pair_differences(
    model: Transformer,
    positive: Int[Array, "N seq"],
    negative: Int[Array, "N seq"],
    layer: int,
    positive_mask: Bool[Array, "N seq"] | None = None,
    negative_mask: Bool[Array, "N seq"] | None = None,
    reduce: str = "last",
    tokenizer=None,
) -> Float[Array, "N d_model"]:
    """Per-pair differences positive_i - negative_i of the reduced resid_pre[layer].
    Prompts are int32 token arrays, or lists of texts with `tokenizer` (right-padded, masked)."""
    tp, mp = _batch(positive, positive_mask, tokenizer)
    tn, mn = _batch(negative, negative_mask, tokenizer)
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
    tokenizer=None,
) -> Float[Array, "d_model"]:
    """CAA / mean difference: mean over pairs of (positive - negative) at resid_pre[layer]
    (reduce "last": each prompt's last real token; "mean": its mean over real tokens).
    Prompts are int32 token arrays, or lists of texts with `tokenizer`:
    `mean_difference(model, ["I love it"], ["I hate it"], 6, tokenizer=tok)`."""
    return pair_differences(model, positive, negative, layer, positive_mask, negative_mask,
                            reduce, tokenizer).mean(0)


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
    extras: dict[str, np.ndarray] | None = None,
) -> None:
    """Write vectors to a .safetensors file (tensor "vectors") with metadata: model, layer,
    site, method are required; "norm" (the L2 norm of each vector) is added; any other
    JSON-serialisable keys are kept (stored as JSON, read back as the same values).

    extras: other named float arrays kept in the same file (a run's losses, the base vector
    its vectors were made orthogonal to, controls), read back by `load_extras`.  The file
    is written to a temporary name and renamed, so a killed writer never leaves half a
    file (checkpoints are written this way)."""
    v = np.asarray(vectors, np.float32)
    if v.ndim not in (1, 2):
        raise ValueError(f"vectors must be [d_model] or [n, d_model]; got {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("vectors contain NaN/inf")
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"metadata lacks {missing} (required: {list(REQUIRED_METADATA)})")
    extras = dict(extras or {})
    if "vectors" in extras:
        raise ValueError("an extra tensor cannot be named 'vectors' (that name holds the vectors)")
    from safetensors.numpy import save_file

    meta = {k: json.dumps(val) for k, val in metadata.items()}
    meta["norm"] = json.dumps(np.linalg.norm(v, axis=-1).tolist())
    tensors = {"vectors": np.ascontiguousarray(v)}
    tensors |= {k: np.ascontiguousarray(a, np.float32) for k, a in extras.items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def _read(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor and the raw metadata of a vector file, after checking it is one."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path.name}: steering vectors are stored as .safetensors only")
    with safe_open(str(path), framework="numpy") as f:
        if "vectors" not in f.keys():
            raise ValueError(f"{path.name} holds no 'vectors' tensor (not written by lens.steering.vectors.save_vectors)")
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_vectors(path: str | Path) -> tuple[Float[np.ndarray, "*n d_model"], dict]:
    """(vectors, metadata) from a file written by `save_vectors` (safetensors only)."""
    tensors, raw = _read(path)
    try:
        meta = {k: json.loads(val) for k, val in raw.items()}
    except json.JSONDecodeError as e:
        raise ValueError(f"{Path(path).name}: metadata is not JSON ({e}); not written by save_vectors") from e
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ValueError(f"{Path(path).name}: metadata lacks {missing}")
    return tensors["vectors"], meta


def load_extras(path: str | Path) -> dict[str, np.ndarray]:
    """The extra tensors `save_vectors(..., extras=...)` stored next to the vectors."""
    tensors, _ = _read(path)
    return {k: v for k, v in tensors.items() if k != "vectors"}


# ------------------------------------------------------------------ steered generation
def generate_with_vectors(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    vectors: Float[Array, "K d_model"],
    layer: int,
    config: GenerationConfig,
    *,
    coeff: float = 1.0,
    vectors_per_call: int | None = None,
    memory_budget: float = 2**30,
    progress: bool | Progress = False,
) -> Int[np.ndarray, "K P max_new_tokens"]:
    """Generate from every prompt under each of K steering vectors at once.

    Vector k times `coeff` is added to the residual stream entering block `layer` at every
    prompt and generated position (`edits.add`); the K x P rows (vector-major) run as ONE
    `models.generation.generate.generate` call with per-row (vmapped) edits, so one compiled prefill
    and decode serve them all.  Row (k, p) draws its random numbers as prompt p does (the
    `row_ids` of generate), so it equals a separate `generate(model, prompts, config,
    edits=edits.add(model, vectors[k], layer, coeff))` row p token for token, greedy or
    sampled with the same seed (tested), however the vectors are chunked.  `config`:
    generate's `GenerationConfig` (length, sampling, stop / pad ids; return_logits must be off).

    Returns int32 [K, P, max_new_tokens]: each row's new tokens, its EOS kept, and the
    generation's pad id (pad_token_id, else the model's pad id, else its first EOS) after
    it; `new_token_lists` cuts the rows back to lists.

    vectors_per_call: vectors per compiled call (calls of exactly that many x P rows, the
    last one padded with zero vectors, so every call of a program reuses one compiled
    prefill/decode).  Default: as many as fit `memory_budget` bytes of cache and
    activations (`vectors_per_call_for`).  progress: a tqdm bar per call (`Progress` or a bool;
    its title names the call's vectors unless it has one)."""
    from lens.core import edits as E
    from lens.models.generation.generate import generate

    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a models.generation.generate.GenerationConfig; got {type(config).__name__}")
    if config.return_logits:
        raise ValueError("generate_with_vectors returns tokens only; use a config with return_logits=False")
    max_new_tokens = config.max_new_tokens
    progress = Progress.of(progress)

    vectors = E.check_vectors(model, np.atleast_2d(np.asarray(vectors, np.float32)))
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [K, d_model]; got {vectors.shape}")
    E.check_layers(model, layer)
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts given")
    K, P = vectors.shape[0], len(prompts)
    if vectors_per_call is not None and (not isinstance(vectors_per_call, (int, np.integer)) or vectors_per_call < 1):
        raise ValueError(f"vectors_per_call must be an int >= 1; got {vectors_per_call!r}")
    if vectors_per_call is None:
        longest = max(len(p) for p in prompts)
        vectors_per_call = vectors_per_call_for(model, P, longest, max_new_tokens, memory_budget)
    n = min(int(vectors_per_call), K)
    padded = np.concatenate([vectors, np.zeros((-K % n, vectors.shape[1]), np.float32)])
    rows = [p for _ in range(n) for p in prompts]
    row_ids = [p for _ in range(n) for p in range(P)]  # row (k, p) samples as prompt p alone
    pad = None
    parts = []
    for start in range(0, len(padded), n):
        stacked = E.stack_edits([E.add(model, v, layer, coeff) for v in padded[start: start + n]])
        per_row = jax.tree.map(lambda a: jnp.repeat(a, P, axis=0), stacked)  # [n * P, ...]
        desc = f"vectors {start + 1}-{min(start + n, K)} of {K}"
        res = generate(model, rows, config, edits=per_row, edits_batched=True, row_ids=row_ids,
                       progress=progress.titled(desc))
        pad = res.pad_token_id
        out = np.full((n * P, max_new_tokens), pad, np.int32)
        for i, toks in enumerate(res.tokens):
            out[i, : len(toks)] = toks
        parts.append(out.reshape(n, P, max_new_tokens))
    return np.concatenate(parts)[:K]


def vectors_per_call_for(model: Transformer, n_prompts: int, prompt_len: int, max_new_tokens: int,
                         memory_budget: float = 2**30) -> int:
    """How many steering vectors' n_prompts rows fit one generation call in `memory_budget`
    bytes: a rough upper bound per row of its KV cache (every layer, prompt + new slots)
    plus the prefill's live activations (one block at a time) and its logits."""
    c = model.config
    item = np.dtype(model.embed.dtype).itemsize
    seq = -(-prompt_len // 8) * 8
    slots = seq + max_new_tokens
    cache = 2 * c.n_layers * slots * c.n_kv_heads * c.d_head * item
    acts = seq * 4 * (6 * c.d_model + 3 * c.d_mlp + 4 * c.n_heads * c.d_head + 2 * c.n_heads * seq)
    per_row = cache + acts + 3 * 4 * c.vocab_size
    return max(1, int(memory_budget // (per_row * n_prompts)))


def new_token_lists(tokens: Int[np.ndarray, "*rows new"], eos_token_ids) -> list:
    """Rows of `generate_with_vectors`' output cut after their first EOS (kept), as nested
    lists of the same leading shape.  `eos_token_ids`: the stop ids, or the model (or its
    tokenizer), whose EOS ids are used: `new_token_lists(out, model)`."""
    eos_token_ids = getattr(getattr(eos_token_ids, "config", eos_token_ids), "eos_token_ids", eos_token_ids)
    eos = set(int(e) for e in eos_token_ids)
    arr = np.asarray(tokens)
    if arr.ndim > 1:
        return [new_token_lists(a, eos) for a in arr]
    row = [int(t) for t in arr]
    stop = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
    return row[:stop]


def calibrate_norm(
    model: Transformer,
    designs: dict[str, Float[np.ndarray, "d_model"]],
    prompts: Sequence[Sequence[int]],
    layer: int,
    reference_norm: float,
    rho_grid: Sequence[float],
    max_new_tokens: int,
    score: Callable[[str], float],
    decode: Callable[[list[int]], str],
    vectors_per_call: int | None = None,
) -> tuple[Float[np.ndarray, "d_model"], dict]:
    """Pick a steering vector's direction and norm by what its greedy generations do.

    Every design (a named direction, e.g. two CAA variants) at every rho of the grid, as
    the vector `unit(design) * rho * reference_norm` added at resid_pre[layer], generates
    greedily from every prompt (one `generate_with_vectors` pass for all of them); each
    decoded reply is scored by `score(text)` (e.g. `lens.steering.code_score.code_score`).  The winner
    is the highest mean score, then the smallest rho (the least destructive), then the
    earlier design.  If no setting scores above 0, the first design at the smallest rho is
    returned and `info["scored"]` is False.

    Returns (vector, info): info has "design", "rho", "scored", "table" (one row per
    design and rho: design, rho, norm, score) and "examples" (per "design@rho", its best
    scoring reply)."""
    grid = [float(r) for r in rho_grid]
    if not grid or min(grid) <= 0:
        raise ValueError(f"rho_grid must hold positive values; got {list(rho_grid)}")
    if not designs:
        raise ValueError("no designs given")
    if not reference_norm > 0:
        raise ValueError(f"reference_norm must be > 0; got {reference_norm}")
    units = {}
    for name, v in designs.items():
        v = np.asarray(v)
        if not np.linalg.norm(v) > 0:
            raise ValueError(f"design {name!r} is the zero vector")
        units[name] = v / np.linalg.norm(v)  # in the design's own dtype (the main job: float32)
    settings = [(name, rho) for name in units for rho in grid]
    vecs = np.stack([units[name] * rho * reference_norm for name, rho in settings]).astype(np.float32)
    tokens = generate_with_vectors(model, prompts, vecs, layer, GenerationConfig(max_new_tokens),
                                   vectors_per_call=vectors_per_call)
    table, examples = [], {}
    for (name, rho), rows in zip(settings, new_token_lists(tokens, model.config.eos_token_ids)):
        texts = [decode(row) for row in rows]
        sc = [float(score(t)) for t in texts]
        table.append({"design": name, "rho": rho, "norm": rho * reference_norm, "score": float(np.mean(sc))})
        examples[f"{name}@{rho}"] = texts[int(np.argmax(sc))]
    order = list(units)
    best = max(table, key=lambda r: (r["score"], -r["rho"], -order.index(r["design"])))
    scored = best["score"] > 0
    if not scored:
        best = next(r for r in table if r["design"] == order[0] and r["rho"] == min(grid))
    vector = units[best["design"]] * best["rho"] * reference_norm
    return vector, {"design": best["design"], "rho": best["rho"], "scored": scored, "table": table,
                    "examples": examples}


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
    from lens.core.capture import pad_prompts
    from lens.models.generation.generate import generate

    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1; got {n_tokens}")

    def reply_resid(prompts):
        prompts = [list(p) for p in prompts]
        replies = generate(model, prompts, GenerationConfig(n_tokens, eos_token_ids=())).tokens
        toks, mask = pad_prompts([p + list(r) for p, r in zip(prompts, replies)])
        x = np.asarray(resid_at(model, toks, layer, mask))
        return np.stack([x[i, len(p) - 1: len(p) - 1 + n_tokens].mean(0) for i, p in enumerate(prompts)])

    return reply_resid(prompts_a).mean(0) - reply_resid(prompts_b).mean(0)
