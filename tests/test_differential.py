"""Differential tests: every public numeric function, jitted and vmapped (K > 1), against an
independent float64 computation.

Why: XLA:CPU once miscompiled a jitted, vmapped `v - y (y.v)/d` (16% wrong) while every eager
test passed (see `models/runtime/xla_guard.py`).  Each row below runs the function the way the
library and the scripts do (under `jax.jit`, with a `jax.vmap` over K > 1 and odd sizes)
and compares it with NumPy float64 (`np_reference.py`: formulas, finite differences,
eigenvalues, union-find) or with transformers + PyTorch in float64 on the same weights.
The geometry rows run at the main job's shapes: x [40, 576] and [40, 640], x [87, 576],
K = 16, RMS and Layer norm, random gains, rho 0.1 and 1.

One table: a new public function is one new `@row(...)`; `test_every_public_function_has_a_row`
fails when a public function of the covered modules has none.  Tolerances are relative to
the reference's largest entry unless stated; each says what was measured.
"""

from __future__ import annotations

import copy
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lens
from lens import models
import np_reference as R
from lens.core import folding
from lens.core import stats as St
from lens import geometry as G
from lens.core.capture import head_output, head_outputs, pad_prompts, resid_at, run_with_cache
from lens.steering.melbo import analysis as A
from lens.steering.melbo.problem import make_problem
from lens_tiny import VOCAB, tiny

ROWS: dict[str, callable] = {}
# Public functions with no numeric result to compare, and why.
EXEMPT = {
    "lens.core.sweep.chunk_size_for": "a memory heuristic (how many vectors fit a chunk), not a numeric result",
    "lens.steering.melbo.analysis.analysis_mesh": "device bookkeeping (which mesh to use), no numbers",
}
COVERED_MODULES = ("lens.geometry", "lens.core.folding", "lens.core.capture", "lens.core.sweep", "lens.core.stats",
                   "lens.steering.melbo.analysis")
K = 16
EPS = 1e-5


def row(*names):
    def register(fn):
        for name in names:
            assert name not in ROWS, name
            ROWS[name] = fn
        return fn

    return register


# ----------------------------------------------------------------------------- geometry data
# (n, d, kind, rho): the main job's x_s pools ~87 real tokens of width 576; [40, 640] is
# Gemma 3 270M's width; LayerNorm rows get a per-row mean offset so centring matters.
GEO_CASES = [(40, 576, "rms", 0.1), (40, 576, "rms", 1.0), (40, 640, "layer", 0.1),
             (40, 640, "layer", 1.0), (87, 576, "rms", 0.71), (87, 576, "layer", 0.71)]


@functools.lru_cache(maxsize=None)
def geo(n, d, kind, rho, seed=0):
    """x [n, d] with unequal row norms (and a mean offset), K orthonormal-direction vectors of
    norm rho * median|x|, a random gain and bias."""
    rs = np.random.RandomState(seed + 7 * d + n)
    x = rs.randn(n, d) * rs.uniform(0.5, 3.0, size=(n, 1))
    if kind == "layer":
        x = x + rs.randn(n, 1) * 2.0
    q, _ = np.linalg.qr(rs.randn(d, K))
    xn = np.median(np.linalg.norm(R.centre(x) if kind == "layer" else x, axis=1))
    v = q.T * rho * xn
    gamma = 1.0 + 0.3 * rs.randn(d)
    beta = 0.1 * rs.randn(d)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return f32(x), f32(v), f32(gamma), f32(beta)


def each_case(check):
    """Run check(name, case-tuple, arrays) for every geometry case."""

    def run(name):
        for case in GEO_CASES:
            check(case, *geo(*case))

    return run


def close(ours, ref, tol, what=""):
    err = R.rel_err(ours, ref)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"


def jv(fn, *args, **kw):
    """jax.jit(jax.vmap(fn)) over the leading axis of every positional arg."""
    return np.asarray(jax.jit(jax.vmap(fn, **kw))(*args))


def sphere_fd_jvp(x, v, kind, eps, t=1e-5):
    """J(x) v by central differences of the float64 sphere map (no analytic formula)."""
    return (R.sphere(R.f64(x) + t * R.f64(v), kind, eps) - R.sphere(R.f64(x) - t * R.f64(v), kind, eps)) / (2 * t)


# ------------------------------------------------------------------------------- norms rows
@row("lens.geometry.to_sphere")
@each_case
def _(case, x, v, gamma, beta):
    kind = case[2]
    ours = jv(lambda vk: G.to_sphere(x + vk, kind, EPS), v)  # [K, n, d]
    close(ours, R.sphere(x[None] + v[:, None], kind, EPS), 2e-6, case)  # measured <= 5e-7


@row("lens.geometry.norm_divisor")
@each_case
def _(case, x, v, gamma, beta):
    kind = case[2]
    ours = jv(lambda vk: G.norm_divisor(x + vk, kind, EPS), v)
    close(ours, R.divisor(x[None] + v[:, None], kind, EPS), 2e-6, case)


@row("lens.geometry.apply_norm")
@each_case
def _(case, x, v, gamma, beta):
    kind = case[2]
    ours = jv(lambda vk: G.apply_norm(x + vk, kind, gamma, beta, EPS), v)
    ref = R.sphere(x[None] + v[:, None], kind, EPS) * gamma + beta
    close(ours, ref, 2e-6, case)


@row("lens.geometry.center")
@each_case
def _(case, x, v, gamma, beta):
    close(jv(lambda vk: G.center(x + vk), v), R.centre(x[None] + R.f64(v)[:, None]), 2e-6, case)


@row("lens.geometry.centering_projector")
def _(name):
    for d in (576, 640, 87):
        P = np.asarray(jax.jit(G.centering_projector, static_argnums=0)(d))
        close(P, np.eye(d) - 1.0 / d, 1e-6, d)
        vs = np.random.RandomState(d).randn(K, d).astype(np.float32)
        applied = jv(lambda vk, P=P: jnp.einsum("ij,j->i", P, vk, precision="highest"), vs)
        close(applied, R.centre(vs), 2e-6, d)


@row("lens.geometry.effective_displacement")
@each_case
def _(case, x, v, gamma, beta):
    kind = case[2]
    ours = jv(lambda vk: G.effective_displacement(x, vk[None], kind, EPS, gamma), v)
    ref = (R.sphere(R.f64(x)[None] + v[:, None], kind, EPS) - R.sphere(x, kind, EPS)[None]) * gamma
    close(ours, ref, 2e-5, case)  # a difference of O(1) sphere points; measured <= 4e-6


