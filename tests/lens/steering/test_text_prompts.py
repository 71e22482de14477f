"""Strings in: lens functions that take token strings / texts with a tokenizer, and EOS
defaults from the model; checked against the id-based calls and transformers."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from hf_tiny import hf_forward
from lens.circuits.patching import logit_diff_metric
from lens.steering import vectors as V
from lens_tiny import tiny
from tiny_tokenizers import sentencepiece_tokenizer

TOK = sentencepiece_tokenizer()  # ids 0..13, inside the tiny models' vocab of 61


def test_logit_diff_metric_takes_token_strings():
    _, model, _ = tiny("llama")
    tokens = np.array([11, 4, 9, 6, 12], np.int32)
    logits = np.asarray(model(tokens))
    metric = logit_diff_metric(" John", " J", tokenizer=TOK)
    assert float(metric(logits)) == pytest.approx(logits[-1, 11] - logits[-1, 9], abs=1e-6)
    pairs = logit_diff_metric([" John", " J"], [" J", "o"], tokenizer=TOK)  # P = 2
    jl = jax.numpy.asarray(logits)
    got = jax.jit(jax.vmap(lambda c, w, p: type(pairs)(c, w, p)(jl)))(pairs.correct, pairs.wrong, pairs.position)
    np.testing.assert_allclose(np.asarray(got), [logits[-1, 11] - logits[-1, 9], logits[-1, 9] - logits[-1, 6]],
                               atol=1e-6)
    with pytest.raises(TypeError, match="without a tokenizer"):
        logit_diff_metric(" Paris", " Rome")
    with pytest.raises(ValueError, match="' Johnhn' is 2 tokens"):
        logit_diff_metric(" Johnhn", " J", tokenizer=TOK)


def test_mean_difference_takes_texts_and_matches_transformers():
    hf, model, _ = tiny("llama")
    pos, neg, layer = [" John", " Jo J"], [" J John", " Johnhn"], 2
    got = np.asarray(V.pair_differences(model, pos, neg, layer, tokenizer=TOK))

    def last(text):  # transformers' residual entering block `layer` at the last token
        return hf_forward(hf, np.asarray(TOK.encode(text)))[1][layer, -1]

    want = np.stack([last(p) - last(n) for p, n in zip(pos, neg)])
    np.testing.assert_allclose(got, want, atol=1e-4)  # float32 both sides; measured ~1e-6
    np.testing.assert_allclose(np.asarray(V.mean_difference(model, pos, neg, layer, tokenizer=TOK)),
                               want.mean(0), atol=1e-4)
    with pytest.raises(TypeError, match="tokenizer=tok"):
        V.mean_difference(model, pos, neg, layer)


def test_new_token_lists_takes_the_model_for_eos():
    _, model, _ = tiny("llama")
    eos = model.config.eos_token_ids
    assert eos, "the tiny llama's config names an EOS"
    out = np.array([[[5, eos[0], 7]], [[8, 9, 10]]])
    assert V.new_token_lists(out, model) == V.new_token_lists(out, eos) == [[[5, eos[0]]], [[8, 9, 10]]]
    assert TOK.eos_token_ids == (1,) and 1 not in out  # the tokenizer's EOS: nothing is cut
    assert V.new_token_lists(out, TOK) == [[[5, eos[0], 7]], [[8, 9, 10]]]
