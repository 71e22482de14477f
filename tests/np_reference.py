"""Independent float64 NumPy references for the differential tests (tests/test_differential.py).

Written from the formulas in the docstrings, not from the code under test: plain loops and
textbook linear algebra (eigenvalues instead of trace identities, arccos instead of atan2,
union-find instead of boolean matrix powers), so a shared mistake is unlikely.
"""

from __future__ import annotations

import numpy as np
import scipy.stats


def f64(a) -> np.ndarray:
    return np.asarray(a, np.float64)


def centre(x):
    x = f64(x)
    return x - x.mean(axis=-1, keepdims=True)


def sphere(x, kind, eps=0.0):
    """P x / sigma (layer) or x / rms (rms), row by row."""
    c = centre(x) if kind == "layer" else f64(x)
    sigma = np.sqrt((c * c).mean(axis=-1, keepdims=True) + eps)
    return c / sigma


def divisor(x, kind, eps=0.0):
    c = centre(x) if kind == "layer" else f64(x)
    return np.sqrt((c * c).mean(axis=-1) + eps)


def jacobian(x, kind, eps=0.0):
    """d to_sphere / dx at one vector, by central finite differences in float64.

    Independent of the analytic formula; step 1e-6 |x| gives ~1e-10 relative accuracy."""
    x = f64(x)
    d = x.shape[-1]
    h = 1e-6 * np.linalg.norm(x) / np.sqrt(d)
    eye = np.eye(d)
    cols = [(sphere(x + h * eye[i], kind, eps) - sphere(x - h * eye[i], kind, eps)) / (2 * h) for i in range(d)]
    return np.stack(cols, axis=1)


def jacobian_formula(x, kind, eps=0.0):
    """The analytic Jacobian written out: (B - y y^T/d)/sigma, B = P or I (used at d = 576,
    where finite differences over 576 columns would be slow)."""
    x = f64(x)
    d = x.shape[-1]
    y = sphere(x, kind, eps)
    base = np.eye(d) - (np.full((d, d), 1.0 / d) if kind == "layer" else 0.0)
    return (base - np.outer(y, y) / d) / divisor(x, kind, eps)


def cosine_matrix(effects):
    e = f64(effects)
    n = np.linalg.norm(e, axis=1)
    unit = np.where(n[:, None] > 0, e / np.where(n > 0, n, 1)[:, None], 0.0)
    return np.clip(unit @ unit.T, -1, 1)


def participation_ratio(effects, normalize=False):
    """(sum lambda)^2 / sum lambda^2 from the eigenvalues of the Gram matrix."""
    e = f64(effects)
    if normalize:
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
    lam = np.linalg.eigvalsh(e @ e.T)
    return lam.sum() ** 2 / (lam ** 2).sum()


def clusters(cos, threshold, absolute=False):
    """Connected components of the threshold graph by union-find; labels in order of the
    smallest member."""
    c = f64(cos)
    k = c.shape[0]
    parent = list(range(k))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    test = np.abs(c) if absolute else c
    for i in range(k):
        for j in range(k):
            if test[i, j] >= threshold or test[j, i] >= threshold:
                a, b = find(i), find(j)
                parent[max(a, b)] = min(a, b)
    roots = [find(i) for i in range(k)]
    order = sorted(set(roots))
    return len(order), np.array([order.index(r) for r in roots])


def closed_form(rho):
    """The literal formula a^2 / (a^2 + b^2)."""
    r = f64(rho)
    a = 1 / np.sqrt(1 + r * r) - 1
    b = r / np.sqrt(1 + r * r)
    return a * a / (a * a + b * b)


def angle(u, w):
    u, w = f64(u), f64(w)
    cos = np.sum(u * w, -1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(w, axis=-1))
    return np.arccos(np.clip(cos, -1, 1))


def tangent(p, v, kind=None):
    p, v = f64(p), f64(v)
    if kind == "layer":
        v = centre(v)
    return v - p * np.sum(p * v, -1, keepdims=True) / np.sum(p * p, -1, keepdims=True)


def exp_map(p, v):
    p = f64(p)
    vt = tangent(p, v)
    r = np.linalg.norm(p, axis=-1, keepdims=True)
    n = np.linalg.norm(vt, axis=-1, keepdims=True)
    t = n / r
    return np.cos(t) * p + np.sin(t) * r * vt / n


def log_map(p, q):
    p, q = f64(p), f64(q)
    ph = p / np.linalg.norm(p, axis=-1, keepdims=True)
    qh = q / np.linalg.norm(q, axis=-1, keepdims=True)
    th = angle(p, q)[..., None]
    u = qh - ph * np.sum(ph * qh, -1, keepdims=True)
    return np.linalg.norm(p, axis=-1, keepdims=True) * th * u / np.linalg.norm(u, axis=-1, keepdims=True)


def slerp(p, q, t):
    """Classic slerp between p's direction and q's direction at p's radius."""
    p, q = f64(p), f64(q)
    r = np.linalg.norm(p, axis=-1, keepdims=True)
    ph, qh = p / r, q / np.linalg.norm(q, axis=-1, keepdims=True)
    th = angle(p, q)[..., None]
    return r * (np.sin((1 - t) * th) * ph + np.sin(t * th) * qh) / np.sin(th)


def rotate(x, v, a, kind):
    x, v = f64(x), f64(v)
    mean = x.mean(-1, keepdims=True) if kind == "layer" else 0.0
    c = x - mean
    if kind == "layer":
        v = centre(v)
    r = np.linalg.norm(c, axis=-1, keepdims=True)
    u = v - c * np.sum(c * v, -1, keepdims=True) / r ** 2
    u = u / np.linalg.norm(u, axis=-1, keepdims=True)
    return mean + np.cos(a) * c + np.sin(a) * r * u


def log_softmax(z):
    z = f64(z)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def ranks(s):
    """Ordinal ranks, ties by index (argsort of a stable argsort)."""
    order = np.argsort(s, kind="stable")
    r = np.empty(len(s))
    r[order] = np.arange(len(s))
    return r


def top_k_set(s, k):
    return set(np.argsort(-f64(s), kind="stable")[:k].tolist())


def rel_err(ours, ref) -> float:
    ours, ref = f64(ours), f64(ref)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


# ------------------------------------------------------------------ the predict-the-model metrics
def log_softmax_np(x):
    x = np.asarray(x, np.float64)
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def metrics_np(m, p, k):
    """One position, float64, written from the definitions."""
    order_m = np.argsort(-m, kind="stable")[:k]
    order_p = np.argsort(-p, kind="stable")[:k]
    hits = len(set(order_m) & set(order_p))
    rho = scipy.stats.spearmanr(m[order_m], p[order_m]).statistic if np.ptp(p[order_m]) > 0 else 0.0
    return {"test_err": np.mean(np.abs(m[order_m] - p[order_m])), "top1": float(order_m[0] == order_p[0]),
            "recall": hits / k, "jaccard": hits / len(set(order_m) | set(order_p)), "spearman": rho,
            "order": float(list(order_m) == list(order_p)), "kl": float(np.sum(np.exp(m) * (m - p)))}
