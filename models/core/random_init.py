"""`models.init(config, key)`: a randomly initialised model of any supported family.

The conventions are transformers' `_init_weights`, so a model trained here starts where
the same model trained with transformers would:
  * every matrix (embeddings, positions, q/k/v/o, MLP, unembedding) ~ normal(0, std),
    std = `initializer_range` (0.02 in every family's HF config);
  * biases 0; norm gains 1 (Gemma stores 1 + w with w = 0, which is our folded 1);
  * GPT-2 only: the two residual-stream writers (attn.c_proj = W_O, mlp.c_proj = W_out)
    get std / sqrt(2 n_layers), the GPT-2 paper's scaling for the 2 L residual adds.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from ..io.convert import assemble, expected_shapes
from .transformer import Transformer

# Families whose HF `_init_weights` rescales the residual projections (transformers'
# GPT2PreTrainedModel); the others use one std for every matrix.
RESIDUAL_SCALED = {"gpt2"}
# The number of fields (6 top-level + 22 per block) before the mixture-of-experts ones.
LEGACY_KEYS = 28
_GAINS = {"ln1_w", "ln2_w", "final_norm_w", "q_norm_w", "k_norm_w", "post_attn_w", "post_mlp_w"}
_BIASES = {"ln1_b", "ln2_b", "final_norm_b", "b_Q", "b_K", "b_V", "b_O", "b_in", "b_gate", "b_out", "unembed_b"}


def init(
    config: ModelConfig,
    key: jax.Array,
    initializer_range: float = 0.02,
    scale_residual: bool | None = None,
    dtype=jnp.float32,
) -> Transformer:
    """A random `Transformer` for `config`; deterministic in `key`.

    scale_residual: apply GPT-2's 1/sqrt(2 n_layers) to W_O and W_out; None = the family's
    transformers convention (True for gpt2 only).
    """
    if initializer_range <= 0:
        raise ValueError(f"initializer_range must be > 0, got {initializer_range}")
    if scale_residual is None:
        scale_residual = config.architecture in RESIDUAL_SCALED
    top_shapes, block_shapes = expected_shapes(config)
    residual_std = initializer_range / math.sqrt(2 * config.n_layers)
    # One key per field, drawn for every field (present or not), so adding a flag never
    # reshuffles the others: the first LEGACY_KEYS fields split `key` as they always did,
    # fields declared later (the mixture-of-experts matrices) fold their index into it.
    n_fields = len(top_shapes) + len(block_shapes)
    split = list(jax.random.split(key, LEGACY_KEYS))
    keys = iter(split + [jax.random.fold_in(key, i) for i in range(LEGACY_KEYS, n_fields)])

    def draw(name: str, shape: tuple | None, layers: int | None):
        k = next(keys)
        if shape is None:
            return None
        full = shape if layers is None else (layers, *shape)
        if name in _GAINS:
            return np.ones(full, np.float32)
        if name in _BIASES:
            return np.zeros(full, np.float32)
        std = residual_std if scale_residual and name in ("W_O", "W_out") else initializer_range
        return np.asarray(std * jax.random.normal(k, full, jnp.float32))

    top = {name: draw(name, shape, None) for name, shape in top_shapes.items()}
    stacked = {name: draw(name, shape, config.n_layers) for name, shape in block_shapes.items()}
    per_layer = [{n: (None if a is None else a[i]) for n, a in stacked.items()} for i in range(config.n_layers)]
    return assemble(config, top, per_layer, dtype)
