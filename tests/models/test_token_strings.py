"""Strings in and out: Tokenizer.to_tokens / to_batch / to_str_tokens / token_id, on tiny BPE
tokenizers built here (byte-level like GPT-2 / SmolLM2, and SentencePiece-style like Gemma)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from lens.models.io.tokenizer import Tokenizer
from tiny_tokenizers import byte_level_tokenizer, sentencepiece_tokenizer

@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def sentencepiece() -> Tokenizer:
    return sentencepiece_tokenizer()


def test_str_tokens_are_readable_byte_level(byte_level):
    ids = byte_level.encode("When John gave, café")
    pieces = byte_level.to_str_tokens(ids)
    assert "".join(pieces) == "When John gave, café"
    assert not any("Ġ" in p for p in pieces)
    # Independent: the backend's own decoder on each single token (all ASCII pieces here but é's)
    for i, p in zip(ids, pieces):
        if "\ufffd" not in p:
            assert p == byte_level.backend.decode([i])
    assert byte_level.to_str_tokens("When John") == pieces[:len(byte_level.encode("When John"))]
    eos = byte_level.eos_token_ids[0]
    assert byte_level.to_str_tokens([eos]) == ["<|endoftext|>"]


def test_str_tokens_are_readable_sentencepiece(sentencepiece):
    assert sentencepiece.to_str_tokens([11, 2, 9, 6, 3]) == [" John", "\n", " J", "o", "\ufffd"]
    assert sentencepiece.to_str_tokens(jnp.asarray([[11], [9]])) == [" John", " J"]
    with pytest.raises(ValueError, match=r"token id 99 outside .* \[0, 14\)"):
        sentencepiece.to_str_tokens([99])


def test_token_id_one_token_or_a_clear_error(byte_level):
    john = byte_level.encode(" John")
    assert len(john) == 1 and byte_level.token_id(" John") == john[0]
    assert byte_level.token_id(7) == 7
    with pytest.raises(ValueError, match=r"' Johnathan' is \d tokens .*not one"):
        byte_level.token_id(" Johnathan")
    ids = byte_level.token_ids([[" John", " Mary"], [" Paris", 3]])
    assert ids.dtype == jnp.int32 and ids.shape == (2, 2)
    assert ids.tolist() == [[john[0], byte_level.encode(" Mary")[0]], [byte_level.encode(" Paris")[0], 3]]


def test_to_tokens_and_to_batch(byte_level):
    t = byte_level.to_tokens("John gave")
    assert t.dtype == jnp.int32 and t.tolist() == byte_level.encode("John gave")
    texts = ["John", "The Eiffel Tower is in Paris", "Rome is"]
    rows = [byte_level.encode(x) for x in texts]
    for side in ("right", "left"):
        b = byte_level.to_batch(texts, side=side)
        assert b.tokens.dtype == jnp.int32 and b.tokens.shape == (3, max(map(len, rows)))
        assert b.lengths.tolist() == [len(r) for r in rows]
        for row, toks, mask in zip(rows, np.asarray(b.tokens), np.asarray(b.mask)):
            assert toks[mask].tolist() == row  # the real tokens, in order
            assert (toks[~mask] == byte_level.eos_token_ids[0]).all()  # no pad id: the EOS
            assert mask[0 if side == "right" else -1]
    with pytest.raises(TypeError, match="list of strings"):
        byte_level.to_batch("John")
    with pytest.raises(ValueError, match="no tokens"):
        byte_level.to_tokens("")
