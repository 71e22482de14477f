"""Behaviour scores that survive a crash: every vector's code scores and replies
(`lens.steering.melbo.verdict.score_vectors`) written to a JSON file as each generate call
completes, and reused when the run is resumed.

    store = ScoreStore(out / "behaviour_seed0.json", {"layer": 8, "max_new_tokens": 48, ...}, resume=True)
    scores, texts = score_vectors_checkpointed(model, prompts, V, 8, max_new_tokens=48,
                                               decode=decode, gen_batch=32, store=store)

A stored row is keyed by the SHA-256 of its vector's float32 bytes, so a score is reused
only for the very vector it was computed for (whatever its index or the order the vectors
are scored in), and the file's `settings` (prompts, layer, reply length, model: whatever
decides a reply) must equal the run's, else the resume is refused.  Vectors are scored in
calls of `gen_batch // len(prompts)` vectors, the last one padded with zero vectors, which
are the calls `verdict.score_vectors` makes in one go (`lens.steering.vectors.generate_with_vectors`:
a row's tokens do not depend on how the vectors are chunked), so a resumed run gives the
uninterrupted run's scores and replies.  The file is replaced atomically (write, then
rename): a kill mid-write leaves the previous version.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from jaxtyping import Float

SCHEMA = 1


def vector_id(v: Float[np.ndarray, " d_model"]) -> str:
    """The SHA-256 (hex) of a vector's little-endian float32 bytes: the key of its stored row."""
    return hashlib.sha256(np.ascontiguousarray(v, "<f4").tobytes()).hexdigest()


class ScoreStore:
    """The scored rows of one MELBO seed ({vector_id: {"scores": [P], "texts": [P]}}) and the
    settings they were computed under, kept in `path` (JSON).

    resume=False starts empty (the file is overwritten at the first save); resume=True
    reads `path` if it exists and raises SystemExit naming every setting that differs (its
    rows must not be mixed into a run with other prompts, layer or reply length)."""

    def __init__(self, path: Path | str, settings: dict, resume: bool):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))  # as it reads back (tuples -> lists)
        self.rows: dict[str, dict] = {}
        if resume and self.path.exists():
            saved = json.loads(self.path.read_text())
            old = saved.get("settings", {})
            changed = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
            if changed or saved.get("schema") != SCHEMA:
                what = ", ".join(changed) or f"schema {saved.get('schema')} vs {SCHEMA}"
                raise SystemExit(f"--resume: {self.path} was scored with other settings ({what}); "
                                 "resume with the same flags, or use a new --out")
            self.rows = saved["rows"]

    def save(self) -> None:
        """Write every row so far: a temporary file, then an atomic rename onto `path`."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"schema": SCHEMA, "settings": self.settings, "rows": self.rows}))
        os.replace(tmp, self.path)


def score_vectors_checkpointed(model, prompts: Sequence[Sequence[int]], vecs: Float[np.ndarray, "K d_model"],
                               layer: int, *, max_new_tokens: int, decode: Callable[[list[int]], str],
                               gen_batch: int, store: ScoreStore,
                               on_save: Callable[[int], None] | None = None
                               ) -> tuple[Float[np.ndarray, "K P"], list[list[str]]]:
    """`verdict.score_vectors` (scores [K, P], texts), vectors already in `store` reused, the
    others scored in calls of gen_batch // len(prompts) vectors and saved after every call.
    `on_save(n_rows)` (a test hook) runs after every save."""
    from lens.steering.melbo.verdict import score_vectors

    v = np.asarray(vecs, np.float32)
    if v.ndim != 2:
        raise ValueError(f"vecs must be [K, d_model]; got shape {v.shape}")
    p = len(prompts)
    ids = [vector_id(x) for x in v]
    todo, seen = [], set()  # the first index of every vector not stored yet
    for i, h in enumerate(ids):
        if h not in store.rows and h not in seen:
            todo.append(i)
            seen.add(h)
    per_call = max(1, gen_batch // p)
    for start in range(0, len(todo), per_call):
        idx = todo[start : start + per_call]
        chunk = np.concatenate([v[idx], np.zeros((per_call - len(idx), v.shape[1]), np.float32)])
        scores, texts = score_vectors(model, prompts, chunk, layer, max_new_tokens=max_new_tokens,
                                      decode=decode, gen_batch=gen_batch)
        for i, s, t in zip(idx, scores, texts):
            store.rows[ids[i]] = {"scores": [float(x) for x in s], "texts": list(t)}
        store.save()
        if on_save is not None:
            on_save(len(store.rows))
    scores = np.array([store.rows[h]["scores"] for h in ids], np.float64).reshape(len(v), p)
    return scores, [list(store.rows[h]["texts"]) for h in ids]
