"""Compiling a native kernel on first use, once per machine: `build(source, stem)`.

The shared library goes to `<lens cache>/kernels/<stem>-<key>.so` (the lens cache is
`models.runtime.paths.cache_dir()`: $LENS_CACHE_DIR or the user cache dir), content-addressed:
the key hashes the source, the compiler flags, the compiler's path, the CPU model and the jax
version (its FFI headers).  A build that fails leaves `<stem>-<key>.failed` holding the
compiler's message; while it exists, `build` raises `BuildError` with that message at once,
without running the compiler again (delete the file to retry: a new source, compiler, CPU or
jax version is a new key anyway).

Nothing here runs at import: only a caller's first use compiles.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


class BuildError(RuntimeError):
    """A kernel could not be compiled (now, or in an earlier process: `remembered`)."""

    def __init__(self, message: str, remembered: bool = False):
        super().__init__(message)
        self.remembered = remembered


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_features() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them ("avx512f", ...); empty where
    there is no /proc/cpuinfo (then no kernel that needs a feature is used)."""
    line = next((l for l in _cpuinfo().splitlines() if l.startswith("flags")), "")
    return frozenset(line.split(":", 1)[-1].split())


def cpu_model() -> str:
    """The CPU's model name (part of the build key: -march=native code is for this CPU)."""
    name = next((l.split(":", 1)[1].strip() for l in _cpuinfo().splitlines() if l.startswith("model name")), "")
    return name or platform.processor()


def compiler() -> str | None:
    """The C++ compiler's path: $CXX if set (and then only it), else g++, else c++; None if
    not found."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return shutil.which("g++") or shutil.which("c++")


def cache_root() -> Path:
    """`<lens cache>/kernels/`, where built kernels and remembered failures live."""
    from lens.models.runtime.paths import cache_dir

    return cache_dir() / "kernels"


def build(source: Path, stem: str, cxx: str) -> Path:
    """Compile `source` with `cxx` (once per key, module docstring) into the lens cache and
    return the shared library's path.  Raises BuildError when the compiler fails, now or
    (remembered) in an earlier process."""
    import jax

    text = Path(source).read_bytes()
    key = hashlib.sha256(b"\0".join([text, " ".join(FLAGS).encode(), cxx.encode(), cpu_model().encode(),
                                     jax.__version__.encode()])).hexdigest()[:16]
    root = cache_root()
    out, failed = root / f"{stem}-{key}.so", root / f"{stem}-{key}.failed"
    if out.exists():
        return out
    if failed.exists():
        raise BuildError(f"{stem}: an earlier build failed (remembered in {failed}; delete it to retry):\n"
                         f"{failed.read_text()[-2000:]}", remembered=True)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tmp_out = Path(tmp) / out.name
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o", str(tmp_out)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
            message = done.stderr if done.returncode != 0 else ""
        except OSError as e:  # e.g. CXX names a file that is not an executable
            message = str(e)
        if message or not tmp_out.exists():
            text = f"{' '.join(cmd)} failed:\n{message[-2000:]}"
            failed.write_text(text)
            raise BuildError(text)
        os.replace(tmp_out, out)  # atomic: a parallel process sees the whole file or none
    return out
