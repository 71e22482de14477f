"""Generation: greedy and sampled decoding with the pure KV cache.
"""
