"""Shared vs distinct effects: two readings of "K steering vectors collapse downstream".

A low participation ratio (PR) of K effects can mean two different things:
  (a) the effects share one big common component (every vector moves the model the same
      way, plus small individual parts that may still be all different), or
  (b) there really are only a few distinct effects (the individual parts collapse too).
So every effect is split as `e_k = m + s_k`, with the shared part `m = mean_k e_k` and the
specific part `s_k = e_k - m`, and three numbers are reported:
  shared_share   `K |m|^2 / sum_k |e_k|^2`, the fraction of effect energy in the mean
                 (1/K for orthogonal equal-norm effects, 1 for identical ones);
  raw PR         PR of the normalised effects (as `cosine_stats`; reading (a) + (b));
  specific PR    PR of the normalised specific parts (ceiling K - 1; reading (b) alone).
  residual PR    PR of the normalised parts left after projecting the shared DIRECTION
                 out of each effect, `e_k - (e_k . m^) m^` (ceiling K - 1).  Centring
                 leaves `(c_k - mean c) m^` in every specific part when the vectors carry
                 different AMOUNTS c_k of the shared direction: that one direction then
                 dominates the specific PR although it is the shared component again.  The
                 residual PR does not count it; the two agree when the c_k are equal.

Everything is computed from the per-unit Gram matrices `g_u[i, j] = e_iu . e_ju` of the
pooling units u (positions or prompts), because a flattened effect is the concatenation of
its units: `G = sum_u g_u`.  A bootstrap over units then only reweights the g_u, and PR
for the first k of K vectors is a leading sub-matrix: no effect is ever recomputed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lens.geometry import orthogonal_pair_cosine_closed_form
from lens.geometry._common import HIGHEST


def unit_grams(effects: Float[Array, "K U d"]) -> Float[Array, "U K K"]:
    """Per-unit Gram matrices `g_u = E_u E_u^T` of effects laid out [vector, unit, width]."""
    e = jnp.asarray(effects, jnp.float32)
    return jnp.einsum("kud,jud->ukj", e, e, precision=HIGHEST)


def _pr_of_gram(g: Float[Array, "K K"]) -> Float[Array, ""]:
    """PR of the NORMALISED vectors with Gram g: K'^2 / ||C||_F^2 over the nonzero rows."""
    diag = jnp.diag(g)
    ok = diag > 0
    inv = jnp.where(ok, 1.0 / jnp.sqrt(jnp.where(ok, diag, 1.0)), 0.0)
    c = g * inv[:, None] * inv[None, :]
    tr = jnp.trace(c)
    fro2 = jnp.sum(c * c)
    return jnp.where(fro2 > 0, tr * tr / jnp.where(fro2 > 0, fro2, 1.0), 0.0)


def _centre_gram(g: Float[Array, "K K"]) -> Float[Array, "K K"]:
    """Gram of the specific parts `e_k - mean(e)`: H G H with H = I - 11^T / K."""
    k = g.shape[0]
    h = jnp.eye(k, dtype=g.dtype) - 1.0 / k
    return h @ g @ h


def _project_out_mean_gram(g: Float[Array, "K K"]) -> Float[Array, "K K"]:
    """Gram of `e_k - (e_k . m) m / |m|^2` (the shared direction m = mean_k e_k projected
    out of every effect): `G - a a^T / |m|^2` with `a = G 1 / K` (= e_k . m) and
    `|m|^2 = 1^T G 1 / K^2`."""
    k = g.shape[0]
    a = jnp.sum(g, axis=1) / k
    m2 = jnp.sum(g) / (k * k)
    return g - jnp.where(m2 > 0, jnp.outer(a, a) / jnp.where(m2 > 0, m2, 1.0), 0.0)


def readings_from_gram(g: Float[Array, "K K"]) -> dict[str, Float[Array, ""]]:
    """raw PR, specific PR, residual PR and shared share from the (pooled) Gram matrix of K
    effects."""
    k = g.shape[0]
    total = jnp.trace(g)
    shared = jnp.sum(g) / k  # K |m|^2 = 1^T G 1 / K
    return {
        "participation_ratio": _pr_of_gram(g),
        "specific_participation_ratio": _pr_of_gram(_centre_gram(g)),
        "residual_participation_ratio": _pr_of_gram(_project_out_mean_gram(g)),
        "shared_share": jnp.where(total > 0, shared / jnp.where(total > 0, total, 1.0), 0.0),
    }


