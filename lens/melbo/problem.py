"""The MELBO problem: a fixed batch of prompts, split at the source layer.

Everything before the steering site is the same for every steering vector, so it runs
ONCE: `make_problem` stores `x_src`, the residual stream after block s (= what enters
block s+1, `resid_pre[s+1]`), and every objective then runs only blocks s+1..t of
`x_src + theta` (`Transformer.run_blocks`).  This is exactly `model.forward` with
`Edits(resid_add=theta at layer s+1, S=1)` (tested), minus the shared prefix.

Layer convention (as in the MELBO papers): "source layer s" means the residual AFTER block
s, "target layer t" the residual AFTER block t, 0 <= s < t < n_layers.

Prompts of different lengths are right-padded; `mask` marks the real tokens, padding is
never attended to, and every sum/mean over positions below runs over real tokens only.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from lens.capture import pad_prompts  # noqa: F401  (re-exported as melbo.pad_prompts)

HIGHEST = jax.lax.Precision.HIGHEST


class MelboProblem(eqx.Module):
    """A model, a padded prompt batch and its cached source-layer residual."""

    model: eqx.Module
    x_src: Float[Array, "P T d_model"]  # residual after block `source` (unsteered)
    query_pos: Int[Array, "P T"]
    key_valid: Bool[Array, "P T"]
    mask: Bool[Array, "P T"]  # real tokens (= key_valid); the positions that count
    source: int = eqx.field(static=True)
    target: int = eqx.field(static=True)


def make_problem(
    model,
    tokens: Int[Array, "P T"],
    mask: Bool[Array, "P T"] | None,
    source: int,
    target: int,
) -> MelboProblem:
    """Run blocks 0..source once per prompt and keep `x_src` = the residual after block s."""
    n = model.config.n_layers
    if not 0 <= source < target < n:
        raise ValueError(f"need 0 <= source < target < n_layers={n}; got {source}, {target}")
    tokens = jnp.asarray(np.asarray(tokens), jnp.int32)
    for row in np.asarray(tokens):
        model.check_tokens(row)  # range checks before any compute
    mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)

    x_src, qpos, kvalid = _prefix(model, tokens, mask, source)
    return MelboProblem(model, x_src, qpos, kvalid, mask, source, target)


@eqx.filter_jit
def _prefix(model, tokens, mask, source: int):
    # The model is an ARGUMENT (a closure would bake the weights in as constants).
    def one(tok, m):
        qpos, kvalid = model.default_positions(tok, m, None, None)
        x = model.embed_tokens(tok, qpos)
        x, _, _ = model.run_blocks(x, qpos, kvalid, 0, source + 1)
        return x, qpos, kvalid

    return jax.vmap(one)(tokens, mask)


def steered_target(
    problem: MelboProblem, theta: Float[Array, " d_model"]
) -> Float[Array, "P T d_model"]:
    """h_t(theta): the residual after block t when theta is added after block s (every position)."""

    def one(x, qpos, kvalid):
        h, _, _ = problem.model.run_blocks(
            x + theta.astype(x.dtype), qpos, kvalid, problem.source + 1, problem.target + 1
        )
        return h

    return jax.vmap(one)(problem.x_src, problem.query_pos, problem.key_valid)


def masked_mean_positions(
    h: Float[Array, "P T d_model"], mask: Bool[Array, "P T"]
) -> Float[Array, "P d_model"]:
    """Mean over each prompt's real tokens."""
    w = mask.astype(h.dtype)
    return jnp.einsum("ptd,pt->pd", h, w, precision=HIGHEST) / jnp.sum(w, axis=1)[:, None]


def melbo_loss(
    problem: MelboProblem,
    theta: Float[Array, " d_model"],
    unsteered: Float[Array, "P T d_model"],
    p: float = 2.0,
    q: float = 1.0,
) -> Float[Array, ""]:
    """MELBO's objective (to MINIMISE):
    `-( sum_prompts ( sum_positions |h_t(theta) - h_t(0)|^2 )^(p/2) )^(1/q)`,
    positions = the real tokens of each prompt; `unsteered` = h_t(0)."""
    diff = (steered_target(problem, theta) - unsteered) * problem.mask[..., None]
    per_prompt = jnp.sum(diff * diff, axis=(1, 2))
    return -jnp.sum(per_prompt ** (p / 2.0)) ** (1.0 / q)


def ortho_loss(
    problem: MelboProblem,
    theta: Float[Array, " d_model"],
    reference: Float[Array, "P d_model"],
) -> Float[Array, ""]:
    """MELBO-ortho's objective: `mean_prompts | mean_positions h_t(theta) - reference_p |`,
    with `reference_p = mean_positions h_t(theta0)` (see `ortho_reference`).

    The original used one prompt; with several we AVERAGE the per-prompt distances (a
    norm per prompt, then the mean), so every prompt counts equally whatever its length."""
    m = masked_mean_positions(steered_target(problem, theta), problem.mask)
    d = m - reference
    return jnp.mean(jnp.sqrt(jnp.sum(d * d, axis=-1)))


def ortho_reference(problem: MelboProblem, theta0: Float[Array, " d_model"]) -> Float[Array, "P d_model"]:
    """`mean_positions h_t(theta0)` per prompt: what MELBO-ortho vectors must reproduce."""
    return masked_mean_positions(steered_target(problem, theta0), problem.mask)
