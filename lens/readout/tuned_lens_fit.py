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

import hashlib
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from lens.core.stats import kl_divergence
from lens.models.core.interventions import Capture
from lens.readout.logit_lens import TunedLens, check_layers, check_lens_fits, decode, residual_stack
from lens.models.core.transformer import Transformer

MOMENTUM = 0.9
WEIGHT_DECAY = 1e-3
CLIP_NORM = 1.0


def reference_optimizer(steps: int, lr_scale: float = 1.0, momentum: float = MOMENTUM,
                        weight_decay: float = WEIGHT_DECAY, clip_norm: float = CLIP_NORM, accumulate: int = 1):
    """(optax transformation, lr schedule) of the reference's SGD recipe (module docstring):
    effective lr = lr_scale * (1 - momentum), Nesterov, coupled weight decay, global-norm
    clip, linear decay to 0 at `steps` optimiser steps.

    accumulate > 1: each optimiser step takes the MEAN gradient of `accumulate` consecutive
    batches (`optax.MultiSteps`; the clip acts on that mean, as the reference clips its
    accumulated gradient), so `steps` optimiser steps take steps * accumulate batches and
    the transformation is called once per batch.  The returned schedule is then indexed by
    batch (what `lens.training.train` logs): the lr of the optimiser step that batch is in."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1; got {accumulate}")
    lr_fn = optax.linear_schedule(lr_scale * (1 - momentum), 0.0, steps)
    opt = optax.chain(optax.clip_by_global_norm(clip_norm), optax.add_decayed_weights(weight_decay),
                      optax.sgd(lr_fn, momentum=momentum, nesterov=True))
    if accumulate == 1:
        return opt, lr_fn
    return (optax.MultiSteps(opt, every_k_schedule=accumulate).gradient_transformation(),
            lambda batch: lr_fn(batch // accumulate))


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
    """loss(tuned, rows [B, T+1]) = sum over the lens's layers of the mean forward KL(model || lens)
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
        hs = jnp.moveaxis(stack[:, np.asarray(tuned.layer_indices)], 1, 0)  # [lens layers, B, T, d]

        # Layer by layer (as the reference), each layer's vocab-sized work inside decoded_kl.
        def layer_loss(args):
            h, w, b = args
            moved = jax.vmap(lambda x: TunedLens(w[None], b[None]).translate(x, 0))(h)
            return decoded_kl(moved.astype(h.dtype), target, self.model)

        return jax.lax.map(layer_loss, (hs, tuned.weight, tuned.bias)).sum()


# --------------------------------------------------------------------------- temperature control
class TemperatureLens(eqx.Module):
    """The control a tuned lens must beat: the logit lens with ONE learned temperature per
    layer, logits_l = decode(resid_pre[l]) / exp(log_temperature[i]) for lens layer i = model
    layer l.  Trained on the same rows, loss and budget as the tuned lens
    (`TemperatureLensLoss`); it can fix a layer's over- or under-confidence but not move the
    residual (one parameter per layer, against the tuned lens's d^2 + d).
    layers: as `TunedLens.layers` (None = every layer; else the model layers, static)."""

    log_temperature: Float[Array, " lens_layers"]
    layers: tuple[int, ...] | None = eqx.field(static=True, default=None)

    @staticmethod
    def init(config, layers=None) -> "TemperatureLens":
        """Temperature 1 everywhere: starts as the logit lens (every layer, or `layers`)."""
        layers = check_layers(layers, config.n_layers)
        return TemperatureLens(jnp.zeros((config.n_layers if layers is None else len(layers),), jnp.float32), layers)

    @property
    def n_layers(self) -> int:
        """How many temperatures (= lens layers)."""
        return self.log_temperature.shape[0]

    @property
    def layer_indices(self) -> tuple[int, ...]:
        """The model layer of each temperature."""
        return tuple(range(self.n_layers)) if self.layers is None else self.layers

    def inverse_temperatures(self) -> Float[Array, " lens_layers_plus_1"]:
        """1 / T for every lens layer, and 1 for the final residual (the model itself)."""
        return jnp.concatenate([jnp.exp(-self.log_temperature), jnp.ones((1,), jnp.float32)])


