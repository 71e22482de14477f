"""Build a steering vector from contrastive prompts and show steered generations.

    .venv/bin/python scripts/steer.py                       # default model and prompts
    .venv/bin/python scripts/steer.py --coeffs 0 4 8 --layer 12 --out runs/love

Thin: parse arguments -> lens.steering.vectors (CAA mean difference, or ActAdd) -> lens sweep of
the coefficients (KL to the unsteered run) -> every coefficient's generations in one call (`lens.steering.vectors.generate_with_vectors`,
coeff x vector added to the prompt and every generated token; with --no-steer-prompt /
--no-steer-generated, models.generation.generate per coefficient) -> a side by
side listing, also written to --out DIR (generations.json, vector.safetensors).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

import numpy as np  # noqa: E402

import lens  # noqa: E402
from lens.cli import finite_float, int_at_least, nonnegative_float  # noqa: E402
from lens import models  # noqa: E402
from lens.core import edits as E  # noqa: E402
from lens.steering import vectors
from lens.models.generation.generate import GenerationConfig, chat_prompt, generate  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)

POSITIVE = ["I love you", "You are wonderful", "What a beautiful day", "I adore this"]
NEGATIVE = ["I hate you", "You are terrible", "What an awful day", "I despise this"]
PROMPTS = ["Tell me about your neighbour.", "Write one sentence about the weather."]


def encode_padded(tokenizer, texts):
    """Right-padded [N, seq] ids and mask (`lens.pad_prompts`) from texts (or lists of ids)."""
    return lens.pad_prompts([tokenizer.encode(t) if isinstance(t, str) else list(t) for t in texts])


def parse_args(argv=None):
    """The command line, every value checked before the model is loaded (--layer against
    the model's depth once it is)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--positive", nargs="+", default=POSITIVE)
    p.add_argument("--negative", nargs="+", default=NEGATIVE)
    p.add_argument("--prompts", nargs="+", default=PROMPTS)
    p.add_argument("--layer", type=int_at_least(0), default=None, help="default: the middle layer")
    p.add_argument("--method", choices=["caa", "actadd"], default="caa")
    p.add_argument("--reduce", choices=["last", "mean"], default="mean")
    p.add_argument("--coeffs", type=finite_float, nargs="+", default=[0.0, 1.0, 2.0])
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=40)
    p.add_argument("--temperature", type=nonnegative_float, default=0.0)
    p.add_argument("--no-steer-prompt", action="store_true")
    p.add_argument("--no-steer-generated", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    for flag in ("positive", "negative", "prompts"):
        if any(not t.strip() for t in getattr(args, flag)):
            p.error(f"argument --{flag}: an empty text")
    if args.method == "caa" and len(args.positive) != len(args.negative):
        p.error(f"--method caa pairs the texts: {len(args.positive)} --positive vs {len(args.negative)} --negative")
    return args


def main(argv=None):
    args = parse_args(argv)
    model, tok = models.load(args.model)
    layer = model.config.n_layers // 2 if args.layer is None else args.layer
    if layer > model.config.n_layers:
        raise SystemExit(f"--layer {layer}: {args.model} has layers 0..{model.config.n_layers} "
                         "(layer l = the residual entering block l)")
    pos, pos_mask = encode_padded(tok, args.positive)
    neg, neg_mask = encode_padded(tok, args.negative)
    if args.method == "caa":
        vector = vectors.mean_difference(model, pos, neg, layer, pos_mask, neg_mask, args.reduce)
    else:
        vector = vectors.actadd(model, pos[0][pos_mask[0]], neg[0][neg_mask[0]], layer)
    print(f"{args.method} vector at layer {layer}: norm {float(np.linalg.norm(vector)):.2f}")

    chats = [chat_prompt(tok, text) for text in args.prompts]
    ptoks, pmask = encode_padded(tok, chats)
    res = lens.sweep_vectors(model, ptoks, np.asarray(vector)[None], coeffs=args.coeffs, layers=[layer],
                             attention_mask=pmask, config=lens.SweepConfig(progress=False))
    rows = []
    if args.no_steer_prompt or args.no_steer_generated:
        # steering only part of the sequence: one generate per coefficient
        outs = [generate(model, chats, GenerationConfig(args.max_new_tokens, temperature=args.temperature),
                         edits=E.add(model, vector, layer, coeff), steer_prompt=not args.no_steer_prompt,
                         steer_generated=not args.no_steer_generated).tokens for coeff in args.coeffs]
    else:
        # every coefficient at once: coeff * vector as K vectors, one compiled decode
        vecs = np.asarray(args.coeffs, np.float32)[:, None] * np.asarray(vector, np.float32)[None]
        out = vectors.generate_with_vectors(model, chats, vecs, layer,
                                             GenerationConfig(args.max_new_tokens, temperature=args.temperature),
                                             progress=True)
        outs = vectors.new_token_lists(out, model.config.eos_token_ids)
    for ci, coeff in enumerate(args.coeffs):
        kl = np.asarray(res.kl[0, ci, 0])
        for i, text in enumerate(args.prompts):
            rows.append({"prompt": text, "coeff": coeff, "kl_last_token": float(kl[i]),
                         "generation": tok.decode(outs[ci][i], skip_special_tokens=True)})
    for text in args.prompts:
        print(f"\n=== {text}")
        for r in rows:
            if r["prompt"] == text:
                print(f"  coeff {r['coeff']:>5}: (KL {r['kl_last_token']:.3f}) {r['generation']!r}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "generations.json").write_text(json.dumps(rows, indent=1))
        vectors.save_vectors(args.out / "vector.safetensors", vector, {
            "model": args.model, "layer": layer, "site": "resid_pre", "method": args.method,
            "positive": args.positive, "negative": args.negative})
        print(f"\nwrote {args.out}/generations.json and vector.safetensors")


if __name__ == "__main__":
    main()
