"""Runtime policy: the XLA:CPU guard, the persistent compilation cache, per-model caches.
"""
