"""Tiny random-initialised transformers models, saved as safetensors folders by the tests.

Shared by the parity tests of every family.  Weights are random but deterministic
(torch.manual_seed), and the norms get random gains/biases so that a port which ignores
a gain or bias cannot pass by accident.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def randomise_norms(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or "layernorm" in name.lower():
                p.copy_(p + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def tiny_llama_config(n_layers: int, max_positions: int = 32):
    """The small GQA Llama (d 24, 4 heads / 2 KV heads of 6, vocab 61, tied) of the MELBO and
    main-job tests."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=6, max_position_embeddings=max_positions,
        tie_word_embeddings=True,
    )


def save_tiny(config, folder: Path, seed: int = 0) -> torch.nn.Module:
    """Build a random HF causal LM for `config`, save it to `folder`, return it (eval, fp32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.float().eval()
    randomise_norms(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def hf_forward(
    model,
    tokens: np.ndarray,
    attention_mask: np.ndarray | None = None,
    position_ids: np.ndarray | None = None,
):
    """(logits [seq, vocab], hidden_states [layers+1, seq, d]) for one sequence.

    transformers numbers positions 0..seq-1 whatever the mask says; pass `position_ids`
    (e.g. cumsum(mask) - 1) to give left-padded tokens the positions our forward uses.
    """
    ids = torch.as_tensor(np.asarray(tokens)[None], dtype=torch.long)
    mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask)[None])
    pos = None if position_ids is None else torch.as_tensor(np.asarray(position_ids)[None], dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    hidden = torch.stack(out.hidden_states)[:, 0]
    return out.logits[0].float().numpy(), hidden.float().numpy()


def hooked(hf, hooks, tokens) -> np.ndarray:
    """transformers logits [seq, vocab] of one sequence with (module, kind, fn) hooks
    registered for that forward only (kind "" = forward hook, "pre_" = pre-hook)."""
    handles = [getattr(mod, f"register_forward_{kind}hook")(fn) for mod, kind, fn in hooks]
    try:
        with torch.no_grad():
            return hf(input_ids=torch.as_tensor(np.asarray(tokens)[None])).logits[0].numpy()
    finally:
        for h in handles:
            h.remove()


def record(hf, module, tokens) -> np.ndarray:
    """The first input of `module` (a [seq, ...] numpy array) on one transformers forward."""
    seen = []
    hooked(hf, [(module, "pre_", lambda m, a: seen.append(a[0][0].clone()))], tokens)
    return seen[0].numpy()


def pre_edit(fn):
    """A forward pre-hook replacing the module's first positional input by fn(input)."""
    return lambda m, args: (fn(args[0]),) + args[1:]
