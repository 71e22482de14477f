"""lens.readout.logit_lens / lens.readout.tuned_lens_fit: the logit lens against a float64 numpy computation from
captured residuals (jitted, vmapped over K = 3 prompts of odd length) and against a
transformers run (hidden_states through the HF final norm + lm_head); a zero-initialised
tuned lens is the logit lens; the tuned-lens loss and its hand-written gradient against
plain autodiff and numpy; training lowers held-out KL; an interrupted training resumes
to the uninterrupted lens (in-process, and by a real SIGKILL of the script); save/load; the
script's smoke preset end to end."""

import dataclasses
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lens
from lens.readout import logit_lens, tuned_lens_fit as tt, tuned_lens_plan as tp
from lens.training import train
from lens_tiny import tiny

FAMILIES = ["llama", "gpt2", "neox", "gemma3"]


def np_decode(model, x, scale=None):
    """float64 final norm + unembedding + soft-cap + log_softmax, from the weights."""
    c = model.config
    x = np.asarray(x, np.float64)
    if c.norm_kind == "layer":
        x = x - x.mean(-1, keepdims=True)
    s = np.sqrt((x * x).mean(-1, keepdims=True) + c.norm_eps) if scale is None else np.asarray(scale)[..., None]
    y = x / s * np.asarray(model.final_norm_w, np.float64)
    if model.final_norm_b is not None:
        y = y + np.asarray(model.final_norm_b, np.float64)
    logits = y @ np.asarray(model.W_U, np.float64).T
    if model.unembed_b is not None:
        logits = logits + np.asarray(model.unembed_b, np.float64)
    if c.final_logit_softcap is not None:
        logits = c.final_logit_softcap * np.tanh(logits / c.final_logit_softcap)
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def prompts(k=3, seq=7, vocab=61, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (k, seq)).astype(np.int32)


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_lens_jit_vmap_equals_numpy_from_captured_residuals(family):
    _, model, _ = tiny(family)
    toks = prompts()
    run = jax.jit(jax.vmap(lambda t, m, frozen: logit_lens.logit_lens(m, t, frozen_scale=frozen),
                           in_axes=(0, None, None)), static_argnums=2)
    got = np.asarray(run(toks, model, False))
    got_frozen = np.asarray(run(toks, model, True))
    assert got.shape == (3, model.config.n_layers + 1, 7, 61) and got.dtype == np.float32
    logits, cache = lens.run_with_cache(model, toks)
    for k in range(3):
        stack = np.concatenate([np.asarray(cache.resid_pre[k]), np.asarray(cache.resid_post[k, -1:])])
        want = np_decode(model, stack)
        np.testing.assert_allclose(got[k], want, atol=2e-4, rtol=0)  # float32 vs float64
        # the last entry is the model's own log-probs
        np.testing.assert_allclose(got[k, -1], np.asarray(jax.nn.log_softmax(logits[k])), atol=2e-5, rtol=0)
        # frozen: every layer divided by the final layer's divisor (centred for LayerNorm)
        final = stack[-1].astype(np.float64)
        final = final - final.mean(-1, keepdims=True) if model.config.norm_kind == "layer" else final
        s_final = np.sqrt((final * final).mean(-1) + model.config.norm_eps)
        np.testing.assert_allclose(got_frozen[k], np_decode(model, stack, np.broadcast_to(s_final, stack.shape[:2])),
                                   atol=2e-4, rtol=0)
        np.testing.assert_allclose(got_frozen[k, -1], got[k, -1], atol=1e-5, rtol=0)
    assert not np.allclose(got_frozen[:, 0], got[:, 0], atol=1e-3)  # the variants differ below the top


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logit_lens_equals_transformers_hidden_states_through_its_head(family):
    hf, model, _ = tiny(family)
    toks = prompts(1, 9)[0]
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(toks[None].astype(np.int64)), output_hidden_states=True)
        base = hf.model if family == "llama" else hf.transformer
        norm = base.norm if family == "llama" else base.ln_f
        # hidden_states[l] for l < n_layers is what enters block l; the last is already normed
        hs = [hf.lm_head(norm(h)) for h in out.hidden_states[:-1]] + [out.logits]
        want = torch.log_softmax(torch.cat(hs).float(), -1).numpy()
    got = np.asarray(logit_lens.logit_lens(model, toks))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_zero_initialised_tuned_lens_is_the_logit_lens():
    _, model, _ = tiny("gemma3")
    toks = prompts(2, 5)
    tuned = logit_lens.TunedLens.init(model.config)
    got = jax.vmap(lambda t: logit_lens.tuned_lens(model, tuned, t))(toks)
    want = jax.vmap(lambda t: logit_lens.logit_lens(model, t))(toks)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="does not fit"):
        logit_lens.tuned_lens(tiny("llama")[1], tuned, toks[0])