class TemperatureLensLoss(eqx.Module):
    """loss(temps, rows) = sum over the lens's layers of the mean KL(model || logit lens / T_l):
    the tuned lens's loss with the translator replaced by one temperature per layer."""

    model: Transformer

    def __call__(self, temps: TemperatureLens, rows: Int[Array, "batch seq_plus_1"]) -> Float[Array, ""]:
        stack, target = TunedLensLoss(self.model).targets(rows)
        # the plain logit-lens logits need no gradient: only the scalar temperatures do
        hs = jnp.moveaxis(stack[:, np.asarray(temps.layer_indices)], 1, 0)  # [lens layers, B, T, d]

        def layer_loss(args):
            h, inv_t = args
            lg = jax.lax.stop_gradient(jax.vmap(lambda x: decode(self.model, x))(h).astype(jnp.float32))
            return kl_divergence(target, jax.nn.log_softmax(lg * inv_t, axis=-1)).mean()

        return jax.lax.map(layer_loss, (hs, jnp.exp(-temps.log_temperature))).sum()


# --------------------------------------------------------------------------- scores
FROZEN_SCALE = "frozen_scale"  # a `score_lenses` entry: the logit lens over the final norm's divisor


def _kind(lens) -> str:
    if lens is None:
        return "logit"
    if isinstance(lens, str):
        if lens != FROZEN_SCALE:
            raise ValueError(f"a lens entry must be None, {FROZEN_SCALE!r}, a TunedLens or a TemperatureLens; got {lens!r}")
        return "frozen"
    if isinstance(lens, TemperatureLens):
        return "temperature"
    if isinstance(lens, TunedLens):
        return "tuned"
    raise ValueError(f"a lens entry must be None, {FROZEN_SCALE!r}, a TunedLens or a TemperatureLens; "
                     f"got {type(lens).__name__}")


@eqx.filter_jit
def _batch_sums(model: Transformer, lenses: tuple, kinds: tuple, layers: tuple, frozen_tuned: bool, rows):
    """Per row, lens layer (then the final residual) and lens: [B, len(layers) + 1, n_lenses, 3]
    sums over the row's positions of KL(model || lens), top-1 agreement with the model, and
    the cross-entropy of the next token rows[:, 1:].  ONE forward per row serves every lens;
    the plain logit-lens logits of a layer are decoded once and serve the logit lens, the
    temperature control (scaled by 1/T) and, when the head is linear in the norm's output
    (no final-norm bias, no unembedding bias, no soft-cap), the frozen-scale variant
    (scaled by own divisor / final divisor, the same logits up to float rounding)."""
    inputs, nxt = rows[:, :-1], rows[:, 1:]
    c = model.config
    linear_head = model.final_norm_b is None and model.unembed_b is None and c.final_logit_softcap is None
    need_plain = any(k in ("logit", "temperature") for k in kinds) or ("frozen" in kinds and linear_head)
    per_layer = {}
    for j, (kind, lens) in enumerate(zip(kinds, lenses)):
        if kind == "tuned":
            per_layer[f"w{j}"], per_layer[f"b{j}"] = lens.weight, lens.bias
        elif kind == "temperature":
            per_layer[f"t{j}"] = jnp.exp(-lens.log_temperature)

    def one(tokens, targets):
        stack, logits, final_scale = residual_stack(model, tokens)
        logits = logits.astype(jnp.float32)
        target = jax.nn.log_softmax(logits, axis=-1)
        p = jnp.exp(target)
        neg_entropy = jnp.sum(p * target, axis=-1)  # [T]
        top = jnp.argmax(logits, axis=-1)

        # With lse = logsumexp(lg): KL(p || softmax lg) = sum p log p - (p . lg - lse) (p sums
        # to 1), CE = lse - lg[next]; so a lens costs one exp pass (lse), one p . lg and one
        # argmax over the vocabulary; a positive per-position rescale c * lg (temperature,
        # frozen divisor) reuses p . lg and the argmax and needs only its own lse.
        def parts(lg):
            return jnp.sum(p * lg, axis=-1), jnp.argmax(lg, axis=-1), jnp.take_along_axis(lg, targets[:, None], -1)[:, 0]

        def stats(lg, c=None, base=None):
            pl, arg, nxt_lg = parts(lg) if base is None else base
            c = jnp.ones_like(pl) if c is None else c
            lse = jax.nn.logsumexp(lg * c[:, None], axis=-1)
            kl = (neg_entropy - (c * pl - lse)).sum()
            agree = (arg == top).sum()
            ce = (lse - c * nxt_lg).sum()
            return jnp.stack([kl, agree.astype(jnp.float32), ce])

        def layer(xs):
            h = xs["h"]
            if need_plain:
                plain, (_, _, own) = model.unembed_resid(h, capture=Capture(norms=True))
                plain = plain.astype(jnp.float32)
                base = parts(plain)
            out = []
            for j, kind in enumerate(kinds):
                if kind == "logit":
                    out.append(stats(plain, base=base))
                elif kind == "temperature":
                    out.append(stats(plain, jnp.broadcast_to(xs[f"t{j}"], own.shape), base))
                elif kind == "frozen" and linear_head:
                    out.append(stats(plain, own.astype(jnp.float32) / final_scale.astype(jnp.float32), base))
                elif kind == "frozen":
                    out.append(stats(decode(model, h, final_scale).astype(jnp.float32)))
                else:
                    moved = TunedLens(xs[f"w{j}"][None], xs[f"b{j}"][None]).translate(h, 0).astype(h.dtype)
                    out.append(stats(decode(model, moved, final_scale if frozen_tuned else None).astype(jnp.float32)))
            return jnp.stack(out)  # [n_lenses, 3]

        rows_l = jax.lax.map(layer, {"h": stack[np.asarray(layers)], **per_layer})  # [lens layers, n_lenses, 3]
        # the model itself: KL 0 and top-1 1 exactly, its own next-token cross-entropy
        own_ce = -jnp.take_along_axis(target, targets[:, None], -1)[:, 0].sum()
        final = jnp.broadcast_to(jnp.stack([jnp.zeros(()), jnp.asarray(top.shape[0], jnp.float32), own_ce]),
                                 (1, len(kinds), 3))
        return jnp.concatenate([rows_l, final], axis=0)

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