@row("lens.geometry.norm_jvp", "lens.geometry.first_order_displacement")
def _(name):
    fn = G.norm_jvp if name.endswith("norm_jvp") else G.first_order_displacement
    for case in GEO_CASES:
        x, v, gamma, _ = geo(*case)
        kind = case[2]
        ours = jv(lambda vk: fn(x, vk[None], kind, EPS, gamma), v)  # THE miscompiled pattern
        ref = np.stack([sphere_fd_jvp(x, vk[None], kind, EPS) for vk in v]) * gamma
        close(ours, ref, 1e-5, case)  # measured <= 2e-6 (0.157 under the miscompile)


@row("lens.geometry.norm_jacobian")
def _(name):
    for case in GEO_CASES[:4]:
        x, v, gamma, _ = geo(*case)
        kind = case[2]
        xs = x[:3]  # three [d, d] Jacobians per case (vmapped)
        ours = jv(lambda xi: G.norm_jacobian(xi, kind, EPS, gamma), xs)
        ref = np.stack([gamma[:, None] * R.jacobian_formula(xi, kind, EPS) for xi in xs])
        close(ours, ref, 1e-5, case)
        # and against finite differences along the K steering directions
        fd = np.stack([sphere_fd_jvp(xi, v, kind, EPS) * gamma for xi in xs])  # [3, K, d]
        close(np.einsum("bij,kj->bki", R.f64(ours), R.f64(v)), fd, 1e-5, case)


# ------------------------------------------------------------------------ orthogonality rows
def _effects(x, v, kind, gamma, order):
    if order == "exact":
        return np.stack([((R.sphere(R.f64(x) + vk, kind, EPS) - R.sphere(x, kind, EPS)) * gamma).ravel() for vk in v])
    return np.stack([(sphere_fd_jvp(x, vk[None], kind, EPS) * gamma).ravel() for vk in v])


@row("lens.geometry.cosine_matrix")
@each_case
def _(case, x, v, gamma, beta):
    effects = np.stack([_effects(x[i:39:3], v, case[2], gamma, "exact") for i in range(3)])  # 3 sets
    effects = effects.astype(np.float32)
    ours = jv(G.cosine_matrix, effects)
    close(ours, np.stack([R.cosine_matrix(e) for e in effects]), 1e-5, case)


@row("lens.geometry.effective_cosine_matrix")
def _(name):
    for case in GEO_CASES:
        x, v, gamma, _ = geo(*case)
        kind = case[2]
        xs = np.stack([x[:13], x[13:26], x[26:39]])  # three batches of 13 activations (vmapped)
        for order in ("exact", "first"):
            ours = jv(lambda xb: G.effective_cosine_matrix(xb, v, kind, EPS, order, gamma), xs)
            ref = np.stack([R.cosine_matrix(_effects(xb, v, kind, gamma, order)) for xb in xs])
            # cosines near 0 (first order at small rho): an absolute tolerance on [-1, 1]
            assert np.abs(ours - ref).max() < 2e-5, (case, order, np.abs(ours - ref).max())


@row("lens.geometry.orthogonal_pair_cosine_closed_form")
def _(name):
    rho = np.geomspace(1e-3, 30, 87).astype(np.float32)
    close(np.asarray(jax.jit(jax.vmap(G.orthogonal_pair_cosine_closed_form))(rho)), R.closed_form(rho), 2e-6)
    # and against the geometry itself: x, v1, v2 mutually orthogonal in d = 576, float64
    q, _ = np.linalg.qr(np.random.RandomState(3).randn(576, 3))
    for r in (0.1, 0.71, 1.0, 3.0):
        x, v1, v2 = q[:, 0] * 24, q[:, 1] * 24 * r, q[:, 2] * 24 * r
        e1, e2 = R.sphere(x + v1, "rms") - R.sphere(x, "rms"), R.sphere(x + v2, "rms") - R.sphere(x, "rms")
        sim = e1 @ e2 / np.linalg.norm(e1) / np.linalg.norm(e2)
        assert abs(float(G.orthogonal_pair_cosine_closed_form(r)) - sim) < 1e-6, r


@row("lens.geometry.orthogonal_pair_cosine_eps")
def _(name):
    # x, v1, v2 mutually orthogonal in d = 576, |v| = rho |x|, RMS with eps: the measured
    # cosine of the two effects in float64 against the jitted, vmapped closed form
    d, s = 576, 3.0
    q, _ = np.linalg.qr(np.random.RandomState(4).randn(d, 3))
    rho = np.array([0.05, 0.3, 0.71, 1.0, 4.0, 17.0])
    for eps in (1e-5, 0.05, 1.0):
        t = np.full_like(rho, eps * d / s**2)
        ours = np.asarray(jax.jit(jax.vmap(G.orthogonal_pair_cosine_eps))(rho.astype(np.float32), t.astype(np.float32)))
        ref = []
        for r in rho:
            x, v1, v2 = q[:, 0] * s, q[:, 1] * s * r, q[:, 2] * s * r
            e1 = R.sphere(x + v1, "rms", eps) - R.sphere(x, "rms", eps)
            e2 = R.sphere(x + v2, "rms", eps) - R.sphere(x, "rms", eps)
            ref.append(e1 @ e2 / np.linalg.norm(e1) / np.linalg.norm(e2))
        close(ours, np.array(ref), 1e-5, eps)


@row("lens.geometry.spearman", "lens.geometry.topk_overlap", "lens.geometry.topk_members")
def _(name):
    # jitted and vmapped over 3 sets: 5 x 2 rows of an odd vocabulary, with ties
    rs = np.random.RandomState(11)
    a = rs.randn(3, 5, 1001).astype(np.float32)
    b = rs.randn(3, 2, 1001).astype(np.float32)
    a[:, :, :40] = 0.25  # ties: ordinal ranks break them by token index
    sp = np.asarray(jax.jit(jax.vmap(G.spearman))(a, b))
    ov = np.asarray(jax.jit(jax.vmap(lambda x, y: G.topk_overlap(x, y, 10)))(a, b))
    mem = np.asarray(jax.jit(jax.vmap(lambda x: G.topk_members(x, 10)))(a))
    for n in range(3):
        for i in range(5):
            assert set(np.flatnonzero(mem[n, i]).tolist()) == R.top_k_set(a[n, i], 10), (n, i)
            for j in range(2):
                ref = np.corrcoef(R.ranks(a[n, i]), R.ranks(b[n, j]))[0, 1]
                assert abs(sp[n, i, j] - ref) < 1e-5, (n, i, j, sp[n, i, j], ref)
                both = R.top_k_set(a[n, i], 10) & R.top_k_set(b[n, j], 10)
                assert abs(ov[n, i, j] - len(both) / 10) < 1e-6, (n, i, j)


