"""lens: interpretability on the pure Equinox ports in `models/` (imported as `lens.models`).

    from lens import models                  # the ports; see lens/_models_path.py
    model, tokenizer = models.load("smollm2-135m-instruct")

The two-function contract:
    logits, cache = lens.run_with_cache(model, tokens)      # cache.resid_pre [layers, seq, d]
    logits = lens.add_vectors(model, tokens, vectors, layer, coeff=1.0)   # [K, seq, vocab]

One package per research question (each `__init__` lists its modules):

    lens.core         capture, edits (interventions as data), sweeps, sharding, weight folding
    lens.steering     steering vectors (ActAdd, CAA, PCA), MELBO / MELBO-ortho, the code score
    lens.geometry     LayerNorm / RMSNorm-aware geometry (pure math) and its readings on a model
    lens.readout      logit lens, tuned lens (and its fitting), direct logit attribution
    lens.circuits     IOI / fact tasks, induction, activation / path / attribution patching, scrubbing
    lens.prediction   the predict-the-model test, n-gram predictors, the losses that game it
    lens.modularity   selective pruning, MoEfication, contextual sparsity
    lens.training     corpora, a small BPE tokenizer, the one training loop
    lens.kernels      optional native CPU kernels behind one dispatch (never needed)
    lens.cli          argparse types for scripts
"""

from __future__ import annotations

# First: the ports, as `lens.models` (never the top-level name `models`, which a user's own
# `models.py` may hold; see lens/_models_path.py).  Their first import is the XLA:CPU guard,
# before anything starts JAX's backend.
from lens._models_path import register as _register_models  # isort: skip

models = _register_models()

import importlib

from lens.core.capture import head_output, head_outputs, pad_prompts, resid_at, run_with_cache
from lens.core.sweep import SweepConfig, SweepResult, add_vectors, run_edits, sweep_vectors

PACKAGES = ("core", "steering", "geometry", "readout", "circuits", "prediction", "modularity", "training", "kernels")

__all__ = [
    "run_with_cache", "add_vectors", "head_outputs", "head_output", "resid_at", "pad_prompts", "sweep_vectors",
    "SweepConfig", "SweepResult", "run_edits", "models", *PACKAGES,
]


def __getattr__(name: str):
    # The packages are imported on first use: `import lens` loads only the contract.
    if name in PACKAGES:
        module = importlib.import_module(f"lens.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'lens' has no attribute {name!r}")
