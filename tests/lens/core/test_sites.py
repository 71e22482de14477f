"""The path-patching sites against transformers with PyTorch forward hooks, on a tiny random
model of every family (tolerance 1e-5 on the logits, float32): attention-output and
MLP-output patching, per-head query / key / value INPUT patching, norm-divisor freezing;
the q/k/v invariant; layer-selective capture; K-stacked sweeps of ablations and patches
equal a loop of single runs."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lens
from lens.core import edits as E
from lens_tiny import VOCAB, tiny
from lens.models import Capture, Edits

RNG = np.random.RandomState(3)
TOKENS = RNG.randint(0, VOCAB, size=8)
OTHER = RNG.randint(0, VOCAB, size=8)
TOL = 1e-5
FAMILIES = ("llama", "gpt2", "neox", "gemma3")


def _layers(hf):
    return hf.model.layers if hasattr(hf, "model") else (
        hf.transformer.h if hasattr(hf, "transformer") else hf.gpt_neox.layers)


# Per family, the transformers module whose output is our site, and where head h's q/k/v
# sits in the output of the (possibly fused) projection.
def _modules(name, hf, layer):
    L = _layers(hf)[layer]
    if name in ("llama", "gemma3"):
        attn, final = L.self_attn, hf.model.norm
        qkv = {s: (getattr(attn, f"{s}_proj"), lambda h, dh, d: h * dh) for s in "qkv"}
        attn_out = L.post_attention_layernorm if name == "gemma3" else attn
        mlp_out = L.post_feedforward_layernorm if name == "gemma3" else L.mlp
        ln2 = L.pre_feedforward_layernorm if name == "gemma3" else L.post_attention_layernorm
        return dict(qkv=qkv, attn_out=attn_out, mlp_out=mlp_out, ln1=L.input_layernorm, ln2=ln2, final=final)
    if name == "gpt2":
        off = {"q": 0, "k": 1, "v": 2}
        qkv = {s: (L.attn.c_attn, lambda h, dh, d, o=off[s]: o * d + h * dh) for s in "qkv"}
        return dict(qkv=qkv, attn_out=L.attn, mlp_out=L.mlp, ln1=L.ln_1, ln2=L.ln_2, final=hf.transformer.ln_f)
    off = {"q": 0, "k": 1, "v": 2}  # NeoX: per head [q | k | v], each d_head wide
    qkv = {s: (L.attention.query_key_value, lambda h, dh, d, o=off[s]: (3 * h + o) * dh) for s in "qkv"}
    return dict(qkv=qkv, attn_out=L.attention, mlp_out=L.mlp, ln1=L.input_layernorm,
                ln2=L.post_attention_layernorm, final=hf.gpt_neox.final_layer_norm)


def hooked(hf, hooks, tokens=TOKENS):
    handles = [mod.register_forward_hook(fn) for mod, fn in hooks]
    try:
        with torch.no_grad():
            return hf(input_ids=torch.as_tensor(tokens[None])).logits[0].numpy()
    finally:
        for h in handles:
            h.remove()


def recorded(hf, module, tokens):
    """(input, output) of `module` on one transformers forward (output's tensor part)."""
    seen = []

    def fn(m, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append((x[0].clone(), (out[0] if isinstance(out, tuple) else out)[0].clone()))

    handle = module.register_forward_hook(fn, with_kwargs=True)
    try:
        hooked(hf, [], tokens)
    finally:
        handle.remove()
    return seen[0]


def replace_output(fn):
    """Forward hook replacing the module's (first) output tensor by fn(output)."""
    def hook(m, args, out):
        if isinstance(out, tuple):
            return (fn(out[0]),) + tuple(out[1:])
        return fn(out)
    return hook


@eqx.filter_jit
def fwd(model, tokens, edits):
    return model.forward(tokens, edits=edits).logits


def run(model, edits, tokens=TOKENS):
    return np.asarray(fwd(model, jnp.asarray(tokens, jnp.int32), edits))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", ["attn_out", "mlp_out"])
def test_sublayer_output_patching_matches_hooks(family, site):
    hf, model, _ = tiny(family)
    layer, pos = model.config.n_layers - 1, [2, 5]
    _, cache = lens.run_with_cache(model, OTHER)
    ours = run(model, E.patch(model, cache, site, layers=[layer], positions=pos))
    module = _modules(family, hf, layer)[site]
    source = recorded(hf, module, OTHER)[1]  # transformers' own activation on the other run

    def fn(out):
        out = out.clone()
        out[0, pos] = source[pos]
        return out

    ref = hooked(hf, [(module, replace_output(fn))])
    np.testing.assert_allclose(ours, ref, atol=TOL)
    assert np.abs(ours - run(model, None)).max() > 1e-3  # the patch did something


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", ["q_input", "k_input", "v_input"])
def test_qkv_input_patching_matches_hooks(family, site):
    """Hook the projection and replace head h's slice with the projection of the normed
    source residual (transformers' hidden_states[l] of the other run)."""
    hf, model, _ = tiny(family)
    c = model.config
    layer, head, pos = c.n_layers - 1, 1, [3, 4, 7]
    with torch.no_grad():
        hs = hf(input_ids=torch.as_tensor(OTHER[None]), output_hidden_states=True).hidden_states
    resid_pre = torch.stack(hs[: c.n_layers])[:, 0]  # [layers, seq, d]
    ours = run(model, E.patch(model, None, site, layers=[layer], positions=pos, heads=[head],
                              source=resid_pre.numpy()))
    mods = _modules(family, hf, layer)
    proj, offset = mods["qkv"][site[0]]
    with torch.no_grad():
        projected = proj(mods["ln1"](resid_pre[layer][None]))[0]
    lo = offset(head, c.d_head, c.d_model)

    def fn(out):
        out = out.clone()
        out[0, pos, lo:lo + c.d_head] = projected[pos, lo:lo + c.d_head]
        return out

    ref = hooked(hf, [(proj, replace_output(fn))])
    np.testing.assert_allclose(ours, ref, atol=TOL)
    assert np.abs(ours - run(model, None)).max() > 1e-4


def _divisor(module, x):
    """The divisor a transformers norm module computes for input x (float32)."""
    eps = getattr(module, "eps", None)
    eps = module.variance_epsilon if eps is None else eps
    x = x.float()
    if isinstance(module, torch.nn.LayerNorm):
        x = x - x.mean(-1, keepdim=True)
    return torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_divisor_freezing_matches_hooks(family):
    """ln1 and ln2 of the last layer and the final norm divide by the OTHER run's divisor:
    y' = (y - b) * s_own / s_other + b on each norm module's output."""
    hf, model, _ = tiny(family)
    layer = model.config.n_layers - 1
    _, cache = lens.run_with_cache(model, OTHER)
    ours = run(model, E.freeze_norm_scale(model, cache, layers=[layer]))
    mods = _modules(family, hf, layer)
    hooks = []
    for name in ("ln1", "ln2", "final"):
        m = mods[name]
        other = _divisor(m, recorded(hf, m, OTHER)[0])

        def hook(mod, args, out, other=other):
            b = 0.0 if getattr(mod, "bias", None) is None else mod.bias
            return (out - b) * _divisor(mod, args[0][0]) / other + b

        hooks.append((m, hook))
    np.testing.assert_allclose(ours, hooked(hf, hooks), atol=TOL)
    assert np.abs(ours - run(model, None)).max() > 1e-3
    # freezing with the run's own divisors changes nothing
    _, own = lens.run_with_cache(model, TOKENS)
    np.testing.assert_allclose(run(model, E.freeze_norm_scale(model, own)), run(model, None), atol=TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_qkv_inputs_carry_the_whole_attention(family):
    """Patching every head's q, k and v inputs at layer l with another run's resid_pre[l]
    makes attn_out[l] equal that run's; mlp_out[l] (which reads this run's stream) does not."""
    _, model, _ = tiny(family)
    layer = model.config.n_layers - 1
    _, other = lens.run_with_cache(model, OTHER)
    e = E.combine(*[E.patch(model, other, s, layers=[layer]) for s in ("q_input", "k_input", "v_input")])
    _, mine = lens.run_with_cache(model, TOKENS, edits=e)
    np.testing.assert_allclose(mine.attn_out[layer], other.attn_out[layer], atol=1e-5)
    assert np.abs(np.asarray(mine.mlp_out[layer] - other.mlp_out[layer])).max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_capture_chosen_layers_and_qkv(family):
    hf, model, _ = tiny(family)
    n = model.config.n_layers
    chosen = [n - 1, 0]
    full_logits, full = lens.run_with_cache(model, TOKENS, capture=Capture.all())
    logits, part = lens.run_with_cache(model, TOKENS, capture=Capture(
        resid=True, head_z=True, norms=True, qkv=True, layers=chosen))
    np.testing.assert_array_equal(logits, full_logits)
    for field in ("resid_pre", "resid_post", "head_z", "ln1_scale", "q", "k", "v"):
        assert getattr(part, field).shape[0] == 2, field
        np.testing.assert_allclose(getattr(part, field), getattr(full, field)[np.array(chosen)], atol=1e-6)
    assert part.neurons is None and part.final_scale is not None
    # q / k / v against transformers' projections (before rotary): the last layer's query
    mods = _modules(family, hf, n - 1)
    proj, offset = mods["qkv"]["q"]
    q_hf = recorded(hf, proj, TOKENS)[1].numpy()
    c = model.config
    for h in range(c.n_heads):
        lo = offset(h, c.d_head, c.d_model)
        np.testing.assert_allclose(part.q[0, :, h], q_hf[:, lo:lo + c.d_head], atol=1e-5)
    with pytest.raises(ValueError, match=rf"Capture\(layers=...\): layer {n} out of range \[0, {n}\)"):
        lens.run_with_cache(model, TOKENS, capture=Capture(resid=True, layers=[n]))
    with pytest.raises(ValueError, match="repeated"):
        Capture(resid=True, layers=[0, 0])


def test_sweep_of_ablations_and_patches_equals_loop():
    _, model, _ = tiny()
    c = model.config
    _, cache = lens.run_with_cache(model, OTHER)
    mask = np.ones((2, 8), bool)
    mask[1, -3:] = False  # right-padded prompt: its last real token is position 4
    prompts = np.stack([TOKENS, OTHER])
    each = [
        E.ablate_heads(model, {1: [h], 2: [(h + 1) % c.n_heads]}) for h in range(3)
    ]
    res = lens.core.sweep.sweep_edits(model, prompts, E.stack_edits(each), attention_mask=mask,
                                      config=lens.SweepConfig(keep_logits=True, chunk_size=2, progress=False))
    assert res.start == 1 and res.kl.shape == (3, 2)
    patches = [E.patch(model, cache, s, layers=[2], positions=[1, 3])
               for s in ("attn_out", "mlp_out", "resid")]
    patches = [E.combine(p, E.patch(model, cache, "q_input", layers=[2], heads=[0])) for p in patches]
    res2 = lens.core.sweep.sweep_edits(model, prompts, E.stack_edits(patches), attention_mask=mask,
                                       config=lens.SweepConfig(last_only=False, keep_logits=True, progress=False))
    last = [7, 4]
    for edits_list, r, last_only in ((each, res, True), (patches, res2, False)):
        for k, e in enumerate(edits_list):
            for p in range(2):
                t, m = jnp.asarray(prompts[p], jnp.int32), jnp.asarray(mask[p])
                logits = np.asarray(model.forward(t, m, edits=e).logits)
                base = np.asarray(model.forward(t, m).logits)
                if last_only:
                    logits, base = logits[last[p]], base[last[p]]
                np.testing.assert_allclose(r.logits[k, p], logits, atol=1e-5)
                lp, blp = jax.nn.log_softmax(logits), jax.nn.log_softmax(base)
                np.testing.assert_allclose(r.kl[k, p], np.sum(np.exp(lp) * (lp - blp), -1), atol=1e-5)
    # run_edits (jitted, vmapped over K) equals the same loop
    np.testing.assert_allclose(lens.run_edits(model, TOKENS, E.stack_edits(patches)),
                               np.stack([run(model, e) for e in patches]), atol=1e-5)


def test_site_declaration_drives_validation():
    _, model, _ = tiny()
    c = model.config
    n = c.n_layers
    _, cache = lens.run_with_cache(model, OTHER)
    with pytest.raises(ValueError, match="kv_heads=2"):
        E.check_edits(model, Edits(k_input_mix=jnp.zeros((n, 1, c.n_heads))), 8)
    with pytest.raises(ValueError, match="source without a mix"):
        E.check_edits(model, Edits(attn_out_source=jnp.zeros((n, 1, c.d_model))), 8)
    with pytest.raises(ValueError, match=r"head \[2\] out of range \[0, 2\) at site 'k_input'"):
        E.patch(model, cache, "k_input", heads=[2])  # 2 kv heads
    with pytest.raises(ValueError, match="per-head sites only"):
        E.patch(model, cache, "mlp_out", heads=[0])
    with pytest.raises(ValueError, match="site must be one of"):
        E.patch(model, cache, "mlp")
    with pytest.raises(ValueError, match="source has shape"):
        E.patch(model, None, "q_input", source=np.zeros((n, 8, c.d_model + 1), np.float32))
    # combine: vectors summed, directions concatenated, a patch set twice refused
    a = E.patch(model, cache, "attn_out", layers=[1])
    with pytest.raises(ValueError, match="more than one"):
        E.combine(a, a)
    assert E.first_edited_layer(model, E.stack_edits([a, a])) == 1
    final = E.stack_edits([E.patch(model, cache, "final_scale")])
    assert E.first_edited_layer(model, final) == n


def test_patch_sites_agree_with_the_activations_they_read():
    """models.core.interventions.PATCH_SITES is the one patch-site table: each site's source
    axes (derived from the Edits declaration) are the axes of the Activations field it reads
    (Activations' own annotations, after [layers]); the unit a patch may pick is the head
    axis of the per-head sites only; only the final norm's site has no [layers] axis; and
    lens.circuits.patching takes a subset of it."""
    import typing

    from lens.circuits import patching as Pt
    from lens.models.core.interventions import PATCH_SITES, Activations

    hints = typing.get_type_hints(Activations)
    per_head = {"heads": "heads", "q_input": "heads", "k_input": "kv_heads", "v_input": "kv_heads"}
    for name, site in PATCH_SITES.items():
        dims = typing.get_args(hints[site.field])[0].dim_str.split()  # e.g. "layers seq d_model"
        dims = dims[1:] if dims[0] == "layers" else dims
        assert dims[0] == "seq" and tuple(dims[1:]) == site.axes[1:], (name, dims, site.axes)
        assert site.unit == per_head.get(name), name
        assert site.layered == (name != "final_scale"), name
    assert set(Pt.SITES) <= set(PATCH_SITES) and all(Pt.SITES[k] is PATCH_SITES[k] for k in Pt.SITES)
