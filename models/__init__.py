"""Pure Equinox ports of transformer language models, checked against transformers.

    import models
    model, tokenizer = models.load("smollm2-135m-instruct")
    logits = model(tokens)              # int32 [seq] -> float32 [seq, vocab]
    logits = jax.vmap(model)(batch)     # batches are vmap
    model = models.init(config, jax.random.key(0))   # random, transformers' conventions
    models.save(model, "folder")        # models.load / transformers read it back
"""

# First, before anything starts JAX's backend: no miscompiling XLA:CPU fusions (see the module).
from models.runtime import xla_guard  # noqa: F401  (isort: skip)
from models.core.config import ModelConfig
from models.io.convert import CheckpointError
from models.core.random_init import init
from models.core.interventions import Activations, Capture, Edits
from models.core.kv_cache import KVCache
from models.io.load import load
from models.io.save import save
from models.core.transformer import ForwardOutput, Transformer, pad_batch

__all__ = [
    "load", "save", "init", "Transformer", "ModelConfig", "Edits", "Capture", "Activations", "KVCache",
    "ForwardOutput", "CheckpointError", "xla_guard", "pad_batch",
]
