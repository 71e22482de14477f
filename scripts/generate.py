"""Load a model (the embedded default unless --model) and generate replies to prompts.

    python scripts/generate.py                       # SmolLM2-135M-Instruct, chat prompts
    python scripts/generate.py --model gemma3-270m --raw --prompt "The capital of France is"
"""

from __future__ import annotations

import argparse
import sys
import time

import lens.models.runtime.xla_guard  # noqa: F401  first: no miscompiling XLA:CPU fusions (see the module)

from lens import models  # noqa: E402
from lens.cli import int_at_least, nonnegative_float, probability  # noqa: E402
from lens.models.generation.generate import GenerationConfig, chat_prompt, generate  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402

compile_cache.enable()  # JAX's persistent compilation cache (models.runtime.compile_cache)

DEFAULT_PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "What is the capital of France?",
    "Give me three tips for staying focused.",
]


def parse_args(argv=None):
    """The command line, every value checked before the model is loaded."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompt", action="append", help="repeatable; default: three chat prompts")
    p.add_argument("--raw", action="store_true", help="no chat template (for base models)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=48)
    p.add_argument("--temperature", type=nonnegative_float, default=0.0)
    p.add_argument("--top-p", type=probability, default=None)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    args = p.parse_args(argv)
    if args.prompt is not None and any(not t.strip() for t in args.prompt):
        p.error("argument --prompt: an empty prompt")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)

    t0 = time.perf_counter()
    model, tok = models.load(args.model)
    print(f"loaded {args.model} ({model.config.architecture}, {model.config.n_layers} layers) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    texts = args.prompt or DEFAULT_PROMPTS
    prompts = [tok.encode(t) if args.raw else chat_prompt(tok, t) for t in texts]
    t0 = time.perf_counter()
    out = generate(model, prompts, GenerationConfig(args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                                    seed=args.seed, eos_token_ids=tok.eos_token_ids,
                                                    pad_token_id=tok.pad_token_id))
    dt = time.perf_counter() - t0
    n_new = sum(len(t) for t in out.tokens)
    for text, new in zip(texts, out.tokens):
        print(f"\n### {text}\n{tok.decode(new, skip_special_tokens=True).strip()}")
    print(f"\n{n_new} new tokens in {dt:.1f} s (including compilation)", file=sys.stderr)


if __name__ == "__main__":
    main()
