"""lens.geometry.logits: exact logit decomposition, ranking agreement, logit-effect similarity.

Tolerances: float32 eps = 2^-23 ~ 1.2e-7.  A logit is a d-term dot product, accurate to
~d eps * sum_i |w_i x_i| (we use 4 d eps times that bound).  Reconstructing
`token_norm * act_norm * cosine + const` repeats ~5 roundings of the dot product and one of
the sum, so it matches the logits to 8 eps * (|dot| + |const|).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lens.geometry as g

EPS32 = float(np.finfo(np.float32).eps)
SETTINGS = settings(max_examples=25)  # on top of the derandomised profile of tests/conftest.py
D, VOCAB, SEQ, K = 16, 64, 3, 4

_decompose = jax.jit(g.decompose_logits)
_ranking = jax.jit(g.ranking_agreement, static_argnames="k")
_similarity = jax.jit(g.logit_effect_similarity, static_argnames="k")


def _rand(seed, shape, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _check_decomposition(x, w_u, gamma, bias, beta):
    xhat = np.asarray(g.to_sphere(jnp.asarray(x), "rms"))
    dec = _decompose(jnp.asarray(xhat), jnp.asarray(w_u), gamma, bias, beta)

    # The model's logits, in float64: W_U (gamma * xhat + beta) + b.
    g64 = np.ones(D) if gamma is None else gamma.astype(np.float64)
    b64 = np.zeros(D) if beta is None else beta.astype(np.float64)
    w64 = w_u.astype(np.float64)
    want = (g64 * xhat + b64) @ w64.T + (0.0 if bias is None else bias)
    bound = np.abs(g64 * xhat) @ np.abs(w64.T) + np.abs(b64) @ np.abs(w64.T)
    np.testing.assert_allclose(
        dec.logits, want, atol=float(4 * D * EPS32 * bound.max()) + 4 * EPS32
    )

    logits, const = np.asarray(dec.logits, np.float64), np.asarray(dec.const, np.float64)
    tol = 8 * EPS32 * (np.abs(logits - const) + np.abs(const)) + 8 * EPS32 * np.abs(logits)
    assert np.all(np.abs(np.asarray(dec.reconstruct(), np.float64) - logits) <= tol)
    assert dec.cosine.shape == dec.logits.shape and dec.act_norm.shape == x.shape[:-1]
    assert np.all(np.abs(np.asarray(dec.cosine)) <= 1.0 + 4 * EPS32)
    # With eps = 0 the sphere point has norm sqrt(d) (d-term reduction: 4 d eps relative).
    np.testing.assert_allclose(dec.act_norm, np.sqrt(D), rtol=4 * D * EPS32)
    np.testing.assert_allclose(
        dec.token_norm, np.linalg.norm(w64 * g64, axis=1), rtol=4 * D * EPS32
    )


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), batched=st.booleans(), log_scale=st.floats(-2, 2))
def test_decomposition_sums_to_logits(seed, batched, log_scale):
    scale = np.float32(10.0**log_scale)
    _check_decomposition(
        _rand(seed, (SEQ, D) if batched else (D,), 2.0),
        _rand(seed + 1, (VOCAB, D), 0.5) * scale,
        _rand(seed + 2, (D,)),
        _rand(seed + 3, (VOCAB,)) * scale,
        _rand(seed + 4, (D,)),
    )


def test_decomposition_without_gain_and_biases():
    _check_decomposition(_rand(20, (D,), 2.0), _rand(21, (VOCAB, D)), None, None, None)


def test_zero_token_and_zero_activation():
    w_u = jnp.asarray(_rand(5, (VOCAB, D))).at[3].set(0.0)
    dec = _decompose(jnp.asarray(_rand(6, (D,))), w_u, None, None, None)
    assert float(dec.cosine[3]) == 0.0 and float(dec.token_norm[3]) == 0.0
    assert float(dec.reconstruct()[3]) == float(dec.logits[3]) == 0.0
    dec0 = _decompose(jnp.zeros(D), w_u, None, None, None)
    np.testing.assert_array_equal(dec0.cosine, 0.0)
    np.testing.assert_array_equal(dec0.reconstruct(), dec0.logits)


def test_bf16_inputs_are_decomposed_in_float32():
    x16 = jnp.asarray(_rand(7, (D,))).astype(jnp.bfloat16)
    w16 = jnp.asarray(_rand(8, (VOCAB, D))).astype(jnp.bfloat16)
    dec = _decompose(x16, w16, None, None, None)
    assert dec.logits.dtype == jnp.float32
    # bf16 values are exact in float32, so this equals the float32 decomposition exactly.
    ref = _decompose(x16.astype(jnp.float32), w16.astype(jnp.float32), None, None, None)
    np.testing.assert_allclose(
        dec.logits, ref.logits, rtol=0, atol=4 * D * EPS32 * float(jnp.abs(ref.logits).max())
    )


def _ref_ranking(x, w_u, k):
    x, w_u = x.astype(np.float64), w_u.astype(np.float64)
    dot = w_u @ x
    tn = np.linalg.norm(w_u, axis=1)
    scores = [dot, dot / (tn * np.linalg.norm(x)), -np.linalg.norm(x - w_u, axis=1), tn]
    tops = [set(np.argsort(-s)[:k]) for s in scores]
    overlap = np.asarray([[len(a & b) / k for b in tops] for a in tops])
    # Spearman = Pearson correlation of ranks (no ties in continuous data).
    ranks = np.argsort(np.argsort(np.stack(scores), axis=1), axis=1).astype(np.float64)
    spearman = np.corrcoef(ranks)
    return overlap, spearman


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1))
def test_ranking_agreement_matches_reference(seed):
    x = _rand(seed, (D,), 3.0)
    # Token norms spread over a decade so the four rankings genuinely differ.
    w_u = _rand(seed + 1, (VOCAB, D)) * np.exp(
        np.random.default_rng(seed).uniform(-1, 1, (VOCAB, 1))
    ).astype(np.float32)
    got = _ranking(jnp.asarray(x), jnp.asarray(w_u), 8)
    overlap, spearman = _ref_ranking(x, w_u, 8)
    # Random continuous scores: no ties, no near-ties closer than float32 rounding (gaps
    # are ~1/vocab relative), so sets are identical and Spearman agrees to rounding
    # of the centred-rank Pearson sum (~vocab eps relative).
    np.testing.assert_array_equal(got.topk_overlap, overlap)
    np.testing.assert_allclose(got.spearman, spearman, atol=4 * VOCAB * EPS32)
    assert got.methods == g.RANKING_METHODS
    np.testing.assert_allclose(got.get("dot", "cosine")[1], spearman[0, 1], atol=4 * VOCAB * EPS32)


def test_equal_token_norms_make_dot_cosine_and_euclidean_agree():
    w_u = _rand(9, (VOCAB, D))
    w_u /= np.linalg.norm(w_u, axis=1, keepdims=True)
    got = _ranking(jnp.asarray(_rand(10, (D,))), jnp.asarray(w_u), 8)
    np.testing.assert_array_equal(got.topk_overlap[:3, :3], 1.0)
    np.testing.assert_allclose(got.spearman[:3, :3], 1.0, atol=4 * VOCAB * EPS32)


def test_nearest_token_is_not_the_model_top_token():
    # x = e0; a long aligned token beats a short nearby one on dot and cosine, but the
    # nearby one is nearer in Euclidean distance.
    x = jnp.asarray([1.0, 0.0])
    w_u = jnp.asarray([[10.0, 0.0], [1.0, 0.1]])
    got = _ranking(x, w_u, 1)
    assert float(got.get("dot", "cosine")[0]) == 1.0
    assert float(got.get("dot", "euclidean")[0]) == 0.0


def test_ranking_k_validation():
    with pytest.raises(ValueError, match="k must be"):
        g.ranking_agreement(jnp.ones(3), jnp.ones((5, 3)), 6)
    with pytest.raises(ValueError, match="k must be"):
        g.logit_effect_similarity(jnp.ones((2, 5)), jnp.ones(5), k=0)
    # A shape mismatch is a ValueError (a TypeError if a jaxtyping runtime checker is on).
    with pytest.raises((ValueError, TypeError)):
        g.logit_effect_similarity(jnp.ones((2, 3, 5)), jnp.ones((2, 5)), k=1)


def _ref_similarity(steered, base, k):
    """float64 reference, positions averaged."""

    def logsm(a):
        a = a - a.max(-1, keepdims=True)
        return a - np.log(np.exp(a).sum(-1, keepdims=True))

    steered, base = steered.astype(np.float64), base.astype(np.float64)
    lp, lq = logsm(steered), logsm(base)
    p = np.exp(lp)
    kl = np.einsum("ipv,ijpv->ij", p, lp[:, None] - lp[None]) / base.shape[0]
    m = 0.5 * (p[:, None] + p[None])
    js = (
        0.5
        * (
            np.einsum("ipv,ijpv->ij", p, lp[:, None] - np.log(m))
            + np.einsum("jpv,ijpv->ij", p, lp[None] - np.log(m))
        )
        / base.shape[0]
    )
    delta = lp - lq
    tops = [
        [set(np.argsort(-delta[i, q])[:k]) for q in range(base.shape[0])]
        for i in range(len(steered))
    ]
    overlap = np.asarray(
        [
            [np.mean([len(a & b) / k for a, b in zip(ti, tj, strict=True)]) for tj in tops]
            for ti in tops
        ]
    )
    c = (delta - delta.mean(-1, keepdims=True)).reshape(len(steered), -1)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    kl_base = np.einsum("ipv,ipv->i", p, delta) / base.shape[0]
    return kl, js, overlap, c @ c.T, kl_base


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1))
def test_logit_effect_similarity_matches_reference(seed):
    base = _rand(seed, (SEQ, VOCAB), 2.0)
    steered = base + _rand(seed + 1, (K, SEQ, VOCAB), 1.0)
    got = _similarity(jnp.asarray(steered), jnp.asarray(base), 5)
    kl, js, overlap, cos, kl_base = _ref_similarity(steered, base, 5)
    # Divergences are sums of vocab terms of O(1) log-prob differences: 4 vocab eps.
    tol = 4 * VOCAB * EPS32
    np.testing.assert_allclose(got.kl, kl, atol=tol)
    np.testing.assert_allclose(got.js, js, atol=tol)
    np.testing.assert_allclose(got.kl_from_base, kl_base, atol=tol)
    np.testing.assert_allclose(got.cosine, cos, atol=tol)
    # Continuous data, no ties: same sets; the count / (k * positions) is rounded once.
    np.testing.assert_allclose(got.topk_overlap, overlap, rtol=2 * EPS32)
    np.testing.assert_array_equal(got.js, got.js.T)
    assert np.all(np.asarray(got.js) <= np.log(2.0))
    assert got.promoted.shape == (K, SEQ, 5)


def test_identical_effects_and_shift_invariance():
    base = _rand(11, (SEQ, VOCAB))
    one = base + _rand(12, (SEQ, VOCAB))
    # Vector 1 = vector 0 with a per-position constant added: softmax ignores it.
    steered = np.stack(
        [
            one,
            one + np.float32(3.0) * np.arange(SEQ, dtype=np.float32)[:, None],
            base + _rand(13, (SEQ, VOCAB)),
            one,
        ]
    )
    got = _similarity(jnp.asarray(steered), jnp.asarray(base), 5)
    for i, j in [(0, 1), (0, 3), (1, 3)]:
        # log_softmax of shifted logits differs by rounding only (~eps times |logits| ~ 8).
        assert float(got.kl[i, j]) < 64 * EPS32 and float(got.js[i, j]) < 64 * EPS32
        np.testing.assert_allclose(got.cosine[i, j], 1.0, atol=64 * EPS32)
        assert float(got.topk_overlap[i, j]) == 1.0
    np.testing.assert_array_equal(np.diag(np.asarray(got.kl)), 0.0)
    np.testing.assert_array_equal(np.diag(np.asarray(got.topk_overlap)), 1.0)
    assert float(got.kl[0, 2]) > 0.01


def test_similarity_without_position_axis():
    base = _rand(14, (VOCAB,))
    steered = base + _rand(15, (K, VOCAB))
    got = _similarity(jnp.asarray(steered), jnp.asarray(base), 3)
    ref = _similarity(jnp.asarray(steered[:, None]), jnp.asarray(base[None]), 3)
    np.testing.assert_allclose(got.kl, ref.kl, atol=4 * VOCAB * EPS32)
    assert got.promoted.shape == (K, 3)


def test_spearman_and_topk_overlap_jitted_against_scipy_and_sets():
    """The one Spearman / top-k overlap (used by ranking_agreement, logit_effect_similarity
    and geometry_report): jitted, M x N rows of an odd vocabulary, against scipy and sets."""
    from scipy.stats import spearmanr

    rs = np.random.RandomState(3)
    a = rs.randn(3, 37).astype(np.float32)
    b = np.concatenate([rs.randn(1, 37), a[1:2] + 0.3 * rs.randn(1, 37)]).astype(np.float32)
    rho = jax.jit(g.spearman)(a, b)
    over = jax.jit(g.topk_overlap, static_argnums=2)(a, b, 5)
    assert rho.shape == over.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            assert float(rho[i, j]) == pytest.approx(spearmanr(a[i], b[j]).statistic, abs=1e-6)
            top_a, top_b = set(np.argsort(-a[i])[:5]), set(np.argsort(-b[j])[:5])
            assert float(over[i, j]) == pytest.approx(len(top_a & top_b) / 5, rel=1e-6)  # float32 k-ths
    np.testing.assert_allclose(np.diag(g.spearman(a, a)), 1.0, atol=1e-6)
    members = g.topk_members(jnp.asarray(a).reshape(3, 1, 37), 4)
    assert members.shape == (3, 1, 37) and float(members.sum()) == 12.0
