"""IOI pair builders: the S2-flip and ABC corruptions (lens.circuits.tasks), with a word-level
stand-in tokenizer (one id per whitespace-separated word, so every name is one token)."""

import re

import numpy as np
import pytest

from lens.circuits import tasks


class WordTokenizer:
    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return [self.ids.setdefault(w, len(self.ids)) for w in re.findall(r" ?[^ ]+", text)]

    def decode(self, ids) -> str:
        back = {v: k for k, v in self.ids.items()}
        return "".join(back[i] for i in ids)


def test_abc_corruption_replaces_exactly_the_three_names_with_fresh_ones():
    tok = WordTokenizer()
    s2 = tasks.ioi_pairs(tok, 12, seed=3, corruption="s2")
    abc = tasks.ioi_pairs(tok, 12, seed=3, corruption="abc")
    assert [p.text for p in s2] == [p.text for p in abc]  # the same clean prompts
    assert sorted({p.template for p in abc}) == [0, 1, 2, 3]
    names = {tok.encode(" " + n)[0] for n in tasks.NAMES}
    for p in abc:
        c, x = np.asarray(p.clean), np.asarray(p.corrupted)
        diff = np.nonzero(c != x)[0]
        assert len(diff) == 3 and all(c[i] in names and x[i] in names for i in diff)  # A, B, S2 only
        fresh = set(x[diff].tolist())
        assert len(fresh) == 3 and not fresh & {p.correct, p.wrong}
    for p in s2:  # the S2 flip: one position, S -> IO
        c, x = np.asarray(p.clean), np.asarray(p.corrupted)
        (i,) = np.nonzero(c != x)[0]
        assert c[i] == p.wrong and x[i] == p.correct


def test_unknown_corruption_is_refused():
    with pytest.raises(ValueError, match="corruption must be one of"):
        tasks.ioi_pairs(WordTokenizer(), 2, corruption="flip")
