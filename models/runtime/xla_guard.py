"""Keep XLA:CPU's YNNPACK fusions off: on jaxlib 0.10.2 they silently miscompile.

A jitted, vmapped `v - y * (y . v) / d` (the body of `lens.geometry.norm_jvp`) came out
of XLA:CPU with a relative error of 0.157 instead of 5e-8; nothing raised, and the main
job reported a wrong number for months.  Reproduction (also `tests/models/test_xla_guard.py`):

    import numpy as np, jax, jax.numpy as jnp
    rs = np.random.RandomState(0)
    y = rs.randn(87, 576).astype(np.float32); V = rs.randn(16, 576).astype(np.float32)
    f = lambda y, V: jax.vmap(lambda v: v[None, :] - y * jnp.sum(y * v[None, :], axis=-1,
                                                                   keepdims=True) / 576.0)(V)
    # eager: 4.8e-08 relative error; jax.jit(f): 0.157

XLA reads `XLA_FLAGS` once, when the first backend starts (after `import jax`, at the
first computation).  So this module, imported before anything else by `models` (and so
by `lens`, the scripts and the benchmarks), appends
`--xla_cpu_experimental_ynn_fusion_type=` (the empty list: no YNNPACK fusion) to
`XLA_FLAGS` if no backend has started yet.  Import order cannot bypass it: if a backend
already started without the flag, `install()` compiles a probe, finds the YNNPACK fusion
in the optimised HLO, and raises instead of letting any number be computed.

Cost (SmolLM2 forward, 4 x 64 tokens, jitted, 2 loaded cores, min of 3, three alternations):
no YNNPACK fusion 1.44-1.67 s, jaxlib's default 1.33-1.50 s, dot fusions only
(`dot,individual_dot`, which also passes the canary) 1.19-1.40 s.  We turn them all off:
the failing class of fusion is not understood well enough to trust the others.

Subprocesses inherit the flag through the environment.  The flag is only added when the
installed jaxlib knows it (XLA aborts on an unknown flag); a jaxlib without YNNPACK
fusions has nothing to guard against.
"""

from __future__ import annotations

import functools
import mmap
import os
import pathlib
import re

FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
FLAG = f"--{FLAG_NAME}="
_FLAG_RE = re.compile(rf"--{FLAG_NAME}=(\S*)")


class CompilerGuardError(RuntimeError):
    """The XLA:CPU backend runs with the fusion that miscompiles; lens refuses to compute."""


@functools.cache
def jaxlib_knows_flag() -> bool:
    """Whether the installed jaxlib has the YNNPACK fusion flag (a byte search, ~ms)."""
    import importlib.util

    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return False
    needle = FLAG_NAME.encode()
    for folder in spec.submodule_search_locations:
        for lib in sorted(pathlib.Path(folder).glob("*.so")):
            with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(needle) >= 0:
                    return True
    return False


def _backend_started() -> bool:
    import sys

    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())


def ynn_fusion_in_use() -> bool:
    """Compile the reproduction's shape of computation and look for a YNNPACK fusion.

    Starts the CPU backend if it has not started (then the flag must already be set)."""
    import jax
    import jax.numpy as jnp

    def probe(y, vs):
        return jax.vmap(lambda v: v[None, :] - y * jnp.sum(y * v[None, :], axis=-1, keepdims=True) / 576.0)(vs)

    cpu = jax.devices("cpu")[0]
    y = jax.device_put(jnp.zeros((87, 576), jnp.float32), cpu)
    vs = jax.device_put(jnp.zeros((16, 576), jnp.float32), cpu)
    text = jax.jit(probe).lower(y, vs).compile().as_text()
    # The fusion kind in the backend config, not a name: op metadata also holds Python names.
    return '"kind":"__ynn_fusion"' in text.replace(" ", "")


def install() -> None:
    """Make sure no YNNPACK fusion ever runs in this process; raise if it is too late."""
    flags = os.environ.get("XLA_FLAGS", "")
    setting = _FLAG_RE.findall(flags)
    if any(value for value in setting):
        raise CompilerGuardError(
            f"XLA_FLAGS sets {FLAG}{setting[-1]!r}: YNNPACK fusions miscompile on XLA:CPU "
            f"(jaxlib 0.10.2: a jitted, vmapped `v - y * (y . v) / d` is 16% wrong) and lens "
            f"refuses to run with them.  Remove that flag; lens sets {FLAG!r} itself.")
    if not _backend_started():
        if not setting and jaxlib_knows_flag():
            os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
        return
    # A backend started before lens was imported: the flag may or may not have been there.
    if jaxlib_knows_flag() and ynn_fusion_in_use():
        raise CompilerGuardError(
            "JAX's CPU backend was started before `models`/`lens` were imported, without "
            f"{FLAG!r} in XLA_FLAGS, so XLA:CPU runs YNNPACK fusions, which silently "
            "miscompile (jaxlib 0.10.2: a jitted, vmapped `v - y * (y . v) / d` is 16% wrong).  "
            "Import lens or models before the first JAX computation, or start Python with "
            f"XLA_FLAGS='{FLAG}'.")


def check() -> None:
    """Raise `CompilerGuardError` if the running backend would use a YNNPACK fusion."""
    if jaxlib_knows_flag() and ynn_fusion_in_use():
        raise CompilerGuardError(f"XLA:CPU would use a YNNPACK fusion: set XLA_FLAGS='{FLAG}' before JAX starts.")


install()
