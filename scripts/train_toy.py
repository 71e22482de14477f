"""Train a small model from scratch on real text (CPU-sized, deterministic by seed).

    .venv/bin/python scripts/train_toy.py --preset gpt2-small-ln --out runs/gpt2_ln
    .venv/bin/python scripts/train_toy.py --preset attn-only-2l --out runs/attn2 --steps 300
    .venv/bin/python scripts/train_toy.py --preset smoke --out /tmp/smoke

Presets (all GPT-2 architecture: LayerNorm with bias, learned positions, tied embeddings):
  gpt2-small-ln  4 layers, d 256, 4 heads, MLP 1024, context 128; shakespeare + python-docs
                 + python-code; 800 steps of 8 x 128 tokens; BPE-4096 tokenizer
  attn-only-2l   2 layers, d 256, 8 heads, no MLPs, context 128; the same text and
                 tokenizer; 500 steps; induction heads measured
  smoke          1 layer, d 32, context 32; shakespeare; a few steps (tests)
Tokenizers: "bpe4096" is `lens.training.bpe.corpus_tokenizer(corpora, 4096)`, a byte-level BPE
trained on the train split of the preset's corpora (the 49k-id unembedding of SmolLM2's
tokenizer was ~80% of a CPU step: see lens/training/bpe.py); "smollm2" is SmolLM2's (49,152 ids,
the embedded default model's).  Either's EOS separates documents; --tokenizer overrides.

Writes to --out: model/ (models.save: transformers-readable for the MLP presets, native
for attention-only; with the tokenizer), report.json, log.json, checkpoint.safetensors.
Running again with the same arguments resumes from the checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

import lens.models.runtime.xla_guard  # noqa: E402,F401  first: no miscompiling XLA:CPU fusions (see the module)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lens import models  # noqa: E402
from lens.training import data, train  # noqa: E402
from lens.cli import Preset, int_at_least  # noqa: E402
from lens.circuits.induction import measure_induction  # noqa: E402
from lens.models.core.config import ModelConfig  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)

TOKENIZER = "smollm2-135m-instruct"
SAMPLE_PROMPTS = ["ROMEO.\n", "def read_file(path):\n", "The module"]


# Preset fields: n_layers, d_model, n_heads, d_mlp, attn_only, seq_len (model context; rows
# hold seq_len + 1 tokens: inputs + shifted targets), corpora, train (a TrainConfig),
# measure_induction, tokenizer.
def preset(n_layers: int, d_model: int, n_heads: int, d_mlp: int, attn_only: bool, seq_len: int,
           corpora: tuple[str, ...], train_cfg: train.TrainConfig, measure_induction: bool = False,
           tokenizer: str = "bpe4096") -> Preset:
    """This script's preset fields (see above)."""
    return Preset(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_mlp=d_mlp, attn_only=attn_only,
                  seq_len=seq_len, corpora=corpora, train=train_cfg, measure_induction=measure_induction,
                  tokenizer=tokenizer)


# CPU-sized for a shared 2-core machine: ~15-20 min for gpt2-small-ln, ~5-8 for attn-only-2l.
_TRAIN = train.TrainConfig(steps=800, batch_size=8, lr=2e-3, warmup_steps=40, eval_every=100,
                           eval_batches=8, checkpoint_every=50)
_TEXT = ("shakespeare", "python-docs", "python-code")
PRESETS = {
    "gpt2-small-ln": preset(4, 256, 4, 1024, False, 128, _TEXT, _TRAIN),
    "attn-only-2l": preset(2, 256, 8, 0, True, 128, _TEXT, dataclasses.replace(_TRAIN, steps=500, lr=3e-3),
                           measure_induction=True),
    "smoke": preset(1, 32, 2, 64, False, 32, ("shakespeare",),
                    train.TrainConfig(steps=12, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=6,
                                      eval_batches=2, checkpoint_every=3), tokenizer="smollm2"),
}
TOKENIZERS = ("bpe4096", "smollm2")


def model_config(p: Preset, tokenizer) -> ModelConfig:
    return ModelConfig(
        architecture="gpt2", vocab_size=tokenizer.vocab_size, d_model=p.d_model, n_layers=p.n_layers,
        n_heads=p.n_heads, n_kv_heads=p.n_heads, d_head=p.d_model // p.n_heads, d_mlp=p.d_mlp,
        max_seq_len=p.seq_len, norm_kind="layer", norm_eps=1e-5, activation="gelu_new", gated_mlp=False,
        positional="learned", attn_bias=True, attn_out_bias=True, mlp_bias=not p.attn_only,
        norm_bias=True, tie_embeddings=True, attn_only=p.attn_only, bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tuple(tokenizer.eos_token_ids), pad_token_id=tokenizer.pad_token_id)


