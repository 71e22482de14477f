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
    st = saved["steering"][name]
    assert abs(st["theta0_norm"] - st["rho"] * st["resid_norm"]) < 1e-3 * st["theta0_norm"]
    assert {"base", "ratio_first_step", "random_first_step", "ratio_all_steps", "random_all_steps"} <= set(st["code_score"])
    assert all(0 <= v["steered"] <= 1 for v in st["code_score"].values())
    moe = saved["moefication"][name]
    full = [r for r in moe["table"] if r["fraction"] == 1.0]
    assert full and all(r["top1_agreement"] == 1.0 for r in full)  # all experts == dense
    assert (tmp_path / "report.md").read_text().startswith("# Modularity")
    assert {p.name for p in tmp_path.glob("*.png")} >= {"pruning_m0.png", "moefication_m0.png", "dejavu_m0.png"}
    assert report["seconds"]["total"] > 0
