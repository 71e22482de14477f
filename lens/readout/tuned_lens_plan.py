"""The size of a tuned-lens fit before running it: memory per batch (`lens.core.plan`,
shapes by `jax.eval_shape`), matmul FLOPs per trained token and hours at a stated FLOP rate.

    plan = training_plan(model.config, batch=32, seq=2048, steps=250, accumulate=4)
    print("\n".join(plan_lines(plan)))
"""

from __future__ import annotations


def training_plan(config, batch: int, seq: int, steps: int, accumulate: int = 1, layers=None,
                  peak_flops: float = 495e12, utilisation: float = 0.4) -> dict:
    """The size of a tuned-lens fit on one device, before running it: bytes of one batch's
    step from `lens.core.plan` (shapes by `jax.eval_shape`, nothing allocated: the frozen
    model's forward with every layer's residual kept and one layer's vocab-sized work live),
    matmul FLOPs per trained token, and the hours at `peak_flops` x `utilisation`.

    FLOPs per token (multiply-adds x 2): the frozen model's forward (every weight matrix and
    the unembedding, causal attention at half the context), then per fitted layer the tuned
    lens's translator (forward + backward, 3 x 2 d^2) and its decode (2 d V) plus the
    gradient into the residual (2 d V: `decoded_kl`); the temperature control decodes each
    layer once (2 d V, no vocab-sized backward).  Defaults: one H100 SXM's dense TF32 peak
    (495 TFLOP/s; float32 matmuls run as TF32 on it) at 40% utilisation."""
    from lens.core import plan as PL  # lens.core's planner (jax.eval_shape of the forward)

    for name, v in (("batch", batch), ("seq", seq), ("steps", steps), ("accumulate", accumulate)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}")
    if not (peak_flops > 0 and 0 < utilisation <= 1):
        raise ValueError(f"need peak_flops > 0 and 0 < utilisation <= 1; got {peak_flops}, {utilisation}")
    if layers is not None and not all(0 <= int(l) < config.n_layers for l in layers):
        raise ValueError(f"layers must lie in [0, {config.n_layers}); got {list(layers)}")

    c = config
    n_fit = c.n_layers if layers is None else len(layers)
    model_fwd = PL.forward_flops_per_token(c, seq)
    decode = 2 * c.d_model * c.vocab_size
    tuned = model_fwd + n_fit * (6 * c.d_model ** 2 + 2 * decode)
    temperature = model_fwd + n_fit * decode
    tokens = steps * accumulate * batch * seq
    mem = PL.plan(c, {"data": 1, "model": 1}, "tuned_lens", batch=batch, seq=seq)
    # the planner counts every layer's translator and its momentum; accumulating adds the
    # running mean gradient (one more translator-sized copy, float32)
    accum = (c.n_layers * (c.d_model ** 2 + c.d_model) * 4) if accumulate > 1 else 0
    rate = peak_flops * utilisation
    return {"batch": batch, "seq": seq, "steps": steps, "accumulate": accumulate,
            "tokens_per_optimiser_step": accumulate * batch * seq, "tokens": tokens, "layers_fitted": n_fit,
            "bytes_per_batch": {"weights": mem.weights, "optimiser": mem.optimiser + accum,
                                "activations": mem.activations, "total": mem.total + accum},
            "flops_per_token": {"tuned_lens": tuned, "temperature_control": temperature},
            "flops": {"tuned_lens": tuned * tokens, "temperature_control": temperature * tokens},
            "hours": {"tuned_lens": tuned * tokens / rate / 3600,
                      "temperature_control": temperature * tokens / rate / 3600},
            "assumed_flops_per_s": rate, "peak_flops_per_s": peak_flops, "utilisation": utilisation}


def plan_lines(plan: dict) -> list[str]:
    """`training_plan`'s dict as one line of text (stdout and report.md of scripts/train_tuned_lens.py);
    `train_tokens_available` / `epochs`, when the caller added them, say how often the data is reused."""
    gib = plan["bytes_per_batch"]["total"] / 2**30
    return [f"Plan: {plan['steps']} optimiser steps x {plan['accumulate']} batch(es) of {plan['batch']} x {plan['seq']} "
            f"tokens = {plan['tokens']:,} tokens per lens ({plan['tokens_per_optimiser_step']:,} per step), "
            f"{plan['layers_fitted']} layers; {gib:.1f} GiB per batch on one device (weights, lens state, "
            f"activations: lens.core.plan); {plan['flops']['tuned_lens'] / 1e15:.3g} PFLOP (tuned) + "
            f"{plan['flops']['temperature_control'] / 1e15:.3g} PFLOP (temperature control) = "
            f"{plan['hours']['tuned_lens'] + plan['hours']['temperature_control']:.3g} h at "
            f"{plan['assumed_flops_per_s'] / 1e12:.0f} TFLOP/s ({plan['utilisation']:.0%} of one H100's dense TF32 "
            f"peak), before scoring"
            + (f"; the train splits hold {plan['train_tokens_available']:,} tokens in rows of {plan['seq']}: "
               f"{plan['epochs']:.2g} passes over them" if "epochs" in plan else "") + "."]
