"""Resumable selective-pruning studies: each `selective_pruning` run saved as it finishes.

A study (the ratio method plus >= 5 draws of two baselines, each collecting statistics on
1e5 tokens per set) runs for hours on a CPU; a crash must not lose the runs already done.

    key = {"config": dataclasses.asdict(config), "rows": rows_digest(forget, retain, *evals.values())}
    records, neuron_mask, head_mask = saved_pruning_run(out / "ratio.safetensors", key,
        lambda: selective_pruning(model, forget, retain, evals, skip, config))

The run's masks and its records (with `key`) go to one safetensors file, written atomically;
a later call with the same key loads it instead of running.  A file with another key is an
error, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from lens.modularity.pruning import load_masks, save_masks

Run = tuple[list[dict], np.ndarray, "np.ndarray | None"]


def rows_digest(*row_sets) -> str:
    """A SHA-256 of the token rows (shapes, dtypes and values): part of a run's key, so a
    saved run is reused only on the very same data."""
    h = hashlib.sha256()
    for rows in row_sets:
        a = np.ascontiguousarray(np.asarray(rows))
        h.update(f"{a.shape}{a.dtype.str}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _normal(key: dict) -> dict:
    try:
        return json.loads(json.dumps(key, sort_keys=True))
    except TypeError as e:
        raise TypeError(f"key must be JSON-serialisable (it is saved with the run): {e}") from None


def saved_pruning_run(path: str | Path, key: dict, run: Callable[[], Run]) -> Run:
    """`run()` (records, neuron mask, head mask or None: a `selective_pruning` call), saved
    at `path` with its records and `key` (everything that decides the result), or loaded
    from `path` when a finished run with the same key is there.  Raises ValueError when
    `path` holds a run with another key."""
    path, key = Path(path), _normal(key)
    if path.is_file():
        neurons, heads, info = load_masks(path)
        if info.get("key") != key:
            diff = sorted(k for k in set(key) | set(info.get("key", {})) if key.get(k) != info.get("key", {}).get(k))
            raise ValueError(f"{path} holds a pruning run with other settings (differs in {diff}): "
                             "use another output folder or delete the file")
        return info["records"], neurons, heads
    records, neurons, heads = run()
    records = json.loads(json.dumps(records))  # what a reload gives: the same value either way
    save_masks(path, neurons, heads, {"key": key, "records": records})
    return records, np.asarray(neurons, bool), None if heads is None else np.asarray(heads, bool)
