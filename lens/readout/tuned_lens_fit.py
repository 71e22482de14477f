"""Fitting and scoring the tuned lens (AlignmentResearch/tuned-lens, `scripts/train_loop.py`).

    loss = TunedLensLoss(model)                         # frozen model, closed over as data
    opt, lr_fn = reference_optimizer(steps)             # the reference's SGD recipe
    options = TrainOptions(loss_fn=loss, opt=opt, rows_config=model.config, lr_fn=lr_fn)
    result = lens.training.train.train(TunedLens.init(model.config), rows, val_rows, cfg, out, options)
    scores = lens_scores(model, result.model, test_rows)   # per layer, logit vs tuned lens

The reference's recipe, reproduced:
  * loss: for every layer l < n_layers, forward KL(model's final distribution || lens
    distribution at layer l) at the SAME position (token_shift 0), averaged over
    positions; the layers' losses are summed (the reference backpropagates each layer's
    loss in turn into one accumulated gradient);
  * optimiser: `torch.optim.SGD(lr = lr_scale * (1 - 0.9), momentum=0.9, nesterov=True,
    weight_decay=1e-3)`, gradients clipped to global norm 1.0 first, LR decayed linearly
    to 0 over the run (`get_linear_schedule_with_warmup` with 0 warmup steps for SGD).
    torch SGD with dampening 0 keeps `buf <- mu buf + g` and steps `g + mu buf` (Nesterov);
    optax `sgd(lr, momentum=mu, nesterov=True)` is `trace(decay=mu, nesterov=True)`:
    `t <- g + mu t`, update `g + mu t`, then `-lr *`: the same arithmetic, so the same lr
    (0.1 = 1.0 x (1 - 0.9)); torch's coupled weight decay (`g <- g + wd p` inside the
    step, after clipping) is `optax.add_decayed_weights(wd)` between the clip and the sgd.
  * what is not reproduced: the reference's 250 steps of 2^18 tokens on the Pile (a GPU
    budget); bfloat16 autocast of the lens (here float32).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from lens.core.stats import kl_divergence
from lens.readout.logit_lens import TunedLens, check_lens_fits, decode, residual_stack
from lens.models.core.transformer import Transformer

MOMENTUM = 0.9
WEIGHT_DECAY = 1e-3
CLIP_NORM = 1.0


def reference_optimizer(steps: int, lr_scale: float = 1.0, momentum: float = MOMENTUM,
                        weight_decay: float = WEIGHT_DECAY, clip_norm: float = CLIP_NORM):
    """(optax transformation, lr schedule) of the reference's SGD recipe (module docstring):
    effective lr = lr_scale * (1 - momentum), Nesterov, coupled weight decay, global-norm
    clip, linear decay to 0 at `steps`."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    lr_fn = optax.linear_schedule(lr_scale * (1 - momentum), 0.0, steps)
    opt = optax.chain(optax.clip_by_global_norm(clip_norm), optax.add_decayed_weights(weight_decay),
                      optax.sgd(lr_fn, momentum=momentum, nesterov=True))
    return opt, lr_fn


def _kl(target_logp: Float[Array, "... vocab"], logits: Float[Array, "... vocab"]) -> Float[Array, "..."]:
    """KL(p || q) per position, p given as log-probs, q as logits (float32)."""
    logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return kl_divergence(target_logp, logq)


@jax.custom_vjp
def decoded_kl(x: Float[Array, "batch seq d_model"], target: Float[Array, "batch seq vocab"],
               model: Transformer) -> Float[Array, ""]:
    """Mean over positions of KL(target || decode(model, x)) (target as log-probs).

    Its gradient in x is computed in the forward pass (one backward through the final norm
    and unembedding) and kept as the only residual, [batch, seq, d]: no [.., vocab] array
    outlives a layer and nothing is recomputed (2 vocab-sized matmuls per layer, where
    rematerialisation needs 3).  No gradient flows to `target` or `model` (frozen)."""
    return _decoded_kl(x, target, model)


def _decoded_kl(x, target, model):
    logits = jax.vmap(lambda h: decode(model, h))(x)
    return _kl(target, logits).mean()


def _decoded_kl_fwd(x, target, model):
    value, grad_x = jax.value_and_grad(_decoded_kl)(x, target, model)
    return value, (grad_x, target, model)


def _decoded_kl_bwd(res, ct):
    grad_x, target, model = res
    # zero cotangents for the frozen inputs; unused by the lens gradient, so XLA drops them
    return ct * grad_x, jnp.zeros_like(target), jax.tree.map(jnp.zeros_like, model)


decoded_kl.defvjp(_decoded_kl_fwd, _decoded_kl_bwd)


