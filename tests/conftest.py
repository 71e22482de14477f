"""Suite-wide policy: CPU, a per-run cache folder for derived files, derandomised
Hypothesis, and memory released after every test module.

Files on disk (`models.runtime.paths`): the suite never writes derived data (compiled
executables, token streams, tokenizers, built kernels) into the user's cache.  The
controller process points LENS_CACHE_DIR at a fresh temporary folder for the run and
LENS_DOWNLOAD_DIR at the user's download folder (verified, content-addressed downloads:
the embedded GGUFs and corpora are fetched once and shared with normal use).  pytest-xdist
workers and subprocess-driven tests inherit both through the environment, so every process
of one run shares one derived folder (JAX's persistent compilation cache included, turned on
here as the scripts turn it on); the controller deletes it at the end.  Set
LENS_TEST_CACHE_DIR to keep derived data in a folder of your choice instead (not deleted).
"""

import functools
import gc
import os
import shutil
import sys
import tempfile

import pytest

# Tests run on the CPU, deterministic, at the product's default matmul precision (what
# `make run` runs; on XLA:CPU it is full float32, checked in test_differential.py).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Memory: XLA's many threads each get a glibc malloc arena, and freed model weights stay in
# them; two arenas per process (inherited by the xdist workers and script subprocesses, which
# start after this import) and a trim after every module (below) hand freed memory back.
os.environ.setdefault("MALLOC_ARENA_MAX", "2")

_RUN_DIR_ENV = "LENS_TEST_RUN_DIR"  # set by the controller: the run's derived-data folder
_created_here: list[str] = []


def _derive_into_run_dir() -> None:
    """In the first process of a run (the controller): choose the folders, once."""
    from lens.models.runtime.paths import CACHE_ENV, DOWNLOAD_ENV, download_dir

    if os.environ.get(_RUN_DIR_ENV):  # an xdist worker, or a nested pytest: already chosen
        return
    os.environ[DOWNLOAD_ENV] = str(download_dir())  # the user's choice, before it moves
    chosen = os.environ.get("LENS_TEST_CACHE_DIR")
    if chosen:
        run_dir = chosen
    else:
        run_dir = tempfile.mkdtemp(prefix="lens-test-cache-")
        _created_here.append(run_dir)
    os.environ[CACHE_ENV] = os.environ[_RUN_DIR_ENV] = run_dir


_derive_into_run_dir()  # at import: before any test module (or xdist worker) starts


def _share_compilations() -> None:
    """The suite is a program too: it turns JAX's persistent compilation cache on, in the
    run's folder, so xdist workers and later modules (after `jax.clear_caches()` below)
    load executables compiled once instead of compiling them again."""
    from lens.models.runtime import compile_cache

    compile_cache.enable()


_share_compilations()


def pytest_unconfigure(config):
    for folder in _created_here:
        shutil.rmtree(folder, ignore_errors=True)


# Hypothesis: the same examples on every run and on every machine (a failure is reproducible
# by rerunning; no example database is written).  Property tests set only max_examples /
# deadline on top of this profile.
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("lens", derandomize=True, database=None, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "lens"))
except ImportError:  # hypothesis is a test requirement; its absence fails the modules that use it
    pass


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_module(request):
    """After each test module: drop its module-level `functools.lru_cache`s (tiny models,
    converted pairs, geometry data), JAX's in-memory executables and tracing caches, and
    collect.  A module's cached models otherwise stay alive for the whole run (modules stay
    in sys.modules), which is what made the suite's peak RSS grow with the number of files."""
    yield
    module = request.module
    for value in list(vars(module).values()):
        if isinstance(value, functools._lru_cache_wrapper) and getattr(value, "__module__", None) == module.__name__:
            value.cache_clear()
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()
    _trim_heap()


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise, so a long-lived xdist
    worker's RSS only grows); a no-op where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
