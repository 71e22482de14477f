"""Peak host memory of `models.load(folder, mesh=mesh)`: about one device shard plus one
tensor, never the whole model.

A ~270 MB float32 Llama (vocab 32000, d 512, d_mlp 2048, 8 layers) is made with
`models.init` and saved in one subprocess; a second one (8 faked CPU devices, mesh (2, 4)
of (data, model)) loads it.  Peak RSS is read from /proc/self/status (VmHWM, reset just
before the load by writing 5 to /proc/self/clear_refs, so the import and warm-up are the
baseline).  Faked CPU devices keep their buffers in host memory, so what the loaded
model holds on its devices (sum over devices of their shards) is subtracted: the rest is
the loader's own transient host memory, which must stay under 1.5 x (the largest
single shard, one device's slice of one weight + the largest tensor).  For scale, the child also reports the
file's size: an unsharded load holds at least the whole model on the host.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

MAKE = r"""
import sys, jax
from lens import models
from lens.models.core.config import ModelConfig
c = ModelConfig(architecture="llama", vocab_size=32000, d_model=512, n_layers=8, n_heads=8,
                n_kv_heads=4, d_head=64, d_mlp=2048, max_seq_len=64, norm_kind="rms", norm_eps=1e-5,
                activation="silu", gated_mlp=True, positional="rope", tie_embeddings=False)
models.save(models.init(c, jax.random.key(0)), sys.argv[1])
"""

LOAD = r"""
import json, math, os, sys
import lens
import jax, jax.numpy as jnp, numpy as np
from lens import models

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)

mesh = models.make_mesh(data=2, model=4)
# warm up every code path on a small model, so the baseline holds the code and compiler
small = sys.argv[2]
models.load(small, mesh=mesh)
import gc; gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
model, _ = models.load(sys.argv[1], mesh=mesh)
peak = status("VmHWM") - base
held = sum(s.data.nbytes for a in jax.tree.leaves(model) for s in a.addressable_shards)
per_device = models.core.sharding.per_device_bytes(model)
largest_shard = max(s.data.nbytes for a in jax.tree.leaves(model) for s in a.addressable_shards)
largest_tensor = max(a.nbytes for a in jax.tree.leaves(model) if a.ndim <= 2)
# a block weight is one tensor per layer in the file: the largest per-layer matrix
largest_tensor = max([largest_tensor] + [a.nbytes // a.shape[0] for a in jax.tree.leaves(model.blocks)])
size = sum(os.path.getsize(os.path.join(sys.argv[1], f)) for f in os.listdir(sys.argv[1]) if f.endswith(".safetensors"))
toks = jnp.arange(5)
print("RESULT" + json.dumps({"peak": peak, "held": held, "largest_device": max(per_device.values()),
                             "largest_shard": largest_shard,
                             "largest_tensor": largest_tensor, "file": size,
                             "finite": bool(jnp.isfinite(model(toks)).all())}))
"""


@pytest.mark.slow
def test_sharded_load_peak_host_memory(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    big, small = tmp_path / "big", tmp_path / "small"
    subprocess.run([sys.executable, "-c", MAKE, str(big)], env=env, cwd=ROOT, check=True, timeout=300)
    tiny = MAKE.replace("vocab_size=32000, d_model=512, n_layers=8", "vocab_size=64, d_model=32, n_layers=2")
    tiny = tiny.replace("d_head=64, d_mlp=2048", "d_head=4, d_mlp=64")
    subprocess.run([sys.executable, "-c", tiny, str(small)], env=env, cwd=ROOT, check=True, timeout=300)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    proc = subprocess.run([sys.executable, "-c", LOAD, str(big), str(small)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1][6:])
    assert r["finite"]
    assert r["file"] > 250e6, r  # the model really is a few hundred MB
    transient = r["peak"] - r["held"]
    bound = 1.5 * (r["largest_shard"] + r["largest_tensor"])
    print(f"transient host peak {transient / 1e6:.1f} MB = "
          f"{transient / (r['largest_shard'] + r['largest_tensor']):.2f} x (largest shard "
          f"{r['largest_shard'] / 1e6:.1f} MB + largest tensor {r['largest_tensor'] / 1e6:.1f} MB); "
          f"file {r['file'] / 1e6:.1f} MB; held on the 8 devices {r['held'] / 1e6:.1f} MB")
    assert transient < bound, r
    assert transient < 0.5 * r["file"], r  # never the whole model on the host
