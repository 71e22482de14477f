"""Where lens keeps files on disk: what it downloads apart from what it derives.

    from .paths import cache_dir, download_dir

    download_dir()   content-addressed downloads, each checked against a pinned sha256
                     (the embedded GGUFs, `corpora/`):
                     $LENS_DOWNLOAD_DIR if set, else cache_dir()
    cache_dir()      derived data, rebuilt on demand from code and downloads (`jax/`
                     compiled executables, `tokens/` token streams, `tokenizers/` BPE and
                     GGUF tokenizers, `kernels/` built shared libraries):
                     $LENS_CACHE_DIR if set, else platformdirs.user_cache_dir("lens")
                     (~/.cache/lens on Linux)

By default both are one folder (one place to look, one place to delete), and setting only
LENS_CACHE_DIR moves both, as before the split.  Setting both separates them: the test
suite (tests/conftest.py) points LENS_CACHE_DIR at a per-run temporary folder and
LENS_DOWNLOAD_DIR at the user's folder, so a test run derives nothing into the user's cache
yet downloads nothing twice.  Both are read at every call, so a process (or a test's
monkeypatch) can change them at any time.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LENS_CACHE_DIR"
DOWNLOAD_ENV = "LENS_DOWNLOAD_DIR"


def cache_dir() -> Path:
    """The folder for derived data: $LENS_CACHE_DIR, else the user cache dir (not created here)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("lens"))


def download_dir() -> Path:
    """The folder for verified downloads: $LENS_DOWNLOAD_DIR, else `cache_dir()` (not created here)."""
    env = os.environ.get(DOWNLOAD_ENV)
    return Path(env).expanduser() if env else cache_dir()
