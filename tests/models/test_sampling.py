"""Sampled generation draws from the distribution transformers' own logits processors define.

4000 copies of one prompt are generated for ONE new token in one batch (row i draws with
its own key, `fold_in(key(seed), i)`), so every draw comes from the same fixed logits (the
tiny Llama's next-token logits, returned by `generate(return_logits=True)`).  The expected
distribution is `softmax` of those logits after transformers' TemperatureLogitsWarper,
TopKLogitsWarper and TopPLogitsWarper (its order), computed in float64.  Checks: every draw
lies in the kept set (expected probability > 0), and a chi-square goodness-of-fit test at a
fixed seed (bins with expected count < 5 merged) does not reject at p = 1e-3.  The same
draws against the untempered distribution are rejected, so the test has power.
"""

import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lens_tiny import tiny
from lens.models.generation.generate import GenerationConfig, generate

pytestmark = pytest.mark.slow  # make test-fast skips it (real weights, subprocesses or long runs)

N_DRAWS = 4000
PROMPT = [3, 17, 42]


@pytest.fixture(scope="module")
def logits():
    _, model, _ = tiny("llama")
    r = generate(model, [PROMPT], GenerationConfig(1, eos_token_ids=(), return_logits=True))
    return model, np.asarray(r.logits[0][0], np.float64)


def hf_probs(logits, temperature, top_k, top_p):
    """transformers' warpers (temperature -> top-k -> top-p), then softmax, in float64."""
    scores = torch.as_tensor(logits, dtype=torch.float64)[None]
    ids = torch.zeros((1, 1), dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return torch.softmax(scores, -1)[0].numpy()


def chi_square_p(counts, probs):
    """p-value of the chi-square goodness-of-fit test, bins with expected count < 5 merged."""
    expected = probs * counts.sum()
    keep = probs > 0
    counts, expected = counts[keep], expected[keep]
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return stats.chisquare(counts, expected).pvalue


# (temperature, top_k, top_p): temperature alone, each filter, and both (the top-p cut
# falls inside the top-k set).  Kept-set sizes of the fixed logits are asserted below.
SETTINGS = [(0.4, None, None), (0.5, 7, None), (0.3, None, 0.6), (0.4, 12, 0.8)]


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_draw_frequencies_match_transformers_warpers(logits, temperature, top_k, top_p):
    model, z = logits
    probs = hf_probs(z, temperature, top_k, top_p)
    kept = np.flatnonzero(probs > 0)
    vocab = len(z)
    # the filters really cut: top-k keeps k tokens, top-p fewer than top-k (or the vocab)
    if top_k is not None and top_p is None:
        assert len(kept) == top_k < vocab
    if top_p is not None:
        assert len(kept) < (top_k or vocab)
    config = GenerationConfig(1, eos_token_ids=(), temperature=temperature, top_k=top_k, top_p=top_p, seed=11)
    out = generate(model, [PROMPT] * N_DRAWS, config)
    draws = np.array([t[0] for t in out.tokens])
    assert np.isin(draws, kept).all(), sorted(set(draws) - set(kept))
    counts = np.bincount(draws, minlength=vocab).astype(np.float64)
    # Fixed seed: the draws, hence the p-value, are deterministic.  Measured p-values:
    # 0.23, 0.25, 0.42 and 0.25 for the four settings (kept sets of 61, 7, 6 and 7 tokens).
    assert chi_square_p(counts, probs) > 1e-3
    # Power: the same counts against the untempered, unfiltered softmax are rejected
    # (measured p = 0.0 in float64 for all four settings).
    untempered = np.exp(z - z.max())
    assert chi_square_p(counts, untempered / untempered.sum()) < 1e-6
