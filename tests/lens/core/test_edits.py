"""Edits as data: empty edits change nothing, each edit equals a PyTorch hook doing the
same thing in transformers, stacked edits vmap like a loop, bad edits fail early."""

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
from lens_tiny import VOCAB, tiny
from lens.models import Capture, Edits

RNG = np.random.RandomState(0)
TOKENS = RNG.randint(0, VOCAB, size=8)
OTHER = RNG.randint(0, VOCAB, size=8)
TOL = 1e-5


def hooked(hf, hooks, tokens=TOKENS):
    """transformers logits with hooks (hf_tiny.hooked) on TOKENS by default."""
    return hf_tiny.hooked(hf, hooks, tokens)


@eqx.filter_jit
def fwd(model, tokens, edits):
    return model.forward(tokens, edits=edits).logits


def run(model, edits, tokens=TOKENS):
    return np.asarray(fwd(model, jnp.asarray(tokens, jnp.int32), edits))


def test_empty_edits_are_bit_identical():
    _, model, _ = tiny()
    c, n = model.config, model.config.n_layers
    plain = run(model, None)
    zeros = Edits(
        resid_add=jnp.zeros((n, 1, c.d_model)), resid_ablate=jnp.zeros((n, 2, c.d_model)),
        resid_mix=jnp.zeros((n, 1)), resid_source=jnp.ones((n, 1, c.d_model)),
        head_mix=jnp.zeros((n, 1, c.n_heads)), neuron_mix=jnp.zeros((n, 1, c.d_mlp)),
        writer_ablate=jnp.zeros((n, 1, c.d_model)),
    )
    assert np.array_equal(run(model, Edits()), plain)
    assert np.array_equal(run(model, zeros), plain)
    assert np.array_equal(run(model, E.add(model, np.zeros(c.d_model, np.float32), 1)), plain)


@pytest.mark.parametrize("positions", [None, [2, 5]])
def test_add_vector_matches_hook(positions):
    hf, model, _ = tiny()
    v = RNG.randn(2, model.config.d_model).astype(np.float32)
    ours = run(model, E.add(model, v, [0, 2], coeff=3.0, positions=positions, seq_len=8))
    sel = slice(None) if positions is None else positions

    def add(vec):
        def fn(h):
            h = h.clone()
            h[:, sel] += 3.0 * torch.as_tensor(vec)
            return h
        return pre_edit(fn)

    layers = hf.model.layers
    ref = hooked(hf, [(layers[0], "pre_", add(v[0])), (layers[2], "pre_", add(v[1]))])
    np.testing.assert_allclose(ours, ref, atol=TOL)
    assert np.abs(ours - run(model, None)).max() > 1e-2  # the edit did something


def _project_out(u):
    u = torch.tensor(np.asarray(u))
    return lambda h: h - (h @ u.T) @ u


def test_directional_ablation_matches_hooks():
    hf, model, _ = tiny()
    dirs = RNG.randn(2, model.config.d_model).astype(np.float32)
    u = np.asarray(E.orthonormal(dirs))
    np.testing.assert_allclose(u @ u.T, np.eye(2), atol=1e-6)
    # residual stream entering block 1
    ours = run(model, E.ablate_direction(model, dirs, layers=[1]))
    ref = hooked(hf, [(hf.model.layers[1], "pre_", pre_edit(_project_out(u)))])
    np.testing.assert_allclose(ours, ref, atol=TOL)
    # out of every writer: embedding, every attention output, every MLP output
    ours = run(model, E.ablate_direction(model, dirs, where="writers"))
    post = lambda m, a, out: _project_out(u)(out)  # noqa: E731
    hooks = [(hf.model.embed_tokens, "", post)]
    for layer in hf.model.layers:
        hooks += [(layer.self_attn.o_proj, "", post), (layer.mlp, "", post)]
    ref = hooked(hf, hooks)
    np.testing.assert_allclose(ours, ref, atol=TOL)
    _, cache = lens.run_with_cache(model, TOKENS, edits=E.ablate_direction(model, dirs, where="writers"))
    assert np.abs(np.asarray(cache.resid_post) @ u.T).max() < 1e-4  # never in the stream


def _set_heads(heads, value):
    """o_proj pre-hook: heads (list) of the [seq, heads*d_head] input set to value(h)."""
    def fn(x):
        x = x.clone()
        for h in heads:
            x[0, :, h * 4:(h + 1) * 4] = value(h, x)
        return x
    return pre_edit(fn)


def test_head_ablation_zero_and_mean_match_hooks():
    hf, model, _ = tiny()
    attn = [layer.self_attn.o_proj for layer in hf.model.layers]
    ours = run(model, E.ablate_heads(model, {1: [0, 4], 2: [3]}))
    zero = lambda h, x: 0.0  # noqa: E731
    ref = hooked(hf, [(attn[1], "pre_", _set_heads([0, 4], zero)), (attn[2], "pre_", _set_heads([3], zero))])
    np.testing.assert_allclose(ours, ref, atol=TOL)
    # mean ablation: each head's z averaged over the positions of a reference run
    _, cache = lens.run_with_cache(model, OTHER, )
    ours = run(model, E.ablate_heads(model, {1: [2]}, kind="mean", cache=cache))
    mean_z = record(hf, attn[1], OTHER).mean(0)
    ref = hooked(hf, [(attn[1], "pre_", _set_heads([2], lambda h, x: torch.as_tensor(mean_z[h * 4:(h + 1) * 4])))])
    np.testing.assert_allclose(ours, ref, atol=TOL)


