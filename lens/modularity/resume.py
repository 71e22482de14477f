"""Resumable long runs: each finished piece (a selective-pruning run, one layer's router or
predictor fit) saved as it finishes, reused under its key.

A study (the ratio method plus >= 5 draws of two baselines, each collecting statistics on
1e5 tokens per set; or 30 layers' routers and predictors on 1e5 tokens) runs for hours on
a CPU; a crash must not lose the pieces already done.

    key = {"config": dataclasses.asdict(config), "rows": rows_digest(forget, retain, *evals.values())}
    records, neuron_mask, head_mask = saved_pruning_run(out / "ratio.safetensors", key,
        lambda: selective_pruning(model, forget, retain, evals, skip, config))
    arrays, info = saved_result(out / "router_layer007.safetensors", key, lambda: ({"w": w}, {"log": log}))

A piece's arrays and its JSON info (with `key`) go to one safetensors file, written
atomically; a later call with the same key loads it instead of running.  A file with
another key is an error, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import jax
import numpy as np

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


def tree_digest(tree) -> str:
    """`rows_digest` of every array leaf of a pytree (a model's weights: a saved fit is
    reused only for the very same model)."""
    return rows_digest(*(np.asarray(x) for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def _json(x):
    """x as what a JSON round trip gives (numpy scalars as Python numbers)."""
    def default(o):
        if isinstance(o, (np.generic, np.ndarray)):
            return o.tolist()
        raise TypeError(f"{type(o).__name__} is not JSON-serialisable")
    try:
        return json.loads(json.dumps(x, sort_keys=True, default=default, allow_nan=False))
    except (TypeError, ValueError) as e:  # ValueError: NaN / inf, which would never equal itself on reload
        raise TypeError(f"key and info must be JSON-serialisable (they are saved with the run): {e}") from None


def saved_result(path: str | Path, key: dict, run: Callable[[], tuple[dict, dict]]) -> tuple[dict, dict]:
    """`run()` -> (arrays {name: array}, info: JSON-able dict), saved at `path` with `key`
    (everything that decides the result), or loaded from `path` when a finished run with
    the same key is there.  Returns (numpy arrays, info as a JSON round trip gives it: the
    same value either way).  Raises ValueError when `path` holds a run with another key."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path, key = Path(path), _json(key)
    if path.is_file():
        try:
            with safe_open(str(path), "numpy") as f:
                saved = json.loads((f.metadata() or {}).get("info", "{}"))
        except Exception as e:  # a truncated or foreign file: say which, never overwrite it silently
            raise ValueError(f"{path} is not a readable saved run ({e}); delete it to compute it again") from None
        if saved.get("key") != key:
            old = saved.get("key", {})
            diff = sorted(k for k in set(key) | set(old) if key.get(k) != old.get(k))
            raise ValueError(f"{path} holds a run with other settings (differs in {diff}): "
                             "use another output folder or delete the file")
        return load_file(str(path)), {k: v for k, v in saved.items() if k != "key"}
    arrays, info = run()
    arrays, info = {k: np.ascontiguousarray(np.asarray(v)) for k, v in arrays.items()}, _json(info)
    write_atomic(path, arrays, {"key": key, **info})
    return arrays, info


def write_atomic(path: str | Path, arrays: dict, info: dict) -> Path:
    """`arrays` as safetensors with `info` as JSON metadata ("info"), written to a temporary
    file and renamed: a kill mid-write leaves no half file."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(arrays, str(tmp), metadata={"info": json.dumps(info)})
    os.replace(tmp, path)
    return path


def saved_pruning_run(path: str | Path, key: dict, run: Callable[[], Run]) -> Run:
    """`run()` (records, neuron mask, head mask or None: a `selective_pruning` call), saved
    at `path` with its records and `key` by `saved_result` (the file `pruning.load_masks`
    reads: masks as uint8, {"key", "records"} as its info)."""
    def masks_and_records():
        records, neurons, heads = run()
        arrays = {"neurons": np.asarray(neurons, np.uint8)}
        if heads is not None:
            arrays["heads"] = np.asarray(heads, np.uint8)
        return arrays, {"records": records}

    arrays, info = saved_result(path, key, masks_and_records)
    heads = arrays.get("heads")
    return info["records"], arrays["neurons"].astype(bool), None if heads is None else heads.astype(bool)
