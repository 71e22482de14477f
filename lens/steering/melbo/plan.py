"""Sizing a MELBO-ortho run on paper, before any weight is loaded: bytes of the weights and
of one block's training state from `jax.eval_shape` / `eqx.filter_eval_shape` (nothing is
allocated), FLOPs of one training step of a block counted on that skeleton (4 N T per vector: the
weights are frozen, so the backward runs through activations only), next to the lowered
(uncompiled) XLA program's own cost analysis, and the wall time at an assumed throughput.

    cfg = plan.qwen15_18b_config()                        # the original's model shape
    p = plan.melbo_plan(cfg, k=800, steps=1000, block=32, source=8, target=16, n_tokens=24)

What it counts: one step of a block = the vmapped forward through blocks source+1..target
of every vector (P prompts x T tokens each), its backward, Adam and the joint Gram-Schmidt.
What it does not: the one-off prefix forward and theta0's reference (negligible), the
analysis and generations after training.  Memory: weights + the block's thetas, Adam
moments and gradients (from eval_shape), plus the residual activations the backward keeps
(`saved_activation_bytes`: an explicit estimate, stated, since eval_shape sees shapes of
inputs and outputs, not of the intermediates XLA will keep).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from lens.models.core.config import ModelConfig

# The original MELBO-ortho model: Qwen1.5-1.8B(-Chat)'s config.json shape fields.
QWEN15_18B = {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 24,
              "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 151936, "rope_theta": 1e6,
              "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "tie_word_embeddings": False,
              "hidden_act": "silu"}


def qwen15_18b_config() -> ModelConfig:
    """The ModelConfig of Qwen1.5-1.8B's shape (d = 2,048, 24 layers), from `QWEN15_18B`."""
    from lens.models.families import family_module

    return family_module(QWEN15_18B).config_from_hf(QWEN15_18B)


def abstract_model(config: ModelConfig, dtype=jnp.float32):
    """The model as a pytree of `jax.ShapeDtypeStruct` (no weights allocated): the skeleton a
    loader fills, here only measured."""
    from lens.models.io.convert import expected_shapes
    from lens.models.core.block import Block
    from lens.models.core.transformer import Transformer

    top, per_block = expected_shapes(config)
    sds = lambda shape: None if shape is None else jax.ShapeDtypeStruct(tuple(shape), dtype)  # noqa: E731
    blocks = Block(**{n: None if s is None else jax.ShapeDtypeStruct((config.n_layers, *s), dtype)
                      for n, s in per_block.items()})
    return Transformer(config=config, embed=sds(top["embed"]), pos_embed=sds(top["pos_embed"]), blocks=blocks,
                       final_norm_w=sds(top["final_norm_w"]), final_norm_b=sds(top.get("final_norm_b")),
                       unembed=sds(top.get("unembed")), unembed_b=sds(top.get("unembed_b")))


def tree_bytes(tree) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf of a pytree."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
                   if hasattr(x, "shape")))


