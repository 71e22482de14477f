"""Entry points (scripts/, bench/) driven the way a user runs them, never imported as
modules: `run_cli` runs `python <file> <args>` in a fresh process; `script_namespace`
executes the file with `runpy.run_path` (its folder first on sys.path, as `python <file>`
puts it) and returns its globals, for calling `main(argv, on_checkpoint=...)` or
`parse_args(argv)` in this process."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def entry(script: str) -> Path:
    """scripts/<name>.py, else bench/<name>.py; "bench/<name>" / "scripts/<name>" explicitly."""
    if "/" in script:
        path = ROOT / f"{script}.py"
    else:
        path = ROOT / "scripts" / f"{script}.py"
        if not path.exists():
            path = ROOT / "bench" / f"{script}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no entry point {script!r} ({path})")
    return path


def script_namespace(script: str) -> dict:
    """The globals of the entry point executed by `runpy.run_path` (not as __main__)."""
    path = entry(script)
    sys.path.insert(0, str(path.parent))
    try:
        return runpy.run_path(str(path))
    finally:
        sys.path.remove(str(path.parent))


def cli_env(**extra: str) -> dict:
    """This process's environment with this checkout first on PYTHONPATH (what `pip
    install -e .` gives a fresh clone) and JAX on the CPU."""
    path = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path, **extra)


def run_cli(script: str, args, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """`python <entry point> <args>` in a fresh process, output captured."""
    return subprocess.run([sys.executable, str(entry(script)), *map(str, args)], cwd=ROOT, env=cli_env(**env),
                          capture_output=True, text=True, timeout=timeout)


# main(argv, on_checkpoint=...) of an entry point in a fresh interpreter (runpy, as
# `python <file>` runs it) whose checkpoint hook SIGKILLs the process when it is called with
# the given value: a hard kill (no cleanup, no atexit) at a known point, no polling race.
_KILL_AT = (
    "import os, runpy, signal, sys; path, at = sys.argv[1], sys.argv[2]; "
    "sys.path.insert(0, os.path.dirname(path)); main = runpy.run_path(path)['main']; "
    "main(sys.argv[3:], on_checkpoint=lambda n: str(n) == at and os.kill(os.getpid(), signal.SIGKILL))"
)


def run_killed_at(script: str, at: int, args, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """The entry point's main(args) in a fresh process that SIGKILLs itself when its
    `on_checkpoint` hook is called with `at` (a step, or vectors done); output captured.
    The return code is -SIGKILL when it got there."""
    return subprocess.run([sys.executable, "-c", _KILL_AT, str(entry(script)), str(at), *map(str, args)], cwd=ROOT,
                          env=cli_env(**env), capture_output=True, text=True, timeout=timeout)
