"""The persistent compilation cache: a second identical process compiles nothing new, and
`import models` alone turns nothing on (the scripts call `compile_cache.enable()`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # make test-fast skips it (real weights, subprocesses or long runs)

ROOT = Path(__file__).resolve().parents[2]  # the repository root

CHILD = """
import jax, jax.numpy as jnp
from lens import models
from lens.models.runtime import compile_cache
compile_cache.enable()
from lens import geometry as G
x = jnp.ones((87, 576)) + jnp.arange(576.0) / 576
v = jnp.eye(16, 576)
print(jax.config.jax_compilation_cache_dir)
print(float(jax.jit(lambda x, v: G.effective_cosine_matrix(x, v, "rms", 1e-5, "first")).lower(x, v).compile()(x, v).sum()))
"""


GENERATE = """
import jax
from lens import models
from lens.models.runtime import compile_cache
compile_cache.enable()
from lens.models.core.config import ModelConfig
from lens.models.generation.generate import GenerationConfig, generate
from lens.steering import vectors
import numpy as np
cfg = ModelConfig(architecture="gpt2", vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_head=8,
                  d_mlp=64, max_seq_len=32, norm_kind="layer", norm_eps=1e-5, activation="gelu_new",
                  gated_mlp=False, positional="learned", attn_bias=True, attn_out_bias=True, mlp_bias=True,
                  norm_bias=True, tie_embeddings=True)
model = models.init(cfg, jax.random.key(0))
print(jax.config.jax_compilation_cache_dir)
print(generate(model, [[3, 4, 5], [6, 7]], GenerationConfig(5, eos_token_ids=())).tokens)
v = np.ones((3, 32), np.float32)
print(vectors.generate_with_vectors(model, [[3, 4, 5]], v, 1, GenerationConfig(4, eos_token_ids=()), progress=False).tolist())
from lens.core.capture import resid_at
print(round(float(resid_at(model, np.array([[3, 4, 5], [6, 7, 8]]), 1).sum()), 4))
"""


def run(cache, child=CHILD, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "LENS_COMPILATION_CACHE")}
    e.update(LENS_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu", **env)
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, env=e, capture_output=True, text=True, timeout=120)
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


def test_second_generation_process_compiles_nothing(tmp_path):
    """Generation's compiled prefill, start and decode (plain and K-vector) and
    `lens.resid_at` (ids checked on the host) carry no host callback, so a second identical
    process loads every one of them from the cache."""
    first = run(tmp_path, GENERATE)
    after_first = entries(tmp_path / "jax")
    assert len(after_first) >= 3, after_first  # at least prefill, start and decode were written
    second = run(tmp_path, GENERATE)
    assert second == first
    assert entries(tmp_path / "jax") == after_first


def test_import_alone_enables_nothing(tmp_path):
    """A library import changes no JAX setting and writes no cache entry."""
    child = CHILD.replace("from lens.models.runtime import compile_cache\ncompile_cache.enable()\n", "")
    assert "enable" not in child
    out = run(tmp_path, child)
    assert out[0] == "None" and not entries(tmp_path / "jax")


def test_cache_can_be_turned_off(tmp_path):
    out = run(tmp_path, LENS_COMPILATION_CACHE="0")
    assert out[0] == "None" and not entries(tmp_path / "jax")


def test_resid_at_refuses_bad_ids_on_the_host():
    import numpy as np
    import pytest

    from lens.core.capture import resid_at
    from lens_tiny import VOCAB, tiny

    _, model, _ = tiny("llama")
    with pytest.raises(ValueError, match="token id out of range"):
        resid_at(model, np.array([[0, VOCAB]]), 1)
