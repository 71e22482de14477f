"""Derived arrays cached per model object: built once, dropped when the model is garbage
collected.  Equinox Modules compare by value (and hash their arrays), so they cannot be
dictionary keys themselves: the key is `id(model)`, made safe by a weakref finalizer that
removes the entry before the id can be reused."""

from __future__ import annotations

import weakref
from typing import Callable, Hashable, TypeVar

T = TypeVar("T")


def cached(store: dict, model, tag: Hashable, build: Callable[[], T]) -> T:
    """`store[(id(model), tag)]`, computed by `build()` on the first call for this model
    and tag.  A model that cannot be weakly referenced gets a fresh `build()` every call."""
    key = (id(model), tag)
    if key in store:
        return store[key]
    out = build()
    try:
        weakref.finalize(model, store.pop, key, None)
    except TypeError:
        return out
    store[key] = out
    return out
