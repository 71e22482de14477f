"""scripts/modularity.py end to end with --preset smoke (a tiny random gated model on
SmolLM2's tokenizer and the real corpora): report.json holds the issue's sections, the
report and figures are written, the pruned model reloads."""

import json

import pytest

pytestmark = pytest.mark.slow  # make test-fast skips it (real weights, subprocesses or long runs)

from script_entry import script_namespace


def test_smoke_preset_writes_every_section(tmp_path):
    report = script_namespace("modularity")["main"](["--out", str(tmp_path), "--preset", "smoke"])
    saved = json.loads((tmp_path / "report.json").read_text())
    for key in ("moefication", "contextual_sparsity", "selective_pruning", "steering"):
        assert saved[key], key
    name = saved["models"][0]
    pr = saved["selective_pruning"][name]
    assert set(pr["methods"]) == {"ratio", "forget", "random"}
    steps = [r["neurons_pruned"] for r in pr["methods"]["ratio"]["records"]]
    assert steps[0] == 0 and all(b > a for a, b in zip(steps, steps[1:]))
    assert pr["reload_max_abs_logit_diff"] < 1e-5
    assert pr["retain"] == ["shakespeare"] and pr["tokens_collected"] == {"forget": 48, "retain": 48}
    assert set(pr["tokens_evaluated"]) == {"python-code", "shakespeare", "python-docs"}
    for r in pr["methods"]["ratio"]["records"]:
        for c in pr["tokens_evaluated"]:
            lo, hi = r[c]["top1_ci95"]
            assert lo <= r[c]["top1"] <= hi and r[c]["loss_ci95"][0] <= r[c]["loss"] <= r[c]["loss_ci95"][1]
    base = pr["baselines"]
    assert base["n_draws"] == 5 and len(base["random"]["draws"]) == 5 and len(base["forget"]["draws"]) == 5
    assert len(pr["differential_drop"]["ratio"]["per_step"]) == len(steps)
    assert isinstance(pr["first_step"]["selective"], bool)
    st = saved["steering"][name]
    assert abs(st["theta0_norm"] - st["rho"] * st["resid_norm"]) < 1e-3 * st["theta0_norm"]
    assert {"base", "ratio_first_step", "random_first_step", "ratio_all_steps", "random_all_steps"} <= set(st["code_score"])
    assert all(0 <= v["steered"] <= 1 for v in st["code_score"].values())
    moe = saved["moefication"][name]
    full = [r for r in moe["table"] if r["fraction"] == 1.0]
    assert full and all(r["top1_agreement"] == 1.0 for r in full)  # all experts == dense
    assert all(abs(r["abs_mass_share"] - 1.0) < 1e-5 for r in full)
    assert {r["split"] for r in moe["table"]} == {"weights", "weights_signfree", "coact", "random"}
    oracle = {r["fraction"]: r for r in moe["per_neuron_oracle"]}
    assert oracle[1.0]["top1_agreement"] == 1.0 and abs(oracle[1.0]["loss_increase"]) < 1e-4
    assert len(moe["per_layer"]["layers"]) == 2
    fit = moe["router_training"]  # lens.modularity.router_predictor_fit: per layer, to a stated rule, on --fit-tokens
    assert moe["tokens"]["fit_tokens"] == 240 and fit["tokens"]["train"] + fit["tokens"]["held_out"] == 240
    assert fit["criterion"]["max_epochs"] == 3 and len(fit["per_layer"]) == 2 and fit["epochs"]["max"] <= 3
    assert all(g["steps"] == g["epochs"] * g["steps_per_epoch"] for g in fit["per_layer"])
    dv = saved["contextual_sparsity"][name]
    assert dv["training"]["label"] == "active" and dv["training"]["criterion"]["target"] == 0.99
    ref = dv["recall_reference"]["trained"]
    assert 0 <= ref["recall"] <= 1 and 0 < ref["true_sparsity"] < 1
    assert (tmp_path / "report.md").read_text().startswith("# Modularity")
    assert {p.name for p in tmp_path.glob("*.png")} >= {"pruning_m0.png", "moefication_m0.png", "dejavu_m0.png"}
    assert report["seconds"]["total"] > 0


