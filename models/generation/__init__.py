"""Generation with the pure KV cache.

Modules:
  generate  generate(model, prompts, GenerationConfig(max_new_tokens, temperature, top_k, top_p,
            seed, eos_token_ids, ...), *, edits=None, ...) -> GenerationResult (tokens, logits);
            batched with left padding, steering edits on the prompt and/or the generated tokens;
            chat_prompt(tokenizer, message)
  decode    the forward that generation runs: per-layer weight buffers and a per-layer cache
            (prefill, forward_cached), equal to the uncached forward at every step
"""