def random_lens(config, scale=0.05, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    n, d = config.n_layers, config.d_model
    return logit_lens.TunedLens(scale * jax.random.normal(k1, (n, d, d)), scale * jax.random.normal(k2, (n, d)))


def test_loss_and_its_hand_written_gradient_against_numpy_and_autodiff():
    _, model, _ = tiny("llama")
    rows = prompts(3, 6)
    tuned = random_lens(model.config)
    loss_fn = tt.TunedLensLoss(model)
    got, grad = jax.jit(jax.value_and_grad(lambda t, r: loss_fn(t, r)))(tuned, rows)
    # numpy: sum over layers of the mean KL(model || lens) on rows[:, :-1]
    _, cache = lens.run_with_cache(model, rows[:, :-1])
    total = 0.0
    for layer in range(model.config.n_layers):
        kls = []
        for k in range(3):
            h = np.asarray(cache.resid_pre[k, layer], np.float64)
            moved = h + h @ np.asarray(tuned.weight[layer], np.float64).T + np.asarray(tuned.bias[layer], np.float64)
            p = np_decode(model, np.asarray(cache.resid_post[k, -1]))
            kls.append((np.exp(p) * (p - np_decode(model, moved))).sum(-1))
        total += np.mean(kls)
    assert float(got) == pytest.approx(total, rel=1e-4)

    def plain(t):  # the same loss through ordinary autodiff (no custom_vjp)
        stack, target = loss_fn.targets(rows)
        out = 0.0
        for layer in range(model.config.n_layers):
            h = jax.vmap(lambda x: t.translate(x, layer))(stack[:, layer])
            out = out + tt._decoded_kl(h, target, model)
        return out

    want = jax.grad(plain)(tuned)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)


def test_reference_optimizer_is_torch_sgd_nesterov():
    """optax chain == torch.optim.SGD(lr 0.1, momentum 0.9, nesterov, weight_decay 1e-3) after
    clip_grad_norm_(1.0), with the linear decay, on the same gradients."""
    steps = 5
    opt, lr_fn = tt.reference_optimizer(steps)
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(4, 3)).astype(np.float32)
    grads = [rng.normal(size=(4, 3)).astype(np.float32) * 3 for _ in range(steps)]
    params, state = jnp.asarray(p0), opt.init(jnp.asarray(p0))
    for g in grads:
        upd, state = opt.update(jnp.asarray(g), state, params)
        params = params + upd
    w = torch.nn.Parameter(torch.tensor(p0))
    sgd = torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(sgd, lambda i: max(0.0, (steps - i) / steps))
    for g in grads:
        w.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_([w], 1.0)
        sgd.step()
        sched.step()
    np.testing.assert_allclose(np.asarray(params), w.detach().numpy(), atol=1e-6)
    assert float(lr_fn(0)) == pytest.approx(0.1) and float(lr_fn(steps)) == 0.0


def test_reference_optimizer_accumulates_the_mean_gradient():
    """accumulate=K: K batches make one optimiser step on their MEAN gradient (clipped, then
    torch's SGD step), the parameters stand still between, and the schedule read per batch
    is the lr of the step the batch is in; jitted update, against torch on the mean gradients."""
    steps, K = 3, 4
    opt, lr_fn = tt.reference_optimizer(steps, accumulate=K)
    rng = np.random.default_rng(1)
    p0 = rng.normal(size=(5, 2)).astype(np.float32)
    grads = [rng.normal(size=(5, 2)).astype(np.float32) * 2 for _ in range(steps * K)]
    params, state = jnp.asarray(p0), opt.init(jnp.asarray(p0))
    update = jax.jit(opt.update)
    for i, g in enumerate(grads):
        before = params
        upd, state = update(jnp.asarray(g), state, params)
        params = params + upd
        if (i + 1) % K:  # inside an accumulation: no step yet
            np.testing.assert_array_equal(np.asarray(params), np.asarray(before))
    w = torch.nn.Parameter(torch.tensor(p0))
    sgd = torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(sgd, lambda i: max(0.0, (steps - i) / steps))
    for s in range(steps):
        w.grad = torch.tensor(np.mean(grads[s * K:(s + 1) * K], axis=0))
        torch.nn.utils.clip_grad_norm_([w], 1.0)
        sgd.step()
        sched.step()
    np.testing.assert_allclose(np.asarray(params), w.detach().numpy(), atol=1e-6)
    assert [round(float(lr_fn(i)), 6) for i in (0, K - 1, K, 2 * K + 1)] == [0.1, 0.1, round(0.1 * 2 / 3, 6),
                                                                           round(0.1 / 3, 6)]
    with pytest.raises(ValueError, match="accumulate must be >= 1"):
        tt.reference_optimizer(3, accumulate=0)


