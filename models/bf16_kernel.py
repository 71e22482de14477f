"""A bfloat16-weight matrix product for the decode step: `matmul(x, to_panels(w), n)` with
w bf16 [K, n], packed once in 64-column panels; `PackedWeight` is what generation uses.

Why: XLA:CPU has no bf16 dot.  It widens every bf16 weight to a float32 copy and dots that,
and in the decode loop it hoists the widening out of the loop, so a bf16 decode step read
the same float32 bytes as a float32 step (docs/generation.md has the profile).  The kernel
in `kernels/bf16_matmul.cc` reads each bf16 weight once, widens it in registers and
accumulates in float32 (x and y stay float32), so a batch-1 decode step streams half the
bytes.  Each 64-column panel of w is one contiguous stream (the prefetchers follow it) and
its 64 outputs stay in registers.  It is an XLA FFI custom call; it runs inside jit, `lax.while_loop` and `jax.vmap`
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
GEMM_TARGET = "lens_bf16_gemm"
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


def build_kernel(source: Path, stem: str) -> Path:
    """Compile a kernel source (once per source / flags / CPU / jax version) into
    `<lens cache>/kernels/<stem>-<key>.so` and return the shared library's path (also used
    by lens.kernels.prediction_rows)."""
    from models.runtime.paths import cache_dir

    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ / c++) on PATH")
    text = Path(source).read_bytes()
    key = hashlib.sha256(text + " ".join(_FLAGS).encode() + _cpu_model().encode()
                         + jax.__version__.encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"{stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o", str(tmp_out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp_out, out)  # atomic: a parallel process sees the whole file or none
    return out


def _build() -> Path:
    """Compile the kernel (once per source / flags / CPU) and return the shared library."""
    return build_kernel(_SOURCE, "bf16_matmul")


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered in this process (built on the first call;
    False without AVX-512 or without a C++ compiler)."""
    if not {"avx512f", "avx512bw"} <= _cpu_flags():
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.LensBf16Matmul), platform="cpu")
        jax.ffi.register_ffi_target(GEMM_TARGET, jax.ffi.pycapsule(lib.LensBf16Gemm), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        import warnings

        warnings.warn(f"bf16 decode kernel unavailable, using XLA's dots: {e}", stacklevel=2)
        return False
    return True


# Above this many rows (e.g. 64 steering vectors x 4 prompts in one decode) the product is
# compute-bound and XLA's float32 GEMM beats this streaming kernel: widen and dot instead.
MAX_ROWS = 64
PANEL = 64  # columns per panel of the packed weight (kernels/bf16_matmul.cc: kPanel)


def to_panels(w: Float[Array, "k n"]) -> Float[Array, "panels k 64"]:
    """bf16 [K, N] -> [ceil(N / 64), K, 64] (zero columns past N): each 64-column panel is
    one contiguous stream for the kernel.  Outside jit, once per model."""
    k, n = w.shape
    pad = -n % PANEL
    w = jnp.pad(w.astype(jnp.bfloat16), ((0, 0), (0, pad)))
    return jnp.transpose(w.reshape(k, (n + pad) // PANEL, PANEL), (1, 0, 2))


def from_panels(panels: Float[Array, "panels k 64"], n: int) -> Float[Array, "k n"]:
    """The inverse of `to_panels`."""
    p, k, width = panels.shape
    return jnp.transpose(panels, (1, 0, 2)).reshape(k, p * width)[:, :n]


def _call(x: Float[Array, "rows k"], panels, n: int) -> Float[Array, "rows n"]:
    if x.shape[0] > MAX_ROWS:
        return jnp.einsum("rk,kn->rn", x.astype(jnp.float32), from_panels(panels, n).astype(jnp.float32))
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x.astype(jnp.float32), panels)


def _rows_as_one_call(call, per_weight):
    """`f(x [rows, K], packed w, n_template)` = `call(x, w, n)` whose vmap rule makes the
    batch's rows rows of ONE call (the weight is read once for all of them); a weight per
    batch element goes to `per_weight(x [rows, K], w, n)`, XLA's dot on the same numbers.
    n travels as the shape of a dummy array: custom_vmap takes arrays only."""

    @jax.custom_batching.custom_vmap
    def f(x, w, n_template):
        return call(x, w, n_template.shape[0])

    @f.def_vmap
    def f_vmap(axis_size, in_batched, x, w, n_template):
        x_batched, w_batched, _ = in_batched
        n = n_template.shape[-1]
        if w_batched:
            x = x if x_batched else jnp.broadcast_to(x, (axis_size, *x.shape))
            return jax.vmap(lambda xi, wi: per_weight(xi, wi, n))(x, w), True
        rows, k = x.shape[1], x.shape[2]
        y = f(x.reshape(axis_size * rows, k), w, n_template)
        return y.reshape(axis_size, rows, n), True

    return f


# a weight per row (never in generation): XLA's dot, widened to float32
_matmul2d = _rows_as_one_call(_call, lambda x, panels, n: jnp.einsum(
    "rk,kn->rn", x.astype(jnp.float32), from_panels(panels, n).astype(jnp.float32)))


def matmul(x: Float[Array, "rows k"], panels: Float[Array, "panels k 64"], n: int) -> Float[Array, "rows n"]:
    """x [rows, K] (any float dtype, used as float32) times the bf16 weight [K, n] packed by
    `to_panels` -> float32 [rows, n].  Jit-, vmap- and while_loop-safe; needs `available()`."""
    if (panels.dtype != jnp.bfloat16 or x.ndim != 2 or panels.ndim != 3 or panels.shape[2] != PANEL
            or x.shape[1] != panels.shape[1] or -(-n // PANEL) != panels.shape[0]):
        raise ValueError(f"matmul: x [rows, K] and bf16 panels [ceil(n / {PANEL}), K, {PANEL}] expected, "
                         f"got x {x.shape}, panels {panels.dtype}{panels.shape}, n {n}")
    # n travels as the shape of a dummy array: custom_vmap takes arrays only
    return _matmul2d(x, panels, jnp.zeros((n,), jnp.int8))


def enabled() -> bool:
    """Whether generation should use the kernel now: `available()` and LENS_BF16_KERNEL is
    not 0 (read at every call, so one process can compare both paths), and only when the
    default backend is the CPU: the custom call is registered for XLA:CPU alone, and on a
    GPU/TPU host (whose CPU may well have AVX-512) the accelerator's own dots are used."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    if jax.default_backend() != "cpu":
        return False
    return available()


# The einsum specs of `models.core.block` (and the unembedding) the kernel runs directly, with
# the [K, N] matrix each one's weight is packed into.
_SPECS = ("sd,hdk->shk", "shk,hkd->sd", "sd,dm->sm", "sm,md->sd", "sd,dv->sv")

# Block matrices and the layout kind of each (`PackedWeight`, `GemmWeight`, models/generation/decode.py).
BLOCK_MATRIX_KINDS = {"W_Q": "qkv", "W_K": "qkv", "W_V": "qkv", "W_O": "out",
                      "W_in": "plain", "W_gate": "plain", "W_out": "plain"}


def _as_matrix(logical: Array, kind: str) -> tuple[Array, int]:
    """(the [K, N] matrix, heads) of a `Block` weight of this kind.  kind "qkv": logical
    [heads, d_model, d_head] -> [d_model, heads * d_head]; "out": [heads, d_head, d_model]
    -> [heads * d_head, d_model]; anything else ("plain"): logical is the matrix."""
    if kind == "qkv":
        h, d, k = logical.shape
        return jnp.transpose(logical, (1, 0, 2)).reshape(d, h * k), h
    if kind == "out":
        h, k, d = logical.shape
        return logical.reshape(h * k, d), h
    return logical, 0


def _from_matrix(w: Array, kind: str, heads: int) -> Array:
    """The inverse of `_as_matrix`: the [K, N] matrix back in `Block`'s layout."""
    if kind == "qkv":
        d, hk = w.shape
        return jnp.transpose(w.reshape(d, heads, hk // heads), (1, 0, 2))
    if kind == "out":
        hk, d = w.shape
        return w.reshape(heads, hk // heads, d)
    return w


class PackedWeight(eqx.Module):
    """A bf16 weight stored as the 64-column panels `matmul` reads ([K, N] matrix packed by
    `to_panels`), standing in for a `Block` matrix (or the unembedding) in the decode layout.

    kind "qkv": logical [heads, d_model, d_head], matrix [d_model, heads * d_head];
    "out": logical [heads, d_head, d_model], matrix [heads * d_head, d_model];
    "plain": logical = matrix (W_in, W_gate, W_out; the unembedding as [d_model, vocab])."""

    panels: Array
    kind: str = eqx.field(static=True)
    heads: int = eqx.field(static=True)
    n: int = eqx.field(static=True)

    @classmethod
    def pack(cls, logical: Array, kind: str) -> "PackedWeight":
        kind = kind if kind in ("qkv", "out") else "plain"
        matrix, h = _as_matrix(logical, kind)
        return cls(to_panels(matrix), kind, h, matrix.shape[1])

    @property
    def dtype(self):
        return self.panels.dtype

    def logical(self) -> Array:
        """The weight in `Block`'s layout (XLA's path: only the rare edits that need it)."""
        return _from_matrix(from_panels(self.panels, self.n), self.kind, self.heads)

    def apply(self, x: Array, spec: str) -> Array:
        """`jnp.einsum(spec, x, logical weight)` in float32 (the caller casts)."""
        if spec not in _SPECS:  # e.g. per-head q/k/v input patching ("shd,hdk->shk")
            return jnp.einsum(spec, x, self.logical(), preferred_element_type=jnp.float32)
        if self.kind == "qkv":
            y = matmul(x, self.panels, self.n)
            return y.reshape(x.shape[0], self.heads, -1)
        if self.kind == "out":
            return matmul(x.reshape(x.shape[0], -1), self.panels, self.n)
        return matmul(x, self.panels, self.n)


# ------------------------------------------------------------------ the many-row GEMM
# `gemm(x, to_pairs(w), n)`: the compute-bound product for thousands of rows (e.g. the
# statistics of lens.modularity.pruning), kernels/bf16_matmul.cc: Bf16Gemm.  x is rounded to bf16
# (round to nearest even, XLA's convert, fused with whatever produced x), w is bf16, the
# products and sums are float32 (VDPBF16PS): twice the arithmetic rate of a float32 GEMM on
# a CPU with avx512_bf16.  Numerically it is `x.astype(bf16) @ w.astype(bf16)` with float32
# accumulation, which is also what `gemm_reference` computes with XLA's dot.


def to_pairs(w: Float[Array, "k n"]) -> Float[Array, "panels pairs 64 2"]:
    """bf16 [K, N] -> [ceil(N / 64), ceil(K / 2), 64, 2] (zeros past K and N): 64-column
    panels whose rows are (k, k+1) pairs, the right operand of VDPBF16PS."""
    k, n = w.shape
    w = jnp.pad(w.astype(jnp.bfloat16), ((0, k % 2), (0, -n % PANEL)))
    k2, n2 = w.shape
    return jnp.transpose(w.reshape(k2 // 2, 2, n2 // PANEL, PANEL), (2, 0, 3, 1))


def from_pairs(pairs: Float[Array, "panels pairs 64 2"], k: int, n: int) -> Float[Array, "k n"]:
    """The inverse of `to_pairs` (bf16; uint16 pairs are read as bf16 bits)."""
    pairs = _as_bf16(pairs)
    p, kp, width, two = pairs.shape
    return jnp.transpose(pairs, (1, 3, 0, 2)).reshape(kp * two, p * width)[:k, :n]


def gemm_reference(x: Float[Array, "rows k"], w: Float[Array, "k n"]) -> Float[Array, "rows n"]:
    """What `gemm` computes, with XLA's dot: bf16-rounded x and w, float32 products and
    sums (on a GPU/TPU the bf16 matrix units; on a CPU without the kernel, a float32 dot)."""
    return jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


def _as_bits(a: Array) -> Array:
    """bf16 -> its uint16 bits (what the kernel takes: XLA:CPU widens a bf16 array that a
    scan slices per layer to a float32 copy of every layer; a uint16 one it leaves alone)."""
    return a if a.dtype == jnp.uint16 else jax.lax.bitcast_convert_type(a.astype(jnp.bfloat16), jnp.uint16)


def _as_bf16(a: Array) -> Array:
    return jax.lax.bitcast_convert_type(a, jnp.bfloat16) if a.dtype == jnp.uint16 else a


def _gemm_call(x, pairs, n: int):
    xb = x.astype(jnp.bfloat16)
    if pairs.shape[1] * 2 != x.shape[1]:  # odd K: the packed weight has a zero row there
        xb = jnp.pad(xb, ((0, 0), (0, 1)))
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call(GEMM_TARGET, out)(_as_bits(xb), _as_bits(pairs))


# a weight per row: XLA's dot on the same bf16 numbers
_gemm2d = _rows_as_one_call(_gemm_call, lambda x, pairs, n: gemm_reference(x, from_pairs(pairs, x.shape[1], n)))


def gemm(x: Float[Array, "rows k"], pairs: Float[Array, "panels pairs 64 2"], n: int) -> Float[Array, "rows n"]:
    """x [rows, K] (any float dtype; rounded to bf16) times the bf16 weight [K, n] packed by
    `to_pairs` (bf16, or its uint16 bits) -> float32 [rows, n], float32 accumulation.  For
    many rows (compute-bound); jit- and vmap-safe (vmapped rows become rows of one call);
    needs `available()`."""
    if (pairs.dtype not in (jnp.bfloat16, jnp.uint16) or x.ndim != 2 or pairs.ndim != 4 or pairs.shape[2:] != (PANEL, 2)
            or -(-x.shape[1] // 2) != pairs.shape[1] or -(-n // PANEL) != pairs.shape[0] or x.shape[0] < 1):
        raise ValueError(f"gemm: x [rows >= 1, K] and bf16 pairs [ceil(n / {PANEL}), ceil(K / 2), {PANEL}, 2] "
                         f"expected, got x {x.shape}, pairs {pairs.dtype}{pairs.shape}, n {n}")
    return _gemm2d(x, pairs, jnp.zeros((n,), jnp.int8))


class GemmWeight(eqx.Module):
    """A `Block` matrix for bf16 compute over many rows: `apply` rounds x to bf16 and
    multiplies with float32 accumulation, through `gemm` (w packed by `to_pairs`) when
    `packed`, else through XLA's dot (`gemm_reference`, w the bf16 [K, N] matrix).  Kinds
    as `PackedWeight` ("qkv", "out", "plain")."""

    w: Array
    kind: str = eqx.field(static=True)
    heads: int = eqx.field(static=True)
    k: int = eqx.field(static=True)
    n: int = eqx.field(static=True)
    packed: bool = eqx.field(static=True)

    @classmethod
    def pack(cls, logical: Array, kind: str, packed: bool, stacked: bool = False) -> "GemmWeight":
        """logical: one weight in `Block`'s layout, or with `stacked` every layer's on a
        leading axis (the packing is vmapped over it; the result scans like the block)."""
        if kind not in ("qkv", "out"):
            kind = "plain"
        matrix, heads = _as_matrix(logical[0] if stacked else logical, kind)
        k, n = matrix.shape

        def one(w):
            m = _as_matrix(w, kind)[0]
            # packed: kept as uint16 bits (see `_as_bits`: a stacked bf16 weight that the
            # layer scan slices would be widened to float32 by XLA:CPU on every call)
            return _as_bits(to_pairs(m)) if packed else m.astype(jnp.bfloat16)

        return cls(jax.vmap(one)(logical) if stacked else one(logical), kind, heads, k, n, packed)

    @property
    def dtype(self):
        return jnp.dtype(jnp.bfloat16)

    def matrix(self) -> Array:
        """The bf16 [K, N] matrix."""
        return from_pairs(self.w, self.k, self.n) if self.packed else self.w

    def logical(self) -> Array:
        """The bf16 weight in `Block`'s layout."""
        return _from_matrix(self.matrix(), self.kind, self.heads)

    def _mm(self, x: Array) -> Array:
        return gemm(x, self.w, self.n) if self.packed else gemm_reference(x, self.w)

    def apply(self, x: Array, spec: str) -> Array:
        """`jnp.einsum(spec, bf16(x), bf16 weight)` with float32 products and sums."""
        if spec not in _SPECS:  # e.g. per-head q/k/v input patching: XLA, the same numbers
            return jnp.einsum(spec, x.astype(jnp.bfloat16), self.logical(), preferred_element_type=jnp.float32)
        if self.kind == "qkv":
            return self._mm(x).reshape(x.shape[0], self.heads, -1)
        if self.kind == "out":
            return self._mm(x.reshape(x.shape[0], -1))
        return self._mm(x)


def gemm_blocks(blocks, use_kernel: bool | None = None):
    """A stacked `Block` (every layer on a leading axis) with each block matrix replaced by
    a stacked `GemmWeight`: the forward then computes every block matmul in bf16 with
    float32 accumulation (norms, softmax, activations and residuals stay in the model's
    dtype).  use_kernel: None = `enabled()` (the kernel on the CPU backend, XLA's dot
    elsewhere).  A second copy of the block weights, in bf16."""
    packed = enabled() if use_kernel is None else bool(use_kernel)
    if packed and not available():
        raise RuntimeError("gemm_blocks: use_kernel=True but the bf16 kernel is not available")
    names = [n for n in BLOCK_MATRIX_KINDS if getattr(blocks, n) is not None]
    return eqx.tree_at(lambda b: [getattr(b, n) for n in names], blocks,
                       [GemmWeight.pack(getattr(blocks, n), BLOCK_MATRIX_KINDS[n], packed, stacked=True) for n in names])
