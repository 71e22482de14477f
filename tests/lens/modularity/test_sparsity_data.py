"""lens.modularity.sparsity_data: the collected training data against transformers runs with
forward hooks (the MLP's activations, the gate's pre-activation), and the reference's
recall (router_predictor_fit.reference_recall) against a brute-force loop over that data."""

import jax
import numpy as np
import pytest

from hf_tiny import hooked
from lens.modularity import contextual_sparsity as CS
from lens.modularity import moefication as MOE
from lens.modularity.router_predictor_fit import reference_recall
from lens.modularity.sparsity_data import check_layers, collect_sparsity_data
from lens_tiny import VOCAB, tiny

RNG = np.random.RandomState(5)
ROWS = RNG.randint(0, VOCAB, size=(6, 9))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_collected_labels_and_reference_recall_equal_hooked_transformers(family, tmp_path):
    hf, model, _ = tiny(family)
    layers = hf.model.layers if family == "llama" else hf.transformer.h
    # "on" from torch: llama = gate_proj output > 0; gpt2 = c_proj input (GELU output) > 0
    seen = [[] for _ in layers]
    for t in ROWS:
        if family == "llama":
            hooks = [(L.mlp.gate_proj, "", (lambda i: lambda m, a, o: seen[i].append(o[0].double().numpy()))(i))
                     for i, L in enumerate(layers)]
        else:
            hooks = [(L.mlp.c_proj, "pre_", (lambda i: lambda m, a: seen[i].append(a[0][0].double().numpy()))(i))
                     for i, L in enumerate(layers)]
        hooked(hf, hooks, t)
    on = np.stack([np.concatenate(s) > 0 for s in seen])  # [layers, tokens, d_mlp]
    labels = MOE.split_random(model, 8, seed=2)
    data = collect_sparsity_data(model, ROWS, [MOE.expert_onehot(labels)], folder=tmp_path / "d", chunk=4)
    got_on = np.unpackbits(np.asarray(data.active), axis=-1, count=model.config.d_mlp).astype(bool)
    margin = np.abs(np.stack([np.concatenate(s) for s in seen])) > 1e-4  # float32 vs float64 at the sign
    np.testing.assert_array_equal(got_on[margin], on[margin])
    assert data.n_tokens == ROWS.size and data.mass.shape[:3] == (model.config.n_layers, ROWS.size, 1)
    # the reference's recall, brute force over tokens and layers from the stored resid
    pred = CS.init_predictors(model, 4, jax.random.key(1))
    hits = total = pos = 0
    for layer in range(model.config.n_layers):
        x = np.asarray(data.resid[layer], np.float64)
        x = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6)
        logit = x @ np.asarray(pred.mlp_a[layer], np.float64) @ np.asarray(pred.mlp_b[layer], np.float64)
        hits += (on[layer] & (logit >= 0)).sum()
        total += on[layer].sum()
        pos += (logit >= 0).sum()
    rec = reference_recall(model, pred, ROWS, chunk=4)
    assert rec["recall"] == pytest.approx(hits / total, abs=2e-3)  # a few float32 ties at 0
    assert rec["classifier_sparsity"] == pytest.approx(pos / on.size, abs=2e-3)
    assert rec["true_sparsity"] == pytest.approx(total / on.size, abs=2e-3)
    data.remove()
    assert not (tmp_path / "d").exists()


def test_collected_mass_equals_hooked_activations(tmp_path):
    hf, model, _ = tiny("llama")
    seen = [[] for _ in hf.model.layers]
    for t in ROWS:
        hooked(hf, [(L.mlp.down_proj, "pre_", (lambda i: lambda m, a: seen[i].append(a[0][0].double().numpy()))(i))
                    for i, L in enumerate(hf.model.layers)], t)
    a = np.abs(np.stack([np.concatenate(s) for s in seen]))  # [layers, tokens, d_mlp]
    splits = [MOE.split_random(model, 8, seed=s) for s in (0, 1)]
    data = collect_sparsity_data(model, ROWS, [MOE.expert_onehot(s) for s in splits], predictors=False,
                                   folder=tmp_path / "d", chunk=4)
    for s, lab in enumerate(splits):
        for layer in range(model.config.n_layers):
            want = np.stack([a[layer][:, lab[layer] == e].sum(1) for e in range(int(lab.max()) + 1)], 1)
            np.testing.assert_allclose(data.mass[layer, :, s], want, rtol=1e-4, atol=1e-6)
    assert data.resid is None and data.top is None


def test_collecting_some_layers_stores_those_slices_and_rejects_bad_layers(tmp_path):
    _, model, _ = tiny("llama")
    n = model.config.n_layers
    onehot = [MOE.expert_onehot(MOE.split_random(model, 8, seed=0))]
    full = collect_sparsity_data(model, ROWS, onehot, folder=tmp_path / "all")
    some = collect_sparsity_data(model, ROWS, onehot, folder=tmp_path / "some", layers=[n - 1, 0])
    assert full.layers == tuple(range(n)) and some.layers == (0, n - 1)
    for name in ("mlp_in", "mass", "resid", "top", "active", "heads"):
        a, b = getattr(full, name), getattr(some, name)
        assert b.shape == (2,) + a.shape[1:], name
        np.testing.assert_array_equal(b, a[[0, n - 1]], err_msg=name)  # the same computation, sliced
    for bad, match in (([n], r"\[0, 3\)"), ([], "non-empty"), ([0, 0], "distinct"), ([0.5], "integer"), ([-1], r"\[0, 3\)")):
        with pytest.raises(ValueError, match=match):
            collect_sparsity_data(model, ROWS, onehot, folder=tmp_path / "bad", layers=bad)
    assert check_layers(model, 1) == (1,) and check_layers(model, None) == tuple(range(n))