def test_training_plan_counts_tokens_flops_and_bytes():
    """training_plan against a count by hand of every weight matmul of the tiny llama model
    (q, k, v, o, the MLP's matrices, the unembedding; causal attention at half the context),
    and its bytes: lens.core.plan's plus the accumulator when accumulating."""
    from lens.core import plan as PL

    _, model, _ = tiny("llama")
    c = model.config
    seq, batch, steps, K = 6, 3, 5, 2
    p = tp.training_plan(c, batch, seq, steps, K, layers=(1,), peak_flops=1e12, utilisation=0.5)
    d, V, q, kv = c.d_model, c.vocab_size, c.n_heads * c.d_head, c.n_kv_heads * c.d_head
    matmuls = [(d, q), (d, kv), (d, kv), (q, d)] + [(d, c.d_mlp)] * (3 if c.gated_mlp else 2)
    forward = 2 * sum(a * b for a, b in matmuls) * c.n_layers + 2 * d * V + 2 * c.n_layers * seq * q
    assert p["flops_per_token"]["tuned_lens"] == forward + 6 * d * d + 4 * d * V  # one fitted layer
    assert p["flops_per_token"]["temperature_control"] == forward + 2 * d * V
    assert p["tokens"] == steps * K * batch * seq and p["tokens_per_optimiser_step"] == K * batch * seq
    assert p["hours"]["tuned_lens"] == pytest.approx(p["flops"]["tuned_lens"] / 0.5e12 / 3600)
    mem = PL.plan(c, {"data": 1, "model": 1}, "tuned_lens", batch=batch, seq=seq)
    assert p["bytes_per_batch"]["total"] == mem.total + c.n_layers * (d * d + d) * 4
    assert tp.training_plan(c, batch, seq, steps)["bytes_per_batch"]["total"] == mem.total  # no accumulator


@pytest.mark.parametrize("kwargs, match", [({"batch": 0}, "batch must be a positive integer"),
                                           ({"seq": 2.5}, "seq must be a positive integer"),
                                           ({"accumulate": -1}, "accumulate must be a positive integer"),
                                           ({"utilisation": 1.5}, "utilisation"),
                                           ({"layers": (0, 99)}, r"layers must lie in \[0, ")])
