"""Per-device memory of the paper-sized workloads before paying for an accelerator.

    python scripts/plan.py                                   # every model x workload x hardware, markdown
    python scripts/plan.py --model qwen1.5-1.8b --hardware tpu-v4-8 --workload melbo
    python scripts/plan.py --config path/to/hf_folder        # any checkpoint's config.json

Nothing is allocated: shapes only (lens/core/plan.py, `jax.eval_shape`).  Weights are
exact for the layout declared in models/core/sharding.py; activations are estimates of
the live set (within [0.5, 2] x XLA's own memory analysis on the CPU in the tests).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lens.models.runtime.xla_guard  # noqa: F401  first (see the module)

import jax.numpy as jnp  # noqa: E402

from lens.core import plan as PL  # noqa: E402
from lens.models.core.config import ModelConfig  # noqa: E402
from lens.models.runtime import compile_cache  # noqa: E402

compile_cache.enable()


def _llama(**kw) -> ModelConfig:
    base = dict(architecture="llama", norm_kind="rms", norm_eps=1e-5, activation="silu", gated_mlp=True,
                positional="rope", tie_embeddings=False)
    return ModelConfig(**{**base, **kw})


# The published shapes (config.json of each checkpoint).
MODELS = {
    "qwen1.5-1.8b": _llama(architecture="qwen2", vocab_size=151936, d_model=2048, n_layers=24, n_heads=16,
                           n_kv_heads=16, d_head=128, d_mlp=5504, max_seq_len=32768, attn_bias=True),
    "llama-3-8b": _llama(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_head=128,
                         d_mlp=14336, max_seq_len=8192),
    "llama-3-70b": _llama(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_head=128,
                          d_mlp=28672, max_seq_len=8192),
}
# name -> (mesh, GiB per device).  A TPU v4-8 is 4 chips (JAX devices), 32 GiB HBM each.
HARDWARE = {
    "gpu-80gb": ({"data": 1, "model": 1}, 80),
    "tpu-v4-8": ({"data": 1, "model": 4}, 32),
}
# The paper-sized settings of each workload (what the plan assumes; see PL.plan).
# name -> (lens.core.plan workload, settings)
WORKLOADS = {
    "sweep": ("sweep", dict(k=256, prompts=8, seq=64)),
    "melbo": ("melbo", dict(k=800, prompts=1, seq=64)),
    "melbo-block32": ("melbo", dict(k=800, block=32, prompts=1, seq=64)),
    "tuned_lens": ("tuned_lens", dict(batch=8, seq=2048)),
    "patching": ("patching", dict(prompts=1, seq=64)),
    "generate": ("generate", dict(batch=8, slots=2048)),
    "train": ("train", dict(batch=8, seq=512)),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), action="append", help="default: all")
    ap.add_argument("--config", type=Path, help="a model folder (its config.json) instead of --model")
    ap.add_argument("--hardware", choices=sorted(HARDWARE), action="append", help="default: all")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), action="append", help="default: all")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    return ap.parse_args(argv)


def rows(args) -> list[str]:
    """Markdown table rows: model | workload | hardware | GiB per device (parts) | fits."""
    if args.config is not None:
        from lens.models.families import family_module
        from lens.models.io.safetensors_reader import read_config

        hf = read_config(args.config)
        models = {args.config.name: family_module(hf).config_from_hf(hf)}
    else:
        models = {m: MODELS[m] for m in (args.model or MODELS)}
    dtype = jnp.dtype(args.dtype)
    out = ["| model | workload (settings) | hardware (mesh) | weights | optimiser | KV cache | activations | total GiB / device | fits |",
           "|---|---|---|---|---|---|---|---|---|"]
    g = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    for name, config in models.items():
        for w in args.workload or WORKLOADS:
            for hw in args.hardware or HARDWARE:
                mesh, cap = HARDWARE[hw]
                try:
                    kind, settings = WORKLOADS[w]
                    p = PL.plan(config, mesh, kind, dtype=dtype, **settings)
                except ValueError as e:
                    out.append(f"| {name} | {w} | {hw} | {e} | | | | | |")
                    continue
                settings = ", ".join(f"{k}={v}" for k, v in p.params.items() if k != "keep_logits")
                fits = "yes" if p.total <= cap * 2**30 else "no"
                out.append(f"| {name} | {kind} ({settings}) | {hw} ({mesh}) | {g(p.weights)} | {g(p.optimiser)} | "
                           f"{g(p.kv_cache)} | {g(p.activations)} | {g(p.total)} | {fits} |")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    print("\n".join(rows(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
