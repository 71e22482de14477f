"""One progress-bar default across the library: every `progress` parameter (or config field)
defaults to models.runtime.progress.DEFAULT (off)."""

from __future__ import annotations

import dataclasses
import inspect

from lens.core import sweep
from lens.models.generation import generate
from lens.models.runtime.progress import DEFAULT, Progress
from lens.modularity import contextual_sparsity, moefication
from lens.steering import vectors
from lens.steering.melbo import analysis
from lens.steering.melbo import train as melbo_train
from lens.training import train


def test_every_progress_default_is_the_library_default():
    assert DEFAULT is False
    functions = [generate.generate, vectors.generate_with_vectors, moefication.train_routers,
                 contextual_sparsity.train_predictors,
                 *[f for _, f in inspect.getmembers(analysis, inspect.isfunction)]]
    checked = 0
    for f in functions:
        p = inspect.signature(f).parameters.get("progress")
        if p is not None:
            assert p.default in (DEFAULT, None), f"{f.__module__}.{f.__name__}: progress={p.default!r}"
            checked += 1
    assert checked >= 3
    for config in (sweep.SweepConfig(), train.TrainOptions()):
        assert Progress.of(config.progress).enabled is DEFAULT, type(config).__name__
    field = {f.name: f for f in dataclasses.fields(melbo_train.MelboRunConfig)}["progress"]
    assert Progress.of(field.default).enabled is DEFAULT
