"""Tokenizers built with the `tokenizers` library, from a GGUF or an HF folder.

    tok = Tokenizer.from_gguf("model.gguf")
    ids = tok.encode("Hello")                              # no BOS unless asked
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.chat_tokens([{"role": "user", "content": "Hi"}])
    text = tok.decode(ids, skip_special_tokens=True)

A GGUF carries no tokenizer.json, only llama.cpp's vocabulary metadata.  `from_gguf`
rebuilds exactly what transformers' GGUF loader builds (`integrations/gguf/
gguf_tokenizer_mapping.py`), and tests/models/test_tokenizer.py checks the two encode alike:

  * "gpt2" vocabularies (SmolLM2): byte-level BPE from the file's tokens and merges;
  * "llama" vocabularies of Gemma 3: SentencePiece-style BPE with byte fallback, whose
    merges (absent from the file) are recovered from the vocabulary in file order.

Tokens the file marks as control become special added tokens (matched whole, dropped by
`skip_special_tokens`); user-defined ones become plain added tokens.  Chat templates are
rendered in a sandboxed jinja2 environment set up like transformers'.  The GGUF builders
live in models/io/gguf_vocab.py, the template environment in models/io/chat_template.py.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from tokenizers import Tokenizer as _HFTokenizer

from .chat_template import compile_chat_template
from .gguf_vocab import (
    BYTE_PIECE,
    add_gguf_special_tokens,
    byte_level_bpe,
    cached_tokenizer_path,
    gemma_bpe,
    set_post_processor,
    unicode_to_bytes,
)


class TokenBatch(NamedTuple):
    """A padded batch of texts (`Tokenizer.to_batch`)."""

    tokens: Int[Array, "B T"]
    mask: Bool[Array, "B T"]  # True on real tokens
    lengths: Int[Array, " B"]  # real tokens per row


class Tokenizer:
    """A `tokenizers.Tokenizer` plus special ids and a chat template.

    Strings in and out: `to_tokens(text)` (int32 [seq]), `to_batch(texts)` (padded tokens,
    mask, lengths), `to_str_tokens(ids)` (readable labels), `token_id(" Paris")` (one token).
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: tuple[int, ...],
        pad_token_id: int | None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
        special_tokens: dict[str, str] | None = None,
    ):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        # {"bos_token": "<s>", ...}: handed to chat templates, as transformers does.
        self.special_tokens = dict(special_tokens or {})

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
            f"eos={self.eos_token_ids}, pad={self.pad_token_id}, chat_template={self.chat_template is not None})"
        )

    # ------------------------------------------------------------------ encode/decode
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; add_special_tokens=True prepends BOS where the model wants it."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    # ------------------------------------------------------------ strings in and out
    def to_tokens(self, text: str, add_special_tokens: bool = False) -> Int[Array, " seq"]:
        """`text` as the int32 [seq] array a model takes (no BOS unless add_special_tokens)."""
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        if not ids:
            raise ValueError(f"{text!r} encodes to no tokens; a model needs at least one")
        return jnp.asarray(ids, jnp.int32)

    def to_batch(
        self, texts: Sequence[str], side: str = "right", add_special_tokens: bool = False,
        length: int | None = None,
    ) -> TokenBatch:
        """Texts as one padded batch: `TokenBatch(tokens [B, T] int32, mask [B, T] bool,
        lengths [B] int32)`, padded on `side` (right for the readers, left for generation) with
        the pad id (else the first EOS, else 0; the mask keeps the forward off it).

            batch = tok.to_batch(["The cat", "A much longer prompt"])
            logits = jax.vmap(lambda t, m: model(t, attention_mask=m))(batch.tokens, batch.mask)
            last = logits[jnp.arange(2), batch.lengths - 1]      # right padding
        """
        from ..core.transformer import pad_batch

        if isinstance(texts, str):
            raise TypeError("to_batch takes a list of strings; use to_tokens for one text")
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        empty = [i for i, r in enumerate(rows) if not r]
        if empty:
            raise ValueError(f"texts {empty} encode to no tokens")
        pad = next((p for p in (self.pad_token_id, *self.eos_token_ids) if p is not None), 0)
        tokens, mask = pad_batch(rows, pad, side, length)
        return TokenBatch(jnp.asarray(tokens), jnp.asarray(mask),
                          jnp.asarray([len(r) for r in rows], jnp.int32))

    def to_str_tokens(self, tokens) -> list[str]:
        """Each token as readable text, for labels of plots and tables: `" John"` rather than
        `"ĠJohn"` (byte-level BPE) or `"▁John"` (SentencePiece); a multi-byte character split
        over tokens shows as U+FFFD in each piece.  `tokens`: a text (encoded first, no BOS)
        or ids (list or array)."""
        if isinstance(tokens, str):
            tokens = self.encode(tokens)
        ids = [int(i) for i in np.asarray(tokens).reshape(-1)]
        return [self._readable(i) for i in ids]

    def token_id(self, token: str | int) -> int:
        """The id of `token`, a string that is exactly one token (" Paris" with its leading
        space) or already an id; ValueError naming the pieces otherwise."""
        if isinstance(token, (int, np.integer)):
            return int(token)
        if not isinstance(token, str):
            raise TypeError(f"a token is a str or an int id; got {type(token).__name__}")
        ids = self.encode(token)
        if len(ids) != 1:
            raise ValueError(
                f"{token!r} is {len(ids)} tokens for this tokenizer "
                f"({self.to_str_tokens(ids)}), not one; pick a one-token string (mind the "
                "leading space: ' Paris' and 'Paris' are different tokens)")
        return ids[0]

    def token_ids(self, tokens) -> Int[Array, "*n"]:
        """`token_id` over a string, an int, or a (nested) list of them: int32 array."""
        if isinstance(tokens, (str, int, np.integer)):
            return jnp.asarray(self.token_id(tokens), jnp.int32)
        return jnp.asarray(np.vectorize(self.token_id, otypes=[np.int64])(np.asarray(tokens, object)), jnp.int32)

    def _readable(self, i: int) -> str:
        piece = self.backend.id_to_token(i)
        if piece is None:
            raise ValueError(f"token id {i} outside this tokenizer's vocabulary [0, {self.vocab_size})")
        if i in self._added_ids:
            return piece
        if self._byte_level:
            inverse = unicode_to_bytes()
            if all(c in inverse for c in piece):
                return bytes(inverse[c] for c in piece).decode("utf-8", errors="replace")
            return piece
        byte = BYTE_PIECE.fullmatch(piece)
        if byte:  # SentencePiece byte fallback: <0x0A> is "\n"; a lone high byte stays unreadable
            value = int(byte.group(1), 16)
            return chr(value) if value < 0x80 else "\ufffd"
        return piece.replace("\u2581", " ")

    @cached_property
    def _byte_level(self) -> bool:
        decoder = json.loads(self.backend.to_str()).get("decoder") or {}
        parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
        return any(d.get("type") == "ByteLevel" for d in parts)

    @cached_property
    def _added_ids(self) -> frozenset[int]:
        return frozenset(self.backend.get_added_tokens_decoder())

    # ---------------------------------------------------------------------- chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt string for `messages` ([{"role": ..., "content": ...}, ...])."""
        if self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template (a base model?); format the prompt yourself"
            )
        template = compile_chat_template(self.chat_template)
        context = {**self.special_tokens, **kwargs}
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)

    def chat_tokens(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat prompt (the template writes any BOS itself)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    # ------------------------------------------------------------------ builders
    def to_dict(self) -> dict:
        return {
            "backend": self.backend.to_str(), "bos_token_id": self.bos_token_id,
            "eos_token_ids": list(self.eos_token_ids), "pad_token_id": self.pad_token_id,
            "chat_template": self.chat_template, "add_bos_token": self.add_bos_token,
            "special_tokens": self.special_tokens,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Tokenizer":
        d = dict(d)
        backend = _HFTokenizer.from_str(d.pop("backend"))
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(backend, **d)

    @classmethod
    def from_gguf(cls, path: str | Path, use_cache: bool = True) -> "Tokenizer":
        """Rebuild the tokenizer a GGUF describes (its `tokenizer.ggml.*` metadata).

        Recovering Gemma's 500k merges takes seconds, so the result is cached as JSON in
        the lens cache dir (see models/io/embedded.py), keyed by file name, size and mtime.
        """
        cache = cached_tokenizer_path(Path(path)) if use_cache else None
        if cache is not None and cache.exists():
            try:
                return cls.from_dict(json.loads(cache.read_text()))
            except Exception:  # noqa: BLE001 -- a stale or corrupt cache is simply rebuilt
                pass
        tok = cls._build_from_gguf(path)
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(tok.to_dict()))
                os.replace(tmp, cache)
            except OSError:
                pass  # an unwritable cache only costs time
        return tok

    @classmethod
    def _build_from_gguf(cls, path: str | Path) -> "Tokenizer":
        from .gguf_reader import read_metadata

        meta = read_metadata(path)
        kind = meta.get("tokenizer.ggml.model")
        arch = meta.get("general.architecture")
        tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
        if not tokens:
            raise ValueError(f"{Path(path).name}: the GGUF has no tokenizer vocabulary")
        types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [1] * len(tokens))]
        if kind == "gpt2":
            backend = byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges") or [])
            add_bos_default = False
        elif kind == "llama" and arch in ("gemma", "gemma2", "gemma3"):
            backend = gemma_bpe(tokens)
            add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
        else:
            raise NotImplementedError(
                f"{Path(path).name}: building a tokenizer for GGUF tokenizer model {kind!r} "
                f"(architecture {arch!r}) is not implemented; supported: 'gpt2' (byte-level BPE) "
                "and gemma's 'llama' (SentencePiece BPE)"
            )
        add_gguf_special_tokens(backend, tokens, types, byte_level=kind == "gpt2")

        def tok(key: str) -> int | None:
            v = meta.get(f"tokenizer.ggml.{key}")
            return None if v is None else int(v)

        bos, eos, pad, unk = tok("bos_token_id"), tok("eos_token_id"), tok("padding_token_id"), tok("unknown_token_id")
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
        set_post_processor(backend, tokens[bos] if bos is not None else None, bos, add_bos)
        names = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=() if eos is None else (eos,),
            pad_token_id=pad,
            chat_template=meta.get("tokenizer.chat_template"),
            add_bos_token=add_bos,
            special_tokens={k: tokens[v] for k, v in names.items() if v is not None},
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer | None":
        """From an HF folder's tokenizer.json (+ tokenizer_config.json); None if absent."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").exists():
            return None
        backend = _HFTokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        special = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = cfg.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value is not None:
                special[key] = value
        ids = {k: backend.token_to_id(v) for k, v in special.items()}
        return cls(
            backend,
            bos_token_id=ids.get("bos_token"),
            eos_token_ids=() if ids.get("eos_token") is None else (ids["eos_token"],),
            pad_token_id=ids.get("pad_token"),
            chat_template=template,
            add_bos_token=bool(cfg.get("add_bos_token", False)),
            special_tokens=special,
        )
