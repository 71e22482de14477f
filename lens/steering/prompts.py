"""The prompt sets of the "write code" steering experiments (scripts/orthogonal_steering.py,
scripts/modularity.py, scripts/orthogonal_readings.py) and how a model turns them into ids.

    from lens.steering import prompts
    model, tok, make = prompts.load_model("smollm2-135m-instruct")
    code = [make(p) for p in prompts.CODE]

CODE and PROSE are the contrastive requests of the CAA "write code" vector; NEUTRAL are
instructions that do NOT ask for code but where code is a natural way to answer (the
vector should tip them into Python): the first is MELBO-ortho's training prompt, all of
them the analysis / generation set; BEHAVIOUR (8) is NEUTRAL plus four more, the prompts
every found vector's "writes code" is decided on.
"""

from __future__ import annotations

import zlib
from typing import Callable

import numpy as np

CODE = [
    "Write a Python function that reverses a string.",
    "Write a Python function to check whether a number is prime.",
    "Write Python code that reads a CSV file and prints the first row.",
    "Implement binary search in Python.",
    "Write a Python script that counts the words in a text.",
    "Write a Python class for a simple stack.",
    "Write a Python function that returns the factorial of n.",
    "Write Python code to sort a list of dictionaries by a key.",
]
PROSE = [
    "Write a short poem about the sea.",
    "Write a paragraph about why people enjoy autumn.",
    "Write a short story about a lost dog finding its way home.",
    "Describe the city of Paris in a few sentences.",
    "Write a letter thanking a friend for a birthday gift.",
    "Explain why the sky is blue in simple words.",
    "Write a few sentences about your favourite holiday.",
    "Describe a sunrise over the mountains.",
]
NEUTRAL = [
    "Sort these numbers from smallest to largest: 5, 2, 9, 1.",
    "How many vowels are in the word banana?",
    "What is the sum of the numbers from 1 to 10?",
    "Convert 100 degrees Fahrenheit to Celsius.",
]
# The behaviour set: non-coding instructions each vector's "does it write code?" is scored
# on (NEUTRAL first, then four more of the same kind: code is a natural but unasked answer).
BEHAVIOUR = NEUTRAL + [
    "List the even numbers between 1 and 20.",
    "What is 15 percent of 80?",
    "Count how many times the letter s appears in the word mississippi.",
    "Which is larger, 2 to the power 10 or 10 to the power 3?",
]

PromptMaker = Callable[[str], list[int]]


def random_prompt_maker(vocab: int) -> PromptMaker:
    """Text -> 8 to 20 random ids below `vocab`, seeded by the text's crc32: deterministic
    prompts for a model without a tokenizer (a bare HF folder, random weights)."""
    if vocab < 1:
        raise ValueError(f"vocab must be >= 1; got {vocab}")

    def make(text: str) -> list[int]:
        rs = np.random.RandomState(zlib.crc32(text.encode()))
        return [int(i) for i in rs.randint(0, vocab, 8 + zlib.crc32(text.encode()) % 13)]
    return make


def prompt_maker(tok) -> PromptMaker:
    """Text -> ids: the chat template's user turn, or the plain text for a tokenizer
    without a chat template (a base model)."""
    from lens.models.generation.generate import chat_prompt

    if getattr(tok, "chat_template", None) is None:
        return lambda text: tok.encode(text)
    return lambda text: chat_prompt(tok, text)


def load_model(name: str, random_weights: bool = False):
    """(model, tokenizer or None, prompt maker) for an embedded name, HF folder or GGUF;
    `random_weights`: a SmolLM2-shaped random model (key 0) with random prompts (a
    pipeline check).  Without a tokenizer the prompts are `random_prompt_maker`'s."""
    import jax

    from lens import models

    if random_weights:
        from lens.models.families.llama import config_from_hf
        from lens.models.io.embedded import SMOLLM2_135M_HF_CONFIG

        model = models.init(config_from_hf(SMOLLM2_135M_HF_CONFIG), jax.random.key(0))
        return model, None, random_prompt_maker(model.config.vocab_size)
    model, tok = models.load(name)
    if tok is None:
        return model, None, random_prompt_maker(model.config.vocab_size)
    if getattr(tok, "chat_template", None) is None:
        print(f"{name}: no chat template, prompts are plain text")
    return model, tok, prompt_maker(tok)


def decoder(tok) -> Callable[[list[int]], str]:
    """Token ids -> text: the tokenizer's, or the ids themselves without one."""
    return (lambda ids: tok.decode(ids)) if tok is not None else (lambda ids: " ".join(map(str, ids)))
