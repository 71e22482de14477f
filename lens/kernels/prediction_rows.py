"""The per-row pass of lens.prediction.scoring's metrics as one native CPU kernel (an XLA FFI custom
call): `rows(m, table, index, k)` reads each row of the model's log-probs once and gives
its top-k, the predictor's log-probs on it, KL(model || predictor), and the top-k of every
predictor row some position reads.

Why: XLA:CPU computes the same quantities as several passes over the [P, V] log-probs
(top-k, exp, a row reduction it does not vectorise well, the gathered predictor row): about
25 ns per element on the 2-core machine, 54 ms per 2,048 x 4,096 chunk.  The kernel
(`models/kernels/prediction_rows.cc`) makes one pass per row: a 16-lane exp polynomial,
the KL sum in registers, the top-k kept by threshold insertion (a vector compare per 16
elements), rows spread over XLA's intra-op threads.

Same numbers as the pure-JAX path (`lens.prediction.scoring` with LENS_PREDICTION_KERNEL=0): the
top-k ids and values exactly (ties to the lower id, -0.0 tied with +0.0), KL to float32
rounding (another summation order; exp(x) for x < -87 is taken as exp(-87) = 1.6e-38
instead of a denormal).  Built on first use like models/bf16_kernel.py (host g++,
`-march=native`, AVX-512, cached under `<lens cache>/kernels/`); `enabled()` is False
without AVX-512 / a compiler, off the CPU backend, or with LENS_PREDICTION_KERNEL=0, and
lens.prediction.scoring then runs its pure-JAX path.  Runs under jit and vmap (batched inputs are
one call; each batch element's index reads its own table).
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from models import bf16_kernel

ENV_SWITCH = "LENS_PREDICTION_KERNEL"
TARGET = "lens_prediction_rows"
MAX_K = 64  # kernels/prediction_rows.cc: kMaxK (the top-k buffer lives on the stack)
_SOURCE = Path(bf16_kernel.__file__).parent / "kernels" / "prediction_rows.cc"


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered in this process (built on the first call;
    False without AVX-512 or without a C++ compiler)."""
    if not {"avx512f", "avx512bw", "avx512dq"} <= bf16_kernel._cpu_flags():
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(bf16_kernel.build_kernel(_SOURCE, "prediction_rows")))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.LensPredictionRows), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        import warnings

        warnings.warn(f"prediction kernel unavailable, using the pure-JAX metrics: {e}", stacklevel=2)
        return False
    return True


def enabled(k: int) -> bool:
    """Whether lens.prediction.scoring should use the kernel for a top-`k` now: `available()`,
    k <= MAX_K, the default backend is the CPU (the custom call is registered for XLA:CPU
    only), and LENS_PREDICTION_KERNEL is not 0 (read at every trace, so one process can
    compare both paths)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    if k > MAX_K or jax.default_backend() != "cpu":
        return False
    return available()


def rows(m: Float[Array, "*B P V"], table: Float[Array, "*B U V"], index: Int[Array, "*B P"], k: int,
         floor: float) -> tuple[Float[Array, "*B P k"], Int[Array, "*B P k"], Float[Array, "*B P k"],
                                Float[Array, "*B P"], Int[Array, "*B U k"]]:
    """(m_val, m_idx, p_on_m, kl, p_idx): the model's top-k log-probs and ids (descending,
    ties to the lower id), max(table[index], floor) at those ids, sum exp(m) (m -
    max(table[index], floor)) per position (not clamped at 0), and the top-k ids of
    max(table row, floor) for every table row some position reads (-1 rows: read by none).
    Needs `enabled(k)`; an index outside [0, U) raises when the call runs."""
    if m.ndim < 2 or table.ndim != m.ndim or index.ndim != m.ndim - 1 or m.shape[-1] != table.shape[-1] \
            or index.shape != m.shape[:-1] or m.shape[:-2] != table.shape[:-2]:
        raise ValueError(f"prediction_kernel.rows: m [..., P, V], table [..., U, V], index [..., P] expected, "
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
