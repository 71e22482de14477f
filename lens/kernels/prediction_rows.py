"""The per-row pass of lens.prediction.scoring's metrics as one native CPU kernel (an XLA FFI custom
call): `rows(m, table, index, k, floor)` reads each row of the model's log-probs once and
gives its top-k, the predictor's log-probs on it, KL(model || predictor), and the top-k of
every predictor row some position reads.

Why: XLA:CPU computes the same quantities as several passes over the [P, V] log-probs
(top-k, exp, a row reduction it does not vectorise well, the gathered predictor row): about
25 ns per element on the 2-core machine, 54 ms per 2,048 x 4,096 chunk.  The kernel
(`lens/kernels/prediction_rows.cc`) makes one pass per row: a 16-lane exp polynomial,
the KL sum in registers, the top-k kept by threshold insertion (a vector compare per 16
elements), rows spread over XLA's intra-op threads.

Same numbers as the pure-JAX path (`lens.prediction.scoring` with LENS_KERNELS=0): the
top-k ids and values exactly (ties to the lower id, -0.0 tied with +0.0), KL to float32
rounding (another summation order; exp(x) for x < -87 is taken as exp(-87) = 1.6e-38
instead of a denormal).  Never used directly: `lens.kernels.prediction_rows_kernel` is the
one dispatch (switch, backend, k, then `load()`).  `load()` checks the CPU for what the
source needs (AVX-512F), finds a compiler, and builds on first use through
`lens.kernels.build` (a failed build is remembered there).  Runs under jit and vmap
(batched inputs are one call; each batch element's index reads its own table).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lens.kernels import build

TARGET = "lens_prediction_rows"
MAX_K = 64  # prediction_rows.cc: kMaxK (the top-k buffer lives on the stack)
SOURCE = Path(__file__).with_name("prediction_rows.cc")
REQUIRED_FEATURES = frozenset({"avx512f"})  # every intrinsic in SOURCE is AVX-512F
_registered: set[str] = set()


@functools.cache
def load() -> tuple[Callable | None, str]:
    """(`rows`, "") once the kernel is built and registered with XLA:CPU in this process,
    else (None, why not): a CPU feature missing, no compiler, or the build failing now or
    in an earlier process (remembered by `lens.kernels.build`).  Builds on the first call
    only; the answer is kept for the process (`load.cache_clear()` asks again)."""
    missing = REQUIRED_FEATURES - build.cpu_features()
    if missing:
        return None, f"the CPU lacks {', '.join(sorted(missing))}"
    cxx = build.compiler()
    if cxx is None:
        return None, "no C++ compiler ($CXX, g++ or c++) found"
    try:
        lib = ctypes.cdll.LoadLibrary(str(build.build(SOURCE, "prediction_rows", cxx)))
        if TARGET not in _registered:
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.LensPredictionRows), platform="cpu")
            _registered.add(TARGET)
    except build.BuildError as e:
        return None, f"build failed: {e}"
    except (OSError, AttributeError) as e:
        return None, f"the built library does not load: {e}"
    return rows, ""


def rows(m: Float[Array, "*B P V"], table: Float[Array, "*B U V"], index: Int[Array, "*B P"], k: int,
         floor: float) -> tuple[Float[Array, "*B P k"], Int[Array, "*B P k"], Float[Array, "*B P k"],
                                Float[Array, "*B P"], Int[Array, "*B U k"]]:
    """(m_val, m_idx, p_on_m, kl, p_idx): the model's top-k log-probs and ids (descending,
    ties to the lower id), max(table[index], floor) at those ids, sum exp(m) (m -
    max(table[index], floor)) per position (not clamped at 0), and the top-k ids of
    max(table row, floor) for every table row some position reads (-1 rows: read by none).
    Needs `load()` to have succeeded; an index outside [0, U) raises when the call runs."""
    if m.ndim < 2 or table.ndim != m.ndim or index.ndim != m.ndim - 1 or m.shape[-1] != table.shape[-1] \
            or index.shape != m.shape[:-1] or m.shape[:-2] != table.shape[:-2]:
        raise ValueError(f"prediction_rows.rows: m [..., P, V], table [..., U, V], index [..., P] expected, "
                         f"got {m.shape}, {table.shape}, {index.shape}")
    if not 1 <= k <= min(MAX_K, m.shape[-1]):
        raise ValueError(f"k must be in [1, {min(MAX_K, m.shape[-1])}], got {k}")
    lead, p, u = m.shape[:-2], m.shape[-2], table.shape[-2]
    out = (jax.ShapeDtypeStruct((*lead, p, k), jnp.float32), jax.ShapeDtypeStruct((*lead, p, k), jnp.int32),
           jax.ShapeDtypeStruct((*lead, p, k), jnp.float32), jax.ShapeDtypeStruct((*lead, p), jnp.float32),
           jax.ShapeDtypeStruct((*lead, u, k), jnp.int32))
    # broadcast_all: under vmap every operand gets the batch axis, which the kernel reads as
    # leading dims (one call for the whole batch)
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="broadcast_all")
    return call(m.astype(jnp.float32), table.astype(jnp.float32), index.astype(jnp.int32),
                k=np.int64(k), floor=np.float32(floor))