class TunedLensLoss(eqx.Module):
    """loss(tuned, rows [B, T+1]) = sum over layers of the mean forward KL(model || lens)
    on the inputs rows[:, :-1].  The frozen model is a field, so `lens.training.train` passes its
    weights as traced data (never trained: only the lens is the trained module)."""

    model: Transformer

    def targets(self, rows: Int[Array, "batch seq_plus_1"]):
        """(residual stacks [B, L+1, T, d], the model's log-probs [B, T, V]), no gradient."""
        def one(tokens):
            stack, logits, _ = residual_stack(self.model, tokens)
            return stack, jax.nn.log_softmax(logits, axis=-1)

        return jax.lax.stop_gradient(jax.vmap(one)(rows[:, :-1]))

    def __call__(self, tuned: TunedLens, rows: Int[Array, "batch seq_plus_1"]) -> Float[Array, ""]:
        stack, target = self.targets(rows)
        n = tuned.n_layers
        hs = jnp.moveaxis(stack[:, :n], 1, 0)  # [L, B, T, d]

        # Layer by layer (as the reference), each layer's vocab-sized work inside decoded_kl.
        def layer_loss(args):
            h, w, b = args
            moved = jax.vmap(lambda x: TunedLens(w[None], b[None]).translate(x, 0))(h)
            return decoded_kl(moved.astype(h.dtype), target, self.model)

        return jax.lax.map(layer_loss, (hs, tuned.weight, tuned.bias)).sum()


# --------------------------------------------------------------------------- temperature control
class TemperatureLens(eqx.Module):
    """The control a tuned lens must beat: the logit lens with ONE learned temperature per
    layer, logits_l = decode(resid_pre[l]) / exp(log_temperature[l]).  Trained on the same
    rows, loss and budget as the tuned lens (`TemperatureLensLoss`); it can fix a layer's
    over- or under-confidence but not move the residual (n_layers parameters, against the
    tuned lens's n_layers * (d^2 + d))."""

    log_temperature: Float[Array, " layers"]

    @staticmethod
    def init(config) -> "TemperatureLens":
        """Temperature 1 everywhere: starts as the logit lens."""
        return TemperatureLens(jnp.zeros((config.n_layers,), jnp.float32))

    @property
    def n_layers(self) -> int:
        return self.log_temperature.shape[0]

    def inverse_temperatures(self) -> Float[Array, " layers_plus_1"]:
        """1 / T_l for every layer, and 1 for the final residual (the model itself)."""
        return jnp.concatenate([jnp.exp(-self.log_temperature), jnp.ones((1,), jnp.float32)])


class TemperatureLensLoss(eqx.Module):
    """loss(temps, rows) = sum over layers of the mean KL(model || logit lens / T_l): the
    tuned lens's loss with the translator replaced by one temperature per layer."""

    model: Transformer

    def __call__(self, temps: TemperatureLens, rows: Int[Array, "batch seq_plus_1"]) -> Float[Array, ""]:
        stack, target = TunedLensLoss(self.model).targets(rows)
        n = temps.n_layers
        # the plain logit-lens logits need no gradient: only the scalar temperatures do
        hs = jnp.moveaxis(stack[:, :n], 1, 0)  # [L, B, T, d]

        def layer_loss(args):
            h, inv_t = args
            lg = jax.lax.stop_gradient(jax.vmap(lambda x: decode(self.model, x))(h).astype(jnp.float32))
            return kl_divergence(target, jax.nn.log_softmax(lg * inv_t, axis=-1)).mean()

        return jax.lax.map(layer_loss, (hs, jnp.exp(-temps.log_temperature))).sum()


# --------------------------------------------------------------------------- scores
@eqx.filter_jit
def _batch_sums(model: Transformer, tuned, rows, frozen_scale: bool = False):
    """Per row and layer [B, L+1, 3] sums over the row's positions of KL(model || lens),
    top-1 agreement with the model, and the cross-entropy of the next token rows[:, 1:].
    tuned: None (logit lens), a TunedLens or a TemperatureLens."""
    inputs, nxt = rows[:, :-1], rows[:, 1:]

    def one(tokens, targets):
        stack, logits, final_scale = residual_stack(model, tokens)
        inv_t = jnp.ones((stack.shape[0],), jnp.float32)
        if isinstance(tuned, TemperatureLens):
            inv_t = tuned.inverse_temperatures()
        elif tuned is not None:
            stack = tuned.translate_stack(stack).astype(stack.dtype)
        target = jax.nn.log_softmax(logits, axis=-1)
        top = jnp.argmax(logits, axis=-1)

        def layer(args):
            x, it = args
            lg = decode(model, x, final_scale if frozen_scale else None).astype(jnp.float32) * it
            logq = jax.nn.log_softmax(lg, axis=-1)
            kl = kl_divergence(target, logq).sum()
            agree = (jnp.argmax(lg, axis=-1) == top).sum()
            ce = -jnp.take_along_axis(logq, targets[:, None], axis=-1)[:, 0].sum()
            return jnp.stack([kl, agree.astype(jnp.float32), ce])

        return jax.lax.map(layer, (stack, inv_t))  # [L+1, 3]

    return jax.vmap(one)(inputs, nxt)