def load_tokenizer(name: str, corpora: tuple[str, ...]):
    if name == "bpe4096":
        from lens.training.bpe import corpus_tokenizer

        return corpus_tokenizer(corpora, 4096)
    from lens.models.io.embedded import fetch
    from lens.models.io.tokenizer import Tokenizer

    return Tokenizer.from_gguf(fetch(TOKENIZER))  # the tokenizer only, not the 135M weights


def rows_for(p: Preset, tokenizer, split: str) -> dict[str, np.ndarray]:
    return {name: data.load_tokens(name, tokenizer, p.seq_len + 1, split) for name in p.corpora}


def samples(model, tokenizer, n_tokens: int = 48) -> dict[str, str]:
    from lens.models.generation.generate import GenerationConfig, generate

    prompts = [tokenizer.encode(s) for s in SAMPLE_PROMPTS]
    n_tokens = min(n_tokens, model.config.max_seq_len - max(map(len, prompts)))
    out = generate(model, prompts, GenerationConfig(n_tokens, temperature=0.8, top_k=40, seed=0))
    return {s: tokenizer.decode(t) for s, t in zip(SAMPLE_PROMPTS, out.tokens)}


def parse_args(argv=None):
    """The command line, every value checked before any data or model is built."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int_at_least(1), default=None, help="override the preset's step count")
    ap.add_argument("--seed", type=int_at_least(0), default=0, help="init and data order")
    ap.add_argument("--checkpoint-every", type=int_at_least(1), default=None, help="override the preset's")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 master weights")
    ap.add_argument("--tokenizer", choices=TOKENIZERS, default=None, help="override the preset's")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None, on_checkpoint=None) -> dict:
    args = parse_args(argv)

    p = PRESETS[args.preset]
    tcfg = dataclasses.replace(p.train, seed=args.seed, bf16=args.bf16,
                               **({"steps": args.steps} if args.steps else {}),
                               **({"checkpoint_every": args.checkpoint_every} if args.checkpoint_every else {}))
    tok_name = args.tokenizer or p.tokenizer
    tok = load_tokenizer(tok_name, p.corpora)
    cfg = model_config(p, tok)
    train_rows = data.mixed_rows(sorted(p.corpora), tok, p.seq_len + 1, "train", seed=args.seed)
    val_parts = rows_for(p, tok, "validation")
    val_rows = data.mixed_rows(sorted(p.corpora), tok, p.seq_len + 1, "validation", seed=args.seed)
    model = models.init(cfg, jax.random.key(args.seed))
    start = time.perf_counter()
    result = train.train(model, train_rows, val_rows, tcfg, args.out,
                         train.TrainOptions(progress=not args.no_progress, on_checkpoint=on_checkpoint,
                                            run_info={"preset": args.preset, "seed": args.seed,
                                                      "tokenizer": data.tokenizer_fingerprint(tok)}))
    seconds = time.perf_counter() - start
    models.save(result.model, args.out / "model", tokenizer=tok)

    n_eval = 16 * tcfg.batch_size
    report = {
        "preset": args.preset, "seed": args.seed, "tokenizer": tok_name, "steps": tcfg.steps, "train_seconds_this_process": seconds,
        "config": dataclasses.asdict(cfg), "train": dataclasses.asdict(tcfg),
        "params": int(sum(x.size for x in jax.tree.leaves(result.model))),
        "train_tokens_seen": tcfg.steps * tcfg.batch_size * p.seq_len,
        "val_loss": train.evaluate(result.model, val_rows[:n_eval], tcfg.batch_size, tcfg.bf16),
        "val_loss_by_corpus": {k: train.evaluate(result.model, v[:n_eval], tcfg.batch_size, tcfg.bf16)
                               for k, v in val_parts.items()},
        "val_rows_evaluated": n_eval,
        "log": result.log,
        "samples": samples(result.model, tok),
        "model_folder": str(args.out / "model"),
    }
    if p.measure_induction:
        ind = measure_induction(result.model, jax.random.key(args.seed + 1), first_token=tok.eos_token_ids[0],
                                n=32, block_len=min(50, (p.seq_len - 1) // 2), low=256)
        report["induction"] = ind.to_json() | {
            "induction_heads": ind.heads_above("induction", 0.3),
            "previous_token_heads": ind.heads_above("previous_token", 0.3),
            "threshold": 0.3, "probe": "EOS + r + r, r = distinct random ids >= 256, 32 probes"}
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"val loss {report['val_loss']:.4f} ({report['val_loss_by_corpus']}); report at {args.out / 'report.json'}")
    return report


if __name__ == "__main__":
    main()
