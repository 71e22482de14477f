"""A bfloat16-weight matrix product for the decode step: `matmul(x, w)` with w bf16 [K, N].

Why: XLA:CPU has no bf16 dot.  It widens every bf16 weight to a float32 copy and dots that,
and in the decode loop it hoists the widening out of the loop, so a bf16 decode step read
the same float32 bytes as a float32 step (docs/generation.md has the profile).  The kernel
in `kernels/bf16_matmul.cc` reads each bf16 weight once, widens it in registers and
accumulates in float32 (x and y stay float32), so a batch-1 decode step streams half the
bytes.  It is an XLA FFI custom call; it runs inside jit, `lax.while_loop` and `jax.vmap`
(batched rows become rows of one call), and the persistent compilation cache stores it.

It is built on first use with the host's C++ compiler (`-O3 -march=native`, AVX-512
needed) into `<lens cache>/kernels/`, keyed by the source, the compiler flags and the CPU
model.  Where it cannot be built (no compiler, no AVX-512, no jaxlib FFI headers) or with
`LENS_BF16_KERNEL=0`, `available()` is False and generation uses XLA's dots as before.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

ENV_SWITCH = "LENS_BF16_KERNEL"
TARGET = "lens_bf16_matmul"
_SOURCE = Path(__file__).parent / "kernels" / "bf16_matmul.cc"
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "")


def _build() -> Path:
    """Compile the kernel (once per source / flags / CPU) and return the shared library."""
    from models.embedded import cache_dir

    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ / c++) on PATH")
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + _cpu_model().encode()
                         + jax.__version__.encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"bf16_matmul-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(tmp_out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp_out, out)  # atomic: a parallel process sees the whole file or none
    return out


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered in this process (built on the first call;
    False without AVX-512 or without a C++ compiler)."""
    if not {"avx512f", "avx512bw"} <= _cpu_flags():
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.LensBf16Matmul), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        import warnings

        warnings.warn(f"bf16 decode kernel unavailable, using XLA's dots: {e}", stacklevel=2)
        return False
    return True


# Above this many rows (e.g. 64 steering vectors x 4 prompts in one decode) the product is
# compute-bound and XLA's float32 GEMM beats this streaming kernel: widen and dot instead.
MAX_ROWS = 64


def _call(x: Float[Array, "rows k"], w) -> Float[Array, "rows n"]:
    if x.shape[0] > MAX_ROWS:
        return jnp.einsum("rk,kn->rn", x.astype(jnp.float32), w.astype(jnp.float32))
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x.astype(jnp.float32), w)


@jax.custom_batching.custom_vmap
def _matmul2d(x, w):
    return _call(x, w)


@_matmul2d.def_vmap
def _matmul2d_vmap(axis_size, in_batched, x, w):
    x_batched, w_batched = in_batched
    if w_batched:  # a weight per row (never in generation): XLA's dot, widened to float32
        x = x if x_batched else jnp.broadcast_to(x, (axis_size, *x.shape))
        y = jnp.einsum("brk,bkn->brn", x.astype(jnp.float32), w.astype(jnp.float32))
        return y, True
    rows, k = x.shape[1], x.shape[2]
    # The batch's rows become rows of one call: the weight is read once for all of them.
    y = _matmul2d(x.reshape(axis_size * rows, k), w)
    return y.reshape(axis_size, rows, w.shape[1]), True


def matmul(x: Float[Array, "rows k"], w) -> Float[Array, "rows n"]:
    """x [rows, K] (any float dtype, used as float32) times w bf16 [K, N] -> float32 [rows, N].

    Jit-, vmap- and while_loop-safe.  Needs `available()`; the caller checks shapes."""
    if w.dtype != jnp.bfloat16 or x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"matmul: x [rows, K] and bf16 w [K, N] expected, got {x.shape} and "
                         f"{w.dtype}{w.shape}")
    return _matmul2d(x, w)


def enabled() -> bool:
    """Whether generation should use the kernel now: `available()` and LENS_BF16_KERNEL is
    not 0 (read at every call, so one process can compare both paths)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    return available()


# The einsum specs of `models.block` (and the unembedding) the kernel runs directly, with
# the [K, N] matrix each one's weight is packed into.
_SPECS = ("sd,hdk->shk", "shk,hkd->sd", "sd,dm->sm", "sm,md->sd", "sd,dv->sv")


class PackedWeight(eqx.Module):
    """A bf16 weight stored as the [K, N] matrix `matmul` reads, standing in for a `Block`
    matrix (or the unembedding) in the decode layout.

    kind "qkv": logical [heads, d_model, d_head], packed [d_model, heads * d_head];
    "out": logical [heads, d_head, d_model], packed [heads * d_head, d_model];
    "plain": logical = packed (W_in, W_gate, W_out; the unembedding packed as [d_model, vocab])."""

    w: Array
    kind: str = eqx.field(static=True)
    heads: int = eqx.field(static=True)

    @classmethod
    def pack(cls, logical: Array, kind: str) -> "PackedWeight":
        if kind == "qkv":
            h, d, k = logical.shape
            return cls(jnp.transpose(logical, (1, 0, 2)).reshape(d, h * k), kind, h)
        if kind == "out":
            h, k, d = logical.shape
            return cls(logical.reshape(h * k, d), kind, h)
        return cls(logical, "plain", 0)

    def logical(self) -> Array:
        """The weight in `Block`'s layout (XLA's path: only the rare edits that need it)."""
        if self.kind == "qkv":
            d, hk = self.w.shape
            return jnp.transpose(self.w.reshape(d, self.heads, hk // self.heads), (1, 0, 2))
        if self.kind == "out":
            hk, d = self.w.shape
            return self.w.reshape(self.heads, hk // self.heads, d)
        return self.w

    def apply(self, x: Array, spec: str) -> Array:
        """`jnp.einsum(spec, x, logical weight)` in float32 (the caller casts)."""
        if spec not in _SPECS:  # e.g. per-head q/k/v input patching ("shd,hdk->shk")
            return jnp.einsum(spec, x, self.logical(), preferred_element_type=jnp.float32)
        if self.kind == "qkv":
            y = matmul(x, self.w)
            return y.reshape(x.shape[0], self.heads, -1)
        if self.kind == "out":
            return matmul(x.reshape(x.shape[0], -1), self.w)
        return matmul(x, self.w)
