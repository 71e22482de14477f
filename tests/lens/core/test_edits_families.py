"""Edits, the steering sweep and MELBO's gradients on GPT-2, GPT-NeoX, Gemma 3, Gemma 2,
Mistral, Qwen3 and Phi-3, each against PyTorch forward hooks doing the same thing in
transformers (test_edits.py does Llama).  One table says where each family's residual stream, head outputs z (the input
of W_O), MLP neurons (the input of W_out) and writers live in transformers.

Writers: what a block ADDS to the residual stream.  For Gemma 2 and 3 that is the output of
the sandwich norms (post_attention_layernorm, post_feedforward_layernorm), not of o_proj
/ down_proj: `writer_ablate` acts after the post-norm (models/core/block.py), so the stream
never holds the direction; projecting it out of o_proj's output instead would let the
post-norm's gain write it back (checked below: that gives other logits).
NeoX is parallel-residual (x + attn(ln1 x) + mlp(ln2 x)): its writers are still the
attention's dense output and the MLP output.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_tiny
from hf_tiny import pre_edit, record
import lens
from lens.core import edits as E
from lens.steering import melbo
from lens_tiny import VOCAB, tiny
from lens.models import Edits

FAMILIES = ["gpt2", "neox", "gemma3", "gemma2", "mistral", "qwen3", "phi3"]
# The sweep and MELBO tests compile several programs per family: the newer Llama-like
# families (same block path as Llama and Gemma 3) run there only in `make test` (slow).
SLOW = [pytest.param(f, marks=pytest.mark.slow) for f in ("mistral", "qwen3", "phi3")]
RNG = np.random.RandomState(5)
TOKENS = RNG.randint(0, VOCAB, size=8)
OTHER = RNG.randint(0, VOCAB, size=8)
# Logits are O(1); float32 vs float32 with other summation orders.  Measured max error over
# every logit check in this file (all three families): 9.4e-7.
TOL = 1e-5

SITES = {  # family -> (decoder layers, W_O module, W_out module, writer modules of a layer)
    "gpt2": lambda hf: (hf.transformer.h, lambda L: L.attn.c_proj, lambda L: L.mlp.c_proj,
                        lambda L: [L.attn.c_proj, L.mlp]),
    "neox": lambda hf: (hf.gpt_neox.layers, lambda L: L.attention.dense,
                        lambda L: L.mlp.dense_4h_to_h, lambda L: [L.attention.dense, L.mlp]),
    "gemma3": lambda hf: (hf.model.layers, lambda L: L.self_attn.o_proj, lambda L: L.mlp.down_proj,
                          lambda L: [L.post_attention_layernorm, L.post_feedforward_layernorm]),
    "gemma2": lambda hf: (hf.model.layers, lambda L: L.self_attn.o_proj, lambda L: L.mlp.down_proj,
                          lambda L: [L.post_attention_layernorm, L.post_feedforward_layernorm]),
    # Phi-3's fused gate_up_proj still feeds down_proj the neurons up * act(gate)
    **{f: lambda hf: (hf.model.layers, lambda L: L.self_attn.o_proj, lambda L: L.mlp.down_proj,
                      lambda L: [L.self_attn.o_proj, L.mlp]) for f in ("mistral", "qwen3", "phi3")},
}


def hooked(hf, hooks, tokens=TOKENS):
    """transformers logits with hooks (hf_tiny.hooked) on TOKENS by default."""
    return hf_tiny.hooked(hf, hooks, tokens)


def sites(family):
    hf, model, _ = tiny(family)
    layers, o_proj, down, writers = SITES[family](hf)
    return hf, model, layers, o_proj, down, writers


def uniform(model, e: Edits) -> Edits:
    """`e` with every field present (zeros where unset: a zero vector adds nothing, a zero
    direction removes nothing, a zero mix keeps the activation) and position axes
    broadcast to the 8 tokens, so ONE compiled forward per family serves every edit here
    (compiling one per edit made this file take minutes)."""
    c = model.config
    n, d, h, dh, m = c.n_layers, c.d_model, c.n_heads, c.d_head, c.d_mlp
    shapes = dict(resid_add=(n, 8, d), resid_mix=(n, 8), resid_source=(n, 8, d), head_mix=(n, 8, h),
                  head_source=(n, 8, h, dh), neuron_mix=(n, 8, m), neuron_source=(n, 8, m))
    out = {k: jnp.zeros(v) if getattr(e, k) is None else jnp.broadcast_to(getattr(e, k), v)
           for k, v in shapes.items()}
    for k in ("resid_ablate", "writer_ablate"):  # two directions at most here
        a = jnp.zeros((n, 0, d)) if getattr(e, k) is None else getattr(e, k)
        out[k] = jnp.pad(a, ((0, 0), (0, 2 - a.shape[1]), (0, 0)))
    return Edits(**out)


def run_cache(model, edits, tokens=TOKENS):
    """Our (logits, activations) with `edits` (lens.run_with_cache, the default capture)."""
    return lens.run_with_cache(model, tokens, edits=uniform(model, edits))


def run(model, edits, tokens=TOKENS):
    return np.asarray(run_cache(model, edits, tokens)[0])


def project_out(u):
    u = torch.tensor(np.asarray(u))
    return lambda h: h - (h @ u.T) @ u


def check(ours, ref, base):
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    assert np.abs(ours - base).max() > 1e-3  # the edit did something


@pytest.mark.parametrize("family", FAMILIES)
def test_add_and_directional_ablation_match_hooks(family):
    hf, model, layers, o_proj, down, writers = sites(family)
    n, d = model.config.n_layers, model.config.d_model
    base = run(model, Edits())
    np.testing.assert_allclose(base, hooked(hf, []), atol=TOL, rtol=0)
    # add: one vector per layer at positions 2 and 5, entering blocks 0 and n-1
    v = RNG.randn(2, d).astype(np.float32)

    def add(vec):
        def fn(h):
            h = h.clone()
            h[:, [2, 5]] += 3.0 * torch.as_tensor(vec)
            return h
        return pre_edit(fn)

    ours = run(model, E.add(model, v, [0, n - 1], coeff=3.0, positions=[2, 5], seq_len=8))
    check(ours, hooked(hf, [(layers[0], "pre_", add(v[0])), (layers[n - 1], "pre_", add(v[1]))]), base)

    dirs = RNG.randn(2, d).astype(np.float32)
    u = np.asarray(E.orthonormal(dirs))
    # out of the residual stream entering block 1
    ours = run(model, E.ablate_direction(model, dirs, layers=[1]))
    check(ours, hooked(hf, [(layers[1], "pre_", pre_edit(project_out(u)))]), base)
    # out of every writer: the embedding (what enters block 0) and each block's two writes
    post = lambda m, a, out: project_out(u)(out)  # noqa: E731
    hooks = [(layers[0], "pre_", pre_edit(project_out(u)))]
    for layer in layers:
        hooks += [(w, "", post) for w in writers(layer)]
    ours = run(model, E.ablate_direction(model, dirs, where="writers"))
    check(ours, hooked(hf, hooks), base)
    _, cache = run_cache(model, E.ablate_direction(model, dirs, where="writers"))
    # the stream never holds the directions: measured |x . u| <= 1e-6 against |x| ~ 1..50
    assert np.abs(np.asarray(cache.resid_post) @ u.T).max() < 1e-4
    if family in ("gemma3", "gemma2"):
        # ablating before the sandwich norm instead (o_proj / down_proj outputs) differs
        early = [(layers[0], "pre_", pre_edit(project_out(u)))]
        for layer in layers:
            early += [(o_proj(layer), "", post), (down(layer), "", post)]
        assert np.abs(hooked(hf, early) - ours).max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_head_and_neuron_ablation_match_hooks(family):
    hf, model, layers, o_proj, down, _ = sites(family)
    c = model.config
    dh, last = c.d_head, c.n_layers - 1
    base = run(model, Edits())

    def set_units(idx, width, value):  # units idx of the [1, seq, units*width] input set to value(i)
        def fn(x):
            x = x.clone()
            for i in idx:
                x[0, :, i * width:(i + 1) * width] = value(i)
            return x
        return pre_edit(fn)

    heads = [0, c.n_heads - 1]
    ours = run(model, E.ablate_heads(model, {last: heads}))
    check(ours, hooked(hf, [(o_proj(layers[last]), "pre_", set_units(heads, dh, lambda i: 0.0))]), base)
    # mean ablation: z averaged over the positions of another run
    _, cache = run_cache(model, Edits(), OTHER)
    ours = run(model, E.ablate_heads(model, {0: [1]}, kind="mean", cache=cache))
    mean_z = torch.as_tensor(record(hf, o_proj(layers[0]), OTHER).mean(0))
    ref = hooked(hf, [(o_proj(layers[0]), "pre_", set_units([1], dh, lambda i: mean_z[i * dh:(i + 1) * dh]))])
    check(ours, ref, base)
    # neurons: zero, and resample from the other run position by position
    idx = [1, 7, 30]
    ours = run(model, E.ablate_neurons(model, {last: idx}))
    check(ours, hooked(hf, [(down(layers[last]), "pre_", set_units(idx, 1, lambda i: 0.0))]), base)
    other = torch.as_tensor(record(hf, down(layers[0]), OTHER))
    ours = run(model, E.ablate_neurons(model, {0: idx}, kind="resample", cache=cache, seq_len=8))
    ref = hooked(hf, [(down(layers[0]), "pre_", set_units(idx, 1, lambda i: other[:, i:i + 1]))])
    check(ours, ref, base)


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_patching_matches_hooks(family):
    hf, model, layers, o_proj, down, _ = sites(family)
    c = model.config
    base = run(model, Edits())
    _, cache = run_cache(model, Edits(), OTHER)

    def patch_from(src, rows, cols=slice(None)):
        def fn(x):
            x = x.clone()
            x[0, rows, cols] = src[rows, cols]
            return x
        return pre_edit(fn)

    # residual stream entering block 1 at positions 3 and 6, from transformers' other run
    resid = torch.as_tensor(record(hf, layers[1], OTHER))
    ours = run(model, E.patch(model, cache, "resid", layers=[1], positions=[3, 6]))
    check(ours, hooked(hf, [(layers[1], "pre_", patch_from(resid, [3, 6]))]), base)
    # the last head of the last layer at the last position
    h, dh, last = c.n_heads - 1, c.d_head, c.n_layers - 1
    z = torch.as_tensor(record(hf, o_proj(layers[last]), OTHER))
    ours = run(model, E.patch(model, cache, "heads", layers=last, positions=-1, heads=[h]))
    check(ours, hooked(hf, [(o_proj(layers[last]), "pre_", patch_from(z, [7], slice(h * dh, (h + 1) * dh)))]), base)
    # every neuron of layer 0 at positions 0..3
    nrn = torch.as_tensor(record(hf, down(layers[0]), OTHER))
    ours = run(model, E.patch(model, cache, "neurons", layers=0, positions=[0, 1, 2, 3]))
    check(ours, hooked(hf, [(down(layers[0]), "pre_", patch_from(nrn, [0, 1, 2, 3]))]), base)


@pytest.mark.parametrize("family", ["gpt2", "neox", "gemma3", "gemma2"] + SLOW)
def test_sweep_matches_hooks_per_prompt(family):
    # The prefix-sharing vmapped sweep (2 chunks, the last padded; a right-padded prompt)
    # against transformers with a pre-hook, each prompt run alone at its real length.
    hf, model, layers, _, _, _ = sites(family)
    d = model.config.d_model
    vectors = RNG.randn(3, d).astype(np.float32)
    coeffs, steer_layers = [0.0, 2.5], [1, 0]
    prompts = RNG.randint(0, VOCAB, size=(2, 8))
    mask = np.ones(prompts.shape, bool)
    mask[1, -3:] = False
    res = lens.sweep_vectors(model, prompts, vectors, coeffs=coeffs, layers=steer_layers, attention_mask=mask,
                             config=lens.SweepConfig(keep_logits=True, chunk_size=2, progress=False))
    for p, n in enumerate((8, 5)):
        base = hooked(hf, [], prompts[p, :n])[-1]
        np.testing.assert_allclose(res.base_logits[p], base, atol=TOL, rtol=0)
        for k in range(3):
            for ci, cf in enumerate(coeffs):
                for li, layer in enumerate(res.layers):
                    add = pre_edit(lambda h: h + cf * torch.as_tensor(vectors[k]))
                    ref = hooked(hf, [(layers[layer], "pre_", add)], prompts[p, :n])[-1]
                    np.testing.assert_allclose(res.logits[k, ci, li, p], ref, atol=TOL, rtol=0)
                    lp, lq = (torch.log_softmax(torch.as_tensor(a, dtype=torch.float64), -1).numpy()
                              for a in (ref, base))
                    kl = np.sum(np.exp(lp) * (lp - lq))
                    np.testing.assert_allclose(res.kl[k, ci, li, p], kl, atol=1e-6, rtol=1e-4)
    assert res.kl[:, 1].min() > 1e-4  # coefficient 2.5 really steered


@pytest.mark.parametrize("family", ["gpt2", "neox", "gemma3", "gemma2"] + SLOW)
def test_melbo_gradients_match_torch_autograd(family):
    # MELBO's and MELBO-ortho's objectives and their gradients in theta (what every training
    # step uses) against torch autograd through a hook adding theta after block s.
    hf, model, layers, _, _, _ = sites(family)
    s, t = 0, 1
    prompts = [list(RNG.randint(0, VOCAB, 8)), list(RNG.randint(0, VOCAB, 6))]
    problem = melbo.make_problem(model, *melbo.pad_prompts(prompts), s, t)
    d = model.config.d_model
    theta, theta0 = (2.0 * RNG.randn(d)).astype(np.float32), (2.0 * RNG.randn(d)).astype(np.float32)

    def torch_h_t(tokens, vec):
        seen = []
        hs = [layers[s].register_forward_hook(lambda m, a, out: out + vec),
              layers[t].register_forward_hook(lambda m, a, out: seen.append(out[0]))]
        try:
            hf(input_ids=torch.as_tensor(np.asarray(tokens)[None]))
        finally:
            for h in hs:
                h.remove()
        return seen[0].double()

    for p in hf.parameters():
        p.requires_grad_(False)
    th = torch.tensor(theta, requires_grad=True)
    zero = torch.zeros(d)
    with torch.no_grad():
        ref_means = [torch_h_t(tk, torch.as_tensor(theta0)).mean(0) for tk in prompts]
    # MELBO (p=2, q=1): -sum_prompts sum_positions |h_t(theta) - h_t(0)|^2
    loss = -sum(((torch_h_t(tk, th) - torch_h_t(tk, zero).detach()) ** 2).sum() for tk in prompts)
    (grad,) = torch.autograd.grad(loss, th)
    # MELBO-ortho: mean over prompts of | mean_positions h_t(theta) - mean h_t(theta0) |
    oloss = sum(torch.linalg.norm(torch_h_t(tk, th).mean(0) - r) for tk, r in zip(prompts, ref_means)) / 2
    (ograd,) = torch.autograd.grad(oloss, th)

    @eqx.filter_jit
    def both(problem, theta, theta0):  # one compiled call: both objectives and gradients
        unsteered = melbo.steered_target(problem, jnp.zeros_like(theta))
        ref = melbo.ortho_reference(problem, theta0)
        return (jax.value_and_grad(lambda v: melbo.melbo_loss(problem, v, unsteered))(theta),
                jax.value_and_grad(lambda v: melbo.ortho_loss(problem, v, ref))(theta))

    (ours, g), (o_ours, o_g) = both(problem, jnp.asarray(theta), jnp.asarray(theta0))
    # measured: gradients' max abs error / max |grad| <= 1.8e-7 (all three families)
    assert float(ours) == pytest.approx(float(loss), rel=1e-5)
    assert float(o_ours) == pytest.approx(float(oloss), rel=1e-5)
    for got, want in ((g, grad), (o_g, ograd)):
        want = want.numpy()
        assert np.abs(want).max() > 1e-3
        np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(want).max(), rtol=0)
