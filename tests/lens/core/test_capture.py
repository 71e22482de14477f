"""run_with_cache: the typed cache against transformers' hidden states, every family."""

import numpy as np
import pytest

import lens
from hf_tiny import hf_forward
from lens_tiny import CONFIGS, VOCAB, tiny
from lens.models import Capture

TOKENS = np.random.RandomState(0).randint(0, VOCAB, size=8)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_resid_pre_equals_hf_hidden_states(family):
    hf, model, _ = tiny(family)
    logits, cache = lens.run_with_cache(model, TOKENS)
    ref_logits, hidden = hf_forward(hf, TOKENS)
    n = model.config.n_layers
    assert cache.resid_pre.shape == cache.resid_mid.shape == cache.resid_post.shape
    assert cache.resid_pre.shape == (n, len(TOKENS), model.config.d_model)
    np.testing.assert_allclose(cache.resid_pre, hidden[:n], atol=1e-5)
    np.testing.assert_allclose(cache.resid_post[:-1], hidden[1:n], atol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    # the final norm's input is the last block's output
    np.testing.assert_array_equal(cache.final_norm_in, cache.resid_post[-1])


def test_cache_fields_are_consistent_and_selectable():
    _, model, _ = tiny("llama")
    logits, cache = lens.run_with_cache(model, TOKENS)
    np.testing.assert_allclose(cache.resid_mid, cache.resid_pre + cache.attn_out, atol=1e-6)
    np.testing.assert_allclose(cache.resid_post, cache.resid_mid + cache.mlp_out, atol=1e-6)
    per_head = lens.head_outputs(model, cache)
    c = model.config
    assert per_head.shape == (c.n_layers, len(TOKENS), c.n_heads, c.d_model)
    np.testing.assert_allclose(per_head.sum(2), cache.attn_out, atol=1e-5)
    np.testing.assert_allclose(lens.head_output(model, cache, 1, 2), per_head[1, :, 2], atol=1e-6)
    assert cache.neurons.shape == (c.n_layers, len(TOKENS), c.d_mlp)
    assert cache.ln1_scale.shape == (c.n_layers, len(TOKENS))
    assert cache.attn_pattern is None  # large capture left out by default

    only, small = lens.run_with_cache(model, TOKENS, capture=Capture(resid=True))
    np.testing.assert_allclose(only, logits, atol=1e-6)  # another program: rounding may differ
    assert small.head_z is None and small.neurons is None and small.ln1_scale is None
    # resid_at runs only the prefix and agrees with the cache
    np.testing.assert_allclose(lens.resid_at(model, TOKENS, 2), cache.resid_pre[2], atol=1e-5)


def test_batched_cache_and_bad_input():
    _, model, _ = tiny("llama")
    batch = np.stack([TOKENS, TOKENS[::-1]])
    logits, cache = lens.run_with_cache(model, batch, capture=Capture(resid=True))
    single, one = lens.run_with_cache(model, batch[1], capture=Capture(resid=True))
    assert cache.resid_pre.shape[:2] == (2, model.config.n_layers)
    np.testing.assert_allclose(cache.resid_pre[1], one.resid_pre, atol=1e-6)
    with pytest.raises(ValueError, match="token id out of range"):
        lens.run_with_cache(model, np.array([0, VOCAB]))
    with pytest.raises(ValueError, match="no head_z"):
        lens.head_outputs(model, cache)


def test_pad_batch_is_the_one_padding():
    """models.pad_batch: right (the readers, lens.pad_prompts) or left (generation) padding
    to a given length; each row reads its tokens and a mask; bad input is refused."""
    from lens import models

    rows = [[5, 6, 7], [8], [9, 10]]
    t, m = models.pad_batch(rows, pad_id=2, side="left", length=5)
    assert t.tolist() == [[2, 2, 5, 6, 7], [2, 2, 2, 2, 8], [2, 2, 2, 9, 10]] and t.dtype == np.int32
    assert m.sum(1).tolist() == [3, 1, 2] and m[:, -1].all()
    t, m = lens.pad_prompts(rows)
    assert t.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]] and m.tolist() == [
        [True] * 3, [True, False, False], [True, True, False]]
    for row, tr, mr in zip(rows, t, m):
        assert tr[mr].tolist() == row
    with pytest.raises(ValueError, match="at least one token"):
        models.pad_batch([[1], []])
    with pytest.raises(ValueError, match="shorter than the longest"):
        models.pad_batch(rows, length=2)
    with pytest.raises(ValueError, match="side"):
        models.pad_batch(rows, side="middle")