# --------------------------------------------------------------------------- degeneracy rows
def _clustered_effects(seed, k=K, width=577):
    """K effects drawn around 5 base directions (plus noise): a few genuine clusters."""
    rs = np.random.RandomState(seed)
    base = rs.randn(5, width)
    pick = rs.randint(0, 5, size=k)
    return (base[pick] * rs.uniform(0.5, 2, (k, 1)) + 0.4 * rs.randn(k, width)).astype(np.float32)


@row("lens.geometry.participation_ratio", "lens.geometry.degeneracy_factor")
def _(name):
    sets = np.stack([_clustered_effects(s) for s in range(3)])
    for normalize in (False, True):
        fn = getattr(G, name.rsplit(".", 1)[1])
        ours = jv(lambda e: fn(e, normalize), sets)
        pr = np.array([R.participation_ratio(e, normalize) for e in sets])
        ref = pr if name.endswith("participation_ratio") else K / pr
        close(ours, ref, 1e-5, normalize)


def _equicorrelated_set(k, c, width=64):
    """K unit vectors with every pairwise cosine exactly c: sqrt(c) u + sqrt(1 - c) e_i, with u
    and the e_i orthonormal (built explicitly; no formula of the code under test)."""
    q, _ = np.linalg.qr(np.random.RandomState(k).randn(width, k + 1))
    return np.sqrt(c) * q[:, 0][None, :] + np.sqrt(1 - c) * q[:, 1:].T


@row("lens.geometry.equicorrelated_participation_ratio")
def _(name):
    # The closed form (jitted, vmapped over 4 cosines, K = 16 and 40) against the eigenvalue
    # PR of explicit equicorrelated sets in float64; float32 closed form: 1e-5 relative.
    cs = np.array([0.0, 0.05, 0.107, 0.4], np.float32)
    for k in (16, 40):
        ours = jv(lambda c: G.equicorrelated_participation_ratio(k, c), cs)
        ref = np.array([R.participation_ratio(_equicorrelated_set(k, float(c))) for c in cs])
        close(ours, ref, 1e-5, k)


@row("lens.geometry.k_at_degeneracy")
def _(name):
    # The smallest K with K / PR >= factor, against a linear scan of the eigenvalue PR of
    # explicit sets (exact integers).
    for c, factor in ((0.3, 2.1), (0.2, 3.3), (0.5, 1.6)):
        k = next(k for k in range(2, 400) if k / R.participation_ratio(_equicorrelated_set(k, c)) >= factor - 1e-9)
        assert G.k_at_degeneracy(c, factor) == k, (c, factor, k)
    assert G.k_at_degeneracy(0.01, 10.0, k_max=1000) is None


@row("lens.geometry.threshold_clusters")
def _(name):
    cos = np.stack([R.cosine_matrix(_clustered_effects(s)) for s in range(4)]).astype(np.float32)
    for th, absolute in ((0.5, False), (0.8, True), (0.3, False)):
        n, labels = jax.jit(jax.vmap(lambda c: G.threshold_clusters(c, th, absolute)))(cos)
        for i in range(4):
            rn, rl = R.clusters(cos[i], th, absolute)
            assert int(n[i]) == rn and np.array_equal(np.asarray(labels[i]), rl), (th, i)
        assert len({int(a) for a in np.asarray(n)}) > 1 or th != 0.5  # non-trivial data


# ------------------------------------------------------------------------------ logit rows
VOCAB_G = 1031


@functools.lru_cache(maxsize=None)
def unembed(d):
    rs = np.random.RandomState(d)
    w = (rs.randn(VOCAB_G, d) * rs.uniform(0.3, 2, (VOCAB_G, 1))).astype(np.float32)
    return w, (0.2 * rs.randn(VOCAB_G)).astype(np.float32)


@row("lens.geometry.decompose_logits")
@each_case
def _(case, x, v, gamma, beta):
    w, bias = unembed(case[1])
    xhat = R.sphere(x, case[2], EPS).astype(np.float32)
    sets = np.stack([xhat[i::3][:13] for i in range(3)])  # [3, 13, d]
    out = jax.jit(jax.vmap(lambda xs: G.decompose_logits(xs, w, gamma, bias, beta)))(sets)
    gw = R.f64(w) * gamma
    ref_logits = np.einsum("bsd,vd->bsv", R.f64(sets), gw) + R.f64(w) @ beta + bias
    tok = np.linalg.norm(gw, axis=1)
    act = np.linalg.norm(R.f64(sets), axis=-1)
    close(out.logits, ref_logits, 2e-6, case)
    close(out.token_norm[0], tok, 2e-6, case)
    close(out.act_norm, act, 2e-6, case)
    close(out.cosine, np.einsum("bsd,vd->bsv", R.f64(sets), gw) / tok / act[..., None], 1e-5, case)
    close(jax.vmap(lambda o: o.reconstruct())(out), ref_logits, 2e-6, case)


@row("lens.core.stats.ranks", "lens.core.stats.spearman", "lens.core.stats.kl_divergence")
def _(name):
    # jitted and vmapped over K = 3 sets of 4 rows of an odd length 1001, with ties; float64
    # numpy references: ordinal ranks (stable argsort), average ranks (mean position of each
    # tied value), Pearson of average ranks, sum p (log p - log q).  Ranks are exact; 1e-5
    # on Spearman and on KL relative to its largest entry (float32 sums of 1001 terms).
    rs = np.random.RandomState(12)
    a = rs.randn(3, 4, 1001).astype(np.float32)
    b = rs.randn(3, 4, 1001).astype(np.float32)
    a[:, :, :60] = 0.5
    b[:, :, 30:90] = -1.0
    ordinal = np.asarray(jax.jit(jax.vmap(lambda x: St.ranks(x, ties="ordinal")))(a))
    average = np.asarray(jax.jit(jax.vmap(St.ranks))(a))
    sp = np.asarray(jax.jit(jax.vmap(St.spearman))(a, b))
    lp, lq = R.log_softmax(a).astype(np.float32), R.log_softmax(b).astype(np.float32)
    kl = np.asarray(jax.jit(jax.vmap(St.kl_divergence))(lp, lq))

    def avg_ranks(x):
        r = R.ranks(x)
        return np.array([r[x == v].mean() for v in x])

    for n in range(3):
        for i in range(4):
            assert (ordinal[n, i] == R.ranks(a[n, i])).all(), (n, i)
            assert (average[n, i] == avg_ranks(a[n, i])).all(), (n, i)
            ref = np.corrcoef(avg_ranks(a[n, i]), avg_ranks(b[n, i]))[0, 1]
            assert abs(sp[n, i] - ref) < 1e-5, (n, i, sp[n, i], ref)
    p64, q64 = R.log_softmax(a), R.log_softmax(b)
    close(kl, (np.exp(p64) * (p64 - q64)).sum(-1), 1e-5, "kl")


