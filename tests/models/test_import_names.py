"""Import names: a user's own `models` never shadows the ports (`lens.models`), and the bare
`import models` from the checkout is the same package, not a second copy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

USE = """
import lens
from lens import models
import jax
from lens.models.core.config import ModelConfig
cfg = ModelConfig(architecture="gpt2", vocab_size=11, d_model=8, n_layers=1, n_heads=2, n_kv_heads=2, d_head=4,
                  d_mlp=16, max_seq_len=8, norm_kind="layer", norm_eps=1e-5, activation="gelu_new",
                  gated_mlp=False, positional="learned", attn_bias=True, attn_out_bias=True, mlp_bias=True,
                  norm_bias=True, tie_embeddings=True)
model = models.init(cfg, jax.random.key(0))
print(models.__name__, type(model).__module__, model(jax.numpy.arange(3, dtype=jax.numpy.int32)).shape)
"""


def run_in(folder: Path, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # lens importable, the user's folder first on sys.path
    return subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("shape", ["module", "package"])
def test_a_users_models_that_raises_does_not_break_import_lens(tmp_path, shape):
    if shape == "module":
        (tmp_path / "models.py").write_text("raise RuntimeError('the user models.py was imported')\n")
    else:
        (tmp_path / "models").mkdir()
        (tmp_path / "models" / "__init__.py").write_text("raise RuntimeError('the user models/ was imported')\n")
    proc = run_in(tmp_path, USE + "import importlib; print(importlib.util.find_spec('models').origin)\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    assert lines[0] == "lens.models lens.models.core.transformer (3, 11)", proc.stdout
    # The user's own `models` is still theirs: nothing of ours took the top-level name.
    assert str(tmp_path) in lines[1], lines[1]


def test_bare_import_models_is_the_same_package():
    code = """
import models
import models.core.block as b1
from models.core.interventions import Edits as E1
import lens
import lens.models.core.block as b2
from lens.models.core.interventions import Edits as E2
assert models is lens.models, (models, lens.models)
assert b1 is b2 and E1 is E2
assert b1.__spec__.name == "lens.models.core.block", b1.__spec__.name
print("ok")
"""
    proc = run_in(ROOT, code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
