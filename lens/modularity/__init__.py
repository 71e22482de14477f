"""Modularity: capability-selective neuron pruning, MoEfication, contextual sparsity (Deja Vu).
"""