@row("lens.geometry.ranking_agreement")
def _(name):
    for d in (576, 640):
        w, _ = unembed(d)
        x, _, gamma, _ = geo(40, d, "rms", 0.1)
        xs = R.sphere(x[:5], "rms").astype(np.float32)
        out = jax.jit(jax.vmap(lambda xi: G.ranking_agreement(xi, w, 10, gamma)))(xs)
        gw = R.f64(w) * gamma
        for i, xi in enumerate(R.f64(xs)):
            dot = gw @ xi
            tn = np.linalg.norm(gw, axis=1)
            scores = [dot, dot / tn / np.linalg.norm(xi), -((xi - gw) ** 2).sum(1), tn]
            tops = [R.top_k_set(s, 10) for s in scores]
            rk = [R.ranks(s) for s in scores]
            for a in range(4):
                for b in range(4):
                    # exact up to float32 rounding of a count / 10
                    assert abs(float(out.topk_overlap[i, a, b]) - len(tops[a] & tops[b]) / 10) < 1e-6, (d, i, a, b)
                    spear = np.corrcoef(rk[a], rk[b])[0, 1]
                    assert abs(float(out.spearman[i, a, b]) - spear) < 1e-5, (d, i, a, b)


@row("lens.geometry.logit_effect_similarity")
def _(name):
    rs = np.random.RandomState(5)
    base = (3 * rs.randn(2, 5, VOCAB_G)).astype(np.float32)  # 2 sets of 5 positions
    steered = (base[:, None] + rs.randn(2, K, 5, VOCAB_G)).astype(np.float32)
    out = jax.jit(jax.vmap(lambda s, b: G.logit_effect_similarity(s, b, k=10)))(steered, base)
    for i in range(2):
        lp, lq = R.log_softmax(steered[i]), R.log_softmax(base[i])  # [K, 5, V], [5, V]
        p = np.exp(lp)
        kl = np.array([[(p[a] * (lp[a] - lp[b])).sum(-1).mean() for b in range(K)] for a in range(K)])
        m = lambda a, b: np.log((p[a] + p[b]) / 2)  # noqa: E731
        js = np.array([[0.5 * ((p[a] * (lp[a] - m(a, b))).sum(-1) + (p[b] * (lp[b] - m(a, b))).sum(-1)).mean()
                        for b in range(K)] for a in range(K)])
        delta = lp - lq
        tops = [[R.top_k_set(delta[a, t], 10) for t in range(5)] for a in range(K)]
        overlap = np.array([[np.mean([len(tops[a][t] & tops[b][t]) / 10 for t in range(5)])
                             for b in range(K)] for a in range(K)])
        centred = delta - delta.mean(-1, keepdims=True)
        assert np.abs(np.asarray(out.kl[i]) - kl).max() < 1e-5
        assert np.abs(np.asarray(out.js[i]) - js).max() < 1e-5
        assert np.abs(np.asarray(out.topk_overlap[i]) - overlap).max() < 1e-6  # counts / 50 in float32
        assert np.abs(np.asarray(out.cosine[i]) - R.cosine_matrix(centred.reshape(K, -1))).max() < 1e-5
        close(out.kl_from_base[i], (p * (lp - lq)).sum(-1).mean(-1), 1e-5)


# ----------------------------------------------------------------------------- sphere rows
@row("lens.geometry.geodesic_angle")
@each_case
def _(case, x, v, gamma, beta):
    kind = case[2]
    ours = jv(lambda vk: G.geodesic_angle(x, x + vk, kind), v)
    c = (lambda a: R.centre(a)) if kind == "layer" else R.f64
    ref = R.angle(c(x)[None], c(R.f64(x)[None] + v[:, None]))
    close(ours, ref, 1e-5, case)


@row("lens.geometry.tangent_project")
@each_case
def _(case, x, v, gamma, beta):
    kind = case[2]
    p = R.sphere(x, kind, 0.0).astype(np.float32)
    ours = jv(lambda vk: G.tangent_project(p, vk[None], kind), v)
    ref = np.stack([R.tangent(p, vk[None], kind) for vk in v])
    close(ours, ref, 1e-5, case)
    # a real projection: tangent vectors are orthogonal to p (and to 1 for LayerNorm)
    assert np.abs(np.einsum("knd,nd->kn", R.f64(ours), R.f64(p))).max() < 1e-3 * np.abs(R.f64(v)).max() * np.sqrt(case[1])


@row("lens.geometry.exp_map")
@each_case
def _(case, x, v, gamma, beta):
    p = R.sphere(x, case[2], 0.0).astype(np.float32)
    scale = np.float32(1.0 / np.median(np.linalg.norm(x, axis=1)) * np.sqrt(case[1]))  # to sphere units
    ours = jv(lambda vk: G.exp_map(p, vk[None] * scale), v)
    close(ours, np.stack([R.exp_map(p, vk[None] * scale) for vk in R.f64(v)]), 1e-5, case)


def _sphere_points(x, v, kind):
    """(p = to_sphere(x) [n, d], q_k = to_sphere(x + v_k) [K, n, d]) in float32, from float64."""
    p = R.sphere(x, kind, 0.0).astype(np.float32)
    return p, np.stack([R.sphere(R.f64(x) + vk, kind, 0.0) for vk in v]).astype(np.float32)


@row("lens.geometry.log_map")
@each_case
def _(case, x, v, gamma, beta):
    p, qs = _sphere_points(x, v, case[2])
    ours = jv(lambda q: G.log_map(p, q), qs)
    close(ours, np.stack([R.log_map(p, q) for q in qs]), 2e-5, case)  # measured <= 4e-6


@row("lens.geometry.geodesic_interpolate")
@each_case
def _(case, x, v, gamma, beta):
    p, qs = _sphere_points(x, v, case[2])
    ts = np.array([0.3, 1.7], np.float32)  # t traced, vmapped too: one compile per shape
    ours = np.asarray(jax.jit(jax.vmap(jax.vmap(lambda q, t: G.geodesic_interpolate(p, q, t), (0, None)),
                                       (None, 0)))(qs, ts))
    for j, t in enumerate(ts):
        close(ours[j], np.stack([R.slerp(p, q, float(t)) for q in qs]), 2e-5, (case, t))


@row("lens.geometry.rotate_towards")
@each_case
def _(case, x, v, gamma, beta):
    kind = case[2]
    angles = np.array([0.05, 1.2], np.float32)
    ours = np.asarray(jax.jit(jax.vmap(jax.vmap(lambda vk, a: G.rotate_towards(x, vk[None], a, kind), (0, None)),
                                       (None, 0)))(v, angles))
    for j, a in enumerate(angles):
        close(ours[j], np.stack([R.rotate(x, vk[None], float(a), kind) for vk in v]), 1e-5, (case, a))


