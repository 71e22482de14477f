"""lens.training.bpe: training is deterministic, any text round-trips, only the train split is
seen, the cache is keyed by corpora and size, and a saved model folder's tokenizer reads
back (ours and transformers') with the same ids."""

import json

import pytest

from lens import models
from lens.training import bpe, data

DOCS = {f"doc{i:02d}.txt": f"Scene {i}. Enter HAMLET and HORATIO.\nHAMLET: To be, or not to be, that is "
        f"the question {i * 7}.\ndef f_{i}(x):\n    return x + {i}  # café ✓\n" * 3 for i in range(40)}
SAMPLES = ["To be, or not to be", "def f(x):\n\treturn x ** 2  # naïve ünïcödé ✓ 😀",
           "", "   leading spaces\n\n\nand blank lines", "\x00\x01 odd bytes \ufffd"]


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(data.CORPORA, "tiny", lambda: dict(DOCS))
    return "tiny"


def test_training_is_deterministic_and_round_trips():
    texts = list(DOCS.values())
    a, b = bpe.train_bpe(texts, 400), bpe.train_bpe(texts, 400)
    assert a.backend.to_str() == b.backend.to_str()  # same vocab and merges, in order
    assert json.loads(a.backend.to_str())["model"]["merges"]  # it did learn merges
    assert a.vocab_size == 400 and a.eos_token_ids == (0,) and a.bos_token_id == 0
    assert data.separator(a) == (0, False)  # EOS after each document, as GPT-2
    for s in SAMPLES:
        assert a.decode(a.encode(s)) == s
    assert len(a.encode(DOCS["doc03.txt"])) < len(DOCS["doc03.txt"].encode()) / 2  # merges compress
    with pytest.raises(ValueError, match="vocab_size"):
        bpe.train_bpe(texts, 100)


def test_corpus_tokenizer_sees_only_the_train_split_and_is_cached(tiny):
    split = data.split_documents(list(DOCS))
    assert bpe.train_texts((tiny,)) == [DOCS[n] for n in split["train"]]
    tok = bpe.corpus_tokenizer((tiny,), 300)
    path = bpe._cache_path((tiny,), 300)
    assert path.exists() and path != bpe._cache_path((tiny,), 301)
    again = bpe.corpus_tokenizer((tiny,), 300)  # from the cache
    assert again.backend.to_str() == tok.backend.to_str()
    assert data.tokenizer_fingerprint(again) == data.tokenizer_fingerprint(tok)
    rows = data.load_tokens(tiny, tok, 16, "validation")
    assert rows.max() < 300
    with pytest.raises(KeyError, match="unknown corpus"):
        bpe.corpus_tokenizer(("nope",), 300)


def test_saved_with_a_model_folder_reads_back_the_same(tmp_path):
    from transformers import AutoTokenizer

    import jax

    from lens.models.core.config import ModelConfig

    tok = bpe.train_bpe(list(DOCS.values()), 320)
    cfg = ModelConfig(architecture="gpt2", vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2,
                      n_kv_heads=2, d_head=8, d_mlp=32, max_seq_len=16, norm_kind="layer", norm_eps=1e-5,
                      activation="gelu_new", gated_mlp=False, positional="learned", attn_bias=True,
                      attn_out_bias=True, mlp_bias=True, norm_bias=True, tie_embeddings=True,
                      bos_token_id=0, eos_token_ids=(0,))
    folder = models.save(models.init(cfg, jax.random.key(0)), tmp_path / "m", tokenizer=tok)
    _, ours = models.load(str(folder))
    hf = AutoTokenizer.from_pretrained(str(folder))
    for s in SAMPLES:
        assert ours.encode(s) == tok.encode(s) == hf(s, add_special_tokens=False)["input_ids"]
    assert ours.eos_token_ids == (0,) and hf.eos_token_id == 0
