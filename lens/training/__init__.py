"""Training: real corpora tokenised and packed, a small BPE tokenizer, the one training loop.
"""