@row("lens.geometry.add_steering")
@each_case
def _(case, x, v, gamma, beta):
    ours = jv(lambda vk: G.add_steering(x, vk[None], 2.5), v)
    close(ours, R.f64(x)[None] + 2.5 * R.f64(v)[:, None], 1e-6, case)


# ------------------------------------------------------------------------ diagnostics rows
@row("lens.geometry.norm_ratio")
@each_case
def _(case, x, v, gamma, beta):
    kind = case[2]
    c = R.centre if kind == "layer" else R.f64
    ours = jv(lambda vk: G.norm_ratio(vk, x, kind), v)
    ref = np.linalg.norm(c(v), axis=1)[:, None] / np.linalg.norm(c(x), axis=1)[None]
    close(ours, ref, 2e-6, case)


@row("lens.geometry.norm_ratio_stats")
def _(name):
    rs = np.random.RandomState(11)
    for d, kind in ((576, "rms"), (640, "layer")):
        resid = (rs.randn(3, 5, 41, d) * rs.uniform(0.5, 3, (3, 5, 41, 1))).astype(np.float32)
        resid[..., 0, :] *= 30  # the BOS outlier
        resid[..., 17] *= 12  # an outlier dimension
        mask = np.ones((3, 41), bool)
        mask[1, 35:] = False
        out = jax.jit(jax.vmap(lambda r, m: G.norm_ratio_stats(r, kind, m, 1, 6.0, 5)))(resid, mask)
        for b in range(3):
            x = R.centre(resid[b]) if kind == "layer" else R.f64(resid[b])
            norms = np.linalg.norm(x, axis=-1)
            valid = mask[b].copy()
            valid[0] = False
            close(out.norms[b], norms, 2e-6)
            close(out.median_norm[b], np.median(norms[:, valid], axis=1), 2e-6)
            close(out.mean_norm[b], norms[:, valid].mean(1), 2e-6)
            close(out.max_norm[b], norms[:, valid].max(1), 2e-6)
            close(out.first_ratio[b], norms[:, 0] / np.median(norms[:, valid], axis=1), 2e-6)
            dim_rms = np.sqrt((x[:, valid] ** 2).mean(1))
            ratio = dim_rms / np.median(dim_rms, axis=1, keepdims=True)
            close(out.dim_ratio[b], ratio, 1e-5)
            assert np.array_equal(np.asarray(out.outlier_dims[b]), ratio >= 6.0)
            assert (np.asarray(out.top_dims[b])[:, 0] == 17).all()


# ============================================================ model-level rows (transformers)
@functools.lru_cache(maxsize=None)
def hf64(name):
    """(transformers model in float64, our float32 port) of the same tiny random weights."""
    hf, ours, _ = tiny(name)
    return copy.deepcopy(hf).double().eval(), ours


