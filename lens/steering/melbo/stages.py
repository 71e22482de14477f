"""Per-token effects of K steering vectors at every stage, and both readings of each.

`lens.steering.melbo.analysis` pools every stage into one K x K cosine matrix.  Here each stage keeps
its pooling units (the real tokens), so that `lens.steering.melbo.decompose` can report, per stage:
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

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float
from tqdm.auto import tqdm

from lens.core import edits as E
from lens import geometry
from lens.steering.melbo import decompose
from lens.steering.melbo.problem import MelboProblem, steered_run
from lens.models.core import layers as model_layers

TOKEN_STAGES = ("target", "last", "last_normed", "logits")
# `answer`'s numpy entries (drop them before writing JSON).
NOT_JSON = ("found_gram", "control_grams", "effective_unit_cos")


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
    y, _ = model_layers.apply_norm(h, c.norm_kind, model.final_norm_w, model.final_norm_b, c.norm_eps)
    return y.astype(jnp.float32)


@eqx.filter_jit
def _runs(problem: MelboProblem, vectors, s_factor):
    """[K, P, T, d] target, last, last-normed and logit-metric states for a chunk."""
    from lens.models.core.interventions import Capture

    def one(v):
        h, acts = steered_run(problem, v, capture=Capture(resid=True, layers=(problem.target,)))
        y = jax.vmap(lambda hp: _final_normed(problem.model, hp))(h)
        return acts.resid_post[:, 0], h, y, jnp.einsum("ptd,de->pte", y, s_factor)

    return jax.vmap(one)(vectors)


def token_effects(
    problem: MelboProblem, vectors: Float[Array, "K d_model"], chunk: int = 8, progress: bool = False,
    s_factor: Float[Array, "d_model d_model"] | None = None,
) -> dict[str, Float[np.ndarray, "K P T d_model"]]:
    """{stage: [K, P, T, d] effect (padding zeroed)} for the token stages: the target and
    last residual changes, the last after the final norm, and the logit-metric-mapped
    change (`s_factor` = `logit_metric_factor(model)`, computed here when not given)."""
    v = jnp.asarray(E.check_vectors(problem.model, np.asarray(vectors, np.float32), "vectors"))  # NaN / width, eagerly
    if s_factor is None:
        s_factor = logit_metric_factor(problem.model)
    s_factor = jnp.asarray(s_factor)
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


@functools.partial(jax.jit, static_argnames=("kind", "order"))
def _effective(x, vectors, gamma, eps, kind: str, order: str):
    fn = geometry.effective_displacement if order == "exact" else geometry.first_order_displacement
    return jax.vmap(lambda vk: fn(x, vk[None], kind, eps, gamma))(vectors)


def effective_effects(
    problem: MelboProblem, vectors: Float[Array, "K d_model"], order: str = "exact"
) -> Float[np.ndarray, "K N d_model"]:
    """[K, N, d] gamma * (to_sphere(x + v) - to_sphere(x)) (or first order) at the source
    tokens (position 0 left out, as `analysis.source_activations`)."""
    from lens.steering.melbo.analysis import source_activations

    model = problem.model
    x = source_activations(problem)
    gamma = model.blocks.ln1_w[problem.layer]
    v = E.check_vectors(model, np.asarray(vectors, np.float32), "vectors")
    return np.asarray(_effective(x, jnp.asarray(v), gamma, model.config.norm_eps,
                                 model.config.norm_kind, order))


def unit_effects(
    problem: MelboProblem, vectors: Float[Array, "K d_model"], chunk: int = 8, progress: bool = False,
    s_factor: Float[Array, "d_model d_model"] | None = None,
) -> dict[str, Float[np.ndarray, "K units d"]]:
    """{stage: [K, units, d]} for every stage (token stages with and without position 0)."""
    v = np.asarray(vectors, np.float32)
    token = token_effects(problem, v, chunk, progress, s_factor)
    mask = np.asarray(problem.mask)
    per_stage = {}
    for order, name in (("exact", "effective"), ("first", "effective_first_order")):
        per_stage[name] = effective_effects(problem, v, order)
    for name in TOKEN_STAGES:
        per_stage[name] = _units(token[name], mask, with_first=False)
        per_stage[f"{name}_with_first"] = _units(token[name], mask, with_first=True)
    return per_stage


def k_curve(problem: MelboProblem, found: Float[Array, "K d_model"], theta0: Float[Array, " d_model"],
            ks: list[int], control_seed: int = 0, chunk: int = 8, progress: bool = False,
            s_factor: Float[Array, "d_model d_model"] | None = None) -> dict:
    """Raw PR, specific PR and shared share of the FIRST k found vectors for each k in ks,
    beside one draw of K random orthogonal controls with the found norms: does the number
    of distinct effects keep growing with K, or saturate?  {stage: {"found": curve,
    "control": curve}} with curves as `decompose.pr_vs_k`."""
    from lens.steering.melbo.analysis import random_orthogonal_controls

    found = np.asarray(found, np.float32)
    ctrl = np.asarray(random_orthogonal_controls(jax.random.key(2000 + control_seed), np.asarray(theta0, np.float32),
                                                 np.linalg.norm(found, axis=1)))
    if s_factor is None:
        s_factor = logit_metric_factor(problem.model)
    f_eff = unit_effects(problem, found, chunk, progress, s_factor)
    c_eff = unit_effects(problem, ctrl, chunk, progress, s_factor)
    return {st: {"found": decompose.pr_vs_k(f_eff[st], list(ks)), "control": decompose.pr_vs_k(c_eff[st], list(ks))}
            for st in f_eff if not st.endswith("_with_first")}


def stage_readings(
    problem: MelboProblem, vectors: Float[Array, "K d_model"], reference: Float[Array, " d_model"] | None = None,
    chunk: int = 8, n_boot: int = 200, seed: int = 0, progress: bool = False,
    s_factor: Float[Array, "d_model d_model"] | None = None,
) -> dict:
    """Both readings at every stage for one set of vectors, with bootstrap intervals over
    tokens: {stage: {"participation_ratio": {...}, "specific_participation_ratio": {...},
    "shared_share": {...}, "shared_cos_reference": float, "units": int}}.  `reference`: a
    vector (theta0) whose own effect at each stage the shared part is compared with."""
    v = np.asarray(vectors, np.float32)
    k = v.shape[0]
    all_v = v if reference is None else np.concatenate([v, np.asarray(reference, np.float32)[None]])
    per_stage = unit_effects(problem, all_v, chunk, progress, s_factor)
    out = {}
    for name, e in per_stage.items():
        found = e[:k]
        res = decompose.bootstrap_readings(found, n_boot=n_boot, seed=seed)
        if reference is not None:
            res["shared_cos_reference"] = decompose.shared_specific(found, e[k])["shared_cos_reference"]
        res["units"] = int(e.shape[1])
        # The pooled Gram of the K effects (not for report.json): lens.steering.melbo.behaviour
        # clusters the vectors by it.
        res["gram"] = np.asarray(jnp.sum(decompose.unit_grams(found), axis=0), np.float64)
        if name == "effective":  # the per-token spread of the closed form's cosine (not JSON)
            res["unit_cos"] = decompose.unit_cosine_means(found)
        out[name] = res
    return out


def _spread(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    return {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def answer(
    problem: MelboProblem, found: Float[Array, "K d_model"], theta0: Float[Array, " d_model"],
    control_seeds=(0, 1, 2), n_boot: int = 200, chunk: int = 8, progress: bool = False,
    s_factor: Float[Array, "d_model d_model"] | None = None,
) -> dict:
    """The main job's question, both readings, with spreads: for the found vectors and for
    random orthogonal controls (orthogonal to theta0 and each other, the found norms; one
    draw per seed), at every stage.  Keys (report.json contract): `shared_share`,
    `specific_participation_ratio`, `residual_participation_ratio`, `participation_ratio`
    ({stage: {"found", "found_lo",
    "found_hi", "control_mean", "control_min", "control_max"}}), `control_spread` ({stage:
    {reading: {mean, min, max, n}}}), `shared_cos_theta0` ({stage: {"found", "control_mean"}}),
    `closed_form_per_token`, `stages_detail` (every bootstrap), `choices` (what decides
    the numbers), and, numpy (drop them before writing JSON): `found_gram` ({stage: [K, K]
    pooled Gram of the found effects}), `control_grams` ({stage: one Gram per control
    seed}) and `effective_unit_cos` ([units] the found vectors' mean effective cosine per
    token, `decompose.unit_cosine_means`)."""
    from lens.steering.melbo.analysis import random_orthogonal_controls, source_activations

    found = np.asarray(found, np.float32)
    theta0 = np.asarray(theta0, np.float32)
    norms = np.linalg.norm(found, axis=1)
    if s_factor is None:  # one [vocab, d] eigendecomposition for every set below
        s_factor = logit_metric_factor(problem.model)
    f = stage_readings(problem, found, theta0, chunk, n_boot, progress=progress, s_factor=s_factor)
    controls = []
    for seed in control_seeds:
        ctrl = np.asarray(random_orthogonal_controls(jax.random.key(1000 + seed), theta0, norms))
        controls.append(stage_readings(problem, ctrl, theta0, chunk, n_boot, seed=seed, progress=progress,
                                       s_factor=s_factor))
    readings = ("shared_share", "specific_participation_ratio", "residual_participation_ratio", "participation_ratio")
    out: dict = {**{r: {} for r in readings}, "control_spread": {}, "shared_cos_theta0": {},
                 "stages_detail": {"found": f, "controls": controls}}
    for stage in f:
        out["control_spread"][stage] = {r: _spread([c[stage][r]["point"] for c in controls]) for r in readings}
        for r in readings:
            sp = out["control_spread"][stage][r]
            out[r][stage] = {"found": f[stage][r]["point"], "found_lo": f[stage][r]["lo"],
                             "found_hi": f[stage][r]["hi"], "control_mean": sp["mean"],
                             "control_min": sp["min"], "control_max": sp["max"]}
        out["shared_cos_theta0"][stage] = {
            "found": f[stage]["shared_cos_reference"],
            "control_mean": float(np.mean([c[stage]["shared_cos_reference"] for c in controls]))}
    # The found vectors' pooled Gram per stage (numpy, not JSON: lens.steering.melbo.behaviour
    # clusters by it); stages_detail stays JSON-able.
    out["found_gram"] = {stage: f[stage].pop("gram") for stage in f}
    out["control_grams"] = {stage: [c[stage].pop("gram") for c in controls] for stage in f}
    out["effective_unit_cos"] = f["effective"].pop("unit_cos")
    for c in controls:
        c["effective"].pop("unit_cos")
    x_norms = np.linalg.norm(np.asarray(source_activations(problem)), axis=1)
    out["closed_form_per_token"] = decompose.closed_form_per_token(x_norms, norms)
    out["choices"] = {
        "k": int(found.shape[0]), "control_seeds": list(control_seeds), "bootstrap": f"{n_boot} draws over tokens, "
        "90% interval re-centred on the point estimate (lens.steering.melbo.decompose.bootstrap_readings)",
        "units": "every real token of every analysis prompt; position 0 (attention sink) left out "
                 "in '<stage>' and kept in '<stage>_with_first'",
        "last": "'last' = residual after the last block BEFORE the final norm; 'last_normed' = after it "
                "(transformers' hidden_states[-1])",
        "logits": "centred logit change (= centred log-prob change) at every real token",
        "effective": "gain * (to_sphere(x + v) - to_sphere(x)) at the steering layer's first norm, "
                     "source tokens without position 0",
        "specific": "PR of the normalised specific parts e_k - mean_k e_k (ceiling K - 1)",
        "residual": "PR of the normalised parts e_k - (e_k . m^) m^, the shared direction m = mean_k e_k projected "
                    "out whatever each vector's amount of it (ceiling K - 1)",
        "shared_share": "K |mean_k e_k|^2 / sum_k |e_k|^2 (1/K for orthogonal equal-norm effects)",
        "closed_form_per_token": "the idealised orthogonal-pair cosine pooled over tokens at each token's "
                                 "own rho (no gain), beside the formula at the mean rho",
        "n_prompts": int(np.asarray(problem.mask).shape[0]), "n_tokens": int(np.asarray(problem.mask).sum()),
    }
    return out
