"""Per-token effects of K steering vectors at every stage, and both readings of each.

`lens.melbo.analysis` pools every stage into one K x K cosine matrix.  Here each stage keeps
its pooling units (the real tokens), so that `lens.melbo.decompose` can report, per stage:
raw PR, the shared share and the specific (centred) PR, bootstrap intervals over tokens,
and the cosine of the shared part with theta0's own effect.  Stages (units in brackets):
  effective        gamma * (to_sphere(x + v) - to_sphere(x)) at the steering layer's first
                   norm [source tokens], exact and first order;
  target           resid_pre[target_layer] change [real tokens];
  last             the residual after the last block, BEFORE the final norm [real tokens];
  last_normed      the same AFTER the final norm (= transformers' hidden_states[-1]);
  logits           the centred logit change at EVERY real token (the next-token
                   distribution there; softmax-shift free, = centred log-prob change).
Position 0 (the attention sink) is a choice that decides numbers: every token stage is
reported with it left out (`*`) and kept (`*_with_first`).

The logit stage never materialises [K, tokens, vocab]: the centred logit change is
`W_c (y_v - y_0)` with y the final norm's output and `W_c` the unembedding centred over
the vocabulary, so its Gram matrix is `dy M dy^T` with `M = W_c^T W_c` [d, d]; effects are
mapped through `S` with `S S^T = M` and become ordinary d-dimensional vectors.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float
from tqdm.auto import tqdm

from lens import geometry
from lens.melbo import decompose
from lens.melbo.problem import MelboProblem, steered_run
from models import layers as model_layers

TOKEN_STAGES = ("target", "last", "last_normed", "logits")


def logit_metric_factor(model) -> np.ndarray:
    """S [d, d] with `S S^T = W_c^T W_c` (float64 eigendecomposition): `dy @ S` has the
    same Gram matrix as the centred logit change `W_c dy`."""
    if model.config.final_logit_softcap is not None:
        raise NotImplementedError("logit soft-capping is not linear: the logit stage needs explicit logits")
    w = np.asarray(model.W_U, np.float64)
    wc = w - w.mean(axis=0, keepdims=True)
    lam, q = np.linalg.eigh(wc.T @ wc)
    return (q * np.sqrt(np.clip(lam, 0, None))[None, :]).astype(np.float32)


def _final_normed(model, h):
    c = model.config
    y, _ = model_layers.apply_norm(h, c.norm_kind, c.norm_eps, model.final_norm_w, model.final_norm_b)
    return y.astype(jnp.float32)


@eqx.filter_jit
def _runs(problem: MelboProblem, vectors, s_factor):
    """[K, P, T, d] target, last, last-normed and logit-metric states for a chunk."""
    from models.interventions import Capture

    def one(v):
        h, acts = steered_run(problem, v, capture=Capture(resid=True, layers=(problem.target,)))
        y = jax.vmap(lambda hp: _final_normed(problem.model, hp))(h)
        return acts.resid_post[:, 0], h, y, jnp.einsum("ptd,de->pte", y, s_factor)

    return jax.vmap(one)(vectors)


def token_effects(problem: MelboProblem, vectors, chunk: int = 8, progress: bool = False) -> dict:
    """{stage: [K, P, T, d] effect (padding zeroed)} for the token stages, and the position
    0 share of each stage's energy."""
    v = jnp.asarray(vectors, jnp.float32)
    s_factor = jnp.asarray(logit_metric_factor(problem.model))
    base = [np.asarray(a)[0] for a in _runs(problem, jnp.zeros((1, v.shape[1])), s_factor)]
    m = np.asarray(problem.mask, np.float32)[None, :, :, None]
    parts = []
    steps = range(0, v.shape[0], chunk)
    for i in tqdm(steps, desc="stage effects", disable=not progress):
        c = v[i : i + chunk]
        pad = chunk - c.shape[0]
        out = _runs(problem, jnp.pad(c, ((0, pad), (0, 0))), s_factor)
        parts.append([(np.asarray(a)[: c.shape[0]] - b[None]) * m for a, b in zip(out, base)])
    return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(TOKEN_STAGES)}


def _units(e: np.ndarray, mask: np.ndarray, with_first: bool) -> np.ndarray:
    """[K, P, T, d] -> [K, U, d] over the real tokens (position 0 dropped unless with_first)."""
    keep = np.asarray(mask, bool).copy()
    if not with_first:
        keep[:, 0] = False
    return e[:, keep]


def effective_effects(problem: MelboProblem, vectors, order: str = "exact") -> np.ndarray:
    """[K, N, d] gamma * (to_sphere(x + v) - to_sphere(x)) (or first order) at the source
    tokens (position 0 left out, as `analysis.source_activations`)."""
    from lens.melbo.analysis import source_activations

    model = problem.model
    x = source_activations(problem)
    gamma = model.blocks.ln1_w[problem.layer]
    fn = geometry.effective_displacement if order == "exact" else geometry.first_order_displacement
    kind, eps = model.config.norm_kind, model.config.norm_eps
    f = jax.jit(jax.vmap(lambda vk: fn(x, vk[None], kind, eps, gamma)))
    return np.asarray(f(jnp.asarray(vectors, jnp.float32)))


def stage_readings(
    problem: MelboProblem, vectors, reference=None, chunk: int = 8, n_boot: int = 200, seed: int = 0,
    progress: bool = False,
) -> dict:
    """Both readings at every stage for one set of vectors, with bootstrap intervals over
    tokens: {stage: {"participation_ratio": {...}, "specific_participation_ratio": {...},
    "shared_share": {...}, "shared_cos_reference": float, "units": int}}.  `reference`: a
    vector (theta0) whose own effect at each stage the shared part is compared with."""
    v = np.asarray(vectors, np.float32)
    k = v.shape[0]
    all_v = v if reference is None else np.concatenate([v, np.asarray(reference, np.float32)[None]])
    token = token_effects(problem, all_v, chunk, progress)
    mask = np.asarray(problem.mask)
    per_stage = {}
    for order, name in (("exact", "effective"), ("first", "effective_first_order")):
        per_stage[name] = effective_effects(problem, all_v, order)
    for name in TOKEN_STAGES:
        per_stage[name] = _units(token[name], mask, with_first=False)
        per_stage[f"{name}_with_first"] = _units(token[name], mask, with_first=True)
    out = {}
    for name, e in per_stage.items():
        found = e[:k]
        res = decompose.bootstrap_readings(found, n_boot=n_boot, seed=seed)
        if reference is not None:
            res["shared_cos_reference"] = decompose.shared_specific(found, e[k])["shared_cos_reference"]
        res["units"] = int(e.shape[1])
        out[name] = res
    return out
