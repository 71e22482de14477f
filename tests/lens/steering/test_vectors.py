"""Steering: the prefix-sharing sweep equals a loop of single edited runs; vector methods;
safetensors storage; bad input fails before compute."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lens
from lens.core import edits as E
from lens.steering import vectors
from lens_tiny import VOCAB, tiny
from lens.models import Capture

RNG = np.random.RandomState(1)
PROMPTS = RNG.randint(0, VOCAB, size=(2, 8))


@eqx.filter_jit
def fwd(model, tokens, mask, edits):
    out = model.forward(tokens, attention_mask=mask, edits=edits, capture=Capture(resid=True))
    return out.logits, out.activations.resid_post


def test_sweep_equals_loop_of_single_runs():
    _, model, _ = tiny()
    d = model.config.d_model
    vectors = RNG.randn(3, d).astype(np.float32)
    coeffs, layers, targets = [0.0, 2.5], [2, 1], [3, 11]
    mask = np.ones(PROMPTS.shape, bool)
    mask[1, -2:] = False  # prompt 1 right-padded: its last real token is position 5
    config = lens.SweepConfig(keep_logits=True, capture_layer=1, chunk_size=2, progress=False)  # 2 chunks, the last padded
    res = lens.sweep_vectors(model, PROMPTS, vectors, coeffs=coeffs, layers=layers, attention_mask=mask,
                             targets=targets, config=config)
    assert res.layers == (1, 2) and res.kl.shape == (3, 2, 2, 2)
    assert res.logprob_delta.shape == (3, 2, 2, 2, 2) and res.logits.shape == (3, 2, 2, 2, VOCAB)
    assert res.activations.shape == (3, 2, 2, 2, 8, d)
    last = [7, 5]
    for k in range(3):
        for ci, c in enumerate(coeffs):
            for li, layer in enumerate(res.layers):
                for p in range(2):
                    m = jnp.asarray(mask[p])
                    t = jnp.asarray(PROMPTS[p], jnp.int32)
                    base, _ = fwd(model, t, m, E.add(model, np.zeros(d, np.float32), layer))
                    logits, post = fwd(model, t, m, E.add(model, vectors[k], layer, c))
                    lp, blp = jax.nn.log_softmax(logits[last[p]]), jax.nn.log_softmax(base[last[p]])
                    np.testing.assert_allclose(res.logits[k, ci, li, p], logits[last[p]], atol=1e-5)
                    kl = float(jnp.sum(jnp.exp(lp) * (lp - blp)))
                    np.testing.assert_allclose(res.kl[k, ci, li, p], kl, atol=1e-5)
                    np.testing.assert_allclose(res.logprob_delta[k, ci, li, p],
                                               (lp - blp)[np.array(targets)], atol=1e-5)
                    np.testing.assert_allclose(res.activations[k, ci, li, p], post[1], atol=1e-5)
    assert np.abs(res.kl[:, 0]).max() < 1e-5  # coefficient 0 steers nothing
    # all positions rather than the last: the same numbers at the last real token
    full = lens.sweep_vectors(model, PROMPTS, vectors[:1], coeffs=[2.5], layers=[1], attention_mask=mask,
                              config=lens.SweepConfig(last_only=False, progress=False))
    assert full.kl.shape == (1, 1, 1, 2, 8)
    np.testing.assert_allclose(full.kl[0, 0, 0, 0, 7], res.kl[0, 1, 0, 0], atol=1e-5)


def test_add_vectors_contract():
    _, model, _ = tiny()
    vectors = RNG.randn(4, model.config.d_model).astype(np.float32)
    out = lens.add_vectors(model, PROMPTS[0], vectors, layer=1, coeff=2.0)
    assert out.shape == (4, 8, VOCAB)
    for k in range(4):
        ref, _ = fwd(model, jnp.asarray(PROMPTS[0], jnp.int32), None, E.add(model, vectors[k], 1, 2.0))
        np.testing.assert_allclose(out[k], ref, atol=1e-5)


def test_steering_vectors_and_storage(tmp_path):
    _, model, _ = tiny()
    a, b = PROMPTS
    _, ca = lens.run_with_cache(model, a)
    _, cb = lens.run_with_cache(model, b)
    np.testing.assert_allclose(vectors.actadd(model, a, b, 2), ca.resid_pre[2, -1] - cb.resid_pre[2, -1], atol=1e-5)
    assert vectors.actadd(model, a, b, 2, position=[0, 1]).shape == (2, model.config.d_model)
    # CAA with a right-padded negative prompt: its last REAL token is used
    neg = np.stack([b, b])
    neg_mask = np.ones(neg.shape, bool)
    neg_mask[1, 5:] = False
    _, cb5 = lens.run_with_cache(model, b[:5])
    v = vectors.mean_difference(model, np.stack([a, a]), neg, 2, negative_mask=neg_mask)
    expect = ca.resid_pre[2, -1] - 0.5 * (cb.resid_pre[2, -1] + cb5.resid_pre[2, -1])
    np.testing.assert_allclose(v, expect, atol=1e-5)
    comps, ratio = vectors.pca_of_differences(model, PROMPTS, PROMPTS[::-1] * 0 + 3, 2, n_components=2)
    np.testing.assert_allclose(np.linalg.norm(comps, axis=-1), 1.0, atol=1e-5)
    assert comps.shape == (2, model.config.d_model) and ratio[0] >= ratio[1]

    path = tmp_path / "v.safetensors"
    meta = {"model": "tiny-llama", "layer": 2, "site": "resid_pre", "method": "caa"}
    vectors.save_vectors(path, v, meta)
    loaded, got = vectors.load_vectors(path)
    np.testing.assert_array_equal(loaded, np.asarray(v))
    assert got["layer"] == 2 and got["method"] == "caa"
    np.testing.assert_allclose(got["norm"], np.linalg.norm(v), rtol=1e-6)
    with pytest.raises(ValueError, match="metadata lacks"):
        vectors.save_vectors(path, v, {"model": "x"})
    with pytest.raises(ValueError, match="NaN"):
        vectors.save_vectors(path, np.full(4, np.nan), meta)


def test_sweep_bad_input_fails_before_compute():
    _, model, _ = tiny()
    d = model.config.d_model
    with pytest.raises(ValueError, match="d_model"):
        lens.sweep_vectors(model, PROMPTS, np.ones((2, d - 1)), layers=[1])
    with pytest.raises(ValueError, match="NaN"):
        lens.sweep_vectors(model, PROMPTS, np.full((2, d), np.nan), layers=[1])
    with pytest.raises(ValueError, match="out of range"):
        lens.sweep_vectors(model, PROMPTS, np.ones((2, d)), layers=[5])
    with pytest.raises(ValueError, match=r"position 8 out of range \[-8, 8\)"):
        lens.sweep_vectors(model, PROMPTS, np.ones((2, d)), layers=[1], positions=[8])
    with pytest.raises(ValueError, match=r"position 4 out of range \[-3, 3\)"):
        vectors.actadd(model, PROMPTS[0], PROMPTS[1][:3], 1, position=4)
    assert lens.core.sweep.chunk_size_for(model, 2, 2, 4, 32, True, False, False, 1e6) >= 1


def test_pca_of_differences_matches_numpy_on_rank_gt_1_data():
    # Six pairs (centred differences of rank 5): the principal directions and explained
    # variance from an independent computation, transformers' hidden states (entering
    # block 2, last token) and a float64 numpy SVD, signed toward the mean difference.
    import torch

    hf, model, _ = tiny()
    rs = np.random.RandomState(4)
    pos, neg = rs.randint(0, VOCAB, (6, 8)), rs.randint(0, VOCAB, (6, 8))
    comps, ratio = vectors.pca_of_differences(model, pos, neg, 2, n_components=3)
    with torch.no_grad():
        h = [hf(input_ids=torch.as_tensor(t), output_hidden_states=True).hidden_states[2][:, -1].double().numpy()
             for t in (pos, neg)]
    diffs = h[0] - h[1]
    _, s, vt = np.linalg.svd(diffs - diffs.mean(0), full_matrices=False)
    want = vt[:3] * np.sign(vt[:3] @ diffs.mean(0))[:, None]
    var = s ** 2 / np.sum(s ** 2)
    assert var[1] > 0.05 and var[0] - var[1] > 0.05 and var[1] - var[2] > 0.02  # rank > 1, gaps
    # measured: components 5e-7, ratios 6e-8 (float32 differences; spectrum 0.59, 0.19, 0.10)
    np.testing.assert_allclose(comps, want, atol=1e-5)
    np.testing.assert_allclose(ratio, var[:3], atol=1e-6)
