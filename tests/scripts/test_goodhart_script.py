"""scripts/goodhart.py --preset smoke end to end: the report has the contract's keys, its
numbers are in range, and the figures are written.  (The smoke preset's models are tiny
and barely trained: this checks the pipeline, not the findings.)"""

import json

import pytest

pytestmark = pytest.mark.slow  # make test-fast skips it (real weights, subprocesses or long runs)

from script_entry import script_namespace


def test_smoke_preset_writes_the_contracted_report(tmp_path):
    script_namespace("goodhart")["main"](["--out", str(tmp_path), "--preset", "smoke", "--no-progress"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "report.md").read_text().startswith("# Goodharting")
    assert (tmp_path / "pass_rate_vs_tolerance.png").stat().st_size > 1000
    assert (tmp_path / "loss_vs_pass_rate.png").stat().st_size > 1000
    (model_name, per_corpus), = report["predictors"].items()
    for corpus in ("shakespeare", "python-docs", "python-code"):
        preds = per_corpus[corpus]
        assert {"unigram", "bigram", "trigram", "direct", "direct+mlp0", "distilled-1L", "uniform"} <= set(preds)
        for name, s in preds.items():
            assert 0 <= s["top1"] <= 1 and 0 <= s["recall"] <= 1 and s["kl"] >= 0, name
            rates = list(s["pass_rate"].values())
            assert rates == sorted(rates), name  # a looser tolerance never passes fewer positions
    sweep = report["lambda_sweep"]
    assert [r["lam"] for r in sweep["bigram"]] == [0.0, 1.0] and [r["lam"] for r in sweep["side"]] == [0.0, 1.0]
    for rows in sweep.values():
        for r in rows:
            assert r["val_loss"] > 0 and 0 <= r["pass_rate"] <= 1
    for target in ("bigram", "side"):
        for row in report["frontier"][target]:
            for key in ("mean_test_error", "prompt_pass_rate", "held_out_code_loss", "held_out_prose_loss"):
                v = row[key]
                assert v["min"] <= v["mean"] <= v["max"], (target, key)
        g = report["gaming_found"][target]
        assert isinstance(g["found"], bool) and "lam = 0" in g["definition"]
    rule = report["reference_losses"]["side_recursion_rule"]
    assert rule["verdict"] in ("passes", "fails") and rule["cheaper"] == "bigram"


def test_large_smoke_runs_the_large_toys_vocabulary_and_depth(tmp_path):
    """`large_smoke`: the `large` preset's toy shape (BPE-4,096, 4 layers; the issue's "closer
    to a real model") through the whole sweep, frontier and gaming verdict at smoke sizes."""
    ns = script_namespace("goodhart")
    large, small = ns["PRESETS"]["large"], ns["PRESETS"]["large_smoke"]
    assert large.vocab >= 4096 and large.layers >= 4
    assert (small.vocab, small.layers) == (large.vocab, large.layers)
    ns["main"](["--out", str(tmp_path), "--preset", "large_smoke", "--no-progress", "--parts", "sweep,toy"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["vocab"] == 4096 and report["settings"]["layers"] == 4
    toy = report["reference_losses"]["toy"]  # the trained toy's own config
    assert (toy["vocab_size"], toy["n_layers"]) == (4096, 4)
    for target in ("bigram", "side"):
        assert [r["lam"] for r in report["frontier"][target]] == [0.0, 1.0]
        assert isinstance(report["gaming_found"][target]["found"], bool)
    # the toy's own n-gram predictors are scored at the large vocabulary
    (per_corpus,) = report["predictors"].values()
    assert all(0 <= s["kl"] for s in per_corpus["python-code"].values() if "kl" in s)
