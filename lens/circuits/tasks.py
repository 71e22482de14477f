"""Token-aligned clean / corrupted prompt pairs for patching: IOI and factual recall.

    pairs = tasks.ioi_pairs(tokenizer, n=120, seed=0)
    clean, corrupted, correct, wrong = tasks.stack_pairs([p for p in pairs if p.template == 0])
    perf = tasks.performance(model, pairs)          # clean / corrupted logit differences, accuracy

IOI (Wang et al. 2022): "When Mary and John went to the store, John gave a drink to" ->
" Mary" (the indirect object, IO) over " John" (the subject, S).  ABBA: IO first in the
opening pair; BABA: S first.  The corrupted prompt replaces the second subject mention (S2)
by the IO ("..., Mary gave a drink to"), so the right answer flips to S; the metric is
logit(IO) - logit(S) at the last token, on both.  Names, places and objects are checked to
be ONE token each (with their leading space), so every pair is token-aligned.

Factual recall: "The capital of France is" -> " Paris"; the corrupted prompt names another
country (one token too), whose capital is the wrong answer; metric logit(capital of the
clean country) - logit(capital of the corrupted one).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import equinox as eqx
import jax
import numpy as np

NAMES = ("Mary John Tom James Alice Bob Sarah David Michael Emma Anna Paul Peter Kate Lisa "
         "Mark Susan Jack Laura Daniel Rachel Chris Steve Linda Karen Kevin Brian Amy Jessica "
         "Andrew Ryan Eric Adam Grace Helen Frank George Henry Jane Lucy").split()
PLACES = "store park school office beach market restaurant library hospital station garden museum".split()
OBJECTS = "drink book ball letter gift key phone bag ring flower snack pen".split()
IOI_TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {obj} to",
    "After {A} and {B} went to the {place}, {S} gave a {obj} to",
    "Then, {A} and {B} had a long day at the {place}. {S} gave a {obj} to",
    "While {A} and {B} were working at the {place}, {S} handed a {obj} to",
)
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid",
    "Russia": "Moscow", "China": "Beijing", "England": "London", "Egypt": "Cairo",
    "Greece": "Athens", "Canada": "Ottawa", "Australia": "Canberra", "India": "Delhi",
    "Ireland": "Dublin", "Austria": "Vienna", "Poland": "Warsaw", "Portugal": "Lisbon",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Hungary": "Budapest",
    "Kenya": "Nairobi", "Peru": "Lima", "Cuba": "Havana", "Belgium": "Brussels",
    "Denmark": "Copenhagen", "Iran": "Tehran", "Iraq": "Baghdad", "Korea": "Seoul",
    "Syria": "Damascus", "Scotland": "Edinburgh", "Wales": "Cardiff",
    "Netherlands": "Amsterdam", "Switzerland": "Bern", "Philippines": "Manila",
    "Israel": "Jerusalem", "Chile": "Santiago",
}
FACT_TEMPLATES = (
    "The capital of {c} is",
    "The capital city of {c} is the city of",
    "Q: What is the capital of {c}? A: The capital is",
)


@dataclasses.dataclass(frozen=True)
class PromptPair:
    """One token-aligned pair: clean / corrupted ids, the metric's tokens, its template."""

    clean: tuple[int, ...]
    corrupted: tuple[int, ...]
    correct: int  # the clean prompt's answer
    wrong: int  # the metric's other token (IOI: the clean S; fact: the corrupted prompt's answer)
    template: int
    text: str  # the clean prompt
    kind: str  # "ABBA" / "BABA" / "fact"


def one_token(tokenizer, word: str) -> int:
    """The id of " word" (leading space); ValueError if it is not exactly one token."""
    ids = tokenizer.encode(" " + word)
    if len(ids) != 1:
        raise ValueError(f"{' ' + word!r} is {len(ids)} tokens {ids} for this tokenizer; the "
                         "pairs need one-token words to stay token-aligned")
    return ids[0]


def _aligned(tokenizer, clean: str, corrupted: str) -> tuple[list[int], list[int]]:
    a, b = tokenizer.encode(clean), tokenizer.encode(corrupted)
    if len(a) != len(b):
        raise ValueError(f"clean and corrupted prompts are not token-aligned ({len(a)} vs "
                         f"{len(b)} tokens): {clean!r} / {corrupted!r}")
    return a, b


IOI_CORRUPTIONS = ("s2", "abc")


