"""Two processes for real: `jax.distributed.initialize` on loopback (CPU gloo
collectives), 4 faked CPU devices each, one (data 2, model 4) mesh over all 8.  Both run
the same script with the same arguments (only the process id differs): load the model
sharded, a forward and a sweep, and process 0 alone writes the report; the numbers equal
this (single-device) process's own.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import lens
from lens import models
from lens.models.core.config import ModelConfig

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.slow  # two subprocesses (about 30 s of CPU)

CHILD = r"""
import json, sys
port, pid, folder, report = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
from lens.core import sharding
sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import lens, jax, numpy as np
from lens import models
assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
mesh = models.make_mesh(data=2, model=4)
model, _ = models.load(folder, mesh=mesh)
assert not model.blocks.W_in.is_fully_addressable  # really split across the two processes
rng = np.random.RandomState(0)
toks = rng.randint(0, model.config.vocab_size, size=(4, 7)).astype(np.int32)
vecs = rng.randn(6, model.config.d_model).astype(np.float32)
logits = sharding.to_host(jax.jit(jax.vmap(model))(sharding.place("prompts", toks, mesh)))
res = lens.sweep_vectors(model, toks, vecs, layers=[1], coeffs=[1.0, 4.0], targets=[3, 5],
                         config=lens.SweepConfig(mesh=mesh, chunk_size=4, progress=False))
wrote = sharding.write_once(report, json.dumps({
    "logits": logits.tolist(), "kl": np.asarray(res.kl).tolist(),
    "delta": np.asarray(res.logprob_delta).tolist()}))
print("wrote" if wrote else "did not write", pid, flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    c = ModelConfig(architecture="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4,
                    d_head=4, d_mlp=64, max_seq_len=16, norm_kind="rms", norm_eps=1e-5, activation="silu",
                    gated_mlp=True, positional="rope", tie_embeddings=False)
    model = models.init(c, jax.random.key(0))
    folder = models.save(model, tmp_path / "model")
    report = tmp_path / "report.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(port), str(i), str(folder), str(report)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:  # never leave a child behind (one waiting forever on the other)
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n\n".join(o[-3000:] for o in outs)
    assert "wrote 0" in outs[0] and "did not write 1" in outs[1], outs
    got = json.loads(report.read_text())

    rng = np.random.RandomState(0)
    toks = rng.randint(0, c.vocab_size, size=(4, 7)).astype(np.int32)
    vecs = rng.randn(6, c.d_model).astype(np.float32)
    want_logits = np.asarray(jax.vmap(model)(toks))
    res = lens.sweep_vectors(model, toks, vecs, layers=[1], coeffs=[1.0, 4.0], targets=[3, 5],
                             config=lens.SweepConfig(chunk_size=4, progress=False))
    errs = {k: float(np.abs(np.asarray(got[k]) - np.asarray(w)).max())
            for k, w in (("logits", want_logits), ("kl", res.kl), ("delta", res.logprob_delta))}
    print("2 processes vs 1, max abs error:", errs)
    np.testing.assert_allclose(np.asarray(got["logits"]), want_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(got["kl"]), np.asarray(res.kl), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(got["delta"]), np.asarray(res.logprob_delta), atol=1e-5, rtol=0)
    assert np.asarray(got["kl"]).shape == (6, 2, 1, 4)