def shared_specific(
    effects: Float[Array, "K U d"] | Float[Array, "K D"],
    reference: Float[Array, "U d"] | Float[Array, " D"] | None = None,
) -> dict[str, float]:
    """Both readings for one stage: raw PR, specific PR, residual PR, shared share and, if a reference
    effect is given (theta0's own effect at the same stage), the cosine between the shared
    part m and it (how much of the shared component is "doing what theta0 does")."""
    e = jnp.asarray(effects, jnp.float32)
    if e.ndim not in (2, 3):
        raise ValueError(f"effects must be [K, D] or [K, units, d]; got shape {e.shape}")
    e = e if e.ndim == 3 else e[:, None, :]
    g = jnp.sum(unit_grams(e), axis=0)
    out = {name: float(v) for name, v in readings_from_gram(g).items()}
    if reference is not None:
        m = jnp.mean(e, axis=0).reshape(-1)
        r = jnp.asarray(reference, jnp.float32).reshape(-1)
        denom = jnp.linalg.norm(m) * jnp.linalg.norm(r)
        cos = jnp.where(denom > 0, m @ r / jnp.where(denom > 0, denom, 1.0), 0.0)
        out["shared_cos_reference"] = float(jnp.clip(cos, -1.0, 1.0))  # as geometry.cosine_matrix: no 1 + ulp
    return out


@jax.jit
def _bootstrap(grams: Float[Array, "U K K"], counts: Int[Array, "B U"]):
    def one(c):
        return readings_from_gram(jnp.einsum("u,ukj->kj", c.astype(grams.dtype), grams, precision=HIGHEST))

    return jax.lax.map(one, counts)


def bootstrap_readings(
    effects: Float[Array, "K U d"], n_boot: int = 200, seed: int = 0, level: float = 0.9
) -> dict[str, dict[str, float]]:
    """Point estimate and a bootstrap interval for each reading (resampling the U pooling
    units with replacement, `n_boot` draws): {name: {"point", "lo", "hi", "bias"}}.

    A resampled set repeats some units and a repeated unit adds no new direction, so the
    bootstrap distribution of a PR sits BELOW the point estimate (measured: ~0.2 of 15 at
    23 units).  Plain percentiles would then exclude the estimate they are meant to bracket;
    the interval here is the bootstrap spread re-centred on the point estimate,
    `point + (q - median)` for the (1 -/+ level)/2 quantiles q, and `bias` = median - point
    says how large the shift was.  With one unit, lo = hi = point."""
    grams = unit_grams(effects)
    n_units = grams.shape[0]
    point = {k: float(v) for k, v in readings_from_gram(jnp.sum(grams, axis=0)).items()}
    rs = np.random.RandomState(seed)
    idx = rs.randint(0, n_units, size=(n_boot, n_units))
    counts = np.zeros((n_boot, n_units), np.int32)
    np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1)
    draws = _bootstrap(grams, jnp.asarray(counts))
    q = (1 - level) / 2
    out = {}
    for name, p in point.items():
        d = np.asarray(draws[name], np.float64)
        med = float(np.median(d))
        out[name] = {"point": p, "lo": p + float(np.quantile(d, q)) - med,
                     "hi": p + float(np.quantile(d, 1 - q)) - med, "bias": med - p}
    return out


def pr_vs_k(effects: Float[Array, "K U d"], ks: list[int]) -> dict[str, list[float]]:
    """Raw and specific PR (and shared share) of the FIRST k vectors, for each k in ks."""
    g = jnp.sum(unit_grams(effects), axis=0)
    out: dict[str, list[float]] = {"k": [int(k) for k in ks]}
    for k in ks:
        if not 2 <= k <= g.shape[0]:
            raise ValueError(f"k = {k} out of range [2, {g.shape[0]}]")
        for name, v in readings_from_gram(g[:k, :k]).items():
            out.setdefault(name, []).append(float(v))
    return out


def closed_form_per_token(x_norms: Float[Array, " N"], v_norms: Float[Array, " K"]) -> dict[str, float]:
    """The idealised orthogonal-pair cosine (`orthogonal_pair_cosine_closed_form`) evaluated
    the way the measurement pools: each token has its own rho = |v| / |x_i|, and a pair's
    effects are concatenated over tokens before the cosine, so
      `cos(1, 2) = sum_i a1i a2i / sqrt(sum_i (a1i^2 + b1i^2) * sum_i (a2i^2 + b2i^2))`
    with `a = 1/sqrt(1+rho^2) - 1`, `b = rho/sqrt(1+rho^2)` (the effect at token i is
    `sqrt(d) (a x^ + b v^)`: its size depends on |x_i| only through rho; no gain).
    Returns the mean over pairs, and the formula at the mean rho for comparison."""
    s = np.asarray(x_norms, np.float64)[None, :]
    r = np.asarray(v_norms, np.float64)[:, None]
    rho = r / s  # [K, N]
    a = 1 / np.sqrt(1 + rho**2) - 1
    b = rho / np.sqrt(1 + rho**2)
    dot = np.einsum("kn,jn->kj", a, a)
    sq = np.sum(a**2 + b**2, axis=1)
    cos = dot / np.sqrt(sq[:, None] * sq[None, :])
    k = cos.shape[0]
    off = cos[~np.eye(k, dtype=bool)] if k > 1 else cos.ravel()
    mean_rho = float(rho.mean())
    return {"pooled_per_token": float(off.mean()),
            "at_mean_rho": float(orthogonal_pair_cosine_closed_form(mean_rho)), "mean_rho": mean_rho}


