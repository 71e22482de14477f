"""What every benchmark shares: our model and transformers' holding the same weights.

`load_pair(random_weights)` gives (ours, hf, description):
  * real weights: the embedded SmolLM2-135M-Instruct GGUF, loaded by `models.load` for
    ours and by transformers' own GGUF loader for the reference (both float32);
  * random weights: a random transformers Llama of SmolLM2-135M's shape, saved as
    safetensors and loaded into ours (no download needed).
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

from lens.models.io.embedded import SMOLLM2_135M_HF_CONFIG as SMOLLM2_SHAPE  # the default model's shape

def load_pair(random_weights: bool, name: str = "smollm2-135m-instruct"):
    """(our model, the transformers model, a description), the same float32 weights."""
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lens.models.families import convert_hf
    from lens.models.io.safetensors_reader import read_safetensors_folder

    if random_weights:
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(LlamaConfig(**copy.deepcopy(SMOLLM2_SHAPE))).float().eval()
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d, safe_serialization=True)
            ours = convert_hf(*read_safetensors_folder(Path(d)), jnp.float32)
        return ours, hf, "random weights, SmolLM2-135M shape"

    from lens import models
    from lens.models.io import embedded

    path = embedded.fetch(name)
    ours, _ = models.load(name)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return ours, hf.eval(), f"{name} ({path.name}, dequantised to float32)"


def best_time(fn, repeats: int, warmup: bool = True) -> float:
    """Fastest wall time of `fn()` over `repeats` calls, after one warm-up call (unless
    `warmup=False`: the caller has already run it once)."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict:
    """This CPU's float32 matmul peak, GFLOP/s: the fastest of `repeats` n x n @ n x n runs
    with `jit(jnp.matmul)` and with `torch.matmul` (after a warm-up each); the better one
    is `peak_gflops`.  Same measurement as bench/forward_generate.py's peak row."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a = np.random.RandomState(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.RandomState(1).standard_normal((n, n)).astype(np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    t_jax = best_time(lambda: mm(ja, jb).block_until_ready(), repeats)
    t_torch = best_time(lambda: torch.matmul(ta, tb), repeats)
    flops = 2 * n**3
    return {"jax_gflops": flops / t_jax / 1e9, "torch_gflops": flops / t_torch / 1e9,
            "peak_gflops": max(flops / t_jax, flops / t_torch) / 1e9}


def write_json(path: Path | None, result: dict) -> None:
    """Write a benchmark's result dict as JSON to `path` (its folder created), or do nothing
    when no path was given (every bench's `--json`)."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
