"""A small byte-level BPE tokenizer trained on the TRAIN split of `lens.training.data` corpora.

    tok = lens.training.bpe.corpus_tokenizer(("shakespeare", "python-docs", "python-code"), 4096)
    rows = lens.training.data.load_tokens("shakespeare", tok, 129, "train")
    models.save(model, folder, tokenizer=tok)     # tokenizer.json that transformers reads

Why: a next-token step costs about 6 * tokens * (12 L d^2 + V d) FLOPs, and with SmolLM2's
V = 49,152 at d = 256 the unembedding (V d = 12.6 M) is four times the 4 blocks (3.1 M):
a CPU run spends ~80% of its time on logits.  At V = 4,096 the unembedding is 1.0 M, a
step is ~3.75x cheaper, and the embedding rows each get ~12x more gradient per token.

GPT-2's recipe: byte-level pre-tokenisation with GPT-2's split regex (no unknown bytes,
any text encodes), all 256 byte symbols in the initial alphabet, merges learned by the
`tokenizers` BpeTrainer, one special token `<|endoftext|>` (id 0) that is BOS, EOS and the
document separator (`add_bos_token` False, as GPT-2).  The validation and test documents
never reach the trainer.  Training is deterministic (same corpora + size -> the same
merges); the result is cached as JSON under $LENS_CACHE_DIR/tokenizers, keyed by the
corpora, the size, the Python version for the stdlib corpora, and FORMAT_VERSION.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, pre_tokenizers, trainers
from tokenizers import models as tok_models

from lens.training import data
from lens.models.runtime.paths import cache_dir
from lens.models.io.tokenizer import Tokenizer

EOT = "<|endoftext|>"
FORMAT_VERSION = 1  # bump when the recipe changes, to invalidate cached tokenizers


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of `vocab_size` ids (EOT + 256 bytes + merges) trained on `texts`."""
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (EOT + 256 bytes + 1 merge), got {vocab_size}")
    backend = _HFTokenizer(tok_models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return _wrap(backend)


def _wrap(backend: _HFTokenizer) -> Tokenizer:
    eot = backend.token_to_id(EOT)
    return Tokenizer(backend, bos_token_id=eot, eos_token_ids=(eot,), pad_token_id=None, add_bos_token=False,
                     special_tokens={"bos_token": EOT, "eos_token": EOT, "unk_token": EOT})


def train_texts(corpora: tuple[str, ...]) -> list[str]:
    """The train-split documents of each corpus, in corpus order then split order."""
    out = []
    for name in corpora:
        data._check_name(name)
        docs = data.CORPORA[name]()
        out += [docs[n] for n in data.split_documents(list(docs))["train"]]
    return out


def _cache_path(corpora: tuple[str, ...], vocab_size: int) -> Path:
    py = "-py%d.%d.%d" % sys.version_info[:3] if any(c.startswith("python") for c in corpora) else ""
    return cache_dir() / "tokenizers" / f"bpe-{'+'.join(corpora)}{py}-V{vocab_size}-v{FORMAT_VERSION}.json"


def corpus_tokenizer(corpora: tuple[str, ...], vocab_size: int = 4096) -> Tokenizer:
    """The BPE trained on the train split of `corpora` (cached; trained on first use)."""
    corpora = tuple(corpora)
    for name in corpora:
        data._check_name(name)
    path = _cache_path(corpora, vocab_size)
    if path.exists():
        return _wrap(_HFTokenizer.from_str(json.loads(path.read_text())["backend"]))
    tok = train_bpe(train_texts(corpora), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".json", delete=False) as f:
        json.dump({"corpora": list(corpora), "vocab_size": vocab_size, "backend": tok.backend.to_str()}, f)
    os.replace(f.name, path)
    return tok
