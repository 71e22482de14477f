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


def test_topk_agreement_and_top_recall_equal_numpy_jitted_and_vmapped():
    scores = RNG.randn(3, 6, 9).astype(np.float32)  # K = 3 sets of 6 tokens x 9 experts / neurons
    mass = RNG.rand(3, 6, 9).astype(np.float32)
    labels = RNG.rand(3, 6, 9) > 0.7
    k = 3
    agree = np.asarray(jax.jit(jax.vmap(lambda s, m: F.topk_agreement(s, m, k)))(jnp.asarray(scores), jnp.asarray(mass)))
    top = np.asarray(jax.jit(jax.vmap(lambda s, y: F.top_recall_counts(s, y, k)))(jnp.asarray(scores), jnp.asarray(labels)))
    for i in range(3):
        shares, hits = [], 0
        for t in range(6):
            mine, oracle = set(np.argsort(-scores[i, t])[:k]), set(np.argsort(-mass[i, t])[:k])
            shares.append(len(mine & oracle) / k)
            hits += sum(int(labels[i, t, j]) for j in mine)
        assert agree[i] == pytest.approx(np.mean(shares), abs=1e-6)
        np.testing.assert_array_equal(top[i], [hits, labels[i].sum()])


def test_fitting_some_layers_on_a_given_split(tmp_path):
    _, model, _ = tiny("llama")
    rows = np.random.RandomState(1).randint(0, VOCAB, size=(12, 9))
    split = MOE.split_random(model, 8)
    data = collect_sparsity_data(model, rows, [MOE.expert_onehot(split)], folder=tmp_path / "d", layers=[1])
    tr, va = np.arange(0, 54), np.arange(90, 108)  # rows 0-5 train, rows 10-11 held out
    routers, log = F.fit_routers(model, [split], data, FitConfig.routers(max_epochs=3, batch=16), split=(tr, va))
    init = MOE.mlp_routers(model, split)
    for layer in (0, 2):  # not fitted: the init
        np.testing.assert_array_equal(routers[0].w1[layer], init.w1[layer])
    assert not np.array_equal(routers[0].w1[1], init.w1[1]) or log["per_layer"][0]["best_epoch"] == 0
    g = log["per_layer"][0]
    assert log["layers"] == [1] and g["layer"] == 1 and (log["tokens"]["train"], log["tokens"]["held_out"]) == (54, 18)
    assert g["held_out_loss"] == g["held_out"][g["best_epoch"]]
    assert all(0 <= v <= 1 for vs in g["held_out_topk_agreement"].values() for v in vs)
    pred, plog = F.fit_predictors(model, data, FitConfig.predictors(max_epochs=2, batch=16), rank=4,
                                  key=jax.random.key(0), split=(tr, va))
    fin = plog["per_layer"][0]["held_out_final"]
    assert plog["per_layer"][0]["held_out"][plog["per_layer"][0]["best_epoch"]] == pytest.approx(fin["recall_reference"])
    assert 0 <= fin["recall_top0.1_at_top0.1"] <= 1 and 0 < fin["truly_on"] < 1
    with pytest.raises(ValueError, match="disjoint"):
        F.fit_routers(model, [split], data, FitConfig.routers(max_epochs=1), split=(tr, tr[:5]))


def _json(x):
    import json
    return json.loads(json.dumps(x, default=lambda o: o.tolist()))


def test_saved_fits_resume_a_stopped_run_and_refuse_other_settings(tmp_path, monkeypatch):
    """Fits saved layer by layer equal the unsaved fits exactly (weights and logs); with one
    layer's file gone (a run killed during that layer) a second start fits that layer only;
    a file saved under other settings is refused.  fit_sparsity's saved_fits: a second call
    fits nothing."""
    from lens.modularity import plateau_fit, sparsity_study as SS

    _, model, _ = tiny("llama")
    rows = np.random.RandomState(2).randint(0, VOCAB, size=(12, 9))
    splits = [MOE.split_by_weights(model, 8), MOE.split_random(model, 8)]
    data = collect_sparsity_data(model, rows, [MOE.expert_onehot(s) for s in splits], folder=tmp_path / "d")
    rcfg, pcfg = FitConfig.routers(max_epochs=3, batch=16), FitConfig.predictors(max_epochs=3, batch=16)
    saved = F.SavedFits(tmp_path / "fits", {"model": "tiny", "rows": "r"})
    plain_r, plain_rlog = F.fit_routers(model, splits, data, rcfg)
    plain_p, plain_plog = F.fit_predictors(model, data, pcfg, rank=4, key=jax.random.key(0))
    r, rlog = F.fit_routers(model, splits, data, rcfg, saved=saved)
    p, plog = F.fit_predictors(model, data, pcfg, rank=4, key=jax.random.key(0), saved=saved)
    n = model.config.n_layers
    assert sorted(f.name for f in (tmp_path / "fits").iterdir()) == sorted(
        [f"router_layer{i:03d}.safetensors" for i in range(n)] + [f"predictor_layer{i:03d}.safetensors" for i in range(n)])
    for a, b in zip(jax.tree.leaves((plain_r, plain_p)), jax.tree.leaves((r, p))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same code, same CPU: exact
    assert _json(plain_rlog) == rlog and _json(plain_plog) == plog
    # killed during layer 1: its files are missing; a second start refits layer 1 only
    for kind in ("router", "predictor"):
        (tmp_path / "fits" / f"{kind}_layer001.safetensors").unlink()
    calls = []
    real = plateau_fit.fit_layer
    monkeypatch.setattr(F, "fit_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    r2, rlog2 = F.fit_routers(model, splits, data, rcfg, saved=saved)
    p2, plog2 = F.fit_predictors(model, data, pcfg, rank=4, key=jax.random.key(0), saved=saved)
    assert len(calls) == 2 and rlog2 == rlog and plog2 == plog
    for a, b in zip(jax.tree.leaves((r, p)), jax.tree.leaves((r2, p2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"other settings \(differs in \['config'\]\)"):
        F.fit_routers(model, splits, data, FitConfig.routers(max_epochs=4, batch=16), saved=saved)
    with pytest.raises(ValueError, match=r"differs in \['prng_key'\]"):
        F.fit_predictors(model, data, pcfg, rank=4, key=jax.random.key(1), saved=saved)
    # through fit_sparsity: the second call loads every layer
    split_d = {"weights": splits[0], "random": splits[1]}
    kw = dict(predictors=True, router_cfg=rcfg, predictor_cfg=pcfg, rank=4, key=jax.random.key(0),
              folder=tmp_path / "d2", saved_fits=tmp_path / "fits2")
    first = SS.fit_sparsity(model, rows, split_d, **kw)
    monkeypatch.setattr(F, "fit_layer", lambda *a, **k: (_ for _ in ()).throw(AssertionError("refitted")))
    again = SS.fit_sparsity(model, rows, split_d, **kw)
    assert again["router_fit"] == first["router_fit"] and again["predictor_fit"] == first["predictor_fit"]
    with pytest.raises(ValueError, match=r"differs in \['rows'\]"):
        SS.fit_sparsity(model, rows[::-1], split_d, **kw)
