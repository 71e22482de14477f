"""Tiny BPE tokenizers for tests: byte-level (GPT-2 / SmolLM2 style, trained here on two
sentences) and SentencePiece-style (Gemma style, a hand-written 14-token vocabulary that fits
the tiny models' vocab of 61)."""

from __future__ import annotations

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lens.models.io.tokenizer import Tokenizer

CORPUS = ["When John and Mary went to the store, John gave a drink to Mary.",
          "The Eiffel Tower is in Paris. Rome is in Italy. café naïve"] * 20


def byte_level_tokenizer() -> Tokenizer:
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"], show_progress=False))
    eos = backend.token_to_id("<|endoftext|>")
    return Tokenizer(backend, bos_token_id=None, eos_token_ids=(eos,), pad_token_id=None)


def sentencepiece_tokenizer() -> Tokenizer:
    vocab = {"<pad>": 0, "<eos>": 1, "<0x0A>": 2, "<0xC3>": 3, "\u2581": 4, "J": 5, "o": 6, "h": 7,
             "n": 8, "\u2581J": 9, "\u2581Jo": 10, "\u2581John": 11, "Jo": 12, "hn": 13}
    merges = [("\u2581", "J"), ("\u2581J", "o"), ("h", "n"), ("\u2581Jo", "hn"), ("J", "o")]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    return Tokenizer(backend, bos_token_id=None, eos_token_ids=(1,), pad_token_id=0)
