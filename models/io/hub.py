"""Models by their Hugging Face Hub id: `models.load("org/name")`.

The id resolves through the standard Hugging Face cache with `huggingface_hub`, so a model that
transformers (or `hf download`) fetched before is found where it already is, and nothing is
downloaded twice:

  * the cache is `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`;
  * `HF_HUB_OFFLINE=1` never touches the network (the cached snapshot of `refs/main`, or of the
    revision asked for, is used as it is);
  * otherwise the Hub is asked for the current commit and the missing files are downloaded;
    when the Hub cannot be reached, a cached snapshot is used, and with none the error says how
    to fetch the folder.

Only what a load needs is fetched: config.json, the `model*.safetensors` weights (and their
index), the tokenizer files.  Pickle weights (`pytorch_model.bin`) are never downloaded or
opened; a repository that has only those is refused, with the way forward.  A snapshot missing
a shard its index lists is refused too (never a partial load).

    path = resolve("HuggingFaceTB/SmolLM2-135M-Instruct")           # the snapshot folder
    path = resolve("HuggingFaceTB/SmolLM2-135M-Instruct@refs/pr/1")  # a branch, tag or commit
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .safetensors_reader import PICKLE_SUFFIXES, UnsafeCheckpointError

# What a load reads from a repository (fnmatch patterns, as huggingface_hub takes them).
WEIGHTS = ["model*.safetensors", "model.safetensors.index.json"]
OPTIONAL = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "generation_config.json",
]
PATTERNS = ["config.json", *WEIGHTS, *OPTIONAL]

# "org/name" or "org/name@revision" (a branch, tag, commit hash or refs/pr/N).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


class HubError(OSError):
    """A Hub id that cannot be loaded: unknown, gated, offline and not cached, incomplete."""


def looks_like_hub_id(key: str) -> bool:
    """True for "org/name" and "org/name@revision" (checked after local paths, which win)."""
    return bool(_HUB_ID.match(key)) and ".." not in key


def split_revision(key: str) -> tuple[str, str | None]:
    """("org/name", "revision" or None) from "org/name[@revision]"."""
    repo_id, _, revision = key.partition("@")
    return repo_id, (revision or None)


def offline() -> bool:
    """Offline mode, read at call time (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set to 1/true)."""
    from huggingface_hub import constants

    on = {"1", "true", "yes", "on"}
    return bool(constants.HF_HUB_OFFLINE) or any(
        os.environ.get(v, "").strip().lower() in on for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_dir() -> Path:
    """The Hugging Face hub cache, read at call time: HF_HUB_CACHE, else $HF_HOME/hub, else
    huggingface_hub's default."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def fetch_command(repo_id: str, revision: str | None = None) -> str:
    """The shell command that puts what `models.load` needs into a local folder."""
    rev = f" --revision {revision}" if revision else ""
    include = " ".join(f"'{p}'" for p in PATTERNS)
    folder = repo_id.split("/")[-1]
    return f"hf download {repo_id}{rev} --include {include} --local-dir {folder}"


def _next_step(repo_id: str, revision: str | None) -> str:
    folder = repo_id.split("/")[-1]
    return (
        "Fetch it on a machine that reaches the Hub (huggingface_hub's CLI; `huggingface-cli download` "
        f"in older versions takes the same arguments):\n    {fetch_command(repo_id, revision)}\n"
        f"then load the folder: models.load({folder!r}).  Or download into the cache there "
        f"(drop --local-dir) and copy that cache folder (models--{repo_id.replace('/', '--')}) into "
        f"{cache_dir()} here, then models.load({repo_id!r}) with HF_HUB_OFFLINE=1."
    )


