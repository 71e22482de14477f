"""Batched MELBO-ortho sharded over 4 fake CPU devices equals the single-device run.

The reference runs here (one device: the plain, unsharded code path); the sharded run
needs XLA_FLAGS before jax is imported, so it runs in a fresh interpreter (as in
tests/lens/core/test_sharding.py) that loads the reference and compares.

Tolerance: the sharded run is the same algorithm on the same inputs, but each device
runs the vmapped forward/backward on its share of the block, so the matmuls have other
shapes ([1 * P * T, d] per device instead of [4 * P * T, d]) and XLA sums in another
order.  Differences start at float32 rounding (~1e-7 relative) and grow a little
through 30 Adam steps and the QR; measured ~4e-7 of a vector's norm and ~4e-7 relative
on the losses.  We allow 1e-5 (relative to each vector's norm; rtol on losses and
effects): a real sharding bug (a vector trained against another's shard, a missed
projection, a wrong gather) moves results by O(1).
"""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lens.steering import melbo
from lens_tiny import tiny
from lens.models.families import convert_hf
from lens.models.io.safetensors_reader import read_safetensors_folder

import pytest

pytestmark = pytest.mark.slow  # make test-fast skips it (real weights, subprocesses or long runs)

K, BLOCK, STEPS = 4, 4, 30


# setup() and run() execute in both processes (the child gets their source).
def setup(folder):
    """A tiny random Llama's MELBO problem (2 prompts, source 0, target 1) and a theta0."""
    model = convert_hf(*read_safetensors_folder(folder), jnp.float32)
    rs = np.random.RandomState(0)
    tokens, mask = melbo.pad_prompts([list(rs.randint(0, 61, 7)), list(rs.randint(0, 61, 5))])
    problem = melbo.make_problem(model, tokens, mask, 0, 1)
    theta0 = 3.0 * jax.random.normal(jax.random.PRNGKey(7), (model.config.d_model,))
    return problem, theta0


def run(problem, theta0, K, block, steps, **kw):
    """Batched MELBO-ortho (blocks of `block`) and the found vectors' steered effects."""
    cfg = melbo.OrthoConfig(steps=steps, lr=0.01)
    run = melbo.MelboRunConfig(mode="batched", block_size=block, seed=5, **kw)
    res = melbo.melbo_ortho(problem, theta0, K, cfg, run=run)
    eff = melbo.steered_effects(problem, res.vectors, chunk=3, **kw)
    return res, eff


HEADER = r"""
import jax, jax.numpy as jnp, numpy as np
from lens.steering import melbo
from lens.models.families import convert_hf
from lens.models.io.safetensors_reader import read_safetensors_folder
"""


CHILD = HEADER + inspect.getsource(setup) + inspect.getsource(run) + r"""
import re, sys, time
T0 = time.time()
from jax.sharding import NamedSharding, PartitionSpec as P
from lens.core import sharding
from lens.steering.melbo import train

assert jax.device_count() == 4, jax.devices()
folder, ref_file, K, block, steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
ref = np.load(ref_file)
problem, theta0 = setup(folder)

# mesh=None on 4 devices: automatic, every block of 4 split over all 4.
assert melbo.block_mesh(None, block).shape[sharding.VECTORS] == 4
assert melbo.block_mesh(None, 6).shape[sharding.VECTORS] == 3  # largest divisor <= 4
try:
    melbo.block_mesh(sharding.make_mesh(vectors=4), 6)
    raise AssertionError("block 6 on 4 devices must be refused")
except ValueError as e:
    assert "block_size=6" in str(e) and "4 devices" in str(e), e

res, eff = run(problem, theta0, K, block, steps)
scale = np.linalg.norm(ref["vectors"], axis=1, keepdims=True)
err = float((np.abs(res.vectors - ref["vectors"]) / scale).max())
assert err < 1e-5, ("vectors", err)
np.testing.assert_allclose(res.losses, ref["losses"], rtol=1e-5, atol=0)
v = np.concatenate([np.asarray(theta0)[None], res.vectors]).astype(np.float64)
u = v / np.linalg.norm(v, axis=1, keepdims=True)
cos = float(np.abs(u @ u.T - np.eye(len(u))).max())
assert cos <= 1e-6, ("orthogonality", cos)
for name in ("target", "last", "logits"):
    a, b = np.asarray(getattr(eff, name)), ref[name]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max(), err_msg=name)
print("OK equal", err, cos, time.time() - T0)

# The block really is partitioned: each device's steered residual is [B/4, P, T, d].
mesh = sharding.make_mesh(vectors=4)
split = NamedSharding(mesh, P(sharding.VECTORS))
cfg = melbo.OrthoConfig(steps=steps, lr=0.01)  # as run(): the executable is cached
aux = jax.jit(melbo.ortho_reference)(problem, theta0)
prob, aux, basis = sharding.replicate((problem, aux, jnp.zeros((K + 1, theta0.shape[0]))), mesh)
thetas = jax.device_put(jnp.ones((block, theta0.shape[0])), split)
hlo = train._train_block.lower(cfg, prob, aux, thetas, basis, split).compile().compiled.as_text()
P_, T_ = problem.x_src.shape[:2]
shapes = set(re.findall(r"f32\[(\d+),%d,%d,%d\]" % (P_, T_, theta0.shape[0]), hlo))
assert shapes == {str(block // 4)}, shapes
print("OK partitioned", shapes, time.time() - T0)
"""

def test_sharded_batched_ortho_equals_single_device(tmp_path):
    assert jax.device_count() == 1  # the reference takes the plain one-device path
    _, _, folder = tiny()
    problem, theta0 = setup(folder)
    res, eff = run(problem, theta0, K, BLOCK, STEPS)
    ref = tmp_path / "ref.npz"
    np.savez(ref, vectors=res.vectors, losses=res.losses, target=eff.target, last=eff.last,
             logits=eff.logits)

    root = Path(__file__).resolve().parents[3]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(ref), str(K), str(BLOCK), str(STEPS)],
        env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "OK equal" in proc.stdout and "OK partitioned" in proc.stdout, proc.stdout