def plateau(log: list[dict], key: str = "val_loss", rel_tol: float = 0.01, patience: int = 2) -> dict:
    """The plateau criterion of a training curve: met at the first logged step after which
    `key` improved by less than `rel_tol` (relative) over each of the next `patience`
    evaluations.  {"criterion": text, "met_at_step": step or None, "curve": [(step, value)]}."""
    curve = [(int(e["step"]), float(e[key])) for e in log if key in e and e[key] is not None]
    met = None
    for i in range(len(curve) - patience):
        base = curve[i][1]
        if all(base - curve[i + j][1] < rel_tol * abs(base) for j in range(1, patience + 1)):
            met = curve[i][0]
            break
    return {"criterion": f"{key} improves by < {rel_tol:.0%} (relative) over each of the next {patience} "
                         "evaluations", "met_at_step": met, "curve": curve}


def row_bytes(tokenizer, rows: np.ndarray) -> int:
    """UTF-8 bytes of the predicted tokens rows[:, 1:], each row decoded as one text."""
    return sum(len(tokenizer.decode([int(t) for t in r[1:]]).encode("utf-8")) for r in np.asarray(rows))


def lens_scores(model: Transformer, tuned: "TunedLens | TemperatureLens | None", rows: np.ndarray,
                n_bytes: int | None = None, batch_size: int = 4, progress: bool = False,
                frozen_scale: bool = False, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per-layer scores of the logit lens (tuned=None) or a tuned lens on `rows` [N, T+1]:
    {"kl": nats/token, "top1": fraction, "ce": nats/token, "ppl": exp(ce)} each a list of
    n_layers + 1 (the last = the model itself, KL 0, top-1 1), plus "ce_bits_per_byte" and
    "kl_bits_per_byte" when `n_bytes` (UTF-8 bytes of rows[:, 1:], `row_bytes`) is given:
    nats per token x tokens / bytes / ln 2, the reference eval's conversion.
    frozen_scale: every layer decoded with the final layer's norm divisor (the
    `logit_lens(frozen_scale=True)` variant; with a tuned lens, after its translators).
    Intervals: "kl_interval_95" / "top1_interval_95" / "ce_interval_95" ([low list, high
    list]), 95% percentile bootstrap over ROWS (`n_boot` resamples; rows, not tokens, are
    the independent units)."""
    rows = np.asarray(rows, np.int32)
    if rows.ndim != 2 or rows.shape[1] < 2 or len(rows) == 0:
        raise ValueError(f"rows must be [N >= 1, T + 1 >= 2] token ids; got {rows.shape}")
    if isinstance(tuned, TemperatureLens):
        if tuned.n_layers != model.config.n_layers:
            raise ValueError(f"the temperature lens has {tuned.n_layers} layers; the model {model.config.n_layers}")
    elif tuned is not None:
        check_lens_fits(model, tuned)
    if rows.min() < 0 or rows.max() >= model.config.vocab_size:
        raise ValueError(f"token ids out of range [0, {model.config.vocab_size})")
    from tqdm.auto import tqdm

    per_row = []
    for i in tqdm(range(0, len(rows), batch_size), disable=not progress, desc="score", leave=False):
        # the last, shorter batch compiles once more; no padding rows to subtract again
        per_row.append(np.asarray(_batch_sums(model, tuned, jnp.asarray(rows[i:i + batch_size]), frozen_scale),
                                  np.float64))
    per_row = np.concatenate(per_row) / (rows.shape[1] - 1)  # [N, L+1, 3] per-token means per row
    total = per_row.mean(0)
    n_tokens = rows.shape[0] * (rows.shape[1] - 1)
    kl, top1, ce = (total[:, k] for k in range(3))
    rng = np.random.default_rng(seed)
    boot = np.stack([per_row[rng.integers(0, len(per_row), len(per_row))].mean(0) for _ in range(n_boot)])
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)  # [L+1, 3]
    out = {"kl": kl.tolist(), "top1": top1.tolist(), "ce": ce.tolist(), "ppl": np.exp(ce).tolist(),
           "tokens": int(n_tokens), "rows": int(len(rows)),
           **{f"{name}_interval_95": [lo[:, k].tolist(), hi[:, k].tolist()]
              for k, name in enumerate(("kl", "top1", "ce"))}}
    if n_bytes is not None:
        factor = n_tokens / n_bytes / np.log(2)
        out |= {"ce_bits_per_byte": (ce * factor).tolist(), "kl_bits_per_byte": (kl * factor).tolist(),
                "bytes": int(n_bytes)}
    return out