def hf_run(hf, tokens, mask=None, hooks=()):
    """(logits [T, V], hidden_states [L+1, T, d], final-norm input [T, d]) in float64."""
    final_in = []
    inner = hf.base_model
    norm = next(getattr(inner, n) for n in ("norm", "ln_f", "final_layer_norm") if hasattr(inner, n))
    handles = [norm.register_forward_pre_hook(lambda m, a: final_in.append(a[0][0].clone()))]
    handles += [getattr(mod, f"register_forward_{kind}hook")(fn) for mod, kind, fn in hooks]
    try:
        with torch.no_grad():
            out = hf(input_ids=torch.as_tensor(np.asarray(tokens)[None], dtype=torch.long),
                     attention_mask=None if mask is None else torch.as_tensor(np.asarray(mask)[None]),
                     output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return (out.logits[0].numpy(), torch.stack(out.hidden_states)[:, 0].numpy(), final_in[0].numpy())


def layers_of(hf):
    inner = hf.base_model
    return inner.layers if hasattr(inner, "layers") else inner.h


def add_hook(hf, layer, v):
    """A pre-hook adding v to the residual entering block `layer` (every position)."""
    t = torch.as_tensor(R.f64(v))
    return (layers_of(hf)[layer], "pre_", lambda m, a: (a[0] + t,) + a[1:])


# Three prompts of unequal (odd) lengths, right-padded: what every batched reader takes.
PROMPTS = [list(np.random.RandomState(1).randint(0, VOCAB, 11)), list(np.random.RandomState(2).randint(0, VOCAB, 7)),
           list(np.random.RandomState(3).randint(0, VOCAB, 9))]
TOK, MASK = pad_prompts(PROMPTS)
TOL_MODEL = 1e-5  # float32 port vs float64 reference on tiny models; measured <= 1.5e-6


def real(a, i):
    return a[..., : len(PROMPTS[i]), :]


@row("models.Transformer.__call__", "models.Transformer.forward")
def _(name):
    # every family through __call__; forward (the same code path plus outputs) on two
    for fam in ("llama", "gpt2", "neox", "gemma3") if name.endswith("__call__") else ("llama", "gemma3"):
        hf, ours = hf64(fam)
        if name.endswith("__call__"):
            logits = np.asarray(jax.jit(jax.vmap(lambda m, t, k: m(t, k), in_axes=(None, 0, 0)))(ours, TOK, MASK))
        else:
            logits = np.asarray(jax.jit(jax.vmap(lambda m, t, k: m.forward(t, k).logits, in_axes=(None, 0, 0)))(
                ours, TOK, MASK))
        for i, p in enumerate(PROMPTS):
            close(real(logits[i], i), hf_run(hf, p)[0], TOL_MODEL, fam)


@row("lens.core.capture.pad_prompts")
def _(name):
    tok, mask = pad_prompts(PROMPTS, pad_id=5)
    for i, p in enumerate(PROMPTS):
        assert list(tok[i, : len(p)]) == p and (tok[i, len(p):] == 5).all()
        assert mask[i].sum() == len(p) and mask[i, : len(p)].all()


@row("lens.core.capture.run_with_cache")
def _(name):
    for fam in ("llama", "gpt2"):
        hf, ours = hf64(fam)
        logits, cache = run_with_cache(ours, TOK, attention_mask=MASK)  # jitted, vmapped over P = 3
        for i, p in enumerate(PROMPTS):
            ref_logits, hidden, final_in = hf_run(hf, p)
            close(real(np.asarray(logits[i]), i), ref_logits, TOL_MODEL, fam)
            n = ours.config.n_layers
            close(real(np.asarray(cache.resid_pre[i]), i), hidden[:n], TOL_MODEL, fam)
            close(real(np.asarray(cache.resid_post[i, -1]), i), final_in, TOL_MODEL, fam)


@row("lens.core.capture.resid_at")
def _(name):
    hf, ours = hf64("llama")
    refs = [hf_run(hf, p) for p in PROMPTS]
    for layer in range(ours.config.n_layers + 1):
        got = np.asarray(resid_at(ours, TOK, layer, MASK))
        for i in range(3):
            ref = refs[i][1][layer] if layer < ours.config.n_layers else refs[i][2]
            close(real(got[i], i), ref, TOL_MODEL, layer)


def _hf_head_outputs(hf, tokens, layer):
    """Each head's write z_h @ W_O[h]^T, from the o_proj input recorded in float64."""
    seen = []
    attn = layers_of(hf)[layer].self_attn
    _, _, _ = hf_run(hf, tokens, hooks=[(attn.o_proj, "pre_", lambda m, a: seen.append(a[0][0].clone()))])
    z = seen[0].numpy()
    W = attn.o_proj.weight.detach().numpy()
    dh = hf.config.head_dim
    return np.stack([z[:, h * dh:(h + 1) * dh] @ W[:, h * dh:(h + 1) * dh].T for h in range(hf.config.num_attention_heads)], 1)


@row("lens.core.capture.head_outputs", "lens.core.capture.head_output")
def _(name):
    hf, ours = hf64("llama")
    _, cache = run_with_cache(ours, TOK, attention_mask=MASK)
    for layer in range(ours.config.n_layers):
        for i, p in enumerate(PROMPTS):
            ref = _hf_head_outputs(hf, p, layer)  # [T, heads, d]
            if name.endswith("head_outputs"):
                got = np.asarray(jax.jit(head_outputs)(ours, cache))[i, layer]
                close(got[: len(p)], ref, TOL_MODEL, layer)
            else:
                one = jax.tree.map(lambda a: a[i], cache)
                h = (layer + i) % ours.config.n_heads  # a different head each time
                got = jax.jit(head_output, static_argnums=(2, 3))(ours, one, layer, h)
                close(np.asarray(got)[: len(p)], ref[:, h], TOL_MODEL, (layer, h))


def _kl_last(steered, base):
    lp, lq = R.log_softmax(steered), R.log_softmax(base)
    return float((np.exp(lp) * (lp - lq)).sum())


@functools.lru_cache(maxsize=None)
def steer_vectors(d, k=3, seed=4):
    return (np.random.RandomState(seed).randn(k, d) * 2.0).astype(np.float32)


@row("lens.core.sweep.sweep_vectors")
def _(name):
    hf, ours = hf64("llama")
    v = steer_vectors(ours.config.d_model)
    coeffs, layers, targets = [0.5, 2.0], [1, 2], [3, 17]
    res = lens.sweep_vectors(ours, TOK, v, coeffs=coeffs, layers=layers, attention_mask=MASK, targets=targets,
                             config=lens.SweepConfig(keep_logits=True, chunk_size=2, progress=False))  # K = 3 in chunks of 2
    for i, p in enumerate(PROMPTS):
        base = hf_run(hf, p)[0][-1]
        for k in range(3):
            for ci, c in enumerate(coeffs):
                for li, layer in enumerate(layers):
                    ref = hf_run(hf, p, hooks=[add_hook(hf, layer, c * v[k])])[0][-1]
                    got = np.asarray(res.logits[k, ci, li, i]).reshape(-1, ref.shape[-1])[-1]
                    close(got, ref, TOL_MODEL, (k, c, layer))
                    assert abs(float(res.kl[k, ci, li, i]) - _kl_last(ref, base)) < 1e-5
                    dlp = R.log_softmax(ref)[targets] - R.log_softmax(base)[targets]
                    assert np.abs(np.asarray(res.logprob_delta[k, ci, li, i]) - dlp).max() < 1e-5


@row("lens.core.sweep.add_vectors")
def _(name):
    for fam in ("llama", "gpt2"):
        hf, ours = hf64(fam)
        v = steer_vectors(ours.config.d_model)
        got = np.asarray(lens.add_vectors(ours, TOK, v, layer=1, coeff=1.5, attention_mask=MASK))  # [K, P, T, V]
        for i, p in enumerate(PROMPTS):
            for k in range(3):
                ref = hf_run(hf, p, hooks=[add_hook(hf, 1, 1.5 * v[k])])[0]
                close(real(got[k, i], i), ref, TOL_MODEL, (fam, k))


@row("lens.core.sweep.run_edits")
def _(name):
    hf, ours = hf64("llama")
    from lens.core import edits as E

    heads = [{1: [0]}, {1: [3, 5]}, {2: [2]}]
    stacked = E.stack_edits([E.ablate_heads(ours, h) for h in heads])
    got = np.asarray(lens.run_edits(ours, TOK, stacked, attention_mask=MASK))
    dh = hf.config.head_dim

    def zero_heads(hs):
        def fn(m, a):
            z = a[0].clone()
            for h in hs:
                z[..., h * dh:(h + 1) * dh] = 0
            return (z,) + a[1:]
        return fn

    for k, spec in enumerate(heads):
        hooks = [(layers_of(hf)[layer].self_attn.o_proj, "pre_", zero_heads(hs)) for layer, hs in spec.items()]
        for i, p in enumerate(PROMPTS):
            close(real(got[k, i], i), hf_run(hf, p, hooks=hooks)[0], TOL_MODEL, (k, i))


@row("lens.core.sweep.sweep_edits")
def _(name):
    """K = 3 stacked edits of different kinds (head ablation, a vector, both) vs hooks."""
    hf, ours = hf64("llama")
    from lens.core import edits as E

    v = steer_vectors(ours.config.d_model)
    stacked = E.stack_edits([E.ablate_heads(ours, {1: [2]}), E.add(ours, v[0], [2]),
                             E.combine(E.ablate_heads(ours, {1: [4]}), E.add(ours, v[1], [1]))])
    res = lens.core.sweep.sweep_edits(ours, TOK, stacked, attention_mask=MASK, targets=[3, 17],
                                      config=lens.SweepConfig(keep_logits=True, chunk_size=2, progress=False))
    dh = hf.config.head_dim

    def zero_head(h):
        def fn(m, a):
            z = a[0].clone()
            z[..., h * dh:(h + 1) * dh] = 0
            return (z,) + a[1:]
        return fn

    o_proj = layers_of(hf)[1].self_attn.o_proj
    hooks = [[(o_proj, "pre_", zero_head(2))], [add_hook(hf, 2, v[0])],
             [(o_proj, "pre_", zero_head(4)), add_hook(hf, 1, v[1])]]
    for i, p in enumerate(PROMPTS):
        base = hf_run(hf, p)[0][-1]
        for k in range(3):
            ref = hf_run(hf, p, hooks=hooks[k])[0][-1]
            close(np.asarray(res.logits[k, i]).reshape(-1, ref.shape[-1])[-1], ref, TOL_MODEL, (k, i))
            assert abs(float(res.kl[k, i]) - _kl_last(ref, base)) < 1e-5
            dlp = R.log_softmax(ref)[[3, 17]] - R.log_softmax(base)[[3, 17]]
            assert np.abs(np.asarray(res.logprob_delta[k, i]) - dlp).max() < 1e-5


@row("lens.core.capture.last_real_index")
def _(name):
    rs = np.random.RandomState(12)
    masks = rs.rand(5, 7, 13) > 0.4  # arbitrary holes, left and right padding alike
    masks[0, 0] = False  # an all-padding row
    got = np.asarray(jax.jit(jax.vmap(lens.core.capture.last_real_index))(masks))
    for b in range(5):
        for r in range(7):
            real_idx = [t for t in range(13) if masks[b, r, t]]
            assert got[b, r] == (real_idx[-1] if real_idx else -1)


# ------------------------------------------------------------------------------- folding rows
@row("lens.core.folding.fold_norms", "lens.core.folding.centre_writers", "lens.core.folding.centre_unembed",
     "lens.core.folding.fold_and_centre")
def _(name):
    fn = getattr(folding, name.rsplit(".", 1)[1])
    for fam in ("gpt2", "neox", "llama"):
        hf, ours = hf64(fam)
        if fam == "llama" and name.endswith("centre_writers"):
            continue  # refused for RMSNorm (tested in test_folding.py)
        model = fn(ours)
        logits = np.asarray(jax.jit(jax.vmap(lambda m, t, k: m(t, k), in_axes=(None, 0, 0)))(model, TOK, MASK))
        for i, p in enumerate(PROMPTS):
            ref = hf_run(hf, p)[0]
            # centring the unembedding shifts every position's logits by one constant
            close(R.log_softmax(real(logits[i], i)), R.log_softmax(ref), TOL_MODEL, (fam, i))
            if "unembed" not in name and name != "lens.core.folding.fold_and_centre":
                close(real(logits[i], i), ref, TOL_MODEL, (fam, i))


# ------------------------------------------------------------------------ MELBO analysis rows
S, T = 0, 1  # source: after block 0 (enters block 1); target: after block 1


@functools.lru_cache(maxsize=None)
def melbo_setup():
    hf, ours = hf64("llama")
    problem = make_problem(ours, TOK[:2], MASK[:2], S, T)
    d = ours.config.d_model
    q, _ = np.linalg.qr(np.random.RandomState(9).randn(d, 8))
    vectors = (q.T * 6.0).astype(np.float32)  # K = 8 orthogonal vectors
    refs = {"base": [hf_run(hf, p) for p in PROMPTS[:2]]}
    refs["steered"] = [[hf_run(hf, p, hooks=[add_hook(hf, S + 1, vk)]) for p in PROMPTS[:2]] for vk in vectors]
    return hf, ours, problem, vectors, refs


def _ref_effects(refs, skip_first=True):
    """Target / last effects flattened over real tokens (position 0 and padding zeroed),
    next-token logits at each prompt's last real token."""
    Tmax = TOK.shape[1]
    tgt, last, logits = [], [], []
    for per_prompt in refs["steered"]:
        t_parts, l_parts, lg = [], [], []
        for i, (steered, base) in enumerate(zip(per_prompt, refs["base"])):
            n = len(PROMPTS[i])
            keep = np.zeros((Tmax, 1))
            keep[:n] = 1
            if skip_first:
                keep[0] = 0
            dt = np.zeros((Tmax, base[1].shape[-1]))
            dt[:n] = steered[1][T + 1] - base[1][T + 1]
            dl = np.zeros_like(dt)
            dl[:n] = steered[2] - base[2]
            t_parts.append(dt * keep)
            l_parts.append(dl * keep)
            lg.append(steered[0][-1])
        tgt.append(np.concatenate(t_parts).ravel())
        last.append(np.concatenate(l_parts).ravel())
        logits.append(np.stack(lg))
    base_logits = np.stack([b[0][-1] for b in refs["base"]])
    return np.stack(tgt), np.stack(last), np.stack(logits), base_logits


@row("lens.steering.melbo.analysis.steered_effects")
def _(name):
    _, _, problem, vectors, refs = melbo_setup()
    eff = A.steered_effects(problem, vectors, chunk=3)  # chunks of 3, padded last chunk
    tgt, last, logits, base_logits = _ref_effects(refs)
    close(eff.target, tgt, TOL_MODEL)
    close(eff.last, last, TOL_MODEL)
    close(eff.logits, logits, TOL_MODEL)
    close(eff.base_logits, base_logits, TOL_MODEL)
    full_t, full_l, _, _ = _ref_effects(refs, skip_first=False)
    Tmax = TOK.shape[1]
    for name_, full, got in (("target", full_t, eff.first_share_target), ("last", full_l, eff.first_share_last)):
        sq = full.reshape(8, 2, Tmax, -1) ** 2
        share = sq[:, :, 0].sum((1, 2)) / sq.sum((1, 2, 3))
        close(got, share, 1e-5, name_)


def _source_x(refs):
    return np.concatenate([b[1][S + 1][1: len(PROMPTS[i])] for i, b in enumerate(refs["base"])])


@row("lens.steering.melbo.analysis.source_activations", "lens.steering.melbo.analysis.median_source_norm")
def _(name):
    _, _, problem, _, refs = melbo_setup()
    x = _source_x(refs)
    close(A.source_activations(problem), x, TOL_MODEL)
    assert abs(A.median_source_norm(problem) - np.median(np.linalg.norm(x, axis=1))) < 1e-5 * np.abs(x).max()


def _ref_stats(c):
    k = c.shape[0]
    off = c[~np.eye(k, dtype=bool)]
    lam = np.linalg.eigvalsh(c)
    return off.mean(), lam.sum() ** 2 / (lam ** 2).sum()


@row("lens.steering.melbo.analysis.analyse_vectors")
def _(name):
    hf, ours, problem, vectors, refs = melbo_setup()
    out = A.analyse_vectors(problem, vectors, top_k=5, chunk=3)
    x = _source_x(refs)
    gamma = layers_of(hf)[S + 1].input_layernorm.weight.detach().numpy()
    eps = hf.config.rms_norm_eps
    tgt, last, logits, base_logits = _ref_effects(refs)
    lp, lq = R.log_softmax(logits), R.log_softmax(base_logits)
    delta = lp - lq
    stages = {
        "raw": R.cosine_matrix(vectors),
        "effective_exact": R.cosine_matrix(_effects(x, vectors, "rms", gamma, "exact") if eps == 0 else np.stack(
            [((R.sphere(x + vk, "rms", eps) - R.sphere(x, "rms", eps)) * gamma).ravel() for vk in R.f64(vectors)])),
        "effective_first_order": R.cosine_matrix(np.stack(
            [(sphere_fd_jvp(x, vk[None], "rms", eps) * gamma).ravel() for vk in vectors])),
        "target": R.cosine_matrix(tgt),
        "last": R.cosine_matrix(last),
        "logits": R.cosine_matrix((delta - delta.mean(-1, keepdims=True)).reshape(8, -1)),
    }
    for stage, c in stages.items():
        assert np.abs(out["cos_matrices"][stage] - c).max() < 2e-5, stage
        mean, pr = _ref_stats(c)
        assert abs(out[stage]["cos_mean"] - mean) < 2e-5, stage
        assert abs(out[stage]["participation_ratio"] - pr) < 1e-4 * pr, stage
    kl_base = (np.exp(lp) * (lp - lq)).sum(-1).mean(-1)
    close(out["logit_kl_from_base"], kl_base, 1e-5)
    rho = np.linalg.norm(vectors, axis=1) / np.median(np.linalg.norm(x, axis=1))
    assert abs(out["rho_mean"] - rho.mean()) < 1e-5 * rho.mean()
    assert abs(out["closed_form_cosine"] - R.closed_form(rho.mean())) < 1e-6


@row("lens.steering.melbo.analysis.cosine_stats")
def _(name):
    for s in range(3):
        c = R.cosine_matrix(_clustered_effects(s))
        out = A.cosine_stats(c, thresholds=(0.5, 0.9))
        mean, pr = _ref_stats(c)
        assert abs(out["cos_mean"] - mean) < 1e-9 and abs(out["participation_ratio"] - pr) < 1e-9 * pr
        assert abs(out["degeneracy_factor"] - K / pr) < 1e-9 * K
        for th in (0.5, 0.9):
            assert out["clusters"][str(th)] == R.clusters(c, th)[0]


@row("lens.steering.melbo.analysis.rescale")
def _(name):
    v = steer_vectors(577, k=K)
    norms = np.linspace(1, 40, K).astype(np.float32)
    got = np.asarray(jax.jit(A.rescale)(v, norms))
    close(got, R.f64(v) / np.linalg.norm(R.f64(v), axis=1, keepdims=True) * norms[:, None], 1e-6)


@row("lens.steering.melbo.analysis.random_orthogonal_controls")
def _(name):
    theta0 = steer_vectors(576, k=1)[0]
    norms = np.linspace(50, 90, K).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), 3)
    sets = np.asarray(jax.jit(jax.vmap(A.random_orthogonal_controls, in_axes=(0, None, None)))(keys, theta0, norms))
    for v in R.f64(sets):
        gram = v @ v.T
        assert np.abs(gram - np.diag(norms.astype(np.float64) ** 2)).max() < 2e-6 * norms.max() ** 2
        assert np.abs(v @ R.f64(theta0)).max() < 2e-6 * norms.max() * np.linalg.norm(theta0)
    assert np.abs(sets[0] - sets[1]).max() > 1.0  # different keys, different draws