def test_training_plan_refuses_bad_sizes(kwargs, match):
    """A plan of nonsense sizes is an error, not a negative or fractional count of tokens."""
    c = tiny("llama")[1].config
    args = {"batch": 2, "seq": 4, "steps": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        tp.training_plan(c, **args)


class Killed(Exception):
    pass


def test_training_lowers_held_out_kl_and_resumes_exactly(tmp_path):
    _, model, _ = tiny("gpt2")
    rng = np.random.default_rng(1)
    rows, val = rng.integers(0, 61, (32, 9)), rng.integers(0, 61, (8, 9))
    opt, lr_fn = tt.reference_optimizer(12, lr_scale=4.0)
    cfg = train.TrainConfig(steps=12, batch_size=4, eval_every=12, eval_batches=2, checkpoint_every=4)
    options = train.TrainOptions(loss_fn=tt.TunedLensLoss(model), opt=opt, rows_config=model.config, lr_fn=lr_fn,
                                 progress=False)
    zero = logit_lens.TunedLens.init(model.config)
    full = train.train(zero, rows, val, cfg, tmp_path / "a", options)
    before = tt.lens_scores(model, None, val)
    after = tt.lens_scores(model, full.model, val)
    assert after["kl"][0] < 0.8 * before["kl"][0] and after["kl"][1] < 0.8 * before["kl"][1]
    assert after["kl"][-1] == pytest.approx(0.0, abs=1e-6) and after["top1"][-1] == 1.0
    assert full.log[-1]["lr"] == pytest.approx(float(lr_fn(11)))

    def assert_resumes_to(whole, cfg, options, out, at):
        """Killed right after the checkpoint at batch `at`, then the same call: the lens of `whole`."""
        def kill(step):
            if step == at:
                raise Killed

        with pytest.raises(Killed):
            train.train(zero, rows, val, cfg, out, dataclasses.replace(options, on_checkpoint=kill))
        resumed = train.train(zero, rows, val, cfg, out, options)
        for a, b in zip(jax.tree.leaves(whole.model), jax.tree.leaves(resumed.model)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    assert_resumes_to(full, cfg, options, tmp_path / "b", at=8)
    # accumulating (6 optimiser steps of 2 batches), killed at a checkpoint in the MIDDLE of an
    # accumulation (batch 3): the half-summed gradient is in the checkpoint, so the resumed lens
    # is the uninterrupted one, bit for bit
    opt2, lr2 = tt.reference_optimizer(6, lr_scale=4.0, accumulate=2)
    cfg2 = dataclasses.replace(cfg, checkpoint_every=3)
    options2 = dataclasses.replace(options, opt=opt2, lr_fn=lr2)
    whole = train.train(zero, rows, val, cfg2, tmp_path / "c", options2)
    assert_resumes_to(whole, cfg2, options2, tmp_path / "d", at=3)
    assert not eqx.tree_equal(whole.model, full.model)  # 6 steps on pairs of batches, not 12 on one

    # save / load round trip, refused for another model
    path = logit_lens.save_tuned_lens(full.model, tmp_path / "lens.safetensors", model, {"steps": 12})
    back, meta = logit_lens.load_tuned_lens(path, model)
    assert eqx.tree_equal(back, full.model) and meta["info"]["steps"] == 12
    with pytest.raises(ValueError, match="does not fit|another unembedding"):
        logit_lens.load_tuned_lens(path, tiny("neox")[1])


def test_scores_count_bytes_and_match_a_loop():
    _, model, _ = tiny("llama")
    rows = prompts(3, 5)
    s = tt.lens_scores(model, None, rows, n_bytes=40, batch_size=2)  # a short last batch
    lp = np.stack([np_decode(model, np.concatenate([np.asarray(c.resid_pre), np.asarray(c.resid_post[-1:])]))
                   for c in [lens.run_with_cache(model, r[:-1])[1] for r in rows]])  # [K, L+1, T, V]
    ce = -np.take_along_axis(lp, rows[:, None, 1:, None], -1)[..., 0].mean((0, 2))
    np.testing.assert_allclose(s["ce"], ce, rtol=1e-4)
    np.testing.assert_allclose(s["ce_bits_per_byte"], ce * 12 / 40 / np.log(2), rtol=1e-4)
    top = lp[:, -1].argmax(-1)
    np.testing.assert_allclose(s["top1"], (lp.argmax(-1) == top[:, None]).mean((0, 2)))
    # the frozen-statistics variant: KL of each layer over the final divisor, against numpy
    fz = tt.lens_scores(model, None, rows, frozen_scale=True, batch_size=3)
    kl = []
    for r in rows:
        c = lens.run_with_cache(model, r[:-1])[1]
        stack = np.concatenate([np.asarray(c.resid_pre), np.asarray(c.resid_post[-1:])]).astype(np.float64)
        s_final = np.sqrt((stack[-1] ** 2).mean(-1) + model.config.norm_eps)  # RMSNorm: no centring
        q = np_decode(model, stack, np.broadcast_to(s_final, stack.shape[:2]))
        kl.append((np.exp(q[-1]) * (q[-1] - q)).sum(-1).mean(-1))
    np.testing.assert_allclose(fz["kl"], np.mean(kl, 0), rtol=1e-3, atol=1e-5)
    assert fz["kl"][0] != pytest.approx(s["kl"][0], rel=1e-3)


@pytest.mark.slow  # a training run (~3 min on the loaded 2-core machine)
def test_temperature_lens_scores_match_numpy_and_training_fits_the_temperature():
    """The temperature control: KL of softmax(logit lens / T_l) against a numpy loop (T = 2,
    0.5, 1.5 at layers 0, 1, 2), jitted and vmapped inside lens_scores over K = 3 rows; the
    bootstrap interval holds the mean; and training its one parameter per layer on the
    tuned-lens loss lowers the held-out KL at every layer."""
    _, model, _ = tiny("llama")
    rows = prompts(3, 5)
    temps = tt.TemperatureLens(jnp.log(jnp.asarray([2.0, 0.5, 1.5], jnp.float32)))
    s = tt.lens_scores(model, temps, rows, batch_size=2, n_boot=200)
    kl = []
    for r in rows:
        c = lens.run_with_cache(model, r[:-1])[1]
        stack = np.concatenate([np.asarray(c.resid_pre), np.asarray(c.resid_post[-1:])]).astype(np.float64)
        q = np_decode(model, stack)  # [L+1, T, V] log-probs of the plain logit lens
        logits = q * np.array([0.5, 2.0, 1 / 1.5, 1.0])[:, None, None]  # log-probs are logits up to a constant
        logits = logits - logits.max(-1, keepdims=True)
        lq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        kl.append((np.exp(lq[-1]) * (lq[-1] - lq)).sum(-1).mean(-1))
    np.testing.assert_allclose(s["kl"], np.mean(kl, 0), rtol=1e-3, atol=1e-5)
    lo, hi = s["kl_interval_95"]
    assert all(a <= m <= b for a, m, b in zip(lo, s["kl"], hi))
    rng = np.random.default_rng(2)
    train_rows, val = rng.integers(0, 61, (32, 9)), rng.integers(0, 61, (8, 9))
    opt, lr_fn = tt.reference_optimizer(20, lr_scale=10.0)
    cfg = train.TrainConfig(steps=20, batch_size=4, eval_every=10, eval_batches=2, checkpoint_every=100)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        fit = train.train(tt.TemperatureLens.init(model.config), train_rows, val, cfg, d,
                          train.TrainOptions(loss_fn=tt.TemperatureLensLoss(model), opt=opt,
                                             rows_config=model.config, lr_fn=lr_fn, progress=False))
    before, after = tt.lens_scores(model, None, val), tt.lens_scores(model, fit.model, val)
    assert all(a < b for a, b in zip(after["kl"][:3], before["kl"][:3]))
    assert after["kl"][-1] == pytest.approx(0.0, abs=1e-6)


def test_plateau_criterion_reports_the_first_flat_step():
    log = [{"step": s, "val_loss": v} for s, v in [(10, 5.0), (20, 3.0), (30, 2.99), (40, 2.985), (50, 2.98)]]
    p = tt.plateau(log, rel_tol=0.01, patience=2)
    assert p["met_at_step"] == 20  # 3.0 -> 2.99 and 2.985: < 1% each
    assert tt.plateau(log[:3], patience=2)["met_at_step"] is None  # (20 needs two later evals)
    assert tt.plateau([{"step": s, "val_loss": 10.0 / s} for s in range(1, 6)])["met_at_step"] is None


@pytest.mark.slow  # a script end to end, a subprocess or a training run
def test_train_tuned_lens_and_lens_report_smoke_presets(tmp_path):
    """Both scripts end to end (smoke presets) on a tiny random model with SmolLM2's tokenizer:
    the lens the first writes is read by the second."""
    import json

    from lens import models
    from lens_tiny import tiny_text_model
    from script_entry import script_namespace

    folder = str(tiny_text_model(tmp_path / "m"))
    report = script_namespace("train_tuned_lens")["main"](["--model", folder, "--preset", "smoke", "--out", str(tmp_path / "o"),
                                    "--no-progress", "--corpora", "shakespeare"])
    saved = json.loads((tmp_path / "o" / "report.json").read_text())
    assert saved["settings"] == report["settings"] and len(saved["tuned_lens"]["kl"]) == 3
    tc = saved["temperature_control"]
    assert len(tc["kl"]) == 3 and len(tc["temperature"]) == 2 and len(tc["kl_interval_95"][0]) == 3
    assert {"tuned_lens", "temperature_control"} <= set(saved["plateau"])
    assert "criterion" in saved["plateau"]["tuned_lens"] and "met_at_step" in saved["plateau"]["tuned_lens"]
    assert "oracle" in saved["oracle_note"] and len(saved["frozen_scale_oracle"]["kl"]) == 3
    md = (tmp_path / "o" / "report.md").read_text()
    assert md.startswith("# Tuned lens vs its temperature control")
    assert "**Verdict: pipeline check only.**" in md  # a random model cannot predict the text
    assert saved["vocab_size"] == models.load(folder)[0].config.vocab_size
    assert saved["preset"] == "smoke preset" and "(smoke preset)" in md.splitlines()[0]  # nothing overridden
    assert (tmp_path / "o" / "lens_scores.png").stat().st_size > 1000
    logit_lens.load_tuned_lens(tmp_path / "o" / "tuned_lens.safetensors", models.load(folder)[0])
    r = script_namespace("lens_report")["main"](["--model", folder, "--preset", "smoke", "--out", str(tmp_path / "r"),
                          "--tuned", str(tmp_path / "o" / "tuned_lens.safetensors")])
    assert set(r["lenses"]) == {"logit lens", "tuned lens"}
    assert np.array(r["lenses"]["tuned lens"]["prob"]).shape == (3, 3)  # 2 layers + output, 3 positions
    assert (tmp_path / "r" / "lens_report.png").stat().st_size > 1000
    # --layers: a lens on layer 1 alone, its report keyed by model layer, its file says so
    # (and --accumulate 2: 2 optimiser steps of 2 batches each, the log in optimiser steps)
    sub = script_namespace("train_tuned_lens")["main"](["--model", folder, "--preset", "smoke", "--out", str(tmp_path / "s"),
                                 "--no-progress", "--corpora", "shakespeare", "--layers", "1", "--accumulate", "2"])
    assert sub["layers"] == [1, 2] and sub["settings"]["layers"] == [1] and len(sub["tuned_lens"]["kl"]) == 2
    assert sub["settings"]["accumulate"] == 2 and sub["plan"]["tokens"] == 2 * 2 * 2 * 8
    assert [(r["step"], r["batches"]) for r in sub["train_log"]] == [(1, 2), (2, 4)]
    assert [r["step"] for r in sub["temperature_train_log"]] == [1, 2]
    assert "Plan: 2 optimiser steps x 2 batch(es) of 2 x 8 tokens" in (tmp_path / "s" / "report.md").read_text()
    planned = script_namespace("train_tuned_lens")["main"](["--model", folder, "--preset", "paper", "--out",
                                                             str(tmp_path / "p"), "--seq", "16", "--plan",
                                                             "--corpora", "shakespeare"])
    assert set(planned) == {"plan"} and not (tmp_path / "p").exists()  # --plan: nothing trained or written
    assert planned["plan"]["tokens"] == 250 * 4 * 32 * 16 and planned["plan"]["epochs"] > 0
    assert set(sub["by_layer"]) == {"1", "2"} and len(sub["temperature_control"]["temperature"]) == 1
    assert sub["by_layer"]["1"]["tuned_lens"]["kl"] == sub["tuned_lens"]["kl"][0]
    assert "layers=(1,)" in sub["preset"]
    assert logit_lens.load_tuned_lens(tmp_path / "s" / "tuned_lens.safetensors", models.load(folder)[0])[0].layers == (1,)
    with pytest.raises(SystemExit, match=r"^--layers: layer 5 out of range \[0, 2\) \(the model has 2 layers\)$"):
        script_namespace("train_tuned_lens")["main"](["--model", folder, "--out", str(tmp_path / "x"), "--layers", "0,5"])
    # --init-lens: a warm start from the layer-1 lens; with a learning rate ~0 the lens trained
    # on is the saved one (its translators unchanged to float32 precision), and the run says so
    saved_sub, _ = logit_lens.load_tuned_lens(tmp_path / "s" / "tuned_lens.safetensors", models.load(folder)[0])
    warm = script_namespace("train_tuned_lens")["main"](["--model", folder, "--preset", "smoke", "--out", str(tmp_path / "w"),
                                  "--no-progress", "--corpora", "shakespeare", "--layers", "1", "--lr-scale", "1e-12",
                                  "--init-lens", str(tmp_path / "s" / "tuned_lens.safetensors")])
    after, _ = logit_lens.load_tuned_lens(tmp_path / "w" / "tuned_lens.safetensors", models.load(folder)[0])
    for a, b in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(saved_sub)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert warm["settings"]["init_lens"].endswith("tuned_lens.safetensors")
    assert "warm-started from" in (tmp_path / "w" / "report.md").read_text()
    with pytest.raises(SystemExit, match=r"^--init-lens: .* holds layers \[1\], this run fits \[0, 1\]"):
        script_namespace("train_tuned_lens")["main"](["--model", folder, "--preset", "smoke", "--out", str(tmp_path / "y"),
                                      "--init-lens", str(tmp_path / "s" / "tuned_lens.safetensors")])
    with pytest.raises(SystemExit, match=r"^--init-lens: .*no tuned lens file"):
        script_namespace("train_tuned_lens")["main"](["--model", folder, "--preset", "smoke", "--out", str(tmp_path / "y"),
                                      "--init-lens", str(tmp_path / "missing.safetensors")])


# A real SIGKILL of scripts/train_tuned_lens.py right after its step-2 checkpoint (a hard
# kill at a known step, no polling race), then the same command resumes in this process.
@pytest.mark.slow  # a script end to end, a subprocess or a training run
def test_sigkilled_tuned_lens_training_resumes_to_the_uninterrupted_lens(tmp_path):
    import signal

    from safetensors.numpy import load_file

    from lens_tiny import tiny_text_model
    from script_entry import run_killed_at, script_namespace

    main = script_namespace("train_tuned_lens")["main"]
    folder = str(tiny_text_model(tmp_path / "m"))
    args = ["--model", folder, "--preset", "smoke", "--steps", "4", "--checkpoint-every", "1", "--eval-every", "4", "--no-progress",
            "--corpora", "shakespeare"]
    killed, full = tmp_path / "killed", tmp_path / "full"
    proc = run_killed_at("train_tuned_lens", 2, args + ["--out", str(killed)])
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (killed / train.CHECKPOINT).exists() and not (killed / "tuned_lens.safetensors").exists()
    resumed = main(args + ["--out", str(killed)])
    whole = main(args + ["--out", str(full)])
    assert [r["step"] for r in resumed["train_log"]] == [4]  # one eval, at the end
    a = load_file(str(killed / "tuned_lens.safetensors"))
    b = load_file(str(full / "tuned_lens.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert resumed["tuned_lens"]["kl"] == whole["tuned_lens"]["kl"]
    # the training time sums the killed process's (up to its step-2 checkpoint) and the resumed
    # one's; a rerun on the finished checkpoint trains nothing and reports the same total
    for out, rep in ((killed, resumed), (full, whole)):
        for fit, key in ((out, "train_seconds"), (out / "temperature", "temperature_train_seconds")):
            clock = json.loads((fit / "train_seconds.json").read_text())
            assert clock["step"] == 4 and rep[key] == clock["seconds"] > 0
    again = main(args + ["--out", str(full)])
    assert again["train_seconds"] == whole["train_seconds"]
    assert again["temperature_train_seconds"] == whole["temperature_train_seconds"]
    # a checkpoint without the timing file (an older run): the total is unknown, said so
    (full / "train_seconds.json").unlink()
    old = main(args + ["--out", str(full)])
    assert old["train_seconds"] is None and old["temperature_train_seconds"] == whole["temperature_train_seconds"]
    assert "not recorded (tuned)" in (full / "report.md").read_text()


# --------------------------------------------------------------------------- a lens on a subset of layers
def test_subset_lens_trains_and_scores_as_the_full_lens_at_its_layers(tmp_path):
    """A lens on layers (0, 2) of the 3-layer tiny Llama, trained from the same (zero) init on
    the same rows, equals the full lens's translators 0 and 2 and scores as it does there
    (jitted training steps; scoring jitted and vmapped over K = 3 rows).  The layers' losses
    are a sum over disjoint parameters, so this holds for any per-parameter optimiser; the
    reference's global-norm clip couples the layers, so the test uses SGD Nesterov without it.
    score_lenses (one forward for all four lenses) equals lens_scores one lens at a time, and
    the frozen-scale entry (here the linear-head shortcut) equals KL from
    logit_lens(frozen_scale=True) at layers 0 and 2."""
    import optax

    _, model, _ = tiny("llama")
    rng = np.random.default_rng(3)
    rows, test = rng.integers(0, 61, (6, 7)), rng.integers(0, 61, (3, 7))
    opt = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.5, momentum=0.9, nesterov=True))

    def fit(lens):
        loss = tt.TunedLensLoss(model)

        @eqx.filter_jit
        def step(lens, state, r):
            g = eqx.filter_grad(loss)(lens, r)
            upd, state = opt.update(g, state, lens)
            return eqx.apply_updates(lens, upd), state

        state = opt.init(lens)
        for i in range(4):
            lens, state = step(lens, state, rows[i % 3 * 2:i % 3 * 2 + 2])
        return lens

    full = fit(logit_lens.TunedLens.init(model.config))
    sub = fit(logit_lens.TunedLens.init(model.config, layers=(0, 2)))
    assert sub.layers == (0, 2) and sub.weight.shape == (2, 24, 24)
    assert float(jnp.abs(full.weight[0]).max()) > 1e-3  # it moved
    np.testing.assert_allclose(np.asarray(sub.weight), np.asarray(full.weight[jnp.asarray([0, 2])]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sub.bias), np.asarray(full.bias[jnp.asarray([0, 2])]), atol=1e-6)
    temps_full = tt.TemperatureLens(jnp.log(jnp.asarray([2.0, 0.5, 1.5], jnp.float32)))
    temps_sub = tt.TemperatureLens(jnp.log(jnp.asarray([2.0, 1.5], jnp.float32)), (0, 2))
    got = tt.score_lenses(model, {"logit": None, "tuned": sub, "temp": temps_sub, "frozen": tt.FROZEN_SCALE},
                          test, batch_size=2, n_boot=50)
    assert got["tuned"]["layers"] == [0, 2, 3]
    for name, lens, frozen in (("logit", None, False), ("tuned", full, False), ("temp", temps_full, False),
                               ("frozen", None, True)):
        want = tt.lens_scores(model, lens, test, batch_size=3, frozen_scale=frozen, n_boot=50)
        for key in ("kl", "top1", "ce"):
            np.testing.assert_allclose(got[name][key], np.asarray(want[key])[[0, 2, 3]], rtol=1e-4, atol=1e-6,
                                       err_msg=f"{name} {key}")
    lp = np.asarray(jax.jit(jax.vmap(lambda t: logit_lens.logit_lens(model, t, frozen_scale=True)))(test[:, :-1]))
    kl = (np.exp(lp[:, -1:]) * (lp[:, -1:] - lp)).sum(-1).mean((0, 2))  # [L+1]
    np.testing.assert_allclose(got["frozen"]["kl"], kl[[0, 2, 3]], rtol=1e-4, atol=1e-6)
    # the subset lens's own log-probs: entries 0, 2 and the output of the full lens's
    np.testing.assert_allclose(np.asarray(logit_lens.tuned_lens(model, sub, test[0])),
                               np.asarray(logit_lens.tuned_lens(model, full, test[0]))[[0, 2, 3]], atol=1e-5)
    with pytest.raises(ValueError, match="different layers"):
        tt.score_lenses(model, {"a": sub, "b": temps_full}, test)
    with pytest.raises(ValueError, match=r"layers \[1\] differ"):
        tt.lens_scores(model, sub, test, layers=[1])


def test_subset_lens_frozen_scale_with_a_norm_bias_and_layer_errors():
    """GPT-2 (LayerNorm with bias: the frozen-scale entry decodes over the final divisor, no
    shortcut) at layer 1 only, against logit_lens(frozen_scale=True); out-of-range and repeated
    layers are refused outside jit in the library's range wording."""
    _, model, _ = tiny("gpt2")
    test = prompts(3, 6)
    got = tt.lens_scores(model, None, test, frozen_scale=True, layers=[1], batch_size=2, n_boot=20)
    lp = np.asarray(jax.vmap(lambda t: logit_lens.logit_lens(model, t, frozen_scale=True))(test[:, :-1]))
    kl = (np.exp(lp[:, -1:]) * (lp[:, -1:] - lp)).sum(-1).mean((0, 2))
    assert got["layers"] == [1, 2]
    np.testing.assert_allclose(got["kl"], kl[[1, 2]], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"^layer 2 out of range \[0, 2\) \(the model has 2 layers\)$"):
        logit_lens.TunedLens.init(model.config, layers=(0, 2))
    with pytest.raises(ValueError, match=r"layer -1 out of range"):
        tt.TemperatureLens.init(model.config, layers=(-1,))
    with pytest.raises(ValueError, match="distinct and increasing"):
        logit_lens.TunedLens.init(model.config, layers=(1, 1))
    assert logit_lens.TunedLens.init(model.config, layers=(0, 1)).layers is None  # every layer: the full lens


def test_subset_lens_save_load_keeps_its_layers(tmp_path):
    """Saved tensors are named by model layer; loading places them by the file's `layers`;
    a file whose tensors and layers disagree is refused, never misplaced."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    _, model, _ = tiny("llama")
    k1, k2 = jax.random.split(jax.random.key(1))
    sub = logit_lens.TunedLens(jax.random.normal(k1, (2, 24, 24)), jax.random.normal(k2, (2, 24)), (0, 2))
    path = logit_lens.save_tuned_lens(sub, tmp_path / "sub.safetensors", model)
    arrays = load_file(str(path))
    assert sorted(arrays) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    np.testing.assert_array_equal(arrays["2.weight"], np.asarray(sub.weight[1]))
    back, meta = logit_lens.load_tuned_lens(path, model)
    assert back.layers == (0, 2) and meta["config"]["layers"] == [0, 2] and eqx.tree_equal(back, sub)
    with safe_open(str(path), "numpy") as f:
        metadata = f.metadata()
    config = json.loads(metadata["config"])
    bad = tmp_path / "bad.safetensors"
    save_file(arrays, str(bad), metadata={**metadata, "config": json.dumps({**config, "layers": [0, 1]})})
    with pytest.raises(ValueError, match=r"tensors \['2.bias', '2.weight'\] for layers its config does not list"):
        logit_lens.load_tuned_lens(bad, model)
    save_file(arrays, str(bad), metadata={**metadata, "config": json.dumps({k: v for k, v in config.items()
                                                                            if k != "layers"})})
    with pytest.raises(ValueError, match="for layers its config does not list|missing tensor"):
        logit_lens.load_tuned_lens(bad, model)  # a file without `layers` means every layer
    save_file(arrays, str(bad), metadata={**metadata, "config": json.dumps({**config, "layers": [0, 3]})})
    with pytest.raises(ValueError, match=r"layer 3 out of range \[0, 3\)"):
        logit_lens.load_tuned_lens(bad, model)


def test_train_tuned_lens_resolves_layers_against_the_model():
    """--layers is checked against the loaded model (before any data or training; main calls
    resolve_layers right after loading) in the library's range wording; given layers are
    sorted, and naming every layer is the full lens (None)."""
    from script_entry import script_namespace

    ns = script_namespace("train_tuned_lens")
    resolve, parse = ns["resolve_layers"], ns["layer_list"]
    assert resolve(parse("25,5,15"), 30) == (5, 15, 25) and resolve(parse("all"), 30) is None
    assert resolve(parse("1,0"), 2) is None
    with pytest.raises(SystemExit, match=r"^--layers: layer 30 out of range \[0, 30\) \(the model has 30 layers\)$"):
        resolve(parse("5,30"), 30)


def test_score_cache_continues_a_stopped_pass_and_test_rows_interleave(tmp_path):
    """score_lenses with a cache: a pass stopped after its first 2 rows (the cache cut to
    them) continues to the uninterrupted result; summarise_rows of the cut cache equals
    scoring those 2 rows alone.  The script's test rows are interleaved over the corpora."""
    from script_entry import script_namespace

    _, model, _ = tiny("llama")
    rows = prompts(4, 6)  # two batches of 2: one compile
    lenses = {"logit": None, "frozen": tt.FROZEN_SCALE}
    cache = tmp_path / "c.npz"
    whole = tt.score_lenses(model, lenses, rows, batch_size=2, n_boot=30, cache=cache)
    with np.load(cache) as z:
        key, sums = z["key"], z["sums"]
    assert sums.shape == (4, 4, 2, 3)
    np.savez(cache, key=key, sums=sums[:2])
    first = tt.summarise_rows(sums[:2], list(lenses), (0, 1, 2), 3, 5, n_boot=30)
    alone = tt.score_lenses(model, lenses, rows[:2], batch_size=2, n_boot=30)
    for name in lenses:
        np.testing.assert_allclose(first[name]["kl"], alone[name]["kl"], rtol=1e-6)
    again = tt.score_lenses(model, lenses, rows, batch_size=2, n_boot=30, cache=cache)
    for name in lenses:
        for k in ("kl", "top1", "ce", "kl_interval_95"):
            np.testing.assert_allclose(again[name][k], whole[name][k], rtol=1e-6)
    interleave = script_namespace("train_tuned_lens")["interleave"]
    got = interleave([np.array([[1], [2], [3]]), np.array([[10]]), np.array([[20], [21]])])
    assert got.ravel().tolist() == [1, 10, 20, 2, 21, 3]
