"""Circuits: clean / corrupted task pairs (IOI, facts), induction heads, activation / path /
attribution patching, causal scrubbing.
"""
