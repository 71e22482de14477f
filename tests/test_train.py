"""lens.train: the loss equals an independent computation, decreases on a tiny run, and a
run killed mid-training (in-process, and by a real SIGKILL of scripts/train_toy.py)
resumes to exactly the weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import models
from lens import train
from models.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


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
    result = train.train(model, learnable_rows(256), learnable_rows(32, seed=1), CFG, tmp_path, progress=False)
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
    full = train.train(model, rows, val, CFG, tmp_path / "full", progress=False)

    def kill(step):
        if step == 20:
            raise Killed

    with pytest.raises(Killed):
        train.train(model, rows, val, CFG, tmp_path / "killed", progress=False, on_checkpoint=kill)
    with safe_open(str(tmp_path / "killed" / train.CHECKPOINT), "numpy") as f:
        assert f.metadata()["step"] == "20"
    resumed = train.train(model, rows, val, CFG, tmp_path / "killed", progress=False)
    for a, b in zip(jax.tree.leaves(full.model), jax.tree.leaves(resumed.model)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["val_loss"] for r in resumed.log] == [r["val_loss"] for r in full.log]

    # A checkpoint written with other settings is refused, naming what differs.
    import dataclasses

    with pytest.raises(ValueError, match="other settings"):
        train.train(model, rows, val, dataclasses.replace(CFG, lr=5e-3), tmp_path / "killed", progress=False)


def test_bad_rows_are_clear_errors(tmp_path):
    model = models.init(tiny_gpt2(), jax.random.key(0))
    with pytest.raises(ValueError, match="token ids outside"):
        train.train(model, learnable_rows(16) + 100, learnable_rows(8), CFG, tmp_path, progress=False)
    with pytest.raises(ValueError, match="max_seq_len"):
        train.train(model, learnable_rows(16, seq=40), learnable_rows(8), CFG, tmp_path, progress=False)


# ---------------------------------------------------------- a real SIGKILL of the script
SMOKE = ("--preset", "smoke", "--steps", "60", "--checkpoint-every", "2", "--no-progress")


def run_script(out, log, cache):
    """scripts/train_toy.py in its own process, with this process's float settings and a
    compilation cache shared by the test's processes."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train_toy.py"), *SMOKE, "--out", str(out)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def checkpoint_step(path):
    try:
        with safe_open(str(path), "numpy") as f:
            return int(f.metadata()["step"])
    except Exception:  # noqa: BLE001 (absent, or being replaced: read again)
        return 0


def test_sigkilled_train_toy_resumes_to_the_uninterrupted_weights(tmp_path):
    cache, killed = tmp_path / "jax_cache", tmp_path / "killed"
    tail = lambda name: (tmp_path / f"{name}.log").read_text()[-3000:]  # noqa: E731

    with open(tmp_path / "killed.log", "w") as log:
        proc = run_script(killed, log, cache)
        deadline = time.time() + 240
        try:
            while checkpoint_step(killed / train.CHECKPOINT) < 4:
                if proc.poll() is not None:
                    pytest.fail(f"exited (rc {proc.returncode}) before it could be killed\n{tail('killed')}")
                if time.time() > deadline:
                    pytest.fail(f"no checkpoint at step >= 4 after 240 s\n{tail('killed')}")
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    step = checkpoint_step(killed / train.CHECKPOINT)
    assert 4 <= step < 60, f"killed after training ended (step {step})"
    assert not (killed / "report.json").exists()

    for name, out in (("resumed", killed), ("full", tmp_path / "full")):
        with open(tmp_path / f"{name}.log", "w") as log:
            assert run_script(out, log, cache).wait(timeout=300) == 0, tail(name)
    a = load_file(str(killed / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (killed, tmp_path / "full"))
    strip = lambda log: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log]  # noqa: E731
    assert ra["val_loss"] == rb["val_loss"] and strip(ra["log"]) == strip(rb["log"])
    assert set(ra["samples"]) == {"ROMEO.\n", "def read_file(path):\n", "The module"}
