"""Interventions and captures as DATA, consumed by the pure forward.

`Edits` is a pytree of per-layer arrays (leading axis = layers) that the forward scans
over together with the stacked weights.  A field left as None costs nothing and is not
even traced; a field given as an array jit-compiles once per shape, and a sweep over K
interventions is `jax.vmap` over a K-stacked `Edits`.  No Python callbacks, no strings.

Order inside block l (documented because it matters when edits are combined):
  1. resid_pre[l] patched:   x <- x + resid_mix * (resid_source - x)
  2. directions ablated:     x <- x - sum_i (x . u_i) u_i         (u_i = resid_ablate rows)
  3. vectors added:          x <- x + resid_add
  then the block runs; inside it
  4. head outputs z (before W_O) mixed:   z <- z + head_mix * (head_source - z)
  5. MLP neurons mixed:                   n <- n + neuron_mix * (neuron_source - n)
  6. each writer (attention output, MLP output) has `writer_ablate` directions removed.
A `*_source` left None means zeros, so `mix = 1` with no source is zero-ablation; mean
ablation, resample ablation and activation patching differ only in the source given.
Position axes `S` are either 1 (every position) or the sequence length.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
from jaxtyping import Array, Float


class Edits(eqx.Module):
    """Every intervention of one forward; all fields optional, leading axis = layers."""

    resid_add: Float[Array, "layers S d_model"] | None = None
    resid_ablate: Float[Array, "layers n_dirs d_model"] | None = None
    resid_mix: Float[Array, "layers S"] | None = None
    resid_source: Float[Array, "layers S d_model"] | None = None
    head_mix: Float[Array, "layers S heads"] | None = None
    head_source: Float[Array, "layers S heads d_head"] | None = None
    neuron_mix: Float[Array, "layers S d_mlp"] | None = None
    neuron_source: Float[Array, "layers S d_mlp"] | None = None
    writer_ablate: Float[Array, "layers n_dirs d_model"] | None = None


@dataclasses.dataclass(frozen=True)
class Capture:
    """Which activations a forward returns (static: each combination compiles once).

    A plain forward uses `Capture()` with every flag off and pays nothing.  The attention
    pattern ([layers, heads, seq, seq]) is off by default since it dominates memory.
    """

    resid: bool = False  # resid_pre, resid_mid, resid_post
    sublayers: bool = False  # attn_out, mlp_out (what each sub-block writes)
    head_z: bool = False  # per-head attention output before W_O, [layers, seq, heads, d_head]
    neurons: bool = False  # MLP hidden activations after the nonlinearity (and gate)
    norms: bool = False  # what each norm divided by, and the final norm's input/output
    attn_pattern: bool = False

    @classmethod
    def all(cls, attn_pattern: bool = True) -> "Capture":
        return cls(True, True, True, True, True, attn_pattern)


class Activations(eqx.Module):
    """Captured activations; a field is None unless its Capture flag was set.

    resid_pre[l] is what enters block l (equals transformers' hidden_states[l]);
    resid_mid[l] is after attention (for parallel-residual models, x + attn_out);
    resid_post[l] is what leaves block l.  norm scales are the divisors sigma(x) / rms(x).
    """

    resid_pre: Float[Array, "layers seq d_model"] | None = None
    resid_mid: Float[Array, "layers seq d_model"] | None = None
    resid_post: Float[Array, "layers seq d_model"] | None = None
    attn_out: Float[Array, "layers seq d_model"] | None = None
    mlp_out: Float[Array, "layers seq d_model"] | None = None
    head_z: Float[Array, "layers seq heads d_head"] | None = None
    neurons: Float[Array, "layers seq d_mlp"] | None = None
    attn_pattern: Float[Array, "layers heads seq seq"] | None = None
    ln1_scale: Float[Array, "layers seq"] | None = None
    ln2_scale: Float[Array, "layers seq"] | None = None
    final_norm_in: Float[Array, "seq d_model"] | None = None
    final_norm_out: Float[Array, "seq d_model"] | None = None
    final_scale: Float[Array, " seq"] | None = None
