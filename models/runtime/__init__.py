"""Runtime policy: the XLA:CPU guard, the persistent compilation cache (opt-in: `compile_cache.enable()`),
per-model caches, and where files live on disk (`paths`: downloads apart from derived data).
"""
