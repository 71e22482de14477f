"""lens.modularity.sparsity_study's whole-study calls: run_sparsity_study equals its pieces
(moe_splits, fit_sparsity, moe_study, dejavu_study) called with the same settings, a second
start loads every fit, the settings are validated, and run_fit_sweep refuses expert sizes
that do not divide d_mlp."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from lens.modularity import router_predictor_fit as RPF
from lens.modularity import sparsity_study as SS
from lens.modularity.plateau_fit import FitConfig
from lens_tiny import VOCAB, tiny

RNG = np.random.RandomState(3)
CLUSTER, FIT, EVAL = RNG.randint(0, VOCAB, (4, 9)), RNG.randint(0, VOCAB, (10, 9)), RNG.randint(0, VOCAB, (2, 9))


def js(x):
    return json.loads(json.dumps(x, default=lambda o: o.tolist()))


def _strip(section):
    """The section less its wall times (they differ run to run)."""
    drop = {"split_seconds", "fit_seconds", "eval_seconds"}
    return js({k: v for k, v in section.items() if k not in drop})


def test_run_sparsity_study_equals_its_pieces_and_resumes(tmp_path, monkeypatch):
    _, model, _ = tiny("llama")
    study = SS.SparsityStudy(expert_size=8, kmeans_iters=2, fractions=(0.5,), router_epochs=2, predictor_epochs=2,
                             rank=4, seed=1)
    moe, dv = SS.run_sparsity_study(model, CLUSTER, FIT, EVAL, study, tmp_path / "a", progress=False)
    splits = SS.moe_splits(model, CLUSTER, 8, 2, 1)
    fits = SS.fit_sparsity(model, FIT, splits, True, FitConfig.routers(max_epochs=2), FitConfig.predictors(max_epochs=2),
                           4, jax.random.key(1), "active", folder=tmp_path / "d")
    want_moe = SS.moe_study(model, splits, fits["routers"], EVAL, (0.5,))
    want_dv = SS.dejavu_study(model, fits["predictors"], fits["untrained"], EVAL, (0.5,))
    for k in ("table", "per_neuron_oracle", "per_layer", "dense_loss"):
        assert js(moe[k]) == js(want_moe[k]), k  # same code, same CPU: exact
    assert js(moe["router_training"]) == js(fits["router_fit"])
    for k in ("recall", "recall_reference", "sparse_forward"):
        assert js(dv[k]) == js(want_dv[k]), k
    assert moe["tokens"] == {"fit_tokens": FIT.size, "evaluated": EVAL.size} and dv["label"] == "active"
    assert len(list((tmp_path / "a" / "sparsity_fits").iterdir())) == 2 * model.config.n_layers
    # started again: every layer's fit is loaded
    monkeypatch.setattr(RPF, "fit_layer", lambda *a, **k: (_ for _ in ()).throw(AssertionError("refitted")))
    moe2, dv2 = SS.run_sparsity_study(model, CLUSTER, FIT, EVAL, study, tmp_path / "a", progress=False)
    assert _strip(moe2) == _strip(moe) and _strip(dv2) == _strip(dv)
    # only one part
    moe3, dv3 = SS.run_sparsity_study(model, CLUSTER, FIT, EVAL, dataclasses.replace(study, moefication=False),
                                      tmp_path / "a", progress=False)
    assert moe3 == {} and js(dv3["recall"]) == js(dv["recall"])  # the saved predictors
    with pytest.raises(ValueError, match=r"other settings \(differs in \['config'\]\)"):  # 20 epochs, not 2
        SS.run_sparsity_study(model, CLUSTER, FIT, EVAL, dataclasses.replace(study, predictor_epochs=20, moefication=False),
                              tmp_path / "a", progress=False)
    odd, _ = SS.run_sparsity_study(model, CLUSTER, FIT, EVAL, SS.SparsityStudy(
        expert_size=7, fractions=(0.5,), rank=4, seed=1, dejavu=False, router_epochs=1), tmp_path / "b", progress=False)
    assert odd == {"skipped": f"d_mlp {model.config.d_mlp} is not a multiple of expert_size 7"}
    with pytest.raises(ValueError, match="not a multiple of expert_size 7"):
        SS.run_fit_sweep(model, CLUSTER, FIT, SS.SparsityStudy(expert_size=7), [0], [16], tmp_path / "c", progress=False)


@pytest.mark.parametrize("bad, match", [(dict(expert_size=0), "expert_size"), (dict(rank=2.5), "rank"),
                                        (dict(fractions=()), "fractions"), (dict(fractions=(0.5, 1.5)), "fractions"),
                                        (dict(label="on"), "label"), (dict(moefication=False, dejavu=False), "nothing")])
def test_sparsity_study_settings_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        SS.SparsityStudy(**bad)