def score_lenses(model: Transformer, lenses: dict, rows: np.ndarray, n_bytes: int | None = None,
                 batch_size: int = 4, progress: bool = False, layers=None, frozen_tuned: bool = False,
                 n_boot: int = 1000, seed: int = 0, cache: "str | Path | None" = None) -> dict:
    """`lens_scores` of several lenses at once, {name: scores}, from ONE forward per row (the
    model's forward is most of a scoring pass's cost; see `_batch_sums`).  lenses: name ->
    None (logit lens), `FROZEN_SCALE` (the logit lens over the final layer's norm divisor),
    a TunedLens or a TemperatureLens.  layers: the model layers scored (None: those of the
    tuned / temperature lenses, which must agree, else every layer); every score list has
    one entry per layer in `scores["layers"]` (the model layers, then n_layers = the model
    itself).  frozen_tuned: tuned lenses decode over the final divisor too.  The bootstrap
    draws the same row resamples for every lens (a paired comparison).
    cache: an .npz file the per-row sums are written to every 10 batches; a later call with
    the same lens names, layers and rows continues from it (it does not hash the lenses'
    weights: delete it when the lenses change; `scripts/train_tuned_lens.py` keeps it with
    the trained lenses' checkpoints)."""
    rows = np.asarray(rows, np.int32)
    if rows.ndim != 2 or rows.shape[1] < 2 or len(rows) == 0:
        raise ValueError(f"rows must be [N >= 1, T + 1 >= 2] token ids; got {rows.shape}")
    if not lenses:
        raise ValueError("lenses must name at least one lens")
    n_model = model.config.n_layers
    kinds = tuple(_kind(v) for v in lenses.values())
    own = set()
    for name, lens in lenses.items():
        if isinstance(lens, TunedLens):
            check_lens_fits(model, lens)
        elif isinstance(lens, TemperatureLens):
            if lens.layers is not None:
                check_layers(lens.layers, n_model)
            elif lens.n_layers != n_model:
                raise ValueError(f"the temperature lens {name!r} has {lens.n_layers} layers; the model {n_model}")
        if isinstance(lens, (TunedLens, TemperatureLens)):
            own.add(lens.layer_indices)
    if len(own) > 1:
        raise ValueError(f"the lenses are fitted to different layers: {sorted(own)}")
    wanted = tuple(range(n_model)) if layers is None and not own else (
        next(iter(own)) if layers is None else check_layers(layers, n_model) or tuple(range(n_model)))
    if own and next(iter(own)) != wanted:
        raise ValueError(f"layers {list(wanted)} differ from the lenses' layers {list(next(iter(own)))}")
    if rows.min() < 0 or rows.max() >= model.config.vocab_size:
        raise ValueError(f"token ids out of range [0, {model.config.vocab_size})")
    from tqdm.auto import tqdm

    lens_values = tuple(None if isinstance(v, str) else v for v in lenses.values())
    key = hashlib.sha256(json.dumps([list(lenses), kinds, wanted, frozen_tuned, batch_size]).encode()
                         + rows.tobytes()).hexdigest()[:16]
    done = []
    if cache is not None and Path(cache).is_file():
        with np.load(cache) as z:
            if str(z["key"]) == key:  # the same lenses' names, layers and rows (not the weights: see the docstring)
                done = [z["sums"]]
    start = sum(len(d) for d in done)
    batches = list(range(start, len(rows), batch_size))
    for n, i in enumerate(tqdm(batches, disable=not progress, desc="score", leave=False)):
        # the last, shorter batch compiles once more; no padding rows to subtract again
        done.append(np.asarray(_batch_sums(model, lens_values, kinds, wanted, frozen_tuned,
                                           jnp.asarray(rows[i:i + batch_size])), np.float64))
        if cache is not None and ((n + 1) % 10 == 0 or n == len(batches) - 1):
            tmp = Path(str(cache) + ".tmp.npz")
            np.savez(tmp, key=key, sums=np.concatenate(done))
            tmp.replace(cache)
    return summarise_rows(np.concatenate(done), list(lenses), wanted, n_model, rows.shape[1] - 1, n_bytes,
                          n_boot, seed)


