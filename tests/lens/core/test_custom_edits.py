"""The custom-edit escape hatch (`edits.custom`, Edits.resid_fn): a pure function of the live
residual, the layer and the positions, checked against transformers forward pre-hooks doing
the same thing (a clamp, a projection-out) on tiny random llama and gpt2, jitted and vmapped
over K > 1 parameter sets; composed after the data edits of its layer."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jaxtyping import Array, Float, Int

import lens
from hf_tiny import hooked, pre_edit
from lens.core import edits as E
from lens.models.generation.generate import GenerationConfig, generate
from lens_tiny import VOCAB, tiny

RNG = np.random.RandomState(1)
TOKENS = RNG.randint(0, VOCAB, size=7).astype(np.int32)
TOL = 1e-4  # float32 on both sides; measured ~1e-6


class Clamp(eqx.Module):
    """Set the component of the residual along unit `u` to `value` at every position."""

    u: Float[Array, " d"]
    value: Float[Array, ""]

    def __call__(self, x, layer, positions):
        return x + (self.value - x @ self.u)[:, None] * self.u


class ProjectOut(eqx.Module):
    """Remove the span of orthonormal rows `U` at positions >= `start`, scaled by the layer
    (layer 1 removes it once, layer 2 twice: uses every argument)."""

    U: Float[Array, "n d"]
    start: Int[Array, ""]

    def __call__(self, x, layer, positions):
        on = (positions >= self.start).astype(x.dtype)[:, None]
        return x - on * layer.astype(x.dtype) * (x @ self.U.T) @ self.U


def hf_layers(family, hf):
    return hf.model.layers if family == "llama" else hf.transformer.h


def torch_clamp(u, value):
    u = torch.as_tensor(np.asarray(u))
    return lambda h: h + (float(value) - h @ u)[..., None] * u


def torch_project_out(U, start, layer):
    U = torch.as_tensor(np.asarray(U))

    def fn(h):
        on = (torch.arange(h.shape[1]) >= int(start)).to(h.dtype)[None, :, None]
        return h - on * layer * (h @ U.T) @ U
    return fn


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_clamp_sweep_matches_hooks(family):
    hf, model, _ = tiny(family)
    d, layers = model.config.d_model, [0, model.config.n_layers - 1]
    u = RNG.randn(d).astype(np.float32)
    u /= np.linalg.norm(u)
    values = jnp.asarray([-4.0, 0.0, 5.0], jnp.float32)  # K = 3 clamp values, one compile
    stacked = jax.vmap(lambda v: E.custom(model, Clamp(jnp.asarray(u), v), layers=layers))(values)
    ours = np.asarray(lens.run_edits(model, jnp.asarray(TOKENS), stacked))  # [K, seq, vocab]
    direct = jax.jit(jax.vmap(lambda e: model(jnp.asarray(TOKENS), edits=e)))(stacked)
    blocks = hf_layers(family, hf)
    for k, v in enumerate(np.asarray(values)):
        ref = hooked(hf, [(blocks[l], "pre_", pre_edit(torch_clamp(u, v))) for l in layers], TOKENS)
        np.testing.assert_allclose(ours[k], ref, atol=TOL)
        np.testing.assert_allclose(np.asarray(direct[k]), ref, atol=TOL)
    assert np.abs(ours[0] - ours[2]).max() > 1e-2  # the values matter


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_projection_out_uses_layer_and_positions(family):
    hf, model, _ = tiny(family)
    d, n = model.config.d_model, model.config.n_layers
    Us = np.stack([np.asarray(E.orthonormal(RNG.randn(2, d).astype(np.float32))) for _ in range(2)])
    layers = [1] if n == 2 else [1, 2]
    fns = [ProjectOut(jnp.asarray(U), jnp.int32(3)) for U in Us]  # K = 2 feature sets
    stacked = E.stack_edits([E.custom(model, f, layers=layers) for f in fns])
    ours = np.asarray(lens.run_edits(model, jnp.asarray(TOKENS), stacked))
    blocks = hf_layers(family, hf)
    for k, U in enumerate(Us):
        ref = hooked(hf, [(blocks[l], "pre_", pre_edit(torch_project_out(U, 3, l))) for l in layers], TOKENS)
        np.testing.assert_allclose(ours[k], ref, atol=TOL)
    plain = np.asarray(model(jnp.asarray(TOKENS)))
    np.testing.assert_allclose(ours[0, :3], plain[:3], atol=1e-5)  # positions < 3 untouched


def test_custom_runs_after_the_data_edits_of_its_layer():
    hf, model, _ = tiny("llama")
    d = model.config.d_model
    u = RNG.randn(d).astype(np.float32)
    u /= np.linalg.norm(u)
    v = 3.0 * RNG.randn(d).astype(np.float32)
    both = E.combine(E.custom(model, Clamp(jnp.asarray(u), jnp.float32(2.0)), layers=[1]),
                     E.add(model, v, layers=[1]))
    ours = np.asarray(eqx.filter_jit(lambda m, e: m(jnp.asarray(TOKENS), edits=e))(model, both))
    add = lambda h: h + torch.as_tensor(v)  # noqa: E731
    clamp = torch_clamp(u, 2.0)
    ref = hooked(hf, [(hf.model.layers[1], "pre_", pre_edit(lambda h: clamp(add(h))))], TOKENS)
    np.testing.assert_allclose(ours, ref, atol=TOL)
    wrong = hooked(hf, [(hf.model.layers[1], "pre_", pre_edit(lambda h: add(clamp(h))))], TOKENS)
    assert np.abs(ours - wrong).max() > 1e-3  # the order is observable, and it is add -> custom


def test_bad_custom_edits_fail_before_compute():
    _, model, _ = tiny("llama")
    d, n = model.config.d_model, model.config.n_layers
    u = jnp.ones((d,)) / np.sqrt(d)
    with pytest.raises(ValueError, match=r"must return the residual's shape \(seq, 24\)"):
        E.custom(model, lambda x, layer, pos: x[:, :3], layers=[1])
    with pytest.raises(ValueError, match=rf"layer {n} out of range \[-{n}, {n}\) \(the model has {n} layers\)"):
        E.custom(model, Clamp(u, jnp.float32(1.0)), layers=[n])
    with pytest.raises(TypeError, match="must be callable"):
        E.custom(model, 3.0, layers=[1])
    e = E.custom(model, Clamp(u, jnp.float32(1.0)), layers=[1])
    with pytest.raises(ValueError, match="in every edit or in none"):
        E.stack_edits([e, E.add(model, np.zeros(d, np.float32), 1)])
    with pytest.raises(ValueError, match="two custom edits"):
        E.combine(e, e)
    with pytest.raises(ValueError, match="not supported in generation"):
        generate(model, [[1, 2, 3]], GenerationConfig(2), edits=e)
    assert E.first_edited_layer(model, e, batch_dims=0) == 1
