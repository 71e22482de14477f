"""The bf16 decode kernel (models/bf16_kernel.py): its product against a float64 numpy
product of the same bf16 weights, jitted and vmapped, on odd sizes and on sizes that take
its two-thread path; and generation with it against generation with XLA's dots.

The kernel widens bf16 -> float32 exactly and accumulates in float32, so against float64
its error is float32 summation error: relative 1e-5 of max |y| is a loose bound (measured
3e-7 - 9e-7).  Skipped where the kernel cannot be built (no AVX-512 or no C++ compiler).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import bf16_kernel
from models.generation.decode import decode_weights, uses_bf16_kernel

pytestmark = pytest.mark.skipif(not bf16_kernel.available(), reason="bf16 kernel not buildable here")

TOL = 1e-5


def _case(rows, k, n, seed=0):
    rs = np.random.RandomState(seed)
    x = rs.randn(rows, k).astype(np.float32)
    w = jnp.asarray(rs.randn(k, n).astype(np.float32)).astype(jnp.bfloat16)
    ref = x.astype(np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)
    return jnp.asarray(x), w, ref


def _rel(got, ref):
    return np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max()


# odd sizes (a partial last panel), one thread (< 4 panels) and two (>= 4)
@pytest.mark.parametrize("rows,k,n", [(1, 5, 17), (3, 577, 203), (1, 576, 1536), (2, 1031, 700)])
def test_matmul_matches_numpy_jitted_and_vmapped(rows, k, n):
    x, w, ref = _case(rows, k, n)
    panels = bf16_kernel.to_panels(w)
    assert np.array_equal(np.asarray(bf16_kernel.from_panels(panels, n)), np.asarray(w))
    mm = jax.jit(bf16_kernel.matmul, static_argnums=2)
    assert _rel(mm(x, panels, n), ref) < TOL
    # vmapped over rows (generation's batch) and twice (rows x prompts): one call each
    one_row = jax.jit(jax.vmap(lambda r: bf16_kernel.matmul(r[None], panels, n)[0]))
    assert _rel(one_row(x), ref) < TOL
    nested = jax.jit(jax.vmap(jax.vmap(lambda r: bf16_kernel.matmul(r[None], panels, n)[0])))
    stacked = nested(jnp.stack([x, 2 * x]))
    assert _rel(stacked[0], ref) < TOL and _rel(stacked[1], 2 * ref) < TOL


def test_matmul_many_rows_and_batched_weights_fall_back():
    # more rows than MAX_ROWS: XLA's float32 dot; a weight per row: XLA's batched dot
    x, w, ref = _case(bf16_kernel.MAX_ROWS + 3, 64, 48)
    panels = bf16_kernel.to_panels(w)
    assert _rel(jax.jit(bf16_kernel.matmul, static_argnums=2)(x, panels, 48), ref) < TOL
    ws = jnp.stack([panels, (2 * panels.astype(jnp.float32)).astype(jnp.bfloat16)])
    got = jax.jit(jax.vmap(lambda p: bf16_kernel.matmul(x[:4], p, 48)))(ws)
    assert _rel(got[0], ref[:4]) < TOL and _rel(got[1], 2 * ref[:4]) < TOL


def test_matmul_rejects_wrong_inputs():
    x, w, _ = _case(2, 8, 16)
    panels = bf16_kernel.to_panels(w)
    with pytest.raises(ValueError, match="bf16 panels"):
        bf16_kernel.matmul(x, panels.astype(jnp.float32), 16)
    with pytest.raises(ValueError, match="bf16 panels"):
        bf16_kernel.matmul(x[:, :5], panels, 16)
    with pytest.raises(ValueError, match="bf16 panels"):
        bf16_kernel.matmul(x, panels, 65)


@pytest.mark.parametrize("kind,shape", [("qkv", (3, 8, 5)), ("out", (3, 5, 8)), ("plain", (8, 12))])
def test_packed_weight_round_trip_and_products(kind, shape):
    rs = np.random.RandomState(1)
    logical = jnp.asarray(rs.randn(*shape).astype(np.float32)).astype(jnp.bfloat16)
    packed = bf16_kernel.PackedWeight.pack(logical, kind)
    assert np.array_equal(np.asarray(packed.logical()), np.asarray(logical))
    lf = np.asarray(logical.astype(jnp.float32), np.float64)
    if kind == "qkv":
        x = rs.randn(4, 8)
        ref, got = np.einsum("sd,hdk->shk", x, lf), packed.apply(jnp.asarray(x, jnp.float32), "sd,hdk->shk")
        # per-head inputs (path patching): the einsum fallback on the logical weight
        xh = rs.randn(4, 3, 8)
        ref2 = np.einsum("shd,hdk->shk", xh, lf)
        got2 = packed.apply(jnp.asarray(xh, jnp.float32), "shd,hdk->shk")
        assert _rel(got2, ref2) < TOL
    elif kind == "out":
        x = rs.randn(4, 3, 5)
        ref, got = np.einsum("shk,hkd->sd", x, lf), packed.apply(jnp.asarray(x, jnp.float32), "shk,hkd->sd")
    else:
        x = rs.randn(4, 8)
        ref, got = np.einsum("sd,dm->sm", x, lf), packed.apply(jnp.asarray(x, jnp.float32), "sd,dm->sm")
    assert got.shape == ref.shape and _rel(got, ref) < TOL


@pytest.mark.parametrize("family", ["gemma3"])  # local layers, sandwich norms, softcap
def test_generation_with_kernel_matches_xla_dots(family, monkeypatch):
    """Greedy bf16 generation with the kernel against the same model on XLA's dots (the
    path without the kernel) and against the float32 model, within test_bf16's bound."""
    from test_bf16 import BOUND, N_NEW, TOKENS, bf16_pair, torch_logits

    from models.generation.generate import GenerationConfig, generate

    ours, _, hf32 = bf16_pair(family)
    scale = np.abs(torch_logits(hf32, TOKENS)).max()
    monkeypatch.setenv(bf16_kernel.ENV_SWITCH, "1")
    assert uses_bf16_kernel(ours) and decode_weights(ours).unembed is not None
    with_kernel = generate(ours, [TOKENS, TOKENS[:7]], GenerationConfig(N_NEW, eos_token_ids=(), return_logits=True))
    monkeypatch.setenv(bf16_kernel.ENV_SWITCH, "0")
    assert not uses_bf16_kernel(ours) and decode_weights(ours).unembed is None
    xla = generate(ours, [TOKENS, TOKENS[:7]], GenerationConfig(N_NEW, eos_token_ids=(), return_logits=True))
    for row in range(2):
        a, b = with_kernel.tokens[row], xla.tokens[row]
        # identical until a near-tie (bf16 noise may pick either), logits within bf16's bound
        same = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), len(a))
        la, lb = np.asarray(with_kernel.logits[row], np.float64), np.asarray(xla.logits[row], np.float64)
        assert np.abs(la[:same + 1] - lb[:same + 1]).max() / scale < BOUND
        if same < len(a):
            top2 = np.sort(lb[same])[-2:]
            assert top2[1] - top2[0] < 2 * BOUND * scale
    assert os.environ[bf16_kernel.ENV_SWITCH] == "0"  # monkeypatch restores it afterwards