def melbo_plan(config: ModelConfig, *, k: int, steps: int, block: int, source: int, target: int,
               n_tokens: int, n_prompts: int = 1, lr: float = 0.01, device_tflops: float = 400.0,
               utilisation: float = 0.3, device_memory_gb: float = 80.0, xla_cost: bool = False) -> dict:
    """The plan of a MELBO-ortho run of `k` vectors in blocks of `block` (see the module
    docstring).  `device_tflops` x `utilisation`: the throughput assumed for the time
    (400 TFLOP/s: an H100's dense bf16/tf32 order of magnitude; float32 matmuls on
    tensor cores as TF32).  `xla_cost`: also lower the step and read XLA's own FLOP count
    (`xla_flops_per_block_step`, NaN otherwise; a second trace, slow for a large model).
    Returns a JSON-able dict, `fits` = memory < device memory."""
    from lens.steering.melbo.problem import MelboProblem
    from lens.steering.melbo.objectives import OrthoConfig
    from lens.steering.melbo.train import _train_block

    if not 0 <= source < target < config.n_layers:
        raise ValueError(f"need 0 <= source < target < n_layers={config.n_layers}; got {source}, {target}")
    d = config.d_model
    if k + 1 > d:
        raise ValueError(f"k = {k} orthogonal vectors plus theta0 exceed d_model = {d}")
    model = abstract_model(config)
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    bl = lambda *s: jax.ShapeDtypeStruct(s, jnp.bool_)  # noqa: E731
    problem = MelboProblem(model=model, x_src=f32(n_prompts, n_tokens, d), query_pos=i32(n_prompts, n_tokens),
                           key_valid=bl(n_prompts, n_tokens), mask=bl(n_prompts, n_tokens), source=source,
                           target=target)
    obj = OrthoConfig(steps=1, lr=lr)  # ONE step: the cost per step
    thetas, basis, aux = f32(block, d), f32(k + 1, d), f32(n_prompts, d)
    # The abstract leaves are the jit's inputs; everything else (config, static ints) is static.
    is_sds = lambda x: isinstance(x, jax.ShapeDtypeStruct)  # noqa: E731
    dyn, static = eqx.partition((problem, aux, thetas, basis), is_sds)

    def step(dyn):
        p, a, th, b = eqx.combine(dyn, static)
        return _train_block(obj, p, a, th, b)

    out = jax.eval_shape(step, dyn)
    xla_flops = float("nan")
    if xla_cost:
        cost = jax.jit(step).lower(dyn).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla_flops = float(cost.get("flops", float("nan")))
    weights = tree_bytes(model)
    # The weights a step runs through: blocks source+1..target (the layer stack is scanned).
    n_active = sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(model.blocks) if hasattr(x, "shape"))
    n_active *= target - source
    tokens = n_prompts * n_tokens
    attn = 4 * tokens * n_tokens * config.n_heads * config.d_head * (target - source)  # QK^T and AV
    flops_step = block * (4 * n_active * tokens + 2 * attn)
    state = 4 * tree_bytes(thetas)  # thetas, gradients, Adam's two moments
    n_blocks = -(-k // block)
    depth = target - source
    # The backward keeps, per vector, token and block, the block's input residual and its
    # MLP hidden (gate, up) plus attention's q/k/v/o: ~ (4 d + 2 d_mlp) floats (an estimate).
    d_mlp = config.d_mlp
    saved = 4 * block * n_prompts * n_tokens * depth * (4 * d + 2 * d_mlp)
    total = weights + state + saved + tree_bytes(basis) + tree_bytes(out)
    flops_total = flops_step * steps * n_blocks
    seconds = flops_total / (device_tflops * 1e12 * utilisation)
    return {"k": k, "steps": steps, "block": block, "lr": lr, "n_blocks": n_blocks, "source": source,
            "target": target, "d_model": d, "n_layers": config.n_layers, "n_tokens": n_tokens,
            "n_prompts": n_prompts, "flops_per_block_step": flops_step, "flops_total": flops_total,
            "xla_flops_per_block_step": xla_flops, "active_weights": n_active,
            "weights_GB": weights / 1e9, "block_state_GB": state / 1e9, "saved_activation_GB": saved / 1e9,
            "memory_GB": total / 1e9, "device_memory_GB": device_memory_gb, "fits": total / 1e9 < device_memory_gb,
            "assumed_TFLOPs": device_tflops, "assumed_utilisation": utilisation, "hours": seconds / 3600,
            "flops_source": ("4 N T per vector per step (forward 2 N T, backward through the activations only "
                             "2 N T: the weights are frozen), N = the weights of blocks source+1..target counted "
                             "on the eval_shape skeleton, plus attention's QK^T / AV; XLA's cost analysis of the "
                             "lowered step is beside it (xla_flops_per_block_step) but counts the scanned layer "
                             "stack's body once"),
            "memory_source": "weights and block state from eval_shape; saved activations estimated (docstring)"}


def plan_lines(p: dict) -> list[str]:
    """The plan as a few printable lines."""
    return [f"MELBO-ortho plan: K = {p['k']} in {p['n_blocks']} blocks of {p['block']}, {p['steps']} steps at lr "
            f"{p['lr']}, d = {p['d_model']}, source {p['source']} -> target {p['target']}, "
            f"{p['n_prompts']} prompt(s) x {p['n_tokens']} tokens",
            f"  FLOPs: {p['flops_per_block_step']:.3g} per block step ({p['active_weights'] / 1e6:.0f} M weights x "
            f"{p['n_prompts'] * p['n_tokens']} tokens x {p['block']} vectors x 4), {p['flops_total']:.3g} in all",
            f"  memory: weights {p['weights_GB']:.2f} GB + block state {p['block_state_GB']:.4f} GB + saved "
            f"activations ~{p['saved_activation_GB']:.2f} GB = {p['memory_GB']:.2f} GB of {p['device_memory_GB']:.0f} GB "
            f"({'fits' if p['fits'] else 'does NOT fit'})",
            f"  time: ~{p['hours'] * 60:.0f} min at {p['assumed_TFLOPs']:.0f} TFLOP/s x {p['assumed_utilisation']:.0%} "
            "utilisation (assumed, not measured)"]


def main_job_plan(model: str, *, k: int, steps: int, block: int, source: int | None, target: int | None,
                  n_prompts: int, lr: float, seeds: int, n_tokens: int = 32) -> tuple[dict, list[str]]:
    """The main job's `--plan-only` record and its printed lines: `melbo_plan` for `model`'s
    config.json when it is a folder, else Qwen1.5-1.8B's shape; source / target default to
    the original's 8 / 16; `n_tokens` is the original's one training prompt (~32 chat-template
    tokens, an assumption); `seeds` MELBO seeds multiply the training time."""
    import json
    from pathlib import Path

    from lens.models.families import family_module

    cfg_file = Path(model) / "config.json"
    if cfg_file.exists():
        hf = json.loads(cfg_file.read_text())
        cfg, name = family_module(hf).config_from_hf(hf), str(model)
    else:
        cfg, name = qwen15_18b_config(), "Qwen1.5-1.8B's shape (no local folder given: --model PATH)"
    s = 8 if source is None else source
    t = 16 if target is None else target
    p = melbo_plan(cfg, k=k, steps=steps, block=block, source=s, target=t, n_tokens=n_tokens,
                   n_prompts=n_prompts, lr=lr)
    p |= {"model": name, "seeds": seeds, "hours_all_seeds": p["hours"] * seeds}
    total_min = p["hours_all_seeds"] * 60
    lines = plan_lines(p) + [f"  model: {name}; x {seeds} MELBO seeds: ~{total_min:.0f} min of training"]
    return p, lines
