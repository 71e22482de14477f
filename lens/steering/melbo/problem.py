"""The MELBO problem: a fixed batch of prompts, split at the source layer.

Everything before the steering site is the same for every steering vector, so it runs
ONCE: `make_problem` stores `x_src = model.prefix(...)`, the residual stream entering
block `problem.layer`, and every objective then runs only the blocks up to the target,
with theta added as `edits.add(model, theta, problem.layer)` (the one path by which a
vector enters the model): `model.forward` with that edit, minus the shared prefix (tested).

Layer convention: the library's "layer l" is the residual ENTERING block l
(`resid_pre[l]`).  The MELBO papers (and `make_problem`'s arguments) say "source layer s"
for the residual AFTER block s and "target layer t" for the residual after block t,
0 <= s < t < n_layers; `make_problem` converts ONCE: layer = s + 1, target_layer = t + 1.

Prompts of different lengths are right-padded; `mask` marks the real tokens, padding is
never attended to, and every sum/mean over positions below runs over real tokens only.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from lens.core import edits as E
from lens.core.capture import pad_prompts  # noqa: F401  (re-exported as melbo.pad_prompts)
from lens.geometry._common import HIGHEST
from lens.models.core.interventions import Activations, Capture


def layer_after(block: int) -> int:
    """MELBO's "after block s" in the library's convention: the layer s + 1 it enters.
    The one place where lens.steering.melbo converts (the main job's CLI keeps MELBO's wording)."""
    return block + 1


class MelboProblem(eqx.Module):
    """A model, a padded prompt batch and its cached source-layer residual."""

    model: eqx.Module
    x_src: Float[Array, "P T d_model"]  # resid_pre[layer] (= after block `source`), unsteered
    query_pos: Int[Array, "P T"]
    key_valid: Bool[Array, "P T"]
    mask: Bool[Array, "P T"]  # real tokens (= key_valid); the positions that count
    source: int = eqx.field(static=True)  # MELBO wording: after block `source`
    target: int = eqx.field(static=True)  # after block `target`

    @property
    def layer(self) -> int:
        """The steering layer in the library's convention: theta enters block `layer`."""
        return layer_after(self.source)

    @property
    def target_layer(self) -> int:
        """The target read as resid_pre[target_layer] (= after block `target`)."""
        return layer_after(self.target)


def make_problem(
    model,
    tokens: Int[Array, "P T"],
    mask: Bool[Array, "P T"] | None,
    source: int,
    target: int,
) -> MelboProblem:
    """Run blocks 0..source once per prompt and keep `x_src` = the residual after block s
    (MELBO's "source layer s" = the library's layer s + 1, `MelboProblem.layer`)."""
    n = model.config.n_layers
    if not 0 <= source < target < n:
        raise ValueError(f"need 0 <= source < target < n_layers={n}; got {source}, {target}")
    tokens = jnp.asarray(np.asarray(tokens), jnp.int32)
    for row in np.asarray(tokens):
        model.check_tokens(row)  # range checks before any compute
    mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)

    x_src, qpos, kvalid = _prefix(model, tokens, mask, layer_after(source))
    return MelboProblem(model, x_src, qpos, kvalid, mask, source, target)


@eqx.filter_jit
def _prefix(model, tokens, mask, layer: int):
    # The model is an ARGUMENT (a closure would bake the weights in as constants).  The ids
    # were range-checked on the host by make_problem: no callback, so the compiled prefix
    # goes into the persistent compilation cache.
    return jax.vmap(lambda tok, m: model.prefix(tok, m, layer, ids_checked=True))(tokens, mask)


def steered_run(
    problem: MelboProblem, theta: Float[Array, " d_model"], stop: int | None = None,
    capture: Capture = Capture(),
) -> tuple[Float[Array, "P T d_model"], Activations]:
    """(resid_pre[stop] per prompt, captures) with theta added at `problem.layer` at every
    position (`edits.add`), from the cached prefix; stop None = every block."""
    model = problem.model
    edits = E.add(model, theta, problem.layer)

    def one(x, qpos, kvalid):
        h, _, acts = model.run_blocks(x, qpos, kvalid, problem.layer, stop, edits=edits,
                                      capture=capture)
        return h, acts

    return jax.vmap(one)(problem.x_src, problem.query_pos, problem.key_valid)


def steered_target(
    problem: MelboProblem, theta: Float[Array, " d_model"]
) -> Float[Array, "P T d_model"]:
    """h_t(theta): the residual after block t when theta is added after block s (every position)."""
    return steered_run(problem, theta, problem.target_layer)[0]


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


def without_first_position(problem: MelboProblem) -> MelboProblem:
    """The same problem with position 0 left out of every sum/mean over positions (the
    objective's `mask`), while every token, position 0 included, is still attended to.

    Position 0 is the attention sink: MELBO's and MELBO-ortho's objectives pool over every
    real token, and position 0 carries 40-55% of MELBO-ortho's pooled target effect on
    SmolLM2.  Training on this problem asks the vectors to reproduce theta0's effect on
    the tokens that carry content only.  Prompts are right-padded, so position 0 is each
    prompt's first real token; a prompt of one token would have nothing left (refused)."""
    mask = np.asarray(problem.mask)
    if (mask.sum(axis=1) < 2).any():
        raise ValueError("without_first_position: every prompt needs at least 2 real tokens")
    mask = mask.copy()
    mask[:, 0] = False
    return eqx.tree_at(lambda p: p.mask, problem, jnp.asarray(mask))
