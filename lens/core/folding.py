"""Weight folding: make the norms' geometry explicit in the weights.

Every block reads the residual stream through a norm `w * N(x) + b`.  Folding moves `w`
and `b` into the weights that read the norm's output, so afterwards every norm is the
bare map N (centre-and-scale for LayerNorm, scale for RMSNorm) and a direction in the
residual stream can be compared with W_Q / W_in / W_U directly:

    W_read' = diag(w) W_read          b_read' = b_read + b @ W_read

For LayerNorm models the writers (embeddings, W_O, W_out and their biases) can then be
centred, since the next LayerNorm deletes the all-ones direction anyway; and the
unembedding can be centred over the vocabulary, which shifts each position's logits by
one constant and leaves the softmax unchanged.

Not folded (documented, not silently skipped): Gemma's q/k norms (RoPE acts after them,
and a per-channel gain does not commute with a rotation) and the sandwich norms on
sub-block outputs (their output is written to the residual stream, not read by a
matrix).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lens.models.core.transformer import Transformer


def _fold_into(w, b, weight, bias, spec_w, spec_b):
    """diag(w) W and b_read + b @ W for stacked weights [layers, ...]."""
    new_weight = jnp.einsum(spec_w, w, weight)
    if b is None:
        return new_weight, bias
    shift = jnp.einsum(spec_b, b, weight)
    return new_weight, shift if bias is None else bias + shift


def fold_norms(model: Transformer) -> Transformer:
    """Fold every foldable norm gain and bias into the weights that read it.

    Logits are unchanged up to float32 rounding (tested for every family).  The returned
    model's norms have unit gains and no biases.
    """
    c = model.config
    if not c.pre_norms or c.is_moe:
        raise ValueError(f"fold_norms: not implemented for {c.architecture!r} "
                         f"({'no pre-norms to fold' if not c.pre_norms else 'a mixture of experts'})")
    blk = model.blocks
    W_Q, b_Q = _fold_into(blk.ln1_w, blk.ln1_b, blk.W_Q, blk.b_Q, "ld,lhdk->lhdk", "ld,lhdk->lhk")
    W_K, b_K = _fold_into(blk.ln1_w, blk.ln1_b, blk.W_K, blk.b_K, "ld,lhdk->lhdk", "ld,lhdk->lhk")
    W_V, b_V = _fold_into(blk.ln1_w, blk.ln1_b, blk.W_V, blk.b_V, "ld,lhdk->lhdk", "ld,lhdk->lhk")
    W_in, b_in = _fold_into(blk.ln2_w, blk.ln2_b, blk.W_in, blk.b_in, "ld,ldm->ldm", "ld,ldm->lm")
    W_gate, b_gate = blk.W_gate, blk.b_gate
    if W_gate is not None:
        W_gate, b_gate = _fold_into(blk.ln2_w, blk.ln2_b, W_gate, b_gate, "ld,ldm->ldm", "ld,ldm->lm")
    ones = jnp.ones_like(blk.ln1_w)
    blocks = dataclasses.replace(
        blk, ln1_w=ones, ln1_b=None, ln2_w=ones, ln2_b=None,
        W_Q=W_Q, b_Q=b_Q, W_K=W_K, b_K=b_K, W_V=W_V, b_V=b_V,
        W_in=W_in, b_in=b_in, W_gate=W_gate, b_gate=b_gate,
    )
    W_U = model.W_U * model.final_norm_w[None, :]
    b_U = model.unembed_b
    if model.final_norm_b is not None:
        shift = model.W_U @ model.final_norm_b
        b_U = shift if b_U is None else b_U + shift
    config = dataclasses.replace(
        c,
        norm_bias=False,
        attn_bias=b_Q is not None,
        mlp_bias=b_in is not None or b_gate is not None or blk.b_out is not None,
        tie_embeddings=False,
        unembed_bias=b_U is not None,
    )
    # One mlp_bias flag covers b_in, b_gate and b_out: fill whichever is missing with zeros.
    if config.mlp_bias:
        zeros_mlp = jnp.zeros_like(blocks.W_in[:, 0, :])
        blocks = dataclasses.replace(
            blocks,
            b_in=zeros_mlp if blocks.b_in is None else blocks.b_in,
            b_gate=(zeros_mlp if blocks.b_gate is None else blocks.b_gate) if config.gated_mlp else None,
            b_out=jnp.zeros_like(blocks.W_out[:, 0, :]) if blocks.b_out is None else blocks.b_out,
        )
    return dataclasses.replace(
        model, config=config, blocks=blocks, final_norm_w=jnp.ones_like(model.final_norm_w),
        final_norm_b=None, unembed=W_U, unembed_b=b_U,
    )


def _centre(w, axis=-1):
    return None if w is None else w - w.mean(axis=axis, keepdims=True)


def centre_writers(model: Transformer) -> Transformer:
    """Remove the all-ones component from everything written to the residual stream.

    Only valid for LayerNorm models (the next LayerNorm deletes that component); refused
    for RMSNorm, where the mean is part of the geometry.
    """
    if model.config.norm_kind != "layer":
        raise ValueError("centring writers is only exact for LayerNorm models")
    blk = model.blocks
    blocks = dataclasses.replace(
        blk, W_O=_centre(blk.W_O), b_O=_centre(blk.b_O), W_out=_centre(blk.W_out), b_out=_centre(blk.b_out),
    )
    # A tied embedding is also the unembedding: untie before centring the writer copy.
    unembed = model.W_U
    config = dataclasses.replace(model.config, tie_embeddings=False)
    return dataclasses.replace(
        model, config=config, blocks=blocks, embed=_centre(model.embed),
        pos_embed=_centre(model.pos_embed), unembed=unembed,
    )


def centre_unembed(model: Transformer) -> Transformer:
    """Subtract the mean unembedding row: logits shift by one constant per position."""
    unembed_b = model.unembed_b
    if unembed_b is not None:
        unembed_b = unembed_b - unembed_b.mean()
    config = dataclasses.replace(model.config, tie_embeddings=False)
    return dataclasses.replace(
        model, config=config, unembed=_centre(model.W_U, axis=0), unembed_b=unembed_b
    )


def fold_and_centre(model: Transformer) -> Transformer:
    """fold_norms, then (LayerNorm models) centre the writers and the unembedding."""
    model = fold_norms(model)
    if model.config.norm_kind == "layer":
        model = centre_unembed(centre_writers(model))
    return model
