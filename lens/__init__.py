"""lens: interpretability on the pure Equinox ports in `models/`.

Public contract:
    logits, cache = lens.run_with_cache(model, tokens)      # cache.resid_pre [layers, seq, d]
    logits = lens.add_vectors(model, tokens, vectors, layer, coeff=1.0)   # [K, seq, vocab]

Richer API: `lens.edits` (interventions as data: add / ablate / patch / stack),
`lens.sweep` (K vectors x C coeffs x L layers x P prompts, prefix shared, chunked),
`lens.steering` (ActAdd, CAA / mean difference, PCA of differences, save/load),
`lens.sharding` (the sweep over a device mesh), `lens.geometry` (norm-aware geometry),
`lens.patching` (activation / path / attribution patching), `lens.tasks` (IOI, facts).
"""

from __future__ import annotations

# First, before anything starts JAX's backend: no miscompiling XLA:CPU fusions.
import models.xla_guard  # noqa: F401  (isort: skip)

import importlib
from lens import edits
from lens.capture import head_output, head_outputs, pad_prompts, resid_at, run_with_cache
from lens import sweep
from lens.sweep import SweepResult, add_vectors, run_edits, sweep_vectors

__all__ = [
    "run_with_cache", "add_vectors", "head_outputs", "head_output", "resid_at", "pad_prompts", "sweep", "sweep_vectors",
    "SweepResult", "run_edits", "edits", "steering", "sharding", "geometry", "lenses", "dla", "patching", "tasks",
]

_LAZY = {"geometry", "steering", "sharding", "lenses", "dla", "patching", "tasks"}


def __getattr__(name: str):
    # geometry is imported on first use so `import lens` never depends on it.
    if name in _LAZY:
        module = importlib.import_module(f"lens.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'lens' has no attribute {name!r}")
