"""models.core.transformer.first_blocks against transformers with its decoder layers cut
(an independent implementation), for Llama and for Gemma 3, whose first layer is a
sliding-window layer (window 4 < 12 tokens, so a truncation that lost `local_layers`
would attend globally and differ).  Tolerance 2e-4 on logits: float32 JAX vs float32
torch over one or two tiny layers (|logits| ~ 1)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from hf_tiny import hf_forward
from lens_tiny import tiny
from lens.models.core.transformer import first_blocks


@pytest.mark.parametrize("family, n", [("llama", 1), ("llama", 2), ("gemma3", 1)])
def test_first_blocks_is_transformers_with_its_layers_cut(family, n):
    hf, model, _ = tiny(family)
    cut = copy.deepcopy(hf)
    cut.model.layers = cut.model.layers[:n]
    cut.config.num_hidden_layers = n
    if getattr(cut.config, "layer_types", None) is not None:
        cut.config.layer_types = cut.config.layer_types[:n]
    tokens = np.random.default_rng(n).integers(0, 61, 12).astype(np.int32)
    want, _ = hf_forward(cut, tokens)
    small = first_blocks(model, n)
    assert small.config.n_layers == n
    np.testing.assert_allclose(np.asarray(small(tokens)), want, rtol=2e-4, atol=2e-4)
    if model.config.local_layers is not None:
        assert small.config.local_layers == model.config.local_layers[:n]
        lost = dataclasses.replace(small, config=dataclasses.replace(small.config, local_layers=(False,) * n))
        assert np.abs(np.asarray(lost(tokens)) - want).max() > 1e-3  # the window matters here


def test_first_blocks_refuses_a_bad_count():
    model = tiny("llama")[1]
    for n in (0, 4, 1.0):
        with pytest.raises(ValueError, match="n_layers"):
            first_blocks(model, n)
