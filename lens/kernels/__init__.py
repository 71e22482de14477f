"""Optional native CPU kernels behind one dispatch; the pure-JAX code is the specification.
"""
