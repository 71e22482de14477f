"""JAX's persistent compilation cache under `<lens cache>/jax`, turned on by the scripts.

Every run of a script used to pay the same XLA compilations again (several seconds per
shape).  `enable()` points JAX's persistent cache at `cache_dir() / "jax"`
(`models.runtime.paths`: $LENS_CACHE_DIR, else ~/.cache/lens) so a second process with the
same shapes, code and XLA flags loads the executables instead (JAX keys entries by the
computation, the jaxlib version, the device and the XLA flags, so the compiler guard's flag
gives separate entries).

It is a policy of the program, not of the library: `import models` changes no JAX setting
(beyond the XLA:CPU guard's flag), and every entry point in scripts/ and bench/ calls

    from . import compile_cache
    compile_cache.enable()

once after its imports.  A notebook or another program opts in the same way.

Limitation (measured): JAX never writes an executable that contains a host callback, and
the model forward validates token ids under jit with `eqx.error_if` (a callback), so
compiles of `model(tokens)` are not cached; the block stacks run on embeddings (MELBO
training and analysis, sweeps past their prefix), the geometry functions and generation
(`models.generation.generate`, `lens.steering.vectors.generate_with_vectors`: ids, lengths and edits are
checked on the host, and the compiled prefill / decode carry no callback; a test runs a
second process and sees no new entry) are.

Turn it off with `LENS_COMPILATION_CACHE=0`; a cache directory the user already chose
(`JAX_COMPILATION_CACHE_DIR` or `jax.config.update("jax_compilation_cache_dir", ...)`
before calling `enable`) is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_SWITCH = "LENS_COMPILATION_CACHE"


def cache_path() -> Path:
    from .paths import cache_dir

    return cache_dir() / "jax"


def enable() -> Path | None:
    """Set the persistent cache directory (and cache every compile that takes >= 0.5 s).
    Returns the directory in use, or None when turned off."""
    import jax

    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    chosen = jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if chosen:
        return Path(chosen)
    path = cache_path()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache rather than fail
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # JAX's default threshold is 1 s; most of our per-shape compiles are 0.5-10 s.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path