def unit_cosine_means(effects: Float[Array, "K U d"]) -> Float[np.ndarray, " U"]:
    """Per pooling unit u (a token): the mean off-diagonal cosine between the K effects at
    that unit alone (units where an effect is zero give cosine 0 for its pairs).  The
    per-token spread of the pooled mean cosine."""
    g = np.asarray(unit_grams(effects), np.float64)  # [U, K, K]
    k = g.shape[1]
    d = np.sqrt(np.clip(np.einsum("ukk->uk", g), 0.0, None))
    inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0)
    c = g * inv[:, :, None] * inv[:, None, :]
    off = ~np.eye(k, dtype=bool)
    return c[:, off].mean(axis=1)


def gram_cosine_mean(g: Float[np.ndarray, "K K"]) -> float:
    """Mean off-diagonal cosine of the (pooled) effects with Gram matrix g."""
    g = np.asarray(g, np.float64)
    d = np.sqrt(np.clip(np.diag(g), 0.0, None))
    inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0)
    c = g * inv[:, None] * inv[None, :]
    return float(c[~np.eye(len(c), dtype=bool)].mean())


def closed_form_pr_vs_k(
    gram: Float[np.ndarray, "K K"], unit_cos: Float[np.ndarray, " U"], ks: list[int],
    extrapolate: tuple[int, ...] = (800, 1558), control_gram: Float[np.ndarray, "K K"] | None = None,
    factor: float = 10.0,
) -> dict:
    """The geometry's prediction beside the measurement: raw PR of the first k effects
    (leading sub-matrix of `gram`) for k in ks, next to the equicorrelated closed form
    `lens.geometry.equicorrelated_participation_ratio(k, c)` at the MEASURED mean pairwise
    cosine c of all K effects (`gram_cosine_mean`), with its per-unit spread (the closed
    form at the 5% and 95% quantiles of `unit_cos`, the per-token mean cosines), extended to
    the K in `extrapolate` (no measurement there).  `control_gram`: the same measurement
    for random controls.  Also the K at which the closed form reaches a `factor`-fold
    degeneracy K / PR (`lens.geometry.k_at_degeneracy`) at c and at the spread's ends."""
    from lens.geometry import equicorrelated_participation_ratio, k_at_degeneracy

    g = np.asarray(gram, np.float64)
    c = gram_cosine_mean(g)
    lo_c, hi_c = (float(np.quantile(np.asarray(unit_cos, np.float64), q)) for q in (0.05, 0.95))
    rows = []
    for k in sorted(set(int(k) for k in ks) | set(int(k) for k in extrapolate)):
        pr = lambda cc: float(equicorrelated_participation_ratio(k, cc))  # noqa: E731
        row = {"k": k, "closed_form": pr(c), "closed_form_lo": pr(hi_c), "closed_form_hi": pr(lo_c),
               "measured": None, "control_measured": None}
        if 2 <= k <= len(g):
            row["measured"] = float(_pr_of_gram(jnp.asarray(g[:k, :k])))
            if control_gram is not None:
                row["control_measured"] = float(_pr_of_gram(jnp.asarray(np.asarray(control_gram)[:k, :k])))
        rows.append(row)

    def at(cc):
        return k_at_degeneracy(cc, factor) if 0 < cc < 1 else None

    return {"rows": rows, "mean_cosine": c, "unit_cosine_p5": lo_c, "unit_cosine_p95": hi_c,
            "unit_cosine_median": float(np.median(unit_cos)), "factor": factor,
            f"k_at_{factor:g}x": at(c), f"k_at_{factor:g}x_range": [at(hi_c), at(lo_c)]}


def subset_readings(gram: Float[np.ndarray, "K K"], index: list[int]) -> dict[str, float] | None:
    """`readings_from_gram` of the vectors in `index` (a principal sub-matrix of the pooled
    Gram); None for fewer than 2 vectors."""
    idx = np.asarray(index, np.int64)
    if idx.size < 2:
        return None
    g = np.asarray(gram, np.float64)[np.ix_(idx, idx)]
    return {k: float(v) for k, v in readings_from_gram(jnp.asarray(g, jnp.float32)).items()}
