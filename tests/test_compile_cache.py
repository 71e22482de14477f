"""The persistent compilation cache: a second identical process compiles nothing new."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import models, jax, jax.numpy as jnp
from lens import geometry as G
x = jnp.ones((87, 576)) + jnp.arange(576.0) / 576
v = jnp.eye(16, 576)
print(jax.config.jax_compilation_cache_dir)
print(float(jax.jit(lambda x, v: G.effective_cosine_matrix(x, v, "rms", 1e-5, "first")).lower(x, v).compile()(x, v).sum()))
"""


def run(cache, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "LENS_COMPILATION_CACHE")}
    e.update(LENS_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu", **env)
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=e, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


def entries(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_second_process_reads_the_cache(tmp_path):
    first = run(tmp_path)
    assert first[0] == str(tmp_path / "jax")
    after_first = entries(tmp_path / "jax")
    assert after_first, "the first run wrote no cache entry"
    second = run(tmp_path)
    assert second == first  # same result
    assert entries(tmp_path / "jax") == after_first  # nothing new compiled and written


def test_cache_can_be_turned_off(tmp_path):
    out = run(tmp_path, LENS_COMPILATION_CACHE="0")
    assert out[0] == "None" and not entries(tmp_path / "jax")
