"""Reading and writing models: safetensors and GGUF readers, the converter, load / save, the
embedded models, tokenizers, the project's native format.
"""