def test_neuron_ablation_and_resample_match_hooks():
    hf, model, _ = tiny()
    down = hf.model.layers[2].mlp.down_proj
    idx = [1, 7, 30]
    ours = run(model, E.ablate_neurons(model, {2: idx}))

    def set_neurons(value):
        def fn(x):
            x = x.clone()
            x[0, :, idx] = value
            return x
        return pre_edit(fn)

    np.testing.assert_allclose(ours, hooked(hf, [(down, "pre_", set_neurons(0.0))]), atol=TOL)
    # resample: the neurons' values on another input, position by position
    _, cache = lens.run_with_cache(model, OTHER, )
    ours = run(model, E.ablate_neurons(model, {2: idx}, kind="resample", cache=cache, seq_len=8))
    other = torch.as_tensor(record(hf, down, OTHER)[:, idx])
    np.testing.assert_allclose(ours, hooked(hf, [(down, "pre_", set_neurons(other))]), atol=TOL)


def test_activation_patching_matches_hooks():
    hf, model, _ = tiny()
    _, cache = lens.run_with_cache(model, OTHER)
    # residual stream entering block 1 at positions 3 and 6
    ours = run(model, E.patch(model, cache, "resid", layers=[1], positions=[3, 6]))
    src = torch.tensor(np.asarray(cache.resid_pre[1]))

    def fn(h):
        h = h.clone()
        h[0, [3, 6]] = src[[3, 6]]
        return h

    ref = hooked(hf, [(hf.model.layers[1], "pre_", pre_edit(fn))])
    np.testing.assert_allclose(ours, ref, atol=TOL)
    # head 5 of layer 2 at the last position, from the other run's transformers activations
    ours = run(model, E.patch(model, cache, "heads", layers=2, positions=-1, heads=[5]))
    o_proj = hf.model.layers[2].self_attn.o_proj
    z_other = torch.as_tensor(record(hf, o_proj, OTHER))

    def fn2(x):
        x = x.clone()
        x[0, -1, 20:24] = z_other[-1, 20:24]
        return x

    np.testing.assert_allclose(ours, hooked(hf, [(o_proj, "pre_", pre_edit(fn2))]), atol=TOL)
    # patching every layer and position with the run's own cache reproduces the run
    full = run(model, E.patch(model, cache, "resid", layers=0))
    np.testing.assert_allclose(full, run(model, None, OTHER), atol=TOL)


def test_stacked_edits_vmap_equals_loop():
    _, model, _ = tiny()
    vs = RNG.randn(3, model.config.d_model).astype(np.float32)
    each = [E.combine(E.add(model, v, 1, 2.0), E.ablate_direction(model, v, layers=[2])) for v in vs]
    stacked = E.stack_edits(each)
    vm = jax.vmap(lambda e: fwd(model, jnp.asarray(TOKENS, jnp.int32), e))(stacked)
    loop = np.stack([run(model, e) for e in each])
    np.testing.assert_allclose(vm, loop, atol=1e-6)
    np.testing.assert_allclose(lens.run_edits(model, TOKENS, stacked), loop, atol=1e-5)


def test_bad_edits_fail_before_compute():
    _, model, _ = tiny()
    d = model.config.d_model
    with pytest.raises(ValueError, match="d_model"):
        E.add(model, np.ones(d + 1), 0)
    with pytest.raises(ValueError, match="NaN"):
        E.add(model, np.full(d, np.nan), 0)
    with pytest.raises(ValueError, match="NaN"):
        lens.add_vectors(model, TOKENS, np.full((2, d), np.inf), 0)
    with pytest.raises(ValueError, match=r"layer 3 out of range \[-3, 3\) \(the model has 3 layers\)"):
        E.add(model, np.ones(d), 3)
    with pytest.raises(ValueError, match=r"layer -4 out of range \[-3, 3\)"):
        lens.add_vectors(model, TOKENS, np.ones((2, d)), -4)
    with pytest.raises(ValueError, match=r"position 8 out of range \[-8, 8\) \(a sequence of 8 tokens"):
        E.add(model, np.ones(d), 0, positions=[8], seq_len=8)
    with pytest.raises(ValueError, match=r"head \[6\] out of range \[0, 6\) at layer 0"):
        E.ablate_heads(model, {0: [6]})
    with pytest.raises(ValueError, match="needs a reference cache"):
        E.ablate_neurons(model, {0: [1]}, kind="mean")
    # a cache from a different model (another width), and from a sequence of another length
    _, gpt2, _ = tiny("gpt2")
    _, foreign = lens.run_with_cache(gpt2, TOKENS, capture=Capture(resid=True))
    with pytest.raises(ValueError, match="different model"):
        E.patch(model, foreign, "resid")
    _, cache = lens.run_with_cache(model, TOKENS[:5], capture=Capture(resid=True))
    with pytest.raises(ValueError, match="sequence length"):
        E.patch(model, cache, "resid", seq_len=8)
    with pytest.raises(ValueError, match="holds no head_z"):
        E.patch(model, cache, "heads")
    # edits for another sequence length are refused before the forward runs
    patch5 = E.patch(model, cache, "resid", positions=[1])
    with pytest.raises(ValueError, match="position axis"):
        lens.run_with_cache(model, TOKENS, edits=patch5)
    with pytest.raises(ValueError, match="differ"):
        E.stack_edits([E.add(model, np.ones(d), 0), E.add(model, np.ones(d), 0, positions=[1], seq_len=8)])