def summarise_rows(sums: np.ndarray, names: list[str], layers, n_model: int, row_tokens: int,
                   n_bytes: int | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """`score_lenses`'s result from its per-row sums [N, len(layers) + 1, len(names), 3] (KL,
    top-1 count, CE summed over each row's `row_tokens` positions; the cache file's `sums`),
    e.g. for the rows a stopped run scored.  n_bytes: UTF-8 bytes of those rows' targets."""
    per_row = np.asarray(sums, np.float64) / row_tokens  # per-token means per row
    n_tokens = per_row.shape[0] * row_tokens
    out = {}
    for j, name in enumerate(names):
        pr = per_row[:, :, j]
        kl, top1, ce = (pr.mean(0)[:, k] for k in range(3))
        rng = np.random.default_rng(seed)
        boot = np.stack([pr[rng.integers(0, len(pr), len(pr))].mean(0) for _ in range(n_boot)])
        lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)  # [L+1, 3]
        s = {"layers": [*layers, n_model], "kl": kl.tolist(), "top1": top1.tolist(), "ce": ce.tolist(),
             "ppl": np.exp(ce).tolist(), "tokens": int(n_tokens), "rows": int(len(pr)),
             **{f"{m}_interval_95": [lo[:, k].tolist(), hi[:, k].tolist()] for k, m in enumerate(("kl", "top1", "ce"))}}
        if n_bytes is not None:
            factor = n_tokens / n_bytes / np.log(2)
            s |= {"ce_bits_per_byte": (ce * factor).tolist(), "kl_bits_per_byte": (kl * factor).tolist(),
                  "bytes": int(n_bytes)}
        out[name] = s
    return out


def lens_scores(model: Transformer, tuned: "TunedLens | TemperatureLens | None", rows: np.ndarray,
                n_bytes: int | None = None, batch_size: int = 4, progress: bool = False,
                frozen_scale: bool = False, n_boot: int = 1000, seed: int = 0, layers=None) -> dict:
    """Per-layer scores of the logit lens (tuned=None) or a tuned / temperature lens on `rows`
    [N, T+1]: {"kl": nats/token, "top1": fraction, "ce": nats/token, "ppl": exp(ce)} each a
    list over `"layers"` (the lens's layers, or `layers`, or every layer; then n_layers = the
    model itself, KL 0, top-1 1), plus "ce_bits_per_byte" and "kl_bits_per_byte" when
    `n_bytes` (UTF-8 bytes of rows[:, 1:], `row_bytes`) is given: nats per token x tokens /
    bytes / ln 2, the reference eval's conversion.
    frozen_scale: every layer decoded with the final layer's norm divisor (the
    `logit_lens(frozen_scale=True)` variant; with a tuned lens, after its translators).
    Intervals: "kl_interval_95" / "top1_interval_95" / "ce_interval_95" ([low list, high
    list]), 95% percentile bootstrap over ROWS (`n_boot` resamples; rows, not tokens, are
    the independent units).  Several lenses from one forward: `score_lenses`."""
    if frozen_scale and isinstance(tuned, TemperatureLens):
        raise ValueError("frozen_scale applies to the logit lens or a tuned lens, not a temperature lens")
    lens = FROZEN_SCALE if frozen_scale and tuned is None else tuned
    return score_lenses(model, {"lens": lens}, rows, n_bytes, batch_size, progress, layers,
                        frozen_tuned=frozen_scale and isinstance(tuned, TunedLens), n_boot=n_boot, seed=seed)["lens"]
