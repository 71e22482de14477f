"""How distinct are a set of steering vectors, stage by stage?

For K vectors added after block s, each stage gives one "effect" per vector and the K x K
cosine matrix of those effects:
  raw         the vectors themselves (what is stored);
  effective   `to_sphere(x + v) - to_sphere(x)` times the gain of the first norm of block
              `problem.layer` (= s + 1, where v enters),
              pooled over the prompt tokens (exact and first order; `lens.geometry`);
  target      h_t(v) - h_t(0), the residual after block t, pooled over real tokens except
              position 0 (the attention sink, whose huge change would dominate; like
              `source_activations`, which leaves it out of |x_s|);
  last        the same after the last block;
  logits      the centred log-prob change at each prompt's last token (next-token
              distribution), plus KL and top-k overlap (`lens.geometry.logit_effect_similarity`).
Per stage: mean off-diagonal cosine (and mean |cos|), the participation ratio of the
normalised effects `PR = K^2 / ||C||_F^2` (K for orthogonal effects, 1 for identical ones;
equal to `lens.geometry.participation_ratio(effects, normalize=True)`), the degeneracy
factor K / PR, and threshold clusters.  Steered runs go through the same split forward as
training (`lens.steering.melbo.problem.steered_run`: `edits.add` at `problem.layer` = s + 1).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Float

from lens import geometry

from lens.core import sharding
from lens.core.capture import last_real_index
from lens.steering.melbo.problem import MelboProblem, steered_run
from lens.models.core.interventions import Capture


class SteeredEffects(eqx.Module):
    """Per vector: effects at the target and last layer (real tokens, flattened; position 0
    zeroed unless skip_first=False), the steered next-token logits at each prompt's last real
    token, and the share of |effect|^2 that sits at position 0 (before it is zeroed).

    Why position 0 is left out by default: the first token's residual has a huge norm (the
    attention sink), and its change dominates a flattened effect (80-90% of |effect|^2 on
    SmolLM2 at the target layer), so cosines would measure that one token, not the prompt."""

    target: Float[Array, "K D"]
    last: Float[Array, "K D"]
    logits: Float[Array, "K P vocab"]
    base_logits: Float[Array, "P vocab"]
    first_share_target: Float[Array, " K"]
    first_share_last: Float[Array, " K"]


def _run_from_source(problem: MelboProblem, theta):
    # Only the target block's output is captured (Capture(layers=...)), not every layer's.
    h, acts = steered_run(problem, theta, capture=Capture(resid=True, layers=(problem.target,)))
    last = last_real_index(problem.mask)
    h_last = h[jnp.arange(h.shape[0]), last]  # [P, d]
    logits = jax.vmap(lambda x: problem.model.unembed_resid(x[None])[0][0])(h_last)
    return acts.resid_post[:, 0], h, logits


_base_run = eqx.filter_jit(_run_from_source)


@eqx.filter_jit
def _effects_chunk(problem: MelboProblem, vectors, base, skip_first: bool):
    m_all = problem.mask[..., None].astype(jnp.float32)
    m = m_all.at[:, 0].set(0.0) if skip_first else m_all
    h_t0, h_l0, _ = base

    def share(d):  # fraction of the real tokens' |effect|^2 at position 0
        d = d * m_all
        return jnp.sum(d[:, 0] ** 2) / jnp.maximum(jnp.sum(d ** 2), 1e-30)

    def one(v):
        h_t, h_l, logits = _run_from_source(problem, v)
        dt, dl = h_t - h_t0, h_l - h_l0
        return (dt * m).reshape(-1), (dl * m).reshape(-1), logits, share(dt), share(dl)

    # vmap, not lax.map: one [chunk * P * T, d] matmul per weight is several times faster
    # on CPU than `chunk` small ones.
    return jax.vmap(one)(vectors)


def analysis_mesh(mesh: Mesh | None) -> Mesh | None:
    """`mesh`, or (None) a "vectors" mesh over every device when there is more than one."""
    if mesh is None and jax.device_count() > 1:
        return sharding.make_mesh()
    return mesh


def steered_effects(
    problem: MelboProblem, vectors: Float[Array, "K d_model"], chunk: int = 8, skip_first: bool = True,
    mesh: Mesh | None = None,
) -> SteeredEffects:
    """Run every vector through blocks s+1..n (chunks of `chunk` vectors per compiled call);
    `skip_first`: leave position 0 out of the target / last effects (see SteeredEffects).

    `mesh`: each chunk is split over its "vectors" axis (the chunk rounded up to a multiple
    of that axis' devices, `lens.core.sharding.round_chunk`), the problem replicated; None =
    every device when there are several (`analysis_mesh`), nothing on one device.  A
    one-device mesh (`make_mesh(vectors=1)`) turns the automatic sharding off."""
    vectors = jnp.asarray(vectors, jnp.float32)
    mesh = analysis_mesh(mesh)
    place = lambda a: a  # noqa: E731
    to_host = np.asarray
    if mesh is not None:
        chunk = sharding.round_chunk(chunk, mesh)
        problem = sharding.replicate(problem, mesh)
        place = lambda a: sharding.place("vectors", a, mesh)  # noqa: E731
        to_host = sharding.to_host
    base = _base_run(problem, jnp.zeros(vectors.shape[1:], jnp.float32))
    parts = []
    for i in range(0, vectors.shape[0], chunk):
        v = vectors[i : i + chunk]
        pad = chunk - v.shape[0]  # pad the last chunk: one compilation for all
        out = _effects_chunk(problem, place(jnp.pad(v, ((0, pad), (0, 0)))), base, skip_first)
        parts.append(jax.tree.map(lambda a: to_host(a)[: v.shape[0]], out))
    tgt, last, logits, st, sl = (jnp.asarray(np.concatenate([p[j] for p in parts])) for j in range(5))
    base_logits = base[2] if mesh is None else jnp.asarray(to_host(base[2]))
    return SteeredEffects(tgt, last, logits, base_logits, st, sl)


_threshold_clusters = jax.jit(geometry.threshold_clusters, static_argnames=("absolute",))


def cosine_stats(cos: Float[Array, "K K"], thresholds=(0.5, 0.9)) -> dict:
    """Summary of a K x K cosine matrix: mean and max off-diagonal cos and |cos|, the
    participation ratio `K^2 / ||C||_F^2` (normalised effects), degeneracy K / PR, and the
    number of threshold clusters (`lens.geometry.threshold_clusters`) per threshold."""
    c = np.asarray(cos, np.float64)
    k = c.shape[0]
    off = c[~np.eye(k, dtype=bool)] if k > 1 else np.zeros(1)
    pr = float(np.trace(c) ** 2 / np.sum(c * c))
    clusters = {
        str(th): int(_threshold_clusters(jnp.asarray(c, jnp.float32), th)[0]) for th in thresholds
    }
    return {
        "cos_mean": float(off.mean()), "abs_cos_mean": float(np.abs(off).mean()),
        "abs_cos_max": float(np.abs(off).max()), "participation_ratio": pr,
        "degeneracy_factor": k / pr, "clusters": clusters,
    }


def source_activations(problem: MelboProblem, skip_first: bool = True) -> Float[Array, "N d_model"]:
    """The real-token residuals after block s, pooled over prompts (position 0, the
    huge-norm first token, left out by default)."""
    m = np.asarray(problem.mask).copy()
    if skip_first:
        m[:, 0] = False
    return jnp.asarray(np.asarray(problem.x_src)[m])


def median_source_norm(problem: MelboProblem) -> float:
    """median |x| over the source-layer residuals of `source_activations`: the |x| of rho."""
    return float(np.median(np.linalg.norm(np.asarray(source_activations(problem)), axis=1)))


def analyse_vectors(
    problem: MelboProblem, vectors: Float[Array, "K d_model"], top_k: int = 10, chunk: int = 8,
    effects: SteeredEffects | None = None, mesh: Mesh | None = None,
) -> dict:
    """Every stage's cosine statistics for one set of vectors (see the module docstring),
    plus norms, rho = |v| / median|x_s|, the closed-form cosine at the mean rho, and the
    logit-level mean pairwise KL, top-k overlap and KL from the unsteered distribution.
    `mesh`: as `steered_effects` (the K x K statistics run on one device)."""
    v = jnp.asarray(vectors, jnp.float32)
    model = problem.model
    x = source_activations(problem)
    norms = np.linalg.norm(np.asarray(v), axis=1)
    rho = norms / median_source_norm(problem)
    eff = effects if effects is not None else steered_effects(problem, v, chunk, mesh=mesh)
    stages, sim = _stage_matrices(
        x, v, model.blocks.ln1_w[problem.layer], eff, model.config.norm_kind, model.config.norm_eps, top_k
    )
    k = v.shape[0]
    off = ~np.eye(k, dtype=bool)
    out = {name: cosine_stats(c) for name, c in stages.items()}
    out["cos_matrices"] = {name: np.asarray(c) for name, c in stages.items()}
    out["norms"] = {"mean": float(norms.mean()), "min": float(norms.min()), "max": float(norms.max())}
    out["rho_mean"] = float(rho.mean())
    out["closed_form_cosine"] = float(geometry.orthogonal_pair_cosine_closed_form(float(rho.mean())))
    out["logit_kl_pairwise_mean"] = float(np.asarray(sim.kl)[off].mean()) if k > 1 else 0.0
    out["logit_topk_overlap_mean"] = float(np.asarray(sim.topk_overlap)[off].mean()) if k > 1 else 1.0
    out["logit_kl_from_base"] = np.asarray(sim.kl_from_base).tolist()
    out["first_token_share"] = {"target": float(np.mean(eff.first_share_target)),
                                "last": float(np.mean(eff.first_share_last))}
    return out


@eqx.filter_jit
def _stage_matrices(x, v, gamma, eff: SteeredEffects, kind: str, eps: float, top_k: int):
    """Every stage's K x K cosine matrix and the logit similarity, in ONE compiled call
    (eagerly, the lax.map / fori_loop inside the geometry functions recompile per call)."""
    sim = geometry.logit_effect_similarity(eff.logits, eff.base_logits, k=top_k)
    stages = {
        "raw": geometry.cosine_matrix(v),
        "effective_exact": geometry.effective_cosine_matrix(x, v, kind, eps, "exact", gamma),
        "effective_first_order": geometry.effective_cosine_matrix(x, v, kind, eps, "first", gamma),
        "target": geometry.cosine_matrix(eff.target),
        "last": geometry.cosine_matrix(eff.last),
        "logits": sim.cosine,
    }
    return stages, sim


def rescale(vectors: Float[Array, "K d_model"], norm: float | Float[Array, " K"]) -> Float[Array, "K d_model"]:
    """Every row scaled to `norm` (a scalar or one norm per row)."""
    v = jnp.asarray(vectors, jnp.float32)
    return v / jnp.linalg.norm(v, axis=1, keepdims=True) * jnp.reshape(jnp.asarray(norm, jnp.float32), (-1, 1))


def random_orthogonal_controls(
    key, theta0: Float[Array, " d_model"], norms: Float[Array, " K"]
) -> Float[Array, "K d_model"]:
    """K random vectors orthogonal to theta0 and to each other (QR of a Gaussian matrix
    after projecting theta0 off), row k scaled to `norms[k]`: the null model for
    "orthogonal vectors with the found vectors' norms"."""
    theta0 = jnp.asarray(theta0, jnp.float32)
    k = jnp.shape(norms)[0]  # static, so the draw jits and vmaps (over keys) too
    u0 = theta0 / jnp.linalg.norm(theta0)
    g = jax.random.normal(key, (theta0.shape[0], k + 1)).at[:, 0].set(u0)
    q, _ = jnp.linalg.qr(g)
    return rescale(q[:, 1:].T, norms)


def rho_sweep(
    problem: MelboProblem, vectors: Float[Array, "K d_model"], rho_grid, chunk: int = 8,
    progress: bool = False, mesh: Mesh | None = None,
) -> dict:
    """Rescale every vector to |v| = rho * median|x_s| for each rho and redo the effective
    (exact, first order) and downstream (target, last, logits) statistics.  Returns lists
    over the grid: `effective_cosine_vs_rho` {exact, first_order}, `degeneracy_vs_rho`
    per stage, `downstream_cosine_vs_rho` {target, last}, and the closed form.  `mesh`:
    as `steered_effects`."""
    x_norm = median_source_norm(problem)
    stages = ("raw", "effective_exact", "effective_first_order", "target", "last", "logits")
    res = {"rho_grid": [float(r) for r in rho_grid], "effective_cosine_vs_rho": {"exact": [], "first_order": []},
           "downstream_cosine_vs_rho": {"target": [], "last": [], "logits": []},
           "degeneracy_vs_rho": {s: [] for s in stages}, "closed_form": []}
    grid = list(rho_grid)
    if progress:
        from tqdm.auto import tqdm

        grid = tqdm(grid, desc="rho sweep")
    for rho in grid:
        a = analyse_vectors(problem, rescale(vectors, rho * x_norm), chunk=chunk, mesh=mesh)
        res["effective_cosine_vs_rho"]["exact"].append(a["effective_exact"]["cos_mean"])
        res["effective_cosine_vs_rho"]["first_order"].append(a["effective_first_order"]["cos_mean"])
        for st in ("target", "last", "logits"):
            res["downstream_cosine_vs_rho"][st].append(a[st]["cos_mean"])
        for st in stages:
            res["degeneracy_vs_rho"][st].append(a[st]["degeneracy_factor"])
        res["closed_form"].append(float(geometry.orthogonal_pair_cosine_closed_form(float(rho))))
    return res