def ioi_pairs(tokenizer, n: int = 120, seed: int = 0,
              templates: Sequence[int] | None = None, corruption: str = "s2") -> list[PromptPair]:
    """n IOI pairs, ABBA and BABA alternating, cycling through `templates` (indices into
    IOI_TEMPLATES; None = all), names / places / objects drawn with `seed`.

    corruption "s2" (the S2 flip): the second subject mention becomes the IO name, so the
    corrupted prompt's answer is S; "abc" (Wang et al.'s ABC distribution): the three name
    mentions become three other distinct names (same place and object), so the corrupted
    prompt holds no information about IO or S.  The metric's tokens are the clean IO
    (`correct`) and the clean S (`wrong`) in both cases; the clean prompts (and so `seed`'s
    draws of IO / S / place / object) are the same for either corruption."""
    if corruption not in IOI_CORRUPTIONS:
        raise ValueError(f"corruption must be one of {IOI_CORRUPTIONS}; got {corruption!r}")
    rng = np.random.RandomState(seed)
    other = np.random.RandomState(seed + 7919)  # the ABC names: a separate stream, so clean prompts match
    templates = list(range(len(IOI_TEMPLATES))) if templates is None else list(templates)
    for t in templates:
        if not 0 <= t < len(IOI_TEMPLATES):
            raise ValueError(f"IOI template {t} out of range [0, {len(IOI_TEMPLATES)})")
    out = []
    for i in range(n):
        t = templates[i % len(templates)]
        io, s = rng.choice(NAMES, 2, replace=False)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        kind = "ABBA" if (i // len(templates)) % 2 == 0 else "BABA"
        a, b = (io, s) if kind == "ABBA" else (s, io)
        fill = dict(A=a, B=b, place=place, obj=obj)
        clean = IOI_TEMPLATES[t].format(S=s, **fill)
        if corruption == "s2":
            corrupted = IOI_TEMPLATES[t].format(S=io, **fill)
        else:
            x, y, z = other.choice([m for m in NAMES if m not in (io, s)], 3, replace=False)
            corrupted = IOI_TEMPLATES[t].format(A=x, B=y, S=z, place=place, obj=obj)
        c, x_ = _aligned(tokenizer, clean, corrupted)
        out.append(PromptPair(tuple(c), tuple(x_), one_token(tokenizer, io), one_token(tokenizer, s),
                              t, clean, kind))
    return out


def factual_pairs(tokenizer, n: int = 111, seed: int = 0,
                  templates: Sequence[int] | None = None) -> list[PromptPair]:
    """n country -> capital pairs cycling through `templates` (FACT_TEMPLATES indices); the
    corrupted prompt names another country drawn with `seed`."""
    rng = np.random.RandomState(seed)
    countries = sorted(CAPITALS)
    templates = list(range(len(FACT_TEMPLATES))) if templates is None else list(templates)
    out = []
    for i in range(n):
        t = templates[i % len(templates)]
        c = countries[(i // len(templates)) % len(countries)]
        other = rng.choice([o for o in countries if o != c])
        clean, corrupted = FACT_TEMPLATES[t].format(c=c), FACT_TEMPLATES[t].format(c=other)
        a, b = _aligned(tokenizer, clean, corrupted)
        out.append(PromptPair(tuple(a), tuple(b), one_token(tokenizer, CAPITALS[c]),
                              one_token(tokenizer, CAPITALS[other]), t, clean, "fact"))
    return out


def stack_pairs(pairs: Sequence[PromptPair]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(clean [P, seq], corrupted [P, seq], correct [P], wrong [P]) int32; every pair must
    have the same length (take one template)."""
    if not pairs:
        raise ValueError("no pairs to stack")
    lengths = sorted({len(p.clean) for p in pairs})
    if len(lengths) > 1:
        raise ValueError(f"pairs of different lengths {lengths}: stack one template at a time")
    arr = lambda xs: np.asarray(xs, np.int32)  # noqa: E731
    return (arr([p.clean for p in pairs]), arr([p.corrupted for p in pairs]),
            arr([p.correct for p in pairs]), arr([p.wrong for p in pairs]))


def performance(model, pairs: Sequence[PromptPair]) -> dict:
    """Does the model do the task?  Per pair the clean logit difference logit(correct) -
    logit(wrong) at the last token and the corrupted one; summary: mean / std, the fraction
    with clean LD > 0 (prefers the right one of the two), top-1 accuracy (the argmax over the
    vocabulary is the answer), overall and per template."""
    import jax.numpy as jnp

    rows = []
    for t in sorted({p.template for p in pairs}):
        group = [p for p in pairs if p.template == t]
        clean, corrupted, correct, wrong = stack_pairs(group)
        lc = np.asarray(_last_logits(model, jnp.asarray(clean)))
        lx = np.asarray(_last_logits(model, jnp.asarray(corrupted)))
        for i, p in enumerate(group):
            rows.append(dict(template=t, kind=p.kind, text=p.text,
                             clean_ld=float(lc[i, correct[i]] - lc[i, wrong[i]]),
                             corrupted_ld=float(lx[i, correct[i]] - lx[i, wrong[i]]),
                             top1=bool(lc[i].argmax() == correct[i])))

    def summary(rs):
        ld = np.array([r["clean_ld"] for r in rs])
        xd = np.array([r["corrupted_ld"] for r in rs])
        return dict(n=len(rs), clean_ld_mean=float(ld.mean()), clean_ld_std=float(ld.std()),
                    corrupted_ld_mean=float(xd.mean()), ld_positive=float((ld > 0).mean()),
                    top1=float(np.mean([r["top1"] for r in rs])))

    return dict(overall=summary(rows),
                per_template={t: summary([r for r in rows if r["template"] == t])
                              for t in sorted({r["template"] for r in rows})},
                per_kind={k: summary([r for r in rows if r["kind"] == k])
                          for k in sorted({r["kind"] for r in rows})},
                rows=rows)



@eqx.filter_jit
def _last_logits(model, tokens):
    # the model is an argument (not a closed-over constant that XLA would fold for minutes)
    return jax.vmap(model)(tokens)[:, -1]
