"""Gaming the "predict the model" test, and the side models it is gamed with.

    loss = GoodhartLoss(lam=1.0, table_logp=jnp.log(bigram.dense_bigram()))
    result = lens.training.train.train(model, rows, val_rows, cfg, out, TrainOptions(loss_fn=loss))

`GoodhartLoss`: next-token cross-entropy + lam * KL(target || model), the target being
the next-token distribution of a bigram table (row `table_logp[previous token]`) or of a
frozen side model.  KL(target || model) pulls the model's distribution toward the cheap
predictor wherever the target puts mass, so the cheap predictor then "predicts the
model" better: the developer's move the test cannot tell from understanding.  lam = 0
is plain training (the term is computed and multiplied by 0).

`DistillLoss`: KL(teacher || student) per position, for training a small student on a
model's logits through lens.training.train (a side model a test-taker could run instead of the
model); `models.core.transformer.first_blocks` starts one from the teacher's own first blocks.
"""

from __future__ import annotations


import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lens.core.stats import kl_divergence
from lens.training.train import next_token_loss


def _student_logp(model, rows: Int[Array, "B T"]) -> Float[Array, "B T V"]:
    return jax.nn.log_softmax(jax.vmap(model)(rows).astype(jnp.float32), axis=-1)


class GoodhartLoss(eqx.Module):
    """CE + lam * mean KL(target || model) over the positions of rows[:, :-1].

    Exactly one of `table_logp` ([V, V] log p(next | previous), a bigram table) or
    `side` (a frozen Transformer; no gradient flows into it) is the target."""

    lam: float = eqx.field(static=True)
    table_logp: Float[Array, "V V"] | None = None
    side: eqx.Module | None = None

    def __post_init__(self):
        if (self.table_logp is None) == (self.side is None):
            raise ValueError("GoodhartLoss needs exactly one target: table_logp or side")
        if not self.lam >= 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")

    def target_logp(self, inputs: Int[Array, "B T"]) -> Float[Array, "B T V"]:
        if self.table_logp is not None:
            return jax.lax.stop_gradient(self.table_logp[inputs])
        return jax.lax.stop_gradient(_student_logp(self.side, inputs))

    def __call__(self, model, rows: Int[Array, "B T"]) -> Float[Array, ""]:
        ce = next_token_loss(model, rows)
        if self.lam == 0:  # static: the plain step, compiled as such
            return ce
        inputs = rows[:, :-1]
        kl = kl_divergence(self.target_logp(inputs), _student_logp(model, inputs)).mean()
        return ce + self.lam * kl


class DistillLoss(eqx.Module):
    """Mean KL(teacher || student) over the positions of rows[:, :-1] (the teacher frozen)."""

    teacher: eqx.Module

    def __call__(self, student, rows: Int[Array, "B T"]) -> Float[Array, ""]:
        inputs = rows[:, :-1]
        t = jax.lax.stop_gradient(_student_logp(self.teacher, inputs))
        return kl_divergence(t, _student_logp(student, inputs)).mean()


def _distill_loss(teacher, student, rows):
    return DistillLoss(teacher)(student, rows)


def mean_kl(teacher, student, rows: Int[np.ndarray, "N T"], batch: int = 8) -> float:
    """Mean KL(teacher || student) over every position of `rows` (the held-out check)."""
    rows = np.asarray(rows, np.int32)
    loss = _distill_loss
    n = (len(rows) // batch) * batch
    if n == 0:
        raise ValueError(f"{len(rows)} rows are fewer than one batch of {batch}")
    return float(np.mean([float(loss(teacher, student, jnp.asarray(rows[i:i + batch]))) for i in range(0, n, batch)]))
