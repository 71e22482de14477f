"""lens.modularity.fitting: the plateau rule against hand-made curves, the reference's
recall definition against numpy, the collected training data against transformers runs
with forward hooks (the MLP's activations, the gate's pre-activation), and the per-layer
fits: they stop by their rule and beat their start on held-out rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_tiny import hooked
from lens.modularity import fitting as F
from lens.modularity import moefication as MOE
from lens_tiny import VOCAB, tiny

RNG = np.random.RandomState(5)
ROWS = RNG.randint(0, VOCAB, size=(6, 9))


# ------------------------------------------------------------------ the plateau rule
def test_plateau_rule_on_hand_made_curves():
    rule = F.PlateauRule("max", min_delta=0.0, patience=2)
    # best at index 2 (0.5); indices 3, 4 do not beat it -> stop at 4
    assert rule.scan([0.1, 0.3, 0.5, 0.5, 0.4, 0.9]) == {"stop": 4, "best": 2, "reason": "plateau"}
    assert rule.scan([0.1, 0.2, 0.3]) == {"stop": None, "best": 2, "reason": None}
    target = F.PlateauRule("max", 0.0, 5, target=0.99)
    assert target.scan([0.2, 0.995, 0.999]) == {"stop": 1, "best": 1, "reason": "target"}
    # relative min_delta on a loss: 1.0 -> 0.9995 is < 0.1% better, so it counts as no gain
    rel = F.PlateauRule("min", 1e-3, 2, relative=True)
    assert rel.scan([1.0, 0.9995, 0.9991, 0.5]) == {"stop": 2, "best": 0, "reason": "plateau"}
    assert rel.scan([1.0, 0.99, 0.98, 0.97]) == {"stop": None, "best": 3, "reason": None}
    with pytest.raises(ValueError, match="mode"):
        F.PlateauRule("up")
    with pytest.raises(ValueError, match="patience"):
        F.PlateauRule("max", patience=0)


# ------------------------------------------------------------------ the recall definition
def test_recall_counts_equal_numpy_jitted_and_vmapped():
    logits = RNG.randn(3, 7, 11).astype(np.float32)  # K = 3 sets of 7 tokens x 11 neurons
    labels = RNG.rand(3, 7, 11) > 0.6
    got = np.asarray(jax.jit(jax.vmap(F.recall_counts))(jnp.asarray(logits), jnp.asarray(labels)))
    for k in range(3):
        on = 1 / (1 + np.exp(-logits[k].astype(np.float64))) >= 0.5  # the reference: sigmoid >= 0.5
        hits = sum(int(labels[k, t, j] and on[t, j]) for t in range(7) for j in range(11))
        np.testing.assert_array_equal(got[k], [hits, labels[k].sum(), on.sum()])


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
    data = F.collect_sparsity_data(model, ROWS, [MOE.expert_onehot(labels)], folder=tmp_path / "d", chunk=4)
    got_on = np.unpackbits(np.asarray(data.active), axis=-1, count=model.config.d_mlp).astype(bool)
    margin = np.abs(np.stack([np.concatenate(s) for s in seen])) > 1e-4  # float32 vs float64 at the sign
    np.testing.assert_array_equal(got_on[margin], on[margin])
    assert data.n_tokens == ROWS.size and data.mass.shape[:3] == (model.config.n_layers, ROWS.size, 1)
    # the reference's recall, brute force over tokens and layers from the stored resid
    pred = F.CS.init_predictors(model, 4, jax.random.key(1))
    hits = total = pos = 0
    for layer in range(model.config.n_layers):
        x = np.asarray(data.resid[layer], np.float64)
        x = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6)
        logit = x @ np.asarray(pred.mlp_a[layer], np.float64) @ np.asarray(pred.mlp_b[layer], np.float64)
        hits += (on[layer] & (logit >= 0)).sum()
        total += on[layer].sum()
        pos += (logit >= 0).sum()
    rec = F.reference_recall(model, pred, ROWS, chunk=4)
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
    data = F.collect_sparsity_data(model, ROWS, [MOE.expert_onehot(s) for s in splits], predictors=False,
                                   folder=tmp_path / "d", chunk=4)
    for s, lab in enumerate(splits):
        for layer in range(model.config.n_layers):
            want = np.stack([a[layer][:, lab[layer] == e].sum(1) for e in range(int(lab.max()) + 1)], 1)
            np.testing.assert_allclose(data.mass[layer, :, s], want, rtol=1e-4, atol=1e-6)
    assert data.resid is None and data.top is None


# ------------------------------------------------------------------ the fits
def test_fits_stop_by_their_rule_and_beat_their_start(tmp_path):
    _, model, _ = tiny("llama")
    rows = np.random.RandomState(0).randint(0, VOCAB, size=(20, 9))
    splits = [MOE.split_by_weights(model, 8), MOE.split_random(model, 8)]
    data = F.collect_sparsity_data(model, rows, [MOE.expert_onehot(s) for s in splits], folder=tmp_path / "d")
    cfg = F.FitConfig.routers(max_epochs=6, batch=32, patience=2)
    routers, log = F.fit_routers(model, splits, data, cfg)
    assert len(routers) == 2 and routers[0].w1.shape == MOE.mlp_routers(model, splits[0]).w1.shape
    for g in log["per_layer"]:
        assert g["held_out"][g["best_epoch"]] < g["held_out"][0]  # held-out loss below the start
        assert g["epochs"] <= 6 and g["steps"] == g["epochs"] * g["steps_per_epoch"]
        want = cfg.rule.scan(g["held_out"])
        assert g["plateau_epoch"] == want["stop"] and g["best_epoch"] == want["best"]
    assert log["tokens"]["train"] + log["tokens"]["held_out"] == rows.size
    pcfg = F.FitConfig.predictors(max_epochs=8, batch=32, lr=1e-2)
    pred, plog = F.fit_predictors(model, data, pcfg, rank=4, key=jax.random.key(0))
    for g in plog["per_layer"]:
        assert g["held_out"][g["best_epoch"]] >= g["held_out"][0]
        assert g["plateau_epoch"] == pcfg.rule.scan(g["held_out"])["stop"]
    assert plog["epochs"]["max"] <= 8 and plog["label"] == "active"
    with pytest.raises(ValueError, match="label"):
        F.fit_predictors(model, data, pcfg, rank=4, label="on")
    with pytest.raises(ValueError, match="splits"):
        F.fit_routers(model, splits[:1], data, cfg)
