"""Sharded sweeps equal single-device sweeps, on 4 fake CPU devices in a subprocess.

XLA_FLAGS must be set before jax is imported, and this pytest process imported jax
long ago, so the check runs in a fresh interpreter.
"""

import os
import subprocess
import sys
from pathlib import Path

from lens_tiny import tiny

import pytest

pytestmark = pytest.mark.slow  # make test-fast skips it (real weights, subprocesses or long runs)

CHILD = r"""
import dataclasses, sys
import lens  # first: its compiler guard must see XLA_FLAGS before JAX starts
import jax, jax.numpy as jnp, numpy as np
assert jax.device_count() == 4, jax.devices()
from lens.core import sharding
from lens.models.families import convert_hf
from lens.models.io.safetensors_reader import read_safetensors_folder

config, tensors = read_safetensors_folder(sys.argv[1])
model = convert_hf(config, tensors, jnp.float32)
rng = np.random.RandomState(0)
prompts = rng.randint(0, config["vocab_size"], size=(2, 6))
vectors = rng.randn(6, model.config.d_model).astype(np.float32)
kw = dict(coeffs=[1.0, 3.0], layers=[1], targets=[2, 5])
config = lens.SweepConfig(keep_logits=True, chunk_size=4, progress=False)
single = lens.sweep_vectors(model, prompts, vectors, config=config, **kw)
runs = {
    "vectors x4": (sharding.make_mesh(vectors=4), model),
    "vectors x2 + tensor-parallel weights": (
        sharding.make_mesh(vectors=2, batch=2),
        sharding.shard_weights(model, sharding.make_mesh(vectors=2, batch=2))),
}
for name, (mesh, m) in runs.items():
    res = lens.sweep_vectors(m, prompts, vectors, config=dataclasses.replace(config, mesh=mesh), **kw)
    for field in ("kl", "logprob_delta", "logits"):
        a, b = np.asarray(getattr(res, field)), np.asarray(getattr(single, field))
        assert a.shape == b.shape, (name, field, a.shape, b.shape)
        err = float(np.abs(a - b).max())
        assert err < 1e-5, (name, field, err)
    print("OK", name)
"""


def test_sharded_sweep_equals_single_device():
    _, _, folder = tiny()
    root = Path(__file__).resolve().parents[3]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("OK") == 2, proc.stdout
