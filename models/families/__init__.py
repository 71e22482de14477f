"""The registry of supported families: HF `model_type` -> its converter module."""

from __future__ import annotations

import importlib

# model_type (as in config.json) -> module under models/ with config_from_hf + convert.
FAMILIES = {
    "llama": "lens.models.families.llama",
    "qwen2": "lens.models.families.llama",
    "gpt2": "lens.models.families.gpt2",
    "gpt_neox": "lens.models.families.neox",
    "gemma3_text": "lens.models.families.gemma3",
    "gemma2": "lens.models.families.gemma2",
    "mistral": "lens.models.families.mistral",
    "qwen3": "lens.models.families.qwen3",
    "phi3": "lens.models.families.phi3",
    "olmo2": "lens.models.families.olmo2",
    "mixtral": "lens.models.families.mixtral",
    "olmoe": "lens.models.families.olmoe",
    "lens": "lens.models.io.native",  # our own format, for configs no HF family expresses
}


def family_module(hf_config: dict):
    """The converter module for the config's model_type; ValueError naming unknown ones."""
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"unknown architecture model_type={model_type!r}; supported: {sorted(FAMILIES)}"
        )
    return importlib.import_module(FAMILIES[model_type])


def convert_hf(hf_config: dict, tensors, dtype):
    """One entry point for both readers: HF config + HF-named tensors -> Transformer."""
    module = family_module(hf_config)
    config = module.config_from_hf(hf_config)
    return module.convert(config, tensors, dtype)