def resolve(key: str) -> Path:
    """The local snapshot folder of Hub id `key` ("org/name[@revision]"), downloaded if needed.

    Raises HubError (unknown id, gated without access, not cached while offline, incomplete
    snapshot) or UnsafeCheckpointError (only pickle weights), each saying what to do next.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError,
        RepositoryNotFoundError, RevisionNotFoundError)

    repo_id, revision = split_revision(key)
    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir(), allow_patterns=PATTERNS,
            local_files_only=offline())
    except GatedRepoError:
        raise HubError(
            f"{where} is a gated model and this machine has no access to it: accept its terms at "
            f"https://huggingface.co/{repo_id}, then log in (`hf auth login`, or set HF_TOKEN to a "
            "read token) and load it again.") from None
    except RevisionNotFoundError:
        raise HubError(
            f"{repo_id} has no revision {revision!r} on the Hub (a branch, tag, commit hash or "
            f"refs/pr/N); see https://huggingface.co/{repo_id}/tree/main") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"no model {repo_id!r} on the Hub, and no local path of that name (nor is it private "
            "to an account this machine is logged into). Check the id (\"org/name\", as in the "
            f"model page's address https://huggingface.co/{repo_id}); for a private model log in "
            "with `hf auth login` or set HF_TOKEN.") from None
    except HFValidationError as e:
        raise HubError(f"{key!r} is not a valid Hub id (\"org/name[@revision]\"): {e}") from None
    except IncompleteSnapshotError as e:
        # The cached tree says some requested file is missing; the optional ones may be the
        # only gaps (transformers downloads no chat_template.jinja, say): check what we need.
        folder = e.snapshot_path
        if not _complete(Path(folder)):
            raise HubError(
                f"{where}: the cached snapshot {folder} is incomplete (an interrupted download?) "
                f"and the Hub cannot be reached. {_next_step(repo_id, revision)}") from None
    except LocalEntryNotFoundError as e:
        # A cache copied by hand may lack refs/main: one snapshot folder is then unambiguous.
        folder = _only_snapshot(repo_id) if revision is None else None
        if folder is None:
            reason = ("offline mode is on (HF_HUB_OFFLINE=1)" if offline()
                      else f"the Hub could not be reached ({str(e).splitlines()[0][:200]})")
            raise HubError(
                f"{where} is not in the Hugging Face cache ({cache_dir()}) and {reason}. "
                f"{_next_step(repo_id, revision)}") from None
    folder = Path(folder)
    _check_folder(folder, repo_id, revision)
    return folder


def _only_snapshot(repo_id: str) -> Path | None:
    """The one snapshot folder of `repo_id` in the cache, if there is exactly one."""
    snapshots = cache_dir() / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    found = [p for p in snapshots.iterdir() if p.is_dir()] if snapshots.is_dir() else []
    return found[0] if len(found) == 1 else None


def _complete(folder: Path) -> bool:
    """config.json and every weight file a load would read are present."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return all((folder / s).is_file() for s in shards)
    return any(folder.glob("model*.safetensors"))


def _check_folder(folder: Path, repo_id: str, revision: str | None) -> None:
    """Refuse a snapshot without safetensors weights, or with an index naming absent shards."""
    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    if not (folder / "config.json").is_file():
        raise HubError(f"{where}: no config.json in {folder}: not a transformers model repository?")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise HubError(
                f"{where}: {len(missing)} of {len(shards)} weight shards listed in "
                f"model.safetensors.index.json are missing from {folder} ({', '.join(missing[:3])}); "
                f"refusing a partial load. {_next_step(repo_id, revision)}")
        return
    if any(folder.glob("model*.safetensors")):
        return
    pickles = _pickle_files(folder, repo_id, revision)
    what = f"only pickle weights ({', '.join(pickles[:3])})" if pickles else "no model*.safetensors weights"
    raise UnsafeCheckpointError(
        f"{where} has {what}. Pickle checkpoints are refused (loading one runs code from the "
        "file). Next step: the Hub's safetensors conversion often sits on a pull-request branch "
        f"(see https://huggingface.co/{repo_id}/discussions; load it as models.load("
        f"'{repo_id}@refs/pr/N')), or convert it on a machine you trust with transformers: "
        f"AutoModelForCausalLM.from_pretrained({repo_id!r}).save_pretrained('folder', "
        "safe_serialization=True), then models.load('folder').")


def _pickle_files(folder: Path, repo_id: str, revision: str | None) -> list[str]:
    """The repository's pickle weight files: from the Hub's listing, else the cached one."""
    names: list[str] = []
    try:
        if offline():
            from huggingface_hub import get_cached_repo_tree

            names = [f.path for f in get_cached_repo_tree(repo_id, revision=revision, cache_dir=cache_dir())]
        else:
            from huggingface_hub import list_repo_files

            names = list_repo_files(repo_id, revision=revision)
    except Exception:  # the listing is only for the message; the refusal stands without it
        names = [p.name for p in folder.iterdir()]
    return [n for n in names if n.endswith(PICKLE_SUFFIXES)]
