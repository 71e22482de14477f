"""theta0, the "write code" base vector of MELBO-ortho (the main job, scripts/
orthogonal_steering.py, and the steering section of scripts/modularity.py build it here).

CAA (contrastive activation addition) of code requests vs prose requests at resid_pre[layer]:
"reply" = mean over the first `reply_tokens` positions of the model's OWN greedy replies
(`lens.steering.vectors.reply_mean_difference`), "last" = the last prompt token
(`lens.steering.vectors.mean_difference`).  Its norm is rho x the median source residual norm
|x| (`lens.steering.melbo.median_source_norm`): rho fixed, or calibrated on the code score of
steered greedy replies to non-coding prompts (`lens.steering.vectors.calibrate_norm`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from jaxtyping import Float

from lens.steering import vectors
from lens.steering.code_score import code_score
from lens.steering.melbo.problem import pad_prompts

DESIGNS = ("reply", "last")


def caa_last(model, prompts_a: Sequence[Sequence[int]], prompts_b: Sequence[Sequence[int]],
             layer: int) -> Float[np.ndarray, "d_model"]:
    """CAA at the last prompt token: mean over pairs of resid_pre[layer](a) - (b) at each
    prompt's last token (`lens.steering.vectors.mean_difference`)."""
    (ta, ma), (tb, mb) = pad_prompts(prompts_a), pad_prompts(prompts_b)
    return np.asarray(vectors.mean_difference(model, ta, tb, layer, ma, mb, reduce="last"))


def caa_designs(model, code: Sequence[Sequence[int]], prose: Sequence[Sequence[int]], layer: int,
                reply_tokens: int, designs: Sequence[str] = DESIGNS) -> dict[str, Float[np.ndarray, "d_model"]]:
    """{design: direction} for the named CAA designs ("reply" and / or "last"), code minus prose."""
    bad = [d for d in designs if d not in DESIGNS]
    if bad or not designs:
        raise ValueError(f"designs must be a non-empty subset of {DESIGNS}; got {list(designs)}")
    out = {}
    if "reply" in designs:
        out["reply"] = vectors.reply_mean_difference(model, code, prose, layer, reply_tokens)
    if "last" in designs:
        out["last"] = caa_last(model, code, prose, layer)
    return out


def code_theta0(
    model,
    code: Sequence[Sequence[int]],
    prose: Sequence[Sequence[int]],
    neutral: Sequence[Sequence[int]],
    layer: int,
    x_norm: float,
    rho_grid: Sequence[float],
    reply_tokens: int,
    max_new_tokens: int,
    decode: Callable[[list[int]], str],
    designs: Sequence[str] = DESIGNS,
    vectors_per_call: int | None = None,
    fixed_rho: float | None = None,
) -> tuple[Float[np.ndarray, "d_model"], dict]:
    """theta0 and its record.  The CAA `designs` of `code` vs `prose` requests (token ids)
    at resid_pre[layer]; then either `fixed_rho` (no generations: the "reply" design at
    fixed_rho x x_norm) or `calibrate_norm` over `designs` x `rho_grid` on the code score
    of greedy replies of `max_new_tokens` to `neutral` (the earlier design wins ties).

    Returns (theta0, info): `calibrate_norm`'s info ("design", "rho", "scored", "table",
    "examples"; fixed_rho: design, rho and an empty table) plus "calibrated" and, with
    both designs, "cos_reply_last" (the cosine of the two directions)."""
    if not x_norm > 0:
        raise ValueError(f"x_norm must be > 0; got {x_norm}")
    dirs = caa_designs(model, code, prose, layer, reply_tokens, designs)
    extra = {}
    if "reply" in dirs and "last" in dirs:
        r, la = dirs["reply"], dirs["last"]
        extra["cos_reply_last"] = float(r @ la / np.linalg.norm(r) / np.linalg.norm(la))
    if fixed_rho is not None:
        if "reply" not in dirs:
            raise ValueError("fixed_rho takes the 'reply' design: include it in designs")
        v = dirs["reply"]
        return v / np.linalg.norm(v) * fixed_rho * x_norm, {
            "design": "reply", "rho": fixed_rho, "calibrated": False, "table": [], **extra}
    theta0, info = vectors.calibrate_norm(model, dirs, neutral, layer, x_norm, rho_grid, max_new_tokens,
                                          score=code_score, decode=decode, vectors_per_call=vectors_per_call)
    return theta0, info | {"calibrated": True, **extra}
