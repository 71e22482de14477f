"""The mixture-of-experts MLP (Mixtral, OLMoE), called by `block_forward` when
`config.n_experts > 0`.

One layer's weights (a `Block` slice; `Transformer.blocks` stacks them [layers, experts,
...] under the same `lax.scan` over layers as every other weight):

    W_router       [d_model, experts]           router (transformers' `gate`)
    W_in_experts   [experts, d_model, d_mlp]    up projection of each expert
    W_gate_experts [experts, d_model, d_mlp]    gate projection of each expert
    W_out_experts  [experts, d_mlp, d_model]    down projection of each expert

For each token (h = the MLP's normalised input):

    logits  = h @ W_router                          (float32, whatever the model dtype)
    p       = softmax(logits)
    top, ix = top_k(p, experts_per_token)
    top     = top / sum(top)        if norm_topk_prob (Mixtral always; OLMoE by flag)
    w[e]    = top[j] where ix[j] = e, else 0        the combining weights [experts]
    n[e]    = act(h @ W_gate[e]) * (h @ W_in[e])    every expert's neurons [experts, d_mlp]
    out     = sum_e w[e] * (n[e] @ W_out[e])

EVERY expert is computed densely and the outputs combined with the top-k weights (zeros
elsewhere).  This is exact: an unchosen expert enters with weight 0 (a zero times a
finite number, added), so the sum equals transformers' gather/scatter over the chosen
experts; it costs n_experts / experts_per_token times the compute of the sparse
dispatch, which is fine for tiny and small models and for interpretability, where every
expert's neurons are wanted (`Capture(neurons=True)` returns all of them, [seq, experts,
d_mlp], before the router weight; the chosen ones are marked by `expert_weights` != 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from . import layers
from .config import ModelConfig


def route(
    config: ModelConfig, w_router: Float[Array, "d_model experts"], h: Float[Array, "seq d_model"]
) -> tuple[Float[Array, "seq experts"], Float[Array, "seq experts"], Int[Array, "seq k"]]:
    """(router logits float32, combining weights float32 with zeros outside the top k,
    chosen experts [seq, k] in descending probability)."""
    logits = jnp.einsum("sd,de->se", h.astype(jnp.float32), w_router.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    top, chosen = jax.lax.top_k(probs, config.experts_per_token)
    if config.norm_topk_prob:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    onehot = jax.nn.one_hot(chosen, config.n_experts, dtype=jnp.float32)  # [seq, k, experts]
    weights = jnp.einsum("sk,ske->se", top, onehot)
    return logits, weights, chosen.astype(jnp.int32)


def moe_mlp(config: ModelConfig, block, h: Float[Array, "seq d_model"], edits=None):
    """The MoE MLP on one sequence.  Returns (mlp output [seq, d_model], expert neurons
    [seq, experts, d_mlp] after any `expert_neuron` edit, router logits [seq, experts],
    combining weights [seq, experts], chosen experts [seq, k])."""
    logits, weights, chosen = route(config, block.W_router, h)
    act = layers.activation_fn(config.activation)
    up = jnp.einsum("sd,edm->sem", h, block.W_in_experts.astype(h.dtype))
    gate = jnp.einsum("sd,edm->sem", h, block.W_gate_experts.astype(h.dtype))
    neurons = act(gate) * up
    if edits is not None:
        neurons = edits.mixed(neurons, "expert_neuron")
    per_expert = jnp.einsum("sem,emd->sed", neurons, block.W_out_experts.astype(h.dtype))
    out = jnp.einsum("se,sed->sd", weights.astype(per_expert.dtype), per_expert)
    return out, neurons, logits, weights, chosen
