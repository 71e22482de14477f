"""Mistral: Llama's block and key map with sliding-window attention in every layer.

`sliding_window` = W (an int) makes every layer local: query position p sees keys at
positions p - W < k <= p (transformers' `kv_idx > q_idx - sliding_window`), in the forward
and in generation alike: the KV cache keeps every slot and the mask, decided by positions
(models/core/layers.attention_allowed), ignores keys that slid out of the window.
`sliding_window` null = full causal attention (Mistral 7B v0.2 and later).

HF key map: exactly Llama's (models/families/llama.py), no biases.  transformers'
MistralModel ignores `layer_types` (it masks every layer with the window when one is set;
MistralConfig saves the field with a warning to use Ministral for alternation), so we do
what transformers computes, and warn (naming the field) when layer_types says otherwise.

GGUF: llama.cpp writes Mistral as `general.architecture = "llama"` and runs it without a
window; see models/io/gguf_reader.py.
"""

from __future__ import annotations

import warnings

from ..core.config import GENERIC_HF_FIELDS, ModelConfig, refuse_unknown
from .llama import convert, llama_fields, window_fields  # noqa: F401  (convert: Llama's key map)

MISTRAL_FIELDS = GENERIC_HF_FIELDS | {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling",
    "sliding_window", "layer_types",
}


def config_from_hf(hf: dict) -> ModelConfig:
    """Mistral `config.json` dict -> ModelConfig (refusing unknown fields)."""
    refuse_unknown(hf, MISTRAL_FIELDS, "mistral")
    n = hf["num_hidden_layers"]
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if types is not None:
        expected = ["sliding_attention" if window is not None else "full_attention"] * n
        if list(types) != expected:
            warnings.warn(
                f"mistral: layer_types={list(types)} is ignored, as transformers' MistralModel ignores "
                f"it: every layer uses sliding_window={window} (use a Ministral checkpoint for "
                "alternating layers)", stacklevel=2)
    return ModelConfig(**llama_fields(hf, "mistral"), **window_fields("mistral", n, window, None))
