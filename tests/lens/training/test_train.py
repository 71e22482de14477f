"""lens.training.train: the loss equals an independent computation, decreases on a tiny run, and a
run killed mid-training (in-process, and by a real SIGKILL of scripts/train_toy.py)
resumes to exactly the weights of an uninterrupted run."""

import json
import signal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from lens import models
from lens.training import data, train
from lens.models.core.config import ModelConfig
from script_entry import run_killed_at, script_namespace



def tiny_gpt2(vocab=61) -> ModelConfig:
    return ModelConfig(architecture="gpt2", vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4,
                       d_head=8, d_mlp=64, max_seq_len=32, norm_kind="layer", norm_eps=1e-5,
                       activation="gelu_new", gated_mlp=False, positional="learned", attn_bias=True,
                       attn_out_bias=True, mlp_bias=True, norm_bias=True, tie_embeddings=True)


def learnable_rows(n, seq=17, vocab=61, seed=0):
    """Rows of a noisy deterministic rule (next = 3 * current + 1 mod vocab, 10% noise)."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((n, seq), np.int32)
    rows[:, 0] = rng.integers(0, vocab, n)
    for i in range(1, seq):
        rows[:, i] = np.where(rng.random(n) < 0.1, rng.integers(0, vocab, n), (3 * rows[:, i - 1] + 1) % vocab)
    return rows


def test_next_token_loss_equals_a_numpy_loop():
    model = models.init(tiny_gpt2(), jax.random.key(0))
    rows = learnable_rows(3, seq=9)
    got = float(train.next_token_loss(model, rows))
    total, count = 0.0, 0
    for r in rows:
        logits = np.asarray(model(r[:-1]), np.float64)
        for i in range(len(r) - 1):
            z = logits[i] - logits[i].max()
            total += -(z[r[i + 1]] - np.log(np.exp(z).sum()))
            count += 1
    assert got == pytest.approx(total / count, rel=1e-5)  # float32 softmax vs float64


CFG = train.TrainConfig(steps=40, batch_size=8, lr=1e-2, warmup_steps=5, eval_every=20, eval_batches=2,
                        checkpoint_every=10)


def test_loss_decreases_on_a_tiny_run(tmp_path):
    model = models.init(tiny_gpt2(), jax.random.key(0))
    result = train.train(model, learnable_rows(256), learnable_rows(32, seed=1), CFG, tmp_path,
                         train.TrainOptions(progress=False))
    first = float(train.next_token_loss(model, learnable_rows(32, seed=1)))
    assert first == pytest.approx(np.log(61), abs=0.1)  # a fresh model is ~uniform
    assert [r["step"] for r in result.log] == [20, 40]
    assert result.log[-1]["val_loss"] < first - 1.0  # the rule is learnable: well below ln 61
    saved = json.loads((tmp_path / "log.json").read_text())
    assert saved == result.log


class Killed(Exception):
    pass


def test_killed_run_resumes_exactly(tmp_path):
    rows, val = learnable_rows(128), learnable_rows(16, seed=1)
    model = models.init(tiny_gpt2(), jax.random.key(0))
    full = train.train(model, rows, val, CFG, tmp_path / "full", train.TrainOptions(progress=False))

    def kill(step):
        if step == 20:
            raise Killed

    with pytest.raises(Killed):
        train.train(model, rows, val, CFG, tmp_path / "killed",
                    train.TrainOptions(progress=False, on_checkpoint=kill))
    with safe_open(str(tmp_path / "killed" / train.CHECKPOINT), "numpy") as f:
        assert f.metadata()["step"] == "20"
    resumed = train.train(model, rows, val, CFG, tmp_path / "killed", train.TrainOptions(progress=False))
    for a, b in zip(jax.tree.leaves(full.model), jax.tree.leaves(resumed.model)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["val_loss"] for r in resumed.log] == [r["val_loss"] for r in full.log]

    # A checkpoint written with other settings is refused, naming what differs.
    import dataclasses

    with pytest.raises(ValueError, match="other settings"):
        train.train(model, rows, val, dataclasses.replace(CFG, lr=5e-3), tmp_path / "killed",
                    train.TrainOptions(progress=False))


def test_bad_rows_are_clear_errors(tmp_path):
    model = models.init(tiny_gpt2(), jax.random.key(0))
    with pytest.raises(ValueError, match="token ids out of range"):
        train.train(model, learnable_rows(16) + 100, learnable_rows(8), CFG, tmp_path,
                    train.TrainOptions(progress=False))
    with pytest.raises(ValueError, match="max_seq_len"):
        train.train(model, learnable_rows(16, seq=40), learnable_rows(8), CFG, tmp_path,
                    train.TrainOptions(progress=False))


# ---------------------------------------------------------- a real SIGKILL of the script
SMOKE = ["--preset", "smoke", "--steps", "6", "--checkpoint-every", "2", "--no-progress"]
@pytest.mark.slow  # a script end to end, a subprocess or a training run
def test_sigkilled_train_toy_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    """Killed in its own process after 2 of 6 steps; resumed and run uninterrupted here
    (same XLA flags: this process imported `models` first); the smallest preset and the
    fewest steps that still resume from a checkpoint left by a dead process."""
    killed, full = tmp_path / "killed", tmp_path / "full"
    # a fresh interpreter (runpy) that SIGKILLs itself right after the step-2 checkpoint,
    # with this process's XLA_FLAGS (the guard's)
    proc = run_killed_at("train_toy", 2, SMOKE + ["--out", str(killed)])
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    with safe_open(str(killed / train.CHECKPOINT), "numpy") as f:
        assert f.metadata()["step"] == "2"
    assert not (killed / "report.json").exists() and not (killed / "model").exists()

    toy_main = script_namespace("train_toy")["main"]
    seen = []  # the batch indices each run trains on: the resumed one starts at 2
    monkeypatch.setattr(train, "batch_at", lambda *a: seen.append(a[3]) or data.batch_at(*a))
    ra = toy_main(SMOKE + ["--out", str(killed)])
    assert seen == [2, 3, 4, 5]
    rb = toy_main(SMOKE + ["--out", str(full)])
    assert seen == [2, 3, 4, 5, 0, 1, 2, 3, 4, 5]
    a = load_file(str(killed / "model" / "model.safetensors"))
    b = load_file(str(full / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    strip = lambda log: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log]  # noqa: E731
    assert ra["val_loss"] == rb["val_loss"] and strip(ra["log"]) == strip(rb["log"])
    assert [r["step"] for r in ra["log"]] == [6]
    assert set(ra["samples"]) == {"ROMEO.\n", "def read_file(path):\n", "The module"}


class BigramTable(eqx.Module):
    """A trainable module that is not a Transformer: next-token logits from a table."""

    logits: jax.Array

    def __call__(self, rows):
        return self.logits[rows[:, :-1]]


def bigram_loss(module: BigramTable, rows):
    logp = jax.nn.log_softmax(module(rows), axis=-1)
    return -jnp.take_along_axis(logp, rows[:, 1:, None], axis=-1).mean()


def test_any_module_trains_with_its_own_loss_and_optimiser_and_resumes(tmp_path):
    """The loop is shared by tuned lenses, routers and students: a custom loss_fn, opt and
    rows_config; the result equals a hand-written SGD loop on the same batches."""
    import optax

    rows, val = learnable_rows(64), learnable_rows(16, seed=1)
    cfg = train.TrainConfig(steps=12, batch_size=8, eval_every=6, eval_batches=2, checkpoint_every=4)
    module = BigramTable(jnp.zeros((61, 61), jnp.float32))
    opt = optax.sgd(50.0)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        train.TrainOptions(loss_fn="bigram")
    with pytest.raises(TypeError, match="optax"):
        train.TrainOptions(opt=object())
    with pytest.raises(TypeError, match="JSON"):
        train.TrainOptions(run_info={"table": np.zeros(2)})
    with pytest.raises(TypeError, match="TrainOptions"):
        train.train(module, rows, val, cfg, tmp_path / "x", {"loss_fn": bigram_loss})
    with pytest.raises(ValueError, match="rows_config"):
        train.train(module, rows, val, cfg, tmp_path / "x",
                    train.TrainOptions(progress=False, loss_fn=bigram_loss, opt=opt))
    config = tiny_gpt2()
    got = train.train(module, rows, val, cfg, tmp_path / "a",
                      train.TrainOptions(progress=False, loss_fn=bigram_loss, opt=opt, rows_config=config))
    # The same steps by hand: plain gradient descent on the same batches.
    table = np.zeros((61, 61), np.float32)
    for step in range(cfg.steps):
        batch = jnp.asarray(data.batch_at(rows, cfg.batch_size, cfg.seed, step))
        grad = jax.grad(lambda t: bigram_loss(BigramTable(t), batch))(jnp.asarray(table))
        table = table - 50.0 * np.asarray(grad)
    np.testing.assert_allclose(np.asarray(got.model.logits), table, atol=1e-4)  # float32, 12 steps
    assert got.log[-1]["val_loss"] < np.log(61) - 0.5  # it learned the rule
    assert got.log[-1]["val_loss"] == pytest.approx(float(bigram_loss(got.model, jnp.asarray(val[:16]))), rel=1e-5)

    def kill(step):
        if step == 8:
            raise Killed

    with pytest.raises(Killed):
        train.train(module, rows, val, cfg, tmp_path / "b",
                    train.TrainOptions(progress=False, loss_fn=bigram_loss, opt=opt, rows_config=config,
                                       on_checkpoint=kill))
    resumed = train.train(module, rows, val, cfg, tmp_path / "b",
                          train.TrainOptions(progress=False, loss_fn=bigram_loss, opt=opt,
                                             rows_config=config))
    np.testing.assert_array_equal(np.asarray(resumed.model.logits), np.asarray(got.model.logits))
