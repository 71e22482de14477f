"""The compiler guard (models/runtime/xla_guard.py) and the canary for the XLA:CPU miscompile.

The canary is the reproduction from the issue: a jitted, vmapped `v - y (y.v)/d` at the
main job's shapes.  Under the guard it must be right; in a fresh interpreter WITHOUT the
guard it reports whether this jaxlib still has the bug (a skip, with the reason, once
upstream fixes it: then the guard could go).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from lens import models
from lens.models.runtime import xla_guard

ROOT = Path(__file__).resolve().parents[2]  # the repository root

REPRO = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp
    rs = np.random.RandomState(0)
    y = rs.randn(87, 576).astype(np.float32); V = rs.randn(16, 576).astype(np.float32)
    f = lambda y, V: jax.vmap(lambda v: v[None, :] - y * jnp.sum(y * v[None, :], axis=-1, keepdims=True) / 576.0)(V)
    ref = V[:, None, :].astype(np.float64) - y[None].astype(np.float64) * np.einsum(
        "bd,kd->kb", y, V.astype(np.float64))[..., None] / 576
    err = lambda out: float(np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max())
    eager, jitted = err(f(y, V)), err(jax.jit(f)(y, V))
""")


def child(code: str, xla_flags: str | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with exactly `xla_flags` as XLA_FLAGS (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_canary_passes_under_the_guard():
    """This process imported `models` first (conftest / the imports above): the guard is on."""
    assert xla_guard.FLAG in os.environ["XLA_FLAGS"]
    ns: dict = {}
    exec(REPRO, ns)
    assert ns["eager"] < 1e-6, ns["eager"]  # measured 4.8e-8
    assert ns["jitted"] < 1e-6, ns["jitted"]  # measured 4.8e-8 (0.157 without the guard)
    assert not xla_guard.ynn_fusion_in_use()
    xla_guard.check()  # raises if a YNNPACK fusion would run


def test_canary_without_the_guard_reports_whether_jaxlib_still_miscompiles():
    proc = child(REPRO + "print(eager, jitted, flush=True)\n", xla_flags=None)
    assert proc.returncode == 0, proc.stderr[-2000:]
    eager, jitted = map(float, proc.stdout.split())
    assert eager < 1e-6
    if jitted < 1e-6:
        pytest.skip(f"jaxlib {jax.__version__} no longer miscompiles the canary (jit error {jitted:.2g}): "
                    "the guard in models/runtime/xla_guard.py is no longer needed for it")
    # The bug is still there: the guard is doing real work.  (jaxlib 0.10.2: 0.157.)
    assert jitted > 1e-3


def test_import_order_cannot_bypass_the_guard():
    """JAX's backend started before lens was imported, without the flag: a clear error."""
    proc = child("import jax.numpy as jnp\njnp.zeros(1).block_until_ready()\nimport lens\n")
    if xla_guard.jaxlib_knows_flag():
        assert proc.returncode != 0
        assert "CompilerGuardError" in proc.stderr and "before `models`/`lens` were imported" in proc.stderr
    else:  # a jaxlib without YNNPACK fusions has nothing to guard against
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_importing_jax_first_is_fine_and_other_flags_survive():
    """`import jax` (no computation yet) then `import lens`: the flag is appended to the
    user's own XLA_FLAGS, which keep working (4 fake devices), and the canary is right."""
    code = ("import jax\nimport lens, os\n" + REPRO +
            "assert jax.device_count() == 4, jax.devices()\n"
            "print(os.environ['XLA_FLAGS'], '|', jitted)\n")
    proc = child(code, xla_flags="--xla_force_host_platform_device_count=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    flags, err = proc.stdout.rsplit("|", 1)
    assert "--xla_force_host_platform_device_count=4" in flags and xla_guard.FLAG in flags
    assert float(err) < 1e-6


def test_backend_started_with_the_flag_already_set_is_accepted():
    proc = child("import jax.numpy as jnp\njnp.zeros(1).block_until_ready()\nimport lens\n" + REPRO +
                 "assert jitted < 1e-6, jitted\n", xla_flags=xla_guard.FLAG)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_user_flag_enabling_ynn_fusions_is_refused():
    proc = child("import models\n", xla_flags=f"{xla_guard.FLAG}dot")
    if not xla_guard.jaxlib_knows_flag():
        pytest.skip("this jaxlib has no YNNPACK fusion flag")
    assert proc.returncode != 0 and "refuses to run with them" in proc.stderr


def test_every_entry_point_imports_the_guard_before_jax():
    """Scripts and benchmarks import `models`/`lens` (which install the guard) before any
    JAX computation: a static check that `import lens.models.runtime.xla_guard` comes before the first `jax` import in each entry point."""
    def imports_jax(text):  # directly, or through the packages; the report scripts (JSON -> markdown) do neither
        return any(f"\n{kw} {pkg}" in "\n" + text for kw in ("import", "from")
                   for pkg in ("jax", "equinox", "optax", "lens", "models"))

    entry_points = [p for p in sorted((ROOT / "scripts").glob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
                    if "__main__" in p.read_text() and imports_jax(p.read_text())]
    assert len(entry_points) >= 5
    for path in entry_points:
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        guard = next((i for i, ln in enumerate(lines) if ln.startswith("import lens.models.runtime.xla_guard")), None)
        first_jax = next((i for i, ln in enumerate(lines)
                          if ln.startswith(("import jax", "from jax", "import equinox", "import optax"))), None)
        assert guard is not None, f"{path.name}: no `import lens.models.runtime.xla_guard` at the top"
        assert first_jax is None or guard < first_jax, f"{path.name}: imports JAX before the guard"


def test_every_jax_entry_point_enables_the_compilation_cache():
    """`import models` changes no JAX setting; the programs opt in to the persistent cache
    (models.runtime.compile_cache) with one line after their imports."""
    import lens.models.runtime.compile_cache  # noqa: F401  (the module the scripts call)

    def uses_jax(text):  # the report / figure scripts read JSON and draw; they import neither package
        return any(f"\n{kw} {pkg}" in text for kw in ("import", "from") for pkg in ("lens", "models"))

    entry_points = [p for p in sorted((ROOT / "scripts").glob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
                    if "__main__" in p.read_text() and uses_jax(p.read_text())]
    assert len(entry_points) >= 5
    for path in entry_points:
        assert "\ncompile_cache.enable()" in path.read_text(), f"{path.name}: no compile_cache.enable() after its imports"


def test_guard_is_in_the_package_inits():
    """models/__init__ (run as `lens.models`) imports the guard first; lens/__init__ first loads
    `lens.models` (lens/_models_path.py), before any other import."""
    assert models.runtime.xla_guard is xla_guard
    expected = {"models/__init__.py": "xla_guard", "lens/__init__.py": "_models_path"}
    for init, needle in expected.items():
        code = (ROOT / init).read_text()
        body = code.split('"""', 2)[2]  # after the module docstring
        branch = body.split("\nelse:\n", 1)[-1]  # models/__init__: its canonical branch
        first_import = next(ln.strip() for ln in branch.splitlines()
                            if ln.strip().startswith(("import ", "from ")) and "__future__" not in ln)
        assert needle in first_import, (init, first_import)
