"""Per-layer maps trained to a stated plateau: the stop rule, the training settings, the loop.

    rule = PlateauRule("min", min_delta=1e-3, patience=3, relative=True)
    rule.scan([2.5, 1.0, 0.999, 0.9995, 0.9993])   # {"stop": 4, "best": 1, "reason": "plateau"}
    best, log = fit_layer(params, loss_fn, eval_fn, train_data, val_data, FitConfig.routers(), opt, key)

Training is per layer (the reference trains one predictor per layer; a layer's inputs come
from the dense run, so the layers are independent): mini-batches drawn from the training
rows, one compiled `lax.scan` per epoch, an evaluation on the held-out rows after every
epoch, the best epoch's parameters kept, stopping by `PlateauRule` (`FitConfig.routers()`
and `FitConfig.predictors()` state the two rules used: `lens.modularity.router_predictor_fit`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import optax


# ------------------------------------------------------------------ the plateau rule
@dataclasses.dataclass(frozen=True)
class PlateauRule:
    """When to stop: after the eval at which `patience` evals in a row have not improved on
    the best so far by at least `min_delta` (relative to |best| when `relative`), or at the
    first eval that reaches `target` (mode "max": >= target; "min": <= target)."""

    mode: str = "max"
    min_delta: float = 0.0
    patience: int = 5
    target: float | None = None
    relative: bool = False

    def __post_init__(self):
        if self.mode not in ("max", "min"):
            raise ValueError(f"PlateauRule.mode must be 'max' or 'min'; got {self.mode!r}")
        if self.patience < 1 or self.min_delta < 0:
            raise ValueError(f"PlateauRule: patience >= 1 and min_delta >= 0; got {self.patience}, {self.min_delta}")

    def improves(self, value: float, best: float) -> bool:
        delta = self.min_delta * (abs(best) if self.relative else 1.0)
        return value > best + delta if self.mode == "max" else value < best - delta

    def reached(self, value: float) -> bool:
        if self.target is None:
            return False
        return value >= self.target if self.mode == "max" else value <= self.target

    def scan(self, values) -> dict:
        """Where this rule stops on a whole curve: {"stop": index or None, "best": index of
        the best value up to the stop, "reason": "target" | "plateau" | None}.  Index 0 is
        the first eval (in the fits below: the start, before any step)."""
        best_i, waited = 0, 0
        for i, v in enumerate(values):
            v = float(v)
            if i == 0:
                pass
            elif self.improves(v, float(values[best_i])):
                best_i, waited = i, 0
            else:
                waited += 1
            if self.reached(v):
                return {"stop": i, "best": best_i, "reason": "target"}
            if waited >= self.patience:
                return {"stop": i, "best": best_i, "reason": "plateau"}
        return {"stop": None, "best": best_i, "reason": None}


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Mini-batch training of one kind of per-layer map (see the module doc)."""

    rule: PlateauRule
    max_epochs: int
    batch: int
    lr: float
    weight_decay: float = 0.0
    val_frac: float = 0.1
    seed: int = 0

    @staticmethod
    def routers(max_epochs: int = 30, batch: int = 512, lr: float = 0.01, patience: int = 3,
                min_delta: float = 1e-3) -> "FitConfig":
        """Adam(0.01) as the reference; stop when held-out loss has not fallen by 0.1% in 3 epochs."""
        return FitConfig(PlateauRule("min", min_delta, patience, None, relative=True), max_epochs, batch, lr)

    @staticmethod
    def predictors(max_epochs: int = 20, batch: int = 256, lr: float = 1e-3, patience: int = 5,
                   target: float = 0.99) -> "FitConfig":
        """AdamW(weight decay 0.01) as the reference; its stop rule (5 epochs, recall > 0.99).
        lr 1e-3 and batch 256 (the reference: 1e-4, 1,024 on 400k tokens: ~7,800 steps)."""
        return FitConfig(PlateauRule("max", 0.0, patience, target), max_epochs, batch, lr, weight_decay=0.01)

    def __post_init__(self):
        if self.max_epochs < 1 or self.batch < 1 or not 0 < self.val_frac < 1 or self.lr <= 0:
            raise ValueError(f"FitConfig: max_epochs, batch >= 1, lr > 0, val_frac in (0, 1); got {self}")



