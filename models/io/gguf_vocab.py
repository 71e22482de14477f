"""Tokenizer backends rebuilt from a GGUF's vocabulary metadata, as transformers' GGUF loader
builds them (`integrations/gguf/gguf_tokenizer_mapping.py`): byte-level BPE for "gpt2"
vocabularies (SmolLM2), SentencePiece-style BPE with byte fallback for Gemma 3's "llama"
vocabulary (its merges recovered from the vocabulary in file order), special and added
tokens, the BOS post-processor, and the on-disk cache of built tokenizers.  Used by
`models.io.tokenizer.Tokenizer.from_gguf`.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map for byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of `bytes_to_unicode`: printable character -> byte."""
    return {c: b for b, c in bytes_to_unicode().items()}


CACHE_VERSION = 1  # bump when the builders change, to invalidate cached tokenizers


def cached_tokenizer_path(path: Path) -> Path | None:
    """Where the tokenizer built from the GGUF at `path` is cached (keyed by its name, size,
    mtime and CACHE_VERSION); None when the file cannot be read."""
    from ..runtime.paths import cache_dir

    try:
        st = path.stat()
    except OSError:
        return None
    key = f"{path.name}-{st.st_size}-{st.st_mtime_ns}-v{CACHE_VERSION}.tokenizer.json"
    return cache_dir() / "tokenizers" / key


def byte_level_bpe(tokens: list[str], merges: list[str]) -> _HFTokenizer:
    """transformers' `byte_level_tokenizer` + `GPT2Tokenizer`: byte-level BPE, no normaliser."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    bpe = models.BPE(
        vocab=vocab,
        merges=[tuple(m.split(" ")) for m in merges],
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    backend = _HFTokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def gemma_merges(tokens: list[str]) -> list[tuple[str, str]]:
    """Merges implied by a vocabulary, best first (transformers' `generate_merges`).

    Gemma's scores do not follow its merge order; the order tokens appear in the file
    does, so each token's "score" is minus its index.  Every split of a token into two
    vocabulary pieces is a merge; within one token, longer left pieces come first.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = {t: -i for i, t in enumerate(tokens)}
    merges = []
    for merge, score in scores.items():
        local = [
            (merge[:k], merge[k:], score)
            for k in range(1, len(merge))
            if merge[:k] in vocab and merge[k:] in vocab
        ]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def gemma_bpe(tokens: list[str]) -> _HFTokenizer:
    """transformers' `gemma_tokenizer` + `GemmaTokenizer`: SentencePiece-style BPE."""
    # Whitespace-only tokens of 2+ spaces are stored with real spaces; the normaliser
    # turns spaces into U+2581, so respell them to match.
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(
        vocab=vocab, merges=gemma_merges(tokens), fuse_unk=True, unk_token="<unk>", dropout=None,
        byte_fallback=True,
    )
    backend = _HFTokenizer(bpe)
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend


def add_gguf_special_tokens(backend: _HFTokenizer, tokens: list[str], types: list[int], byte_level: bool) -> None:
    """Control tokens -> special added tokens; user-defined -> plain added tokens.

    In a byte-level vocabulary a "control" token spelled outside the byte alphabet is a
    llama.cpp mislabel (adding it would grow the vocabulary), so it is skipped, as
    transformers does.
    """
    spelled = set(bytes_to_unicode().values()) if byte_level else None
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types)
        if ty == CONTROL and (spelled is None or set(t) <= spelled)
    ]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens(user)


def set_post_processor(backend: _HFTokenizer, bos: str | None, bos_id: int | None, add_bos: bool) -> None:
    if add_bos and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    else:
        backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
