"""The generation forward (models/generation/decode.py: per-layer buffers, unrolled layers, per-layer
cache) equals the model's own uncached forward at every step, for the families that
test_generate.py does not build: Gemma 3 (sliding-window layers, sandwich norms, qk-norm)
and GPT-NeoX (partial rotary, parallel residual).  The generated sequence is longer than
Gemma's window of 4, so the window is exercised in the cache.

Tolerance 1e-5 on logits of order 1 (float32; measured <= 6.3e-7): reordered sums only;
a wrong position, window or cache slot moves logits by > 1e-2."""

import jax.numpy as jnp
import numpy as np
import pytest

from lens_tiny import VOCAB, tiny
from lens.models.generation.decode import decode_weights
from lens.models.generation.generate import GenerationConfig, generate


@pytest.mark.parametrize("family", ["gemma3", "neox"])
def test_cached_decode_equals_full_forward(family):
    _, model, _ = tiny(family)
    prompts = [list(np.random.RandomState(0).randint(0, VOCAB, n)) for n in (12, 5)]  # left padding too
    res = generate(model, prompts, GenerationConfig(14, eos_token_ids=(), return_logits=True))
    for p, new, logits in zip(prompts, res.tokens, res.logits):
        full = np.asarray(model.forward(jnp.asarray(p + new, jnp.int32)).logits)
        np.testing.assert_allclose(logits, full[len(p) - 1:-1], rtol=0, atol=1e-5)


def test_decode_weights_are_built_once_per_model():
    _, model, _ = tiny("llama")
    a = decode_weights(model)
    assert decode_weights(model) is a and len(a.layers) == model.config.n_layers
    # W_Q kept [d_model, heads, d_head]: the layout the dot reads without a copy
    np.testing.assert_array_equal(np.asarray(a.layers[1].W_Q), np.asarray(model.blocks.W_Q[1]).transpose(1, 0, 2))
