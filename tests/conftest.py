import os

# Tests run on the CPU, deterministic, at the product's default matmul precision (what
# `make run` runs; on XLA:CPU it is full float32, checked in test_differential.py).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

