"""The many-row bf16 GEMM (models/bf16_kernel.py: gemm, GemmWeight, gemm_blocks) and the
bf16-compute statistics of lens.modularity.pruning built on it.

The kernel rounds x to bf16 (round to nearest even), multiplies by the bf16 weight and
sums in float32.  Expected values: a float64 numpy product of the same bf16-rounded
inputs.  Its only error is then float32 summation over K terms: bounded by
K * 2^-24 * (|x| @ |w|) per element; we assert 2e-5 * (|x| @ |w|) (K <= 333 here, bound
2e-5).  The statistics in bf16 differ from float32 by bf16 rounding of every matmul input
(relative 2^-9 per number): on the tiny random models the measured max relative
difference of mean |a| per neuron is ~1e-2 and the median ~1e-3; asserted: max < 5e-2,
median < 5e-3.  Skipped where the kernel cannot be built (no AVX-512 or no compiler).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens.modularity import pruning as M
from lens_tiny import VOCAB, tiny
from models import bf16_kernel
from models.bf16_kernel import GemmWeight, from_pairs, gemm, gemm_blocks, to_pairs

pytestmark = pytest.mark.skipif(not bf16_kernel.available(), reason="bf16 kernel not buildable here")

REL = 2e-5


def _bf16(a):
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def _case(rows, k, n, seed=0):
    rs = np.random.RandomState(seed)
    x = rs.randn(rows, k).astype(np.float32)
    w = rs.randn(k, n).astype(np.float32)
    xb, wb = _bf16(x), _bf16(w)
    return jnp.asarray(x), jnp.asarray(w), xb @ wb, np.abs(xb) @ np.abs(wb)


def _check(got, ref, scale):
    got = np.asarray(got, np.float64)
    assert got.shape == ref.shape
    assert np.all(np.abs(got - ref) <= REL * scale + 1e-30)


# odd K (a zero pair row), odd N (a partial panel), row counts below / across the 6-row
# microkernel and the 96-row work items (one thread and two)
@pytest.mark.parametrize("rows,k,n", [(1, 1, 1), (7, 5, 17), (13, 64, 64), (101, 97, 130), (203, 333, 70)])
def test_gemm_matches_numpy_jitted_and_vmapped(rows, k, n):
    x, w, ref, scale = _case(rows, k, n)
    pairs = to_pairs(w)
    assert pairs.shape == (-(-n // 64), -(-k // 2), 64, 2)
    assert np.array_equal(np.asarray(from_pairs(pairs, k, n)), np.asarray(w.astype(jnp.bfloat16)))
    _check(jax.jit(gemm, static_argnums=2)(x, pairs, n), ref, scale)
    # vmapped: over rows (one call of all rows) and over a batch of 3 row-sets
    _check(jax.jit(jax.vmap(lambda r: gemm(r[None], pairs, n)[0]))(x), ref, scale)
    xs = jnp.stack([x, 2 * x, -x])
    got = jax.jit(jax.vmap(lambda a: gemm(a, pairs, n)))(xs)
    for i, f in enumerate((1, 2, -1)):
        _check(got[i], f * ref, abs(f) * scale)


def test_gemm_batched_weights_and_bad_shapes():
    x, w, ref, scale = _case(9, 31, 40)
    ws = jnp.stack([to_pairs(w), to_pairs(-w)])  # a weight per batch element: XLA's dot, same numbers
    got = jax.jit(jax.vmap(lambda p: gemm(x, p, 40)))(ws)
    _check(got[0], ref, scale)
    _check(got[1], -ref, scale)
    with pytest.raises(ValueError, match="gemm: x"):
        gemm(x, to_pairs(w), 65)  # 2 panels needed, 1 given
    with pytest.raises(ValueError, match="gemm: x"):
        gemm(x[:, :30], to_pairs(w), 40)  # K 30 -> 15 pairs, the weight has 16


@pytest.mark.parametrize("packed", [True, False])
def test_gemm_weight_applies_every_block_spec(packed):
    rs = np.random.RandomState(3)
    h, d, k, s = 3, 21, 5, 11
    cases = [("qkv", rs.randn(h, d, k), rs.randn(s, d), "sd,hdk->shk"),
             ("out", rs.randn(h, k, d), rs.randn(s, h, k), "shk,hkd->sd"),
             ("plain", rs.randn(d, 2 * d + 1), rs.randn(s, d), "sd,dm->sm"),
             ("qkv", rs.randn(h, d, k), rs.randn(s, h, d), "shd,hdk->shk")]  # input patching: XLA
    for kind, w, x, spec in cases:
        gw = GemmWeight.pack(jnp.asarray(w, jnp.float32), kind, packed)
        ref = np.einsum(spec, _bf16(x), _bf16(w))
        scale = np.einsum(spec, np.abs(_bf16(x)), np.abs(_bf16(w)))
        _check(jax.jit(lambda a, g: g.apply(a, spec))(jnp.asarray(x, jnp.float32), gw), ref, scale)
        assert np.array_equal(np.asarray(gw.logical()), np.asarray(jnp.asarray(w, jnp.float32).astype(jnp.bfloat16)))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_stats_close_to_float32_and_kernel_equals_xla(family, monkeypatch):
    _, model, _ = tiny(family)
    rows = np.random.RandomState(5).randint(0, VOCAB, size=(5, 9))
    f32 = M.activation_stats(model, rows, chunk=2)
    bf = M.activation_stats(model, rows, chunk=2, compute_dtype="bfloat16")
    for a, b in ((f32.neurons, bf.neurons), (f32.head_z, bf.head_z)):
        rel = np.abs(b - a) / np.abs(a)
        assert rel.max() < 5e-2 and np.median(rel) < 5e-3, (rel.max(), np.median(rel))
        assert rel.max() > 0  # really computed in bf16
    # the same bf16 numbers through XLA's dot (the non-kernel path): float32 summation order only
    monkeypatch.setenv(bf16_kernel.ENV_SWITCH, "0")
    xla = M.activation_stats(model, rows, chunk=2, compute_dtype="bfloat16")
    np.testing.assert_allclose(bf.neurons, xla.neurons, rtol=1e-4)
    np.testing.assert_allclose(bf.head_z, xla.head_z, rtol=1e-4)
    scores = M.neuron_scores(model, rows[:3], rows[3:], chunk=2, compute_dtype="bfloat16")
    assert scores.shape == (model.config.n_layers, model.config.d_mlp)
    heads = M.head_scores(model, rows[:3], rows[3:], chunk=2, compute_dtype="bfloat16")
    assert heads.shape == (model.config.n_layers, model.config.n_heads)
    with pytest.raises(ValueError, match="compute_dtype"):
        M.activation_stats(model, rows, compute_dtype="float16")


def test_gemm_blocks_keeps_non_matrix_leaves():
    _, model, _ = tiny("llama")
    blocks = gemm_blocks(model.blocks, use_kernel=True)
    assert isinstance(blocks.W_Q, GemmWeight) and blocks.W_Q.w.shape[0] == model.config.n_layers
    assert blocks.ln1_w is model.blocks.ln1_w
    unpacked = jax.vmap(lambda w: from_pairs(w, blocks.W_out.k, blocks.W_out.n))(blocks.W_out.w)
    np.testing.assert_array_equal(np.asarray(unpacked), np.asarray(model.blocks.W_out.astype(jnp.bfloat16)))
