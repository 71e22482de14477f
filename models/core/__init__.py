"""The model core: config, stateless layers, the block, the transformer, interventions as data,
the KV cache, random initialisation.
"""
