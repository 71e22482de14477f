"""`jax.jit` over a function of the model (the README's idiom), and a clear error for
`jax.jit(model)` itself, on tiny random llama / gpt2 checked against transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_tiny import hf_forward
from lens_tiny import tiny


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_jit_with_the_model_as_argument_matches_transformers(family):
    hf, model, _ = tiny(family)
    batch = np.array([[3, 14, 15, 9, 26, 5, 35], [8, 9, 7, 9, 3, 2, 38]], np.int32)  # K = 2
    run = jax.jit(lambda model, tokens: model(tokens))
    one = run(model, jnp.asarray(batch[0]))
    many = jax.jit(lambda model, tokens: jax.vmap(model)(tokens))(model, jnp.asarray(batch))
    want = np.stack([hf_forward(hf, row)[0] for row in batch])
    # tolerance: float32 on both sides, logits ~1; measured ~1e-6
    np.testing.assert_allclose(np.asarray(one), want[0], atol=1e-4)
    np.testing.assert_allclose(np.asarray(many), want, atol=1e-4)
    # A second model with the same config reuses the compiled program (weights are arguments).
    before = run._cache_size()
    run(jax.tree.map(lambda x: x * 1.0 if isinstance(x, jax.Array) else x, model), jnp.asarray(batch[1]))
    assert run._cache_size() == before


def test_jit_of_the_model_itself_says_the_idiom():
    _, model, _ = tiny("llama")
    tokens = jnp.arange(4, dtype=jnp.int32)
    for fn in (model, model.forward):
        with pytest.raises(TypeError, match=r"jax.jit\(lambda model, tokens: model\(tokens\)\)"):
            jax.jit(fn)(tokens)
