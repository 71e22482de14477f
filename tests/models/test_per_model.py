"""models.runtime.per_model_cache.cached: one build per model and tag, dropped with the model."""

import gc

from lens.models.runtime import per_model_cache as per_model


class _Model:  # any weakly referenceable object stands in for a Transformer
    pass


def test_built_once_per_model_and_tag_and_dropped_with_the_model():
    store, builds = {}, []

    def build():
        builds.append(1)
        return object()

    m = _Model()
    a = per_model.cached(store, m, "bf16", build)
    assert per_model.cached(store, m, "bf16", build) is a and len(builds) == 1
    per_model.cached(store, m, "f32", build)  # another tag: its own entry
    assert len(builds) == 2 and len(store) == 2
    del m
    gc.collect()
    assert store == {}  # no stale id(model) keys a new object could collide with


def test_an_object_without_weak_references_is_rebuilt_every_call():
    store, builds = {}, []
    key_obj = (1, 2)  # tuples cannot be weakly referenced
    for _ in range(2):
        per_model.cached(store, key_obj, "t", lambda: builds.append(1) or len(builds))
    assert len(builds) == 2 and store == {}
