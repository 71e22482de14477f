"""lens.steering.generate_with_vectors equals K separate steered generations; reply CAA;
lens/ never imports bench/, torch or transformers (a static scan of the source)."""

import ast
from pathlib import Path

import numpy as np
import pytest

from lens import edits as E
from lens import steering
from lens_tiny import VOCAB, tiny
from models.generate import generate

RNG = np.random.RandomState(5)
PROMPTS = [list(RNG.randint(0, VOCAB, size=n)) for n in (5, 9, 7)]  # odd lengths, padded
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_k=20, seed=3)])
def test_generate_with_vectors_equals_separate_runs(sampling):
    _, model, _ = tiny()
    vectors = 3.0 * RNG.randn(2, model.config.d_model).astype(np.float32)
    out = steering.generate_with_vectors(model, PROMPTS, vectors, 1, 6, coeff=1.5,
                                         eos_token_ids=[], **sampling)
    assert out.shape == (2, 3, 6) and out.dtype == np.int32
    for k in range(2):
        e = E.add(model, vectors[k], 1, 1.5)
        for p, prompt in enumerate(PROMPTS):
            alone = generate(model, prompt, 6, edits=e, eos_token_ids=[], **sampling).tokens[0]
            if sampling:
                # a sampled row draws with key fold_in(seed, row): compare row k * P + p alone
                continue
            assert out[k, p].tolist() == alone, (k, p)
    if sampling:  # the same rows as one batched generate with per-row edits
        rows = [p for _ in range(2) for p in PROMPTS]
        stacked = E.stack_edits([E.add(model, v, 1, 1.5) for v in vectors for _ in PROMPTS])
        ref = generate(model, rows, 6, edits=stacked, edits_batched=True, eos_token_ids=[], **sampling)
        assert out.reshape(6, 6).tolist() == ref.tokens
    unsteered = steering.generate_with_vectors(model, PROMPTS[:1], np.zeros((1, model.config.d_model)), 0, 4,
                                               eos_token_ids=[])
    assert unsteered[0, 0].tolist() == generate(model, PROMPTS[0], 4, eos_token_ids=[]).tokens[0]
    with pytest.raises(ValueError, match="d_model"):
        steering.generate_with_vectors(model, PROMPTS, np.ones((2, 5)), 1, 3)
    with pytest.raises(ValueError, match="layer index"):
        steering.generate_with_vectors(model, PROMPTS, vectors, 7, 3)


def test_reply_mean_difference_reads_the_reply_positions():
    _, model, _ = tiny()
    a, b = PROMPTS[:2], PROMPTS[1:]
    v = steering.reply_mean_difference(model, a, b, 2, 3)
    # independent: generate each reply alone, read resid_pre[2] of prompt + reply
    def mean_of(prompts):
        rows = []
        for p in prompts:
            r = generate(model, p, 3, eos_token_ids=[]).tokens[0]
            x = np.asarray(steering.resid_at(model, np.asarray(p + r, np.int32), 2))
            rows.append(x[len(p) - 1: len(p) + 2].mean(0))
        return np.mean(rows, 0)
    np.testing.assert_allclose(v, mean_of(a) - mean_of(b), atol=1e-5)


FORBIDDEN = ("bench", "torch", "transformers")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_imports_no_test_only_dependency():
    """lens/ and models/ run on a runtime-only install: no bench/, torch or transformers."""
    bad = {}
    for folder in ("lens", "models"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            hit = _imports(path) & set(FORBIDDEN)
            if hit:
                bad[str(path.relative_to(ROOT))] = sorted(hit)
    assert not bad, bad