def test_layers_fit_a_subset_on_nested_token_counts(tmp_path):
    main = script_namespace("modularity")["main"]
    args = ["--out", str(tmp_path), "--preset", "smoke", "--sections", "moefication,contextual_sparsity"]
    saved = main(args + ["--layers", "1", "--fit-sweep", "48"])["fit_sweep"]
    sweep = next(iter(saved.values()))
    assert sweep["layers"] == [1] and sweep["tokens_collected"] == 240
    counts = [f["train_tokens"] for f in sweep["fits"]]
    assert counts[0] == 48 and counts[-1] == 240 - sweep["held_out_tokens"]  # the given count, then every train token
    for f in sweep["fits"]:
        assert [g["layer"] for g in f["router_fit"]["per_layer"]] == [1]
        assert f["predictor_fit"]["tokens"]["held_out"] == sweep["held_out_tokens"]
    md = (tmp_path / "report.md").read_text()
    assert "## Routers and predictors of layers [1]" in md
    answer = md.split("**Answer.** ")[1].splitlines()[0]  # a sections-subset run leads with what WAS run
    assert answer.startswith(f"{next(iter(saved))}, layers [1] fitted on 48 / ") and "recall" in answer
    assert "Not run in this report (`--sections moefication,contextual_sparsity`, `--layers 1`): selective pruning" in md
    assert "## Selective pruning" not in md and "## MoEfication" not in md  # not-run sections: one line, no headers
    assert script_namespace("modularity_report")["render"](tmp_path) == md  # report.md again from report.json
    with pytest.raises(SystemExit, match="--layers: layers must lie in"):
        main(args + ["--layers", "2"])  # the smoke model has 2 layers


def test_compute_dtype_reaches_the_pruning_statistics(tmp_path):
    """--compute-dtype bfloat16 goes from the command line into every statistics-collecting
    pruning run (ratio, forget-only; random collects none) and its saved key, and the report
    says so; a float32 rerun into the same folder is refused rather than silently reused."""
    main = script_namespace("modularity")["main"]
    from lens.modularity import pruning as M

    args = ["--out", str(tmp_path), "--preset", "smoke", "--sections", "selective_pruning", "--prune-steps", "1",
            "--random-draws", "1"]
    saved = main(args + ["--compute-dtype", "bfloat16"])["selective_pruning"]
    (pr,) = saved.values()
    assert pr["compute_dtype"] == "bfloat16"
    runs = tmp_path / "pruning_runs_m0"
    dtypes = {name: M.load_masks(runs / f"{name}.safetensors")[2]["key"]["config"]["compute_dtype"]
              for name in ("ratio", "forget_0", "random_0")}
    assert dtypes == {"ratio": "bfloat16", "forget_0": "bfloat16", "random_0": "float32"}
    assert "statistics in bfloat16" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="compute_dtype|other settings"):
        main(args + ["--compute-dtype", "float32"])


def test_eval_split_validation_plus_test_draws_from_both_held_out_splits():
    """--eval-split validation+test (the paper preset's: shakespeare's validation split holds
    fewer than 1e5 tokens) draws each corpus's metric rows from its validation and test rows
    together; asking for more rows than there are gives every row of both, once."""
    import argparse

    import numpy as np

    ns = script_namespace("modularity")
    assert ns["PRESETS"]["paper"].eval_split == "validation+test" and ns["PRESETS"]["default"].eval_split == "validation"
    from lens.models.io import embedded
    from lens.models.io.tokenizer import Tokenizer
    from lens.training import data

    tok = Tokenizer.from_gguf(embedded.fetch("smollm2-135m-instruct"))
    args = argparse.Namespace(seq=24)
    both = ns["rows_for"](tok, args, "validation+test", 10**9, 0)
    val = ns["rows_for"](tok, args, "validation", 10**9, 0)
    assert set(both) == set(val) == {"python-code", "shakespeare", "python-docs"}
    for name in both:
        v, t = (data.load_tokens(name, tok, 24, s) for s in ("validation", "test"))
        assert len(both[name]) == len(v) + len(t) and len(val[name]) == len(v)
        as_set = lambda a: {r.tobytes() for r in np.asarray(a)}  # noqa: E731
        assert as_set(both[name]) == as_set(v) | as_set(t) and as_set(t) - as_set(v)


def test_plan_prints_the_study_size_and_runs_nothing(tmp_path, capsys):
    """--plan: the selective-pruning study's size for the preset's sizes (smoke: 2 rows of 24
    tokens per set, 2 steps, 5 draws), counted by hand here, and nothing run or saved."""
    report = script_namespace("modularity")["main"](["--out", str(tmp_path), "--preset", "smoke", "--plan"])
    (plan,) = (v["plan"] for v in report["selective_pruning"].values())
    F = R = 48  # collect_tokens 48 = 2 rows of 24
    E = 3 * 48  # three corpora, 2 rows of 24 each
    assert plan["token_forwards"]["total"] == E + 2 * (F + R + E) + 5 * 2 * E + 5 * 2 * (F + E)
    assert "Plan (selective pruning)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
    assert json.loads((tmp_path / "plan.json").read_text()) == report["selective_pruning"]
