"""Shared vs specific effects (lens.steering.melbo.decompose) against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_reference as R
from lens import geometry
from lens.steering.melbo import decompose as D

K = 16


def orthogonal_effects(k=K, units=5, d=48, seed=0):
    q, _ = np.linalg.qr(np.random.RandomState(seed).randn(units * d, k))
    return (3.0 * q.T).reshape(k, units, d).astype(np.float32)


def test_shared_share_is_one_over_k_for_orthogonal_equal_norm_effects():
    out = D.shared_specific(orthogonal_effects())
    assert abs(out["shared_share"] - 1 / K) < 1e-6  # exactly 1/16 up to float32
    assert abs(out["participation_ratio"] - K) < 1e-4
    # centred orthogonal equal-norm vectors span K - 1 directions equally: PR = K - 1
    assert abs(out["specific_participation_ratio"] - (K - 1)) < 1e-3


def test_specific_pr_equals_the_hand_computation_on_centred_normalised_effects():
    rs = np.random.RandomState(1)
    e = (rs.randn(K, 7, 33) + 2.0 * rs.randn(1, 7, 33)).astype(np.float32)  # a shared part
    out = D.shared_specific(e)
    flat = R.f64(e).reshape(K, -1)
    centred = flat - flat.mean(0)
    assert abs(out["specific_participation_ratio"] - R.participation_ratio(centred, normalize=True)) < 1e-4
    assert abs(out["participation_ratio"] - R.participation_ratio(flat, normalize=True)) < 1e-4
    assert abs(out["participation_ratio"] - float(geometry.participation_ratio(flat, normalize=True))) < 1e-4
    m = flat.mean(0)
    assert abs(out["shared_share"] - K * m @ m / (flat ** 2).sum()) < 1e-5


def test_the_two_readings_separate_a_shared_component_from_few_effects():
    rs = np.random.RandomState(2)
    common = rs.randn(1, 200)
    shared = (5 * common + rs.randn(K, 200)).astype(np.float32)  # one big shared part + distinct rest
    few = np.repeat(rs.randn(2, 200), K // 2, axis=0).astype(np.float32)  # truly 2 effects
    a, b = D.shared_specific(shared), D.shared_specific(few)
    assert a["participation_ratio"] < 1.5 and a["shared_share"] > 0.9  # raw reading: "collapse"
    assert a["specific_participation_ratio"] > 0.6 * (K - 1)  # but the specific parts are distinct
    assert b["specific_participation_ratio"] < 1.01  # few distinct: the specific parts collapse too


def test_residual_pr_equals_the_hand_computation_on_projected_normalised_effects():
    """The shared direction projected out of each effect in float64, by hand; jitted and
    vmapped over a K > 1 stack of Gram matrices as well."""
    rs = np.random.RandomState(4)
    e = (rs.randn(K, 7, 33) + rs.uniform(0.5, 4.0, (K, 1, 1)) * rs.randn(1, 7, 33)).astype(np.float32)
    flat = R.f64(e).reshape(K, -1)
    m = flat.mean(0)
    projected = flat - np.outer(flat @ m / (m @ m), m)
    want = R.participation_ratio(projected, normalize=True)
    assert abs(D.shared_specific(e)["residual_participation_ratio"] - want) < 1e-3
    grams = jnp.stack([jnp.asarray(flat @ flat.T, jnp.float32), jnp.asarray(flat[::-1] @ flat[::-1].T, jnp.float32)])
    got = jax.jit(jax.vmap(D.readings_from_gram))(grams)["residual_participation_ratio"]
    np.testing.assert_allclose(np.asarray(got), [want, want], rtol=1e-4)  # a permutation changes no PR


def test_residual_pr_does_not_count_different_amounts_of_the_shared_direction():
    """Effects c_k m + s_k with orthogonal equal-norm s_k and very different amounts c_k of
    one shared direction m: centring leaves (c_k - mean c) m in every specific part, so the
    specific PR drops well below K - 1; projecting m out leaves the s_k: residual PR = K - 1
    (the s_k are centred first so that their mean adds nothing along m)."""
    rs = np.random.RandomState(5)
    q, _ = np.linalg.qr(rs.randn(300, K + 1))
    m, s = q[:, 0], q[:, 1:].T  # m orthogonal to every s_k
    s = s - s.mean(0)  # equal norms, K - 1 directions, mean 0
    c = np.linspace(0.0, 30.0, K)
    e = (c[:, None] * m[None] + s).astype(np.float32)
    out = D.shared_specific(e)
    assert abs(out["residual_participation_ratio"] - (K - 1)) < 1e-2
    assert out["specific_participation_ratio"] < 2.0  # the spread of c_k dominates the centred parts


def test_shared_cos_reference():
    rs = np.random.RandomState(3)
    ref = rs.randn(4, 30).astype(np.float32)
    e = (ref[None] + 0.01 * rs.randn(K, 4, 30)).astype(np.float32)
    assert D.shared_specific(e, ref)["shared_cos_reference"] > 0.999
    assert abs(D.shared_specific(e, -ref)["shared_cos_reference"] + 1) < 1e-3


def test_bootstrap_intervals_contain_the_point_estimate():
    rs = np.random.RandomState(4)
    e = (rs.randn(K, 23, 40) + 1.5 * rs.randn(1, 23, 40)).astype(np.float32)
    boot = D.bootstrap_readings(e, n_boot=100, seed=0)
    for name, b in boot.items():
        assert b["lo"] <= b["point"] <= b["hi"], (name, b)
        assert b["hi"] > b["lo"], name  # real spread with 23 units
    assert boot["shared_share"]["point"] == pytest.approx(D.shared_specific(e)["shared_share"], rel=1e-6)


def test_pr_vs_k_is_the_leading_submatrix():
    rs = np.random.RandomState(5)
    e = rs.randn(K, 3, 20).astype(np.float32)
    curve = D.pr_vs_k(e, [2, 5, 16])
    for j, k in enumerate([2, 5, 16]):
        assert curve["participation_ratio"][j] == pytest.approx(D.shared_specific(e[:k])["participation_ratio"], rel=1e-5)
        assert curve["specific_participation_ratio"][j] == pytest.approx(
            D.shared_specific(e[:k])["specific_participation_ratio"], rel=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        D.pr_vs_k(e, [17])


def test_pr_vs_k_is_monotone_for_random_orthogonal_vectors_at_small_rho_on_a_tiny_model():
    """The control's K-curve: random orthogonal vectors at rho 0.05 act almost linearly,
    so each added vector adds a new direction downstream."""
    from lens.core.capture import pad_prompts
    from lens.steering.melbo import analysis, make_problem
    from lens_tiny import VOCAB, tiny

    _, model, _ = tiny("llama")
    tokens, mask = pad_prompts([list(np.random.RandomState(7).randint(0, VOCAB, 12)),
                                list(np.random.RandomState(8).randint(0, VOCAB, 9))])
    problem = make_problem(model, tokens, mask, 0, 1)
    d = model.config.d_model
    q, _ = np.linalg.qr(np.random.RandomState(9).randn(d, 12))
    x_norm = analysis.median_source_norm(problem)
    vectors = (q.T * 0.05 * x_norm).astype(np.float32)
    eff = analysis.steered_effects(problem, vectors, chunk=4)
    effects = np.asarray(eff.target).reshape(12, -1, d)  # units = (prompt, position)
    curve = D.pr_vs_k(effects, list(range(2, 13)))
    assert np.all(np.diff(curve["participation_ratio"]) > 0), curve["participation_ratio"]
    assert np.all(np.diff(curve["specific_participation_ratio"]) > 0)


def test_closed_form_per_token_against_the_pooled_geometry():
    """Tokens of different norms, all orthogonal to K orthogonal vectors of different norms:
    the pooled cosine of exact float64 effects equals the per-token closed form."""
    d, n, k = 96, 9, 4
    q, _ = np.linalg.qr(np.random.RandomState(6).randn(d, n + k))
    xs = q[:, :n].T * np.linspace(5, 40, n)[:, None]
    vs = q[:, n:].T * np.array([3.0, 6.0, 9.0, 12.0])[:, None]
    eff = np.stack([np.concatenate([R.sphere(x + v, "rms") - R.sphere(x, "rms") for x in xs]) for v in vs])
    cos = R.cosine_matrix(eff)
    want = cos[~np.eye(k, dtype=bool)].mean()
    got = D.closed_form_per_token(np.linalg.norm(xs, axis=1), np.linalg.norm(vs, axis=1))
    assert got["pooled_per_token"] == pytest.approx(want, abs=1e-9)
    # with one norm everywhere it is the textbook closed form
    same = D.closed_form_per_token(np.full(5, 10.0), np.full(3, 7.0))
    assert same["pooled_per_token"] == pytest.approx(float(geometry.orthogonal_pair_cosine_closed_form(0.7)), rel=1e-6)
    assert same["at_mean_rho"] == pytest.approx(same["pooled_per_token"], rel=1e-6)


def test_bootstrap_jits_and_vmaps_like_a_loop():
    e = np.random.RandomState(8).randn(K, 11, 24).astype(np.float32)
    grams = D.unit_grams(e)
    counts = np.random.RandomState(0).randint(0, 3, size=(5, 11)).astype(np.int32)
    batched = jax.jit(jax.vmap(lambda c: D.readings_from_gram(jnp.einsum("u,ukj->kj", c.astype(jnp.float32), grams))))(counts)
    for b in range(5):
        w = np.repeat(np.arange(11), counts[b])
        flat = R.f64(e[:, w]).reshape(K, -1)
        assert float(batched["participation_ratio"][b]) == pytest.approx(R.participation_ratio(flat, True), rel=1e-4)


def test_closed_form_pr_vs_k_follows_from_the_mean_cosine_and_the_gram():
    """Every closed-form value = the equicorrelated formula at the pooled Gram's mean cosine
    (numpy, float64); measured = the PR of the leading k x k block; per-unit cosines by a loop."""
    rs = np.random.RandomState(3)
    e = (rs.randn(6, 4, 10) + 0.8 * rs.randn(1, 4, 10)).astype(np.float32)  # a shared part: c > 0
    g = np.einsum("kud,jud->kj", e.astype(np.float64), e.astype(np.float64))
    unit = D.unit_cosine_means(e)
    for u in range(4):
        x = e[:, u].astype(np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        cu = x @ x.T
        assert unit[u] == pytest.approx(cu[~np.eye(6, dtype=bool)].mean(), abs=1e-6)
    cf = D.closed_form_pr_vs_k(g, unit, [2, 3, 6], extrapolate=(800,), control_gram=np.eye(6))
    dn = np.sqrt(np.diag(g))
    cmat = g / dn[:, None] / dn[None, :]
    c = cmat[~np.eye(6, dtype=bool)].mean()
    assert cf["mean_cosine"] == pytest.approx(c, rel=1e-9) and c > 0.1
    for row in cf["rows"]:
        k = row["k"]
        assert row["closed_form"] == pytest.approx(k * k / ((1 + (k - 1) * c) ** 2 + (k - 1) * (1 - c) ** 2), rel=1e-5)
        if k <= 6:
            sub = cmat[:k, :k]
            assert row["measured"] == pytest.approx(k * k / np.sum(sub * sub), rel=1e-5)
            assert row["control_measured"] == pytest.approx(k, rel=1e-6)
        else:
            assert row["measured"] is None
    lo, hi = np.quantile(unit, [0.05, 0.95])
    assert cf["unit_cosine_p5"] == pytest.approx(lo) and cf["unit_cosine_p95"] == pytest.approx(hi)
    assert cf["rows"][-1]["closed_form_lo"] <= cf["rows"][-1]["closed_form"] <= cf["rows"][-1]["closed_form_hi"]
    assert cf["k_at_10x"] == geometry.k_at_degeneracy(c, 10.0)


def test_subset_readings_equal_the_readings_of_the_subset():
    e = orthogonal_effects(k=6, units=3, d=8) + np.random.RandomState(1).randn(1, 3, 8).astype(np.float32)
    g = np.einsum("kud,jud->kj", e, e)
    idx = [0, 2, 5]
    want = D.shared_specific(e[idx])
    got = D.subset_readings(g, idx)
    for key in ("shared_share", "participation_ratio", "specific_participation_ratio", "residual_participation_ratio"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key
    assert D.subset_readings(g, [3]) is None
