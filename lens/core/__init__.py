"""Core machinery: capture activations, build edits (interventions as data), run vmapped sweeps,
shard them over devices, fold norm weights.
"""
