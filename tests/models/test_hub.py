"""models.load("org/name"): Hub ids through the Hugging Face cache (no network in these tests).

The cache is laid out as huggingface_hub writes it (models--org--name/{refs/main,
snapshots/<commit>/...}) in a temporary HF_HOME; offline mode is on in every test, so a test
that would reach for the network fails instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from hf_tiny import hf_forward, save_tiny, tiny_llama_config
from lens import models
from lens.models.io import hub
from lens.models.io.safetensors_reader import UnsafeCheckpointError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
ROOT = Path(__file__).resolve().parents[2]


def cached_repo(home: Path, repo_id: str) -> Path:
    """An empty snapshot folder for `repo_id` at refs/main in the cache under HF_HOME=`home`."""
    storage = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = storage / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_hub_id_from_offline_cache_matches_transformers(tmp_path):
    """The hidden check's setting: HF_HOME and HF_HUB_OFFLINE=1 set before anything is imported
    (a fresh interpreter); the model loads by its id and its logits equal transformers'."""
    home = tmp_path / "hf_home"
    snap = cached_repo(home, "tiny-org/tiny-llama")
    hf = save_tiny(tiny_llama_config(2), snap)
    tokens = np.array([3, 14, 15, 9, 26, 5], np.int32)
    want, _ = hf_forward(hf, tokens)
    out = tmp_path / "logits.npy"
    code = textwrap.dedent(f"""
        import numpy as np, jax.numpy as jnp
        from lens import models
        model, tok = models.load("tiny-org/tiny-llama")
        assert tok is None, tok
        np.save({str(out)!r}, np.asarray(model(jnp.asarray({tokens.tolist()}, jnp.int32))))
    """)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    np.testing.assert_allclose(np.load(out), want, atol=1e-4, rtol=1e-4)


def test_revision_suffix_and_local_path_wins(offline_home, tmp_path, monkeypatch):
    snap = cached_repo(offline_home, "tiny-org/tiny-llama")
    save_tiny(tiny_llama_config(1), snap)
    assert hub.resolve(f"tiny-org/tiny-llama@{COMMIT}") == snap
    assert hub.resolve("tiny-org/tiny-llama") == snap
    # A local folder of the same relative name is read, not the cache.
    local = tmp_path / "tiny-org" / "tiny-llama"
    save_tiny(tiny_llama_config(3), local)
    monkeypatch.chdir(tmp_path)
    model, _ = models.load("tiny-org/tiny-llama")
    assert model.config.n_layers == 3


def test_not_cached_offline_says_how_to_fetch(offline_home):
    with pytest.raises(hub.HubError) as e:
        models.load("nobody-here/not-cached")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE=1" in msg and "hf download nobody-here/not-cached" in msg
    assert "models.load('not-cached')" in msg and "--local-dir not-cached" in msg


def test_pickle_only_repo_is_refused(offline_home):
    snap = cached_repo(offline_home, "tiny-org/old-bin")
    (snap / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (snap / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(UnsafeCheckpointError, match=r"only pickle weights \(pytorch_model.bin\).*refs/pr/N"):
        models.load("tiny-org/old-bin")


def test_missing_shard_is_refused_not_partially_loaded(offline_home):
    snap = cached_repo(offline_home, "tiny-org/sharded")
    save_tiny(tiny_llama_config(1), snap)
    (snap / "model.safetensors").rename(snap / "model-00001-of-00002.safetensors")
    from safetensors.numpy import load_file

    names = list(load_file(str(snap / "model-00001-of-00002.safetensors")))
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map["lm_head.extra"] = "model-00002-of-00002.safetensors"
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(hub.HubError, match=r"1 of 2 weight shards .* missing.*model-00002-of-00002"):
        models.load("tiny-org/sharded")


def _http_error(cls, status):
    import httpx2

    request = httpx2.Request("GET", "https://huggingface.co/api/models/x")
    return cls("from the Hub", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize("kind, status, expect", [
    ("GatedRepoError", 403, r"gated model .* accept its terms at https://huggingface.co/org/gated.*hf auth login"),
    ("RepositoryNotFoundError", 404, r"no model 'org/gated' on the Hub.*Check the id"),
])
def test_gated_and_unknown_ids_say_the_next_step(monkeypatch, kind, status, expect):
    import huggingface_hub
    from huggingface_hub import errors

    def refuse(*a, **k):
        raise _http_error(getattr(errors, kind), status)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(hub.HubError, match=expect):
        models.load("org/gated")


def test_hub_id_shape():
    assert hub.looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub.looks_like_hub_id("org/name@refs/pr/1")
    assert hub.split_revision("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for not_id in ("smollm", "a/b/c", "../x", "/abs/path", "dir/file.gguf/x"):
        assert not hub.looks_like_hub_id(not_id), not_id
    with pytest.raises(FileNotFoundError, match="nor a Hugging Face Hub id"):
        models.load("no_such_model_anywhere")


def test_cache_without_refs_uses_its_only_snapshot(offline_home):
    snap = cached_repo(offline_home, "tiny-org/no-ref")
    (snap.parents[1] / "refs" / "main").unlink()
    save_tiny(tiny_llama_config(1), snap)
    assert hub.resolve("tiny-org/no-ref") == snap
    (snap.parent / "another").mkdir()  # two snapshots and no ref: ambiguous, refused
    with pytest.raises(hub.HubError, match="not in the Hugging Face cache"):
        hub.resolve("tiny-org/no-ref")
