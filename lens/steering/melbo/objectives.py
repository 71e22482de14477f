"""The two objectives a MELBO training loop optimises (`lens.steering.melbo.train` runs them):
MELBO (maximise the target-layer change at a fixed norm) and MELBO-ortho (reproduce
theta0's target-layer effect orthogonally to it), each with its optimiser, its initial
vector, one projected step and the joint fix of a batched block; and `scale_by_torch_amsgrad`,
the AMSGrad of the original's torch optimiser.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array

from lens.steering.melbo.basis import gram_schmidt, project_off
from lens.steering.melbo.problem import HIGHEST, melbo_loss, ortho_loss


@dataclasses.dataclass(frozen=True)
class MelboConfig:
    """MELBO (Mack & Turner): maximise the target-layer change at fixed |theta| = radius.

    Optimiser as the original: torch AdamW(lr 1e-3, betas (0.9, 0.98), amsgrad; see
    `scale_by_torch_amsgrad` for why not optax's amsgrad) with decoupled
    weight decay `weight_decay` (0 by default; it is irrelevant after renormalisation
    except through Adam's moments).  The gradient is projected onto the sphere's tangent
    space and off earlier vectors; the iterate is projected off earlier vectors and
    renormalised to `radius` after every step."""

    radius: float
    steps: int = 300
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.98
    amsgrad: bool = True
    weight_decay: float = 0.0
    p: float = 2.0
    q: float = 1.0

    def optimizer(self) -> optax.GradientTransformation:
        scale = scale_by_torch_amsgrad if self.amsgrad else optax.scale_by_adam
        return optax.chain(
            scale(b1=self.b1, b2=self.b2, eps=1e-8),
            optax.add_decayed_weights(self.weight_decay),
            optax.scale(-self.lr),
        )

    def init(self, key, basis, ref_norm):
        v = project_off(jax.random.normal(key, basis.shape[1:], jnp.float32), basis)
        return self.radius * v / jnp.linalg.norm(v)

    def step(self, problem, aux, opt, theta, state, basis):
        loss, g = jax.value_and_grad(melbo_loss, argnums=1)(problem, theta, aux, self.p, self.q)
        g = g - (jnp.dot(g, theta, precision=HIGHEST) / jnp.dot(theta, theta, precision=HIGHEST)) * theta
        g = project_off(g, basis)
        updates, state = opt.update(g, state, theta)
        theta = project_off(theta + updates, basis)
        return self.radius * theta / jnp.linalg.norm(theta), state, loss

    def fix_block(self, thetas):
        q = gram_schmidt(thetas)
        return self.radius * q / jnp.linalg.norm(q, axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class OrthoConfig:
    """MELBO-ortho: theta orthogonal to theta0 and earlier vectors, minimising
    `|mean_pos h_t(x + theta) - mean_pos h_t(x + theta0)|` (see `ortho_loss`); Adam(lr),
    the iterate projected off earlier vectors after every step, no norm constraint.
    Init: a random vector projected off earlier ones, scaled to |theta0|."""

    steps: int = 1000
    lr: float = 0.01

    def optimizer(self) -> optax.GradientTransformation:
        return optax.adam(self.lr)

    def init(self, key, basis, ref_norm):
        v = project_off(jax.random.normal(key, basis.shape[1:], jnp.float32), basis)
        return ref_norm * v / jnp.linalg.norm(v)

    def step(self, problem, aux, opt, theta, state, basis):
        loss, g = jax.value_and_grad(ortho_loss, argnums=1)(problem, theta, aux)
        updates, state = opt.update(g, state, theta)
        return project_off(theta + updates, basis), state, loss

    def fix_block(self, thetas):
        return gram_schmidt(thetas)


Objective = MelboConfig | OrthoConfig


class TorchAmsgradState(NamedTuple):
    count: Array
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates


def scale_by_torch_amsgrad(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """AMSGrad as torch.optim.Adam(W)(amsgrad=True) computes it, which the original MELBO
    used: the running max is taken of the RAW second moment and bias-corrected after the
    max, `m_hat / (sqrt(max_t nu_t) / sqrt(1 - b2^t) + eps)`.  optax.scale_by_amsgrad takes
    the max of the bias-corrected moment instead, which differs in the first ~1/(1-b2)
    steps (tests/lens/steering/test_melbo_parity.py checks this against torch)."""

    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        return TorchAmsgradState(jnp.zeros([], jnp.int32), zeros(), zeros(), zeros())

    def update(updates, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
        c1 = 1 - b1 ** count.astype(jnp.float32)
        c2 = jnp.sqrt(1 - b2 ** count.astype(jnp.float32))
        out = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v) / c2 + eps), mu, nu_max)
        return out, TorchAmsgradState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init, update)
