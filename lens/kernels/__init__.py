"""Optional native CPU kernels behind ONE switch and one dispatch; the pure-JAX code is the
specification, and nothing (no data structure, no result beyond float32 rounding) depends
on whether a kernel ran.

    kernel = lens.kernels.prediction_rows_kernel(jax.default_backend(), k)
    if kernel.fn is None: print(kernel.reason)    # and run the pure-JAX path

The switch: LENS_KERNELS=0 (or false / off / no) turns every kernel off; read at every
call, so one process can compare both paths.  Each kernel is built on first use only
(never at import; `lens.kernels.build`), checks the CPU features its source needs, and a
failed build is remembered in the lens cache, not retried by every process.

Kernels: `prediction_rows` (lens.prediction.scoring's per-row metrics on XLA:CPU, k <= 64).
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

ENV_SWITCH = "LENS_KERNELS"


def kernels_on() -> bool:
    """False when $LENS_KERNELS is 0 / false / off / no (the one parse of the switch)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


class Kernel(NamedTuple):
    """A dispatch's answer: `fn` the kernel to call, or None and `reason` says why not."""

    fn: Callable | None
    reason: str = ""


def prediction_rows_kernel(backend: str, k: int) -> Kernel:
    """The prediction-rows kernel (`lens.kernels.prediction_rows.rows`) for a top-`k` on
    `backend` (`jax.default_backend()`), or Kernel(None, reason): the switch is off, the
    backend is not "cpu" (the custom call is registered for XLA:CPU only), k is outside
    [1, 64], or the kernel cannot be loaded here (CPU feature, compiler, build).  The first
    call that passes the first three checks builds it (once per machine)."""
    from lens.kernels import prediction_rows

    if not kernels_on():
        return Kernel(None, f"{ENV_SWITCH}={os.environ.get(ENV_SWITCH)} turns the native kernels off")
    if backend != "cpu":
        return Kernel(None, f"backend {backend!r}: the kernel is for XLA:CPU only")
    if not 1 <= k <= prediction_rows.MAX_K:
        return Kernel(None, f"k = {k} is outside the kernel's [1, {prediction_rows.MAX_K}]")
    fn, reason = prediction_rows.load()
    return Kernel(fn, reason)
