"""Validation of edit arguments at the boundary (outside jit): layers, positions, vectors,
and activation caches checked against the model's shapes.  Used by every `Edits`
constructor (lens.core.edits, lens.core.ablations) and by callers that build their own.

    layers = check_layers(model, [4, -1])             # -> [4, n_layers - 1]
    positions = check_positions([0, -1], seq_len=12)  # -> [0, 11]
    v = check_vectors(model, v, "steering vector")    # width d_model, every value finite
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jaxtyping import Array

from lens.models.core.interventions import PATCH_SITES, Activations, site_widths
from lens.models.core.ranges import check_index, layer_context, position_context
from lens.models.core.transformer import Transformer

LayerSpec = int | Sequence[int] | None


def check_layers(model: Transformer, layers: LayerSpec, n: int | None = None) -> list[int]:
    """Normalise `layers` (int, list, None = all) to a list of in-range ints (negatives count
    from the end); raise ValueError for an out-of-range index."""
    n = model.config.n_layers if n is None else n
    if layers is None:
        return list(range(n))
    out = []
    for layer in [layers] if np.ndim(layers) == 0 else list(np.asarray(layers).ravel()):
        out.append(check_index("layer", layer, n, negative=True, context=layer_context(n)))
    if len(set(out)) != len(out):
        raise ValueError(f"repeated layer index in {out}")
    return out


def check_positions(positions: int | Sequence[int] | None, seq_len: int | None) -> list[int] | None:
    """Normalise positions (None = every position) to in-range ints, given the sequence length."""
    if positions is None:
        return None
    if seq_len is None:
        raise ValueError("chosen positions need seq_len (the length of the tokens edited)")
    out = []
    for p in [positions] if np.ndim(positions) == 0 else list(np.asarray(positions).ravel()):
        out.append(check_index("position", p, seq_len, negative=True, context=position_context(seq_len)))
    return out


def check_vectors(model: Transformer, vectors, name: str = "vector") -> np.ndarray | Array:
    """Check the last axis is d_model and (when concrete) every value is finite."""
    d = model.config.d_model
    shape = tuple(np.shape(vectors))
    if len(shape) == 0 or shape[-1] != d:
        raise ValueError(f"{name} has shape {shape}; its last axis must be d_model={d}")
    if not isinstance(vectors, jax.core.Tracer):
        bad = ~np.isfinite(np.asarray(vectors, np.float32))
        if bad.any():
            raise ValueError(f"{name} contains {int(bad.sum())} NaN/inf values")
    return vectors


def position_mask(positions: list[int] | None, seq_len: int | None) -> np.ndarray:
    """[S] 0/1 mask: S = 1 for every position, else seq_len with ones at `positions`."""
    if positions is None:
        return np.ones((1,), np.float32)
    mask = np.zeros((seq_len,), np.float32)
    mask[positions] = 1.0
    return mask


def edit_dtype(model: Transformer):
    """The dtype edits are stored in: the model's (its embedding's)."""
    return model.embed.dtype


CACHE_FIELDS = {s.field: s for s in PATCH_SITES.values()}


def checked_field(model: Transformer, cache: Activations, field: str) -> Array:
    """cache.<field>, checked against the model's shapes (a cache from another model fails)."""
    a = getattr(cache, field, None)
    if a is None:
        raise ValueError(f"the cache holds no {field}: capture it (Capture flag) in the source run")
    return checked_shape(model, a, field, f"cache.{field}")


def checked_shape(model: Transformer, a, field: str, what: str) -> Array:
    c = model.config
    widths = site_widths(c)
    tail = tuple(widths[t] for t in CACHE_FIELDS[field].axes[1:])
    layered = CACHE_FIELDS[field].layered
    shape = tuple(np.shape(a))
    lead = 1 + int(layered)  # [layers,] seq
    ok = len(shape) in (lead + len(tail), lead + 1 + len(tail))
    ok = ok and shape[len(shape) - len(tail):] == tail
    ok = ok and (not layered or shape[-2 - len(tail)] == c.n_layers)
    if not ok:
        raise ValueError(
            f"{what} has shape {shape}, which does not fit this model "
            f"([batch,] {'layers=%d, ' % c.n_layers if layered else ''}seq"
            f"{''.join(', %d' % t for t in tail)}): a cache from a different model?"
        )
    return a

