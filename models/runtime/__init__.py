"""Runtime: what surrounds a forward, not what it computes.

Modules:
  xla_guard        keeps XLA:CPU's miscompiling YNNPACK fusions off (imported first by `models`)
  compile_cache    enable(): JAX's persistent compilation cache under cache_dir()/jax (opt-in)
  paths            cache_dir() (derived data) and download_dir() (checked downloads)
  per_model_cache  cached(model, tag, build): arrays derived once per model object
  progress         Progress(enabled, desc, chunk): the one progress-bar option
"""
