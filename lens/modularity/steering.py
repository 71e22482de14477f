"""Does pruning the most code-specific neurons touch the "write code" steering vector?
(scripts/modularity.py's steering section.)

theta0 is the main job's (`lens.steering.melbo.base_vector.code_theta0`, the "reply" design
at a fixed rho); this module measures (1) theta0's share in the span of the most
forget-specific pruned neurons' output directions vs as many random neurons
(`span_share`), and (2) the code score of greedy replies with and without theta0 on the
base model, ratio-pruned models and randomly pruned models of the same counts
(`steered_code_scores`, `pruned_steering_table`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Bool, Float, Int

from lens.models.generation.generate import GenerationConfig
from lens.modularity import pruning as M
from lens.steering import vectors
from lens.steering.code_score import code_score


def direction_share(W_out: Float[np.ndarray, "layers d_mlp d_model"], neurons: Int[np.ndarray, "n 2"],
                    unit: Float[np.ndarray, "d_model"]) -> float:
    """|P unit|^2: the share of the unit vector in the span of the (layer, neuron) output
    rows of W_out (orthonormalised by QR)."""
    q, _ = np.linalg.qr(W_out[neurons[:, 0], neurons[:, 1]].T)
    return float(np.sum((q.T @ unit) ** 2))


def span_share(W_out: Float[np.ndarray, "layers d_mlp d_model"], mask: Bool[np.ndarray, "layers d_mlp"],
               scores: Float[np.ndarray, "layers d_mlp"], unit: Float[np.ndarray, "d_model"], layer: int,
               draws: int, seed: int) -> dict:
    """The n_dir = d_model / 8 most forget-specific (highest `scores`) pruned neurons writing
    before `layer` (layers < layer; a span of >= d_model directions is the whole space):
    the unit vector's share in their output span vs as many random neurons of the same
    layers (`draws` draws from default_rng(seed)), and the share a random subspace of
    that dimension would hold (n / d).  {"n_directions": 0} without pruned neurons there."""
    d_mlp, d = W_out.shape[1], W_out.shape[2]
    n_dir = max(1, d // 8)
    cand = np.argwhere(mask[:layer])
    if len(cand) == 0:
        return {"n_directions": 0}
    s = scores[:layer][mask[:layer]]
    top = cand[np.argsort(-s)[:n_dir]]
    rng = np.random.default_rng(seed)
    ctrl = []
    for _ in range(draws):
        flat = rng.choice(layer * d_mlp, size=len(top), replace=False)
        ctrl.append(direction_share(W_out, np.stack([flat // d_mlp, flat % d_mlp], 1), unit))
    return {"n_directions": int(len(top)), "share_pruned": direction_share(W_out, top, unit),
            "share_random_mean": float(np.mean(ctrl)), "share_random_range": [float(min(ctrl)), float(max(ctrl))],
            "share_expected_random_subspace": len(top) / d, "pruned_before_layer": int(mask[:layer].sum())}


def steered_code_scores(model, prompts: Sequence[Sequence[int]], theta0: Float[np.ndarray, "d_model"], layer: int,
                        max_new_tokens: int, decode: Callable[[list[int]], str],
                        eos_token_ids: Sequence[int]) -> tuple[dict, str]:
    """Mean code score of greedy replies to `prompts` without ("unsteered") and with
    ("steered") theta0 added at resid_pre[layer]; and the first steered reply (300 chars).
    `eos_token_ids` end a reply (the base model's, also for a pruned copy)."""
    vecs = np.stack([np.zeros_like(theta0), theta0]).astype(np.float32)
    out = vectors.generate_with_vectors(model, prompts, vecs, layer, GenerationConfig(max_new_tokens), progress=False)
    rows = vectors.new_token_lists(out.reshape(-1, out.shape[-1]), eos_token_ids)
    texts = [decode(r) for r in rows]
    per = np.asarray([code_score(t) for t in texts]).reshape(len(vecs), len(prompts))
    return {"unsteered": float(per[0].mean()), "steered": float(per[1].mean())}, texts[len(prompts)][:300]


def pruned_steering_table(model, sets: dict[str, Bool[np.ndarray, "layers d_mlp"]], score_fn, seeds: int,
                          ) -> tuple[dict, dict]:
    """`score_fn(model) -> (scores, example)` (e.g. `steered_code_scores` bound to its
    prompts) on the base model ("base"), each pruned set ("ratio_<name>") and `seeds`
    random prunings of the same count each ("random_<name>": mean, steered range and the
    draws; masks from default_rng(1000 + seed)).  Returns (table, examples)."""
    table, examples = {}, {}
    table["base"], examples["base"] = score_fn(model)
    for name, mask in sets.items():
        table[f"ratio_{name}"], examples[f"ratio_{name}"] = score_fn(M.prune(model, mask))
        draws = []
        for seed in range(seeds):
            rnd = M.random_unpruned(mask.shape, int(mask.sum()), np.zeros_like(mask), np.random.default_rng(1000 + seed))
            sc, ex = score_fn(M.prune(model, rnd))
            draws.append(sc)
            examples.setdefault(f"random_{name}", ex)
        table[f"random_{name}"] = {k: float(np.mean([r[k] for r in draws])) for k in ("unsteered", "steered")}
        table[f"random_{name}"]["steered_range"] = [min(r["steered"] for r in draws), max(r["steered"] for r in draws)]
        table[f"random_{name}"]["draws"] = draws
    return table, examples


def loss_and_agreement(logits: Float[np.ndarray, "rows seq vocab"], dense: Float[np.ndarray, "rows seq vocab"],
                       rows: Int[np.ndarray, "rows seq"]) -> tuple[float, float]:
    """(mean next-token NLL of `logits` on `rows`, share of positions whose argmax agrees
    with the dense model's `dense` logits)."""
    logits, dense, rows = np.asarray(logits), np.asarray(dense), np.asarray(rows)
    if logits.shape != dense.shape or logits.shape[:2] != rows.shape:
        raise ValueError(f"logits {logits.shape}, dense {dense.shape} and rows {rows.shape} disagree")
    logp = jax.nn.log_softmax(jnp.asarray(logits[:, :-1]), -1)
    nll = -np.take_along_axis(np.asarray(logp), rows[:, 1:, None], -1)[..., 0]
    return float(nll.mean()), float((logits.argmax(-1) == dense.argmax(-1)).mean())