@row("lens.steering.melbo.analysis.rho_sweep")
def _(name):
    hf, ours, problem, vectors, refs = melbo_setup()
    grid = [0.1, 1.0]
    res = A.rho_sweep(problem, vectors, grid, chunk=4)
    x = _source_x(refs)
    gamma = layers_of(hf)[S + 1].input_layernorm.weight.detach().numpy()
    eps = hf.config.rms_norm_eps
    xn = np.median(np.linalg.norm(x, axis=1))
    for j, rho in enumerate(grid):
        v = R.f64(vectors) / np.linalg.norm(vectors, axis=1, keepdims=True) * rho * xn
        exact = R.cosine_matrix(np.stack([((R.sphere(x + vk, "rms", eps) - R.sphere(x, "rms", eps)) * gamma).ravel()
                                          for vk in v]))
        first = R.cosine_matrix(np.stack([(sphere_fd_jvp(x, vk[None], "rms", eps) * gamma).ravel() for vk in v]))
        assert abs(res["effective_cosine_vs_rho"]["exact"][j] - _ref_stats(exact)[0]) < 2e-5
        assert abs(res["effective_cosine_vs_rho"]["first_order"][j] - _ref_stats(first)[0]) < 2e-5
        assert abs(res["closed_form"][j] - R.closed_form(rho)) < 1e-6
        steered = [[hf_run(hf, p, hooks=[add_hook(hf, S + 1, vk)]) for p in PROMPTS[:2]] for vk in v]
        tgt, _, _, _ = _ref_effects({"base": refs["base"], "steered": steered})
        _, pr = _ref_stats(R.cosine_matrix(tgt))
        assert abs(res["degeneracy_vs_rho"]["target"][j] - 8 / pr) < 1e-4 * 8 / pr


