"""lens.modularity.router_predictor_fit: the reference's recall definition against numpy, and
the per-layer fits: they stop by their rule and beat their start on held-out rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens.modularity import moefication as MOE
from lens.modularity import router_predictor_fit as F
from lens.modularity.plateau_fit import FitConfig
from lens.modularity.sparsity_data import collect_sparsity_data
from lens_tiny import VOCAB, tiny

RNG = np.random.RandomState(5)


# ------------------------------------------------------------------ the recall definition
def test_recall_counts_equal_numpy_jitted_and_vmapped():
    logits = RNG.randn(3, 7, 11).astype(np.float32)  # K = 3 sets of 7 tokens x 11 neurons
    labels = RNG.rand(3, 7, 11) > 0.6
    got = np.asarray(jax.jit(jax.vmap(F.recall_counts))(jnp.asarray(logits), jnp.asarray(labels)))
    for k in range(3):
        on = 1 / (1 + np.exp(-logits[k].astype(np.float64))) >= 0.5  # the reference: sigmoid >= 0.5
        hits = sum(int(labels[k, t, j] and on[t, j]) for t in range(7) for j in range(11))
        np.testing.assert_array_equal(got[k], [hits, labels[k].sum(), on.sum()])


# ------------------------------------------------------------------ the fits
def test_fits_stop_by_their_rule_and_beat_their_start(tmp_path):
    _, model, _ = tiny("llama")
    rows = np.random.RandomState(0).randint(0, VOCAB, size=(20, 9))
    splits = [MOE.split_by_weights(model, 8), MOE.split_random(model, 8)]
    data = collect_sparsity_data(model, rows, [MOE.expert_onehot(s) for s in splits], folder=tmp_path / "d")
    cfg = FitConfig.routers(max_epochs=6, batch=32, patience=2)
    routers, log = F.fit_routers(model, splits, data, cfg)
    assert len(routers) == 2 and routers[0].w1.shape == MOE.mlp_routers(model, splits[0]).w1.shape
    for g in log["per_layer"]:
        assert g["held_out"][g["best_epoch"]] < g["held_out"][0]  # held-out loss below the start
        assert g["epochs"] <= 6 and g["steps"] == g["epochs"] * g["steps_per_epoch"]
        want = cfg.rule.scan(g["held_out"])
        assert g["plateau_epoch"] == want["stop"] and g["best_epoch"] == want["best"]
    assert log["tokens"]["train"] + log["tokens"]["held_out"] == rows.size
    pcfg = FitConfig.predictors(max_epochs=8, batch=32, lr=1e-2)
    pred, plog = F.fit_predictors(model, data, pcfg, rank=4, key=jax.random.key(0))
    for g in plog["per_layer"]:
        assert g["held_out"][g["best_epoch"]] >= g["held_out"][0]
        assert g["plateau_epoch"] == pcfg.rule.scan(g["held_out"])["stop"]
    assert plog["epochs"]["max"] <= 8 and plog["label"] == "active"
    with pytest.raises(ValueError, match="label"):
        F.fit_predictors(model, data, pcfg, rank=4, label="on")
    with pytest.raises(ValueError, match="splits"):
        F.fit_routers(model, splits[:1], data, cfg)
