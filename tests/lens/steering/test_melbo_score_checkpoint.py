"""lens.steering.melbo.score_checkpoint: behaviour scores saved per generate call and reused
on resume.  Reference: `verdict.score_vectors` over all the vectors in one go (one call per
gen_batch // P vectors, the last padded), on a tiny random Llama whose replies are decoded
so that about half of them "hold Python" (the scores are not all zero)."""

import json

import numpy as np
import pytest

from lens.steering.melbo import score_checkpoint as S
from lens.steering.melbo import verdict
from lens_tiny import VOCAB, tiny

PROMPTS = [[3, 5, 7, 11], [2, 4, 6]]
SETTINGS = {"layer": 1, "max_new_tokens": 4, "prompts": PROMPTS}


class Killed(Exception):
    pass


def decode(row):
    """Reply tokens -> text; an odd first token reads as Python, so scores follow the tokens."""
    return "```python\nimport os\n```" if row and row[0] % 2 else "just prose " + " ".join(map(str, row))


def score(model, vecs, store, on_save=None):
    return S.score_vectors_checkpointed(model, PROMPTS, vecs, 1, max_new_tokens=4, decode=decode, gen_batch=4,
                                        store=store, on_save=on_save)


@pytest.fixture(scope="module")
def setup():
    _, model, _ = tiny()
    rs = np.random.RandomState(0)
    vecs = (rs.randn(5, model.config.d_model) * 3).astype(np.float32)  # 5 = 2 + 2 + 1 (padded call)
    want = verdict.score_vectors(model, PROMPTS, vecs, 1, max_new_tokens=4, decode=decode, gen_batch=4)
    return model, vecs, want


def test_killed_scoring_resumes_to_the_uninterrupted_scores(setup, tmp_path, monkeypatch):
    model, vecs, (want_scores, want_texts) = setup
    assert 0 < want_scores.mean() < 1 and want_scores.shape == (5, 2)  # the check is not vacuous
    path = tmp_path / "behaviour_seed0.json"

    def kill(n):
        raise Killed(n)  # dies right after its first save: 2 of 5 vectors stored

    with pytest.raises(Killed):
        score(model, vecs, S.ScoreStore(path, SETTINGS, resume=False), on_save=kill)
    saved = json.loads(path.read_text())
    assert len(saved["rows"]) == 2 and set(saved["rows"]) == {S.vector_id(v) for v in vecs[:2]}

    generated = []
    real = verdict.score_vectors

    def counting(model, prompts, v, *a, **k):
        generated.append(len(v))
        return real(model, prompts, v, *a, **k)

    monkeypatch.setattr(verdict, "score_vectors", counting)
    scores, texts = score(model, vecs, S.ScoreStore(path, SETTINGS, resume=True))
    assert generated == [2, 2]  # vectors 2, 3 and 4 (padded to 2) only
    np.testing.assert_array_equal(scores, want_scores)
    assert texts == want_texts
    # every vector stored: a resume in another order generates nothing and keeps each vector's row
    generated.clear()
    order = [4, 2, 0, 3, 1]
    s2, t2 = score(model, vecs[order], S.ScoreStore(path, SETTINGS, resume=True))
    assert generated == []
    np.testing.assert_array_equal(s2, want_scores[order])
    assert t2 == [want_texts[i] for i in order]


def test_resume_with_other_settings_is_refused(tmp_path):
    path = tmp_path / "scores.json"
    store = S.ScoreStore(path, SETTINGS, resume=False)
    store.rows["x"] = {"scores": [1.0], "texts": ["t"]}
    store.save()
    with pytest.raises(SystemExit, match="max_new_tokens"):
        S.ScoreStore(path, SETTINGS | {"max_new_tokens": 5}, resume=True)
    with pytest.raises(SystemExit, match="prompts"):
        S.ScoreStore(path, SETTINGS | {"prompts": [[3, 5, 7, 12], [2, 4, 6]]}, resume=True)
    assert S.ScoreStore(path, SETTINGS, resume=True).rows == {"x": {"scores": [1.0], "texts": ["t"]}}
    assert S.ScoreStore(path, SETTINGS, resume=False).rows == {}  # a fresh run starts empty
    assert not (tmp_path / "scores.json.tmp").exists()
    # the key is the vector's float32 bytes: -0.0 and 0.0 differ, a float64 copy does not
    v = np.arange(VOCAB % 7 + 3, dtype=np.float32)
    assert S.vector_id(v) == S.vector_id(v.astype(np.float64)) != S.vector_id(v + 1e-6)