# ------------------------------------------------------------------------------ the table
@pytest.mark.parametrize("name", sorted(ROWS))
def test_row(name):
    ROWS[name](name)


# ------------------------------------------------------------------------------ completeness
def public_functions() -> set[str]:
    names = {"models.Transformer.__call__", "models.Transformer.forward"}
    for mod_name in COVERED_MODULES:
        mod = __import__(mod_name, fromlist=["_"])
        public = getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]
        for n in public:
            obj = inspect.unwrap(getattr(mod, n))  # a jax.jit-decorated function counts too
            if inspect.isfunction(obj) and (mod_name == "lens.geometry" or obj.__module__ == mod_name):
                names.add(f"{mod_name}.{n}")
    return names


def test_every_public_function_has_a_row():
    missing = sorted(public_functions() - set(ROWS) - set(EXEMPT))
    assert not missing, f"public functions without a differential row: {missing}"
    stale = sorted(set(ROWS) - public_functions())
    assert not stale, f"rows for functions that are not public any more: {stale}"


def test_cpu_default_matmul_precision_is_full_float32():
    """The suite runs at the product's default precision (no 'highest' override), so it
    tests what `make run` runs; on XLA:CPU the default float32 dot is full precision,
    bit-identical to 'highest' (checked here, so a change of default cannot slip past)."""
    rs = np.random.RandomState(0)
    x, w = rs.randn(87, 576).astype(np.float32), rs.randn(576, 1536).astype(np.float32)
    default = np.asarray(jax.jit(jnp.dot)(x, w))
    with jax.default_matmul_precision("highest"):
        highest = np.asarray(jax.jit(lambda a, b: jnp.dot(a, b))(x, w))
    assert np.array_equal(default, highest)
    assert jax.config.jax_default_matmul_precision is None
