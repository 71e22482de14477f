"""Models and data for the causal-scrubbing worked examples (`scripts/causal_scrubbing.py`,
`bench/scrubbing.py`): a 2-layer attention-only model trained here until it has induction
heads, and a balanced-parentheses classifier trained on a synthetic task.

Both train through the one loop (`lens.train.train`: checkpoints, exact resume, progress
bar) and are cached under `runs/`; a second call loads the saved model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

import models
from lens import data, train
from models.config import ModelConfig

TEXT = ("shakespeare", "python-docs", "python-code")


# ------------------------------------------------------------------ induction model
@dataclasses.dataclass(frozen=True)
class InductionSetup:
    """The attention-only model's size and training.  `repeat_frac` of the training rows
    are a natural-text segment followed by itself (r + r): induction heads form within a
    few hundred steps on such rows, where on natural text alone 1500 steps formed none."""

    d_model: int = 256
    n_heads: int = 8
    seq_len: int = 64
    steps: int = 1200
    batch_size: int = 16
    lr: float = 2e-3
    repeat_frac: float = 0.3
    seed: int = 0


def attn_only_config(s: InductionSetup, tokenizer) -> ModelConfig:
    """GPT-2-style 2-layer attention-only model (LayerNorm, learned positions, tied)."""
    return ModelConfig(
        architecture="gpt2", vocab_size=tokenizer.vocab_size, d_model=s.d_model, n_layers=2,
        n_heads=s.n_heads, n_kv_heads=s.n_heads, d_head=s.d_model // s.n_heads, d_mlp=0,
        max_seq_len=s.seq_len, norm_kind="layer", norm_eps=1e-5, activation="gelu_new",
        gated_mlp=False, positional="learned", attn_bias=True, attn_out_bias=True, mlp_bias=False,
        norm_bias=True, tie_embeddings=True, attn_only=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tuple(tokenizer.eos_token_ids), pad_token_id=tokenizer.pad_token_id)


def text_tokenizer():
    from lens.bpe import corpus_tokenizer

    return corpus_tokenizer(TEXT, 4096)


def text_rows(tokenizer, seq_len: int, split: str, seed: int = 0) -> Int[np.ndarray, "N seq"]:
    """Rows of seq_len + 1 tokens from the three corpora, shuffled together."""
    rows = np.concatenate([data.load_tokens(n, tokenizer, seq_len + 1, split) for n in TEXT])
    return rows[np.random.default_rng(seed).permutation(len(rows))]


def with_repeats(rows: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """A copy of `rows` in which a fraction `frac` (chosen by `seed`) becomes r + r + ...:
    the row's first half repeated to the row's length."""
    rows = rows.copy()
    n, width = rows.shape
    half = width // 2
    chosen = np.random.default_rng(seed).random(n) < frac
    rep = np.concatenate([rows[chosen, :half]] * (width // half + 1), axis=1)[:, :width]
    rows[chosen] = rep
    return rows


def induction_model(out_dir: str | Path, setup: InductionSetup = InductionSetup(),
                    progress: bool = True):
    """(model, tokenizer): loaded from out_dir/model when it exists, else trained (resuming
    from out_dir/checkpoint.safetensors when present) and saved there."""
    out_dir = Path(out_dir)
    tok = text_tokenizer()
    if (out_dir / "model").exists():
        return models.load(out_dir / "model"), tok
    cfg = attn_only_config(setup, tok)
    train_rows = with_repeats(text_rows(tok, setup.seq_len, "train", setup.seed), setup.repeat_frac,
                              setup.seed)
    val_rows = text_rows(tok, setup.seq_len, "validation", setup.seed)
    tcfg = train.TrainConfig(steps=setup.steps, batch_size=setup.batch_size, lr=setup.lr,
                             warmup_steps=50, eval_every=100, eval_batches=8, checkpoint_every=100,
                             seed=setup.seed)
    model = models.init(cfg, jax.random.key(setup.seed))
    result = train.train(model, train_rows, val_rows, tcfg, out_dir, progress=progress,
                         run_info={"setup": dataclasses.asdict(setup),
                                   "tokenizer": data.tokenizer_fingerprint(tok)})
    models.save(result.model, out_dir / "model", tokenizer=tok)
    (out_dir / "setup.json").write_text(json.dumps(dataclasses.asdict(setup)) + "\n")
    return result.model, tok
