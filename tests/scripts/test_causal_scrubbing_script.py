"""scripts/causal_scrubbing.py end to end on its smoke preset (a tiny parentheses
classifier trained in seconds): report.json's contract and the plots."""

import json

import pytest

pytestmark = pytest.mark.slow  # make test-fast skips it (real weights, subprocesses or long runs)

from script_entry import script_namespace


def test_parens_smoke_writes_the_contract(tmp_path):
    script_namespace("causal_scrubbing")["main"](["--example", "parens", "--out", str(tmp_path), "--preset", "smoke", "--no-progress"])
    report = json.loads((tmp_path / "report.json").read_text())
    hs = report["hypotheses"]
    assert {"identity", "empty", "label-only", "two-tests"} <= set(hs)
    for h in hs.values():
        lo, hi = h["loss_recovered_interval"]
        assert lo <= h["loss_recovered_mean"] <= hi
        assert len(h["per_example_losses"]) == report["n_examples"]
    assert abs(hs["identity"]["loss_recovered_mean"] - 1.0) < 1e-6 and abs(hs["empty"]["loss_recovered_mean"]) < 1e-6
    assert abs(hs["identity"]["loss_mean"] - report["model_loss"]) < 1e-6
    for name in ["report.md", "per_example_losses.png", "loss_recovered.png"]:
        assert (tmp_path / name).stat().st_size > 0