GENERATE_BF16 = """
import models, jax, jax.numpy as jnp
from models.runtime import compile_cache
compile_cache.enable()
from models.core.config import ModelConfig
from models.generation.decode import uses_bf16_kernel
from models.generation.generate import GenerationConfig, generate
cfg = ModelConfig(architecture="llama", vocab_size=61, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16,
                  d_mlp=96, max_seq_len=32, norm_kind="rms", norm_eps=1e-5, activation="silu", gated_mlp=True,
                  positional="rope", tie_embeddings=True)
model = models.init(cfg, jax.random.key(0))
model = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, model)
print(jax.config.jax_compilation_cache_dir, uses_bf16_kernel(model))
print(generate(model, [[3, 4, 5], [6, 7]], GenerationConfig(5, eos_token_ids=())).tokens)
"""


def test_second_bf16_generation_process_reads_the_cache(tmp_path):
    """The compiled decode holding the kernel's custom call is stored in JAX's persistent
    cache: a second identical process writes no new entry (and reuses the built kernel)."""
    from test_compile_cache import entries, run

    first = run(tmp_path, GENERATE_BF16)
    assert first[1] == "True", first  # the kernel path ran
    after_first = entries(tmp_path / "jax")
    kernels = entries(tmp_path / "kernels")
    assert len(after_first) >= 3 and len(kernels) == 1, (after_first, kernels)
    second = run(tmp_path, GENERATE_BF16)
    assert second == first
    assert entries(tmp_path / "jax") == after_first and entries(tmp_path / "kernels") == kernels