# ------------------------------------------------------------------ the generic per-layer fit
@functools.partial(jax.jit, static_argnames=("loss_fn", "opt", "n", "bs"))
def _epoch(p, state, key, train_data, loss_fn, opt, n, bs):
    """One epoch: a random permutation of the n training tokens in n // bs batches of bs."""
    perm = jax.random.permutation(key, n)[: (n // bs) * bs].reshape(n // bs, bs)

    def step(carry, idx):
        p, state = carry
        loss, g = jax.value_and_grad(loss_fn)(p, *(a[idx] for a in train_data))
        upd, state = opt.update(g, state, p)
        return (optax.apply_updates(p, upd), state), loss

    (p, state), losses = jax.lax.scan(step, (p, state), perm)
    return p, state, losses.mean()


def fit_layer(params, loss_fn, eval_fn, train_data, val_data, cfg: FitConfig, opt, key):
    """Train one layer's params; returns (best params, log).  train_data / val_data: tuples
    of arrays with a leading token axis; loss_fn(params, *batch) -> scalar (the same object
    for every layer: one compilation); eval_fn(params, *val_data) -> (the rule's metric,
    dict of extras).  Eval 0 is the start."""
    n = int(train_data[0].shape[0])
    bs = min(cfg.batch, n)
    nb = n // bs

    def epoch(p, state, k):
        return _epoch(p, state, k, train_data, loss_fn, opt, n, bs)

    state = opt.init(params)
    metric, extras = eval_fn(params, *val_data)
    curve, extra_curve, train_loss = [float(metric)], [extras], []
    best, best_i = params, 0
    stop = {"stop": None, "best": 0, "reason": None}
    for e in range(cfg.max_epochs):
        key, sub = jax.random.split(key)
        params, state, tl = epoch(params, state, sub)
        metric, extras = eval_fn(params, *val_data)
        curve.append(float(metric))
        extra_curve.append(extras)
        train_loss.append(float(tl))
        stop = cfg.rule.scan(curve)
        if stop["best"] != best_i:
            best, best_i = params, stop["best"]
        if stop["stop"] is not None:
            break
    return best, {"epochs": len(curve) - 1, "steps": (len(curve) - 1) * nb, "steps_per_epoch": nb,
                  "best_epoch": best_i, "plateau_epoch": stop["stop"], "stop_reason": stop["reason"] or "max_epochs",
                  "held_out": curve, "held_out_extras": extra_curve, "train_loss": train_loss}


def fit_summary(logs: list[dict], rule: PlateauRule, cfg: FitConfig, metric: str, n_train: int, n_val: int) -> dict:
    """The report of one kind of per-layer fit: its rule, settings, token counts, epochs
    (min / median / max over layers), total steps, stop reasons and the per-layer logs."""
    ep = [g["epochs"] for g in logs]
    return {"criterion": {"metric": metric, **dataclasses.asdict(rule), "max_epochs": cfg.max_epochs,
                          "keeps": "the best held-out epoch's parameters"},
            "batch": cfg.batch, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
            "tokens": {"train": n_train, "held_out": n_val, "held_out_split": f"{cfg.val_frac:.0%} of the rows"},
            "epochs": {"min": min(ep), "median": float(np.median(ep)), "max": max(ep)},
            "steps_total": int(sum(g["steps"] for g in logs)),
            "stop_reasons": {r: sum(g["stop_reason"] == r for g in logs) for r in ("target", "plateau", "max_epochs")},
            "per_layer": logs}
