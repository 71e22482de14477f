"""lens.circuits.scrubbing's patched heads (one-head slices of a block: GQA, rotary, q/k norms,
sliding windows) on tiny transformers models: with every draw the same sequence, the
treeified run through those heads equals transformers' own forward; with different
draws, each head equals the whole-block path patching of `models.Edits` (q / k / v input
sites, themselves checked against transformers hooks in the intervention tests)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lens.circuits import scrubbing as S
from lens.circuits import scrubbing_runs as R
from lens.circuits import scrubbing_sampling as Sm
from lens_tiny import VOCAB, tiny
from lens.models.core.interventions import Capture, Edits

SEQ = 9  # > the gemma3 sliding window (4): the local layer's window matters


def head_tree(layer: int, heads: tuple[int, ...], sampler) -> S.Node:
    """Output <- each head of `heads` (layer `layer`) with its q / k / v inputs each fed by
    the embeddings and head 0 of the layer below, every draw by `sampler`."""
    Nd, below = S.Node, layer - 1

    def feed():
        return (Nd(S.Embed(), sampler), Nd(S.Head(below, 0), sampler, other=sampler))

    return Nd(S.Output(), S.Exact(), other=sampler, children=tuple(
        Nd(S.Head(layer, h), sampler, other=sampler, children=tuple(
            Nd(S.HeadInput(layer, h, w), sampler, feed(), other=sampler) for w in "qkv")) for h in heads))


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_same_draws_equal_transformers_forward(name):
    hf, m, _ = tiny(name)
    c = m.config
    heads = (0, c.n_heads - 1)  # first and last query head: different kv heads under GQA
    tree = head_tree(1, heads, S.Exact())
    tokens = np.random.default_rng(0).integers(0, VOCAB, (3, SEQ)).astype(np.int32)
    plan, runs, _ = Sm.sample_runs(tree, len(tokens), np.random.default_rng(0), {})
    got = jax.jit(jax.vmap(lambda r: R.treeified_logits(m, plan, r)))(jnp.asarray(tokens[runs]))
    with torch.no_grad():
        want = hf(torch.tensor(tokens.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=0)  # float32, two implementations


@pytest.mark.parametrize("name,layer", [("llama", 1), ("gemma3", 0), ("gemma3", 1)])  # gemma3 0: sliding
def test_patched_heads_equal_whole_block_path_patching(name, layer):
    _, m, _ = tiny(name)
    c = m.config
    heads = (1, c.n_heads - 1)
    rng = np.random.default_rng(1)
    srcs = {w: jnp.asarray(rng.normal(size=(len(heads), SEQ, c.d_model)), jnp.float32) for w in "qkv"}
    base = jnp.asarray(rng.normal(size=(SEQ, c.d_model)), jnp.float32)
    qpos, valid = m.default_positions(jnp.zeros((SEQ,), jnp.int32), None, None, None)
    one = jax.jit(lambda h, s: jax.vmap(lambda q, k, v: R._patched_head(m, layer, h, q, k, v, qpos, valid))(
        s["q"], s["k"], s["v"]), static_argnums=0)  # vmapped over members, as under the scrub's vmap

    group = c.n_heads // c.n_kv_heads
    for i, h in enumerate(heads):
        fields = {}
        for w in "qkv":
            unit, width = (h, c.n_heads) if w == "q" else (h // group, c.n_kv_heads)
            mix = np.zeros((c.n_layers, 1, width), np.float32)
            mix[layer, 0, unit] = 1.0
            src = np.zeros((c.n_layers, SEQ, c.d_model), np.float32)
            src[layer] = np.asarray(srcs[w][i])
            fields[f"{w}_input_mix"], fields[f"{w}_input_source"] = jnp.asarray(mix), jnp.asarray(src)
        z = m.run_blocks(base, qpos, valid, start=layer, stop=layer + 1, edits=Edits(**fields),
                         capture=Capture(head_z=True))[2].head_z[0, :, h]
        np.testing.assert_allclose(np.asarray(one(h, srcs)[i]), np.asarray(z), atol=2e-5, rtol=0)
