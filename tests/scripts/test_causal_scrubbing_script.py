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
    for h in hs.values():  # the nats behind every percentage
        lo, hi = h["nats_recovered_interval"]
        assert lo <= h["nats_recovered_mean"] <= hi
    assert "margin" in report["info"]["metric"]
    assert report["unit"] == "logit units" and "logit units" in report["nats_at_stake"]["meaning"]


def test_induction_smoke_checks_the_model_before_any_finding(tmp_path):
    """The smoke model (20 steps) cannot copy: model_check is written, fails, and the
    report's first lines say the numbers are pipeline checks only."""
    script_namespace("causal_scrubbing")["main"](["--example", "induction", "--out", str(tmp_path), "--preset", "smoke",
                                                  "--no-progress", "--vocab", "40"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["info"]["setup"]["vocab"] == 40 and "vocab 40" in report["info"]["data"]  # --vocab reaches the model
    check = report["model_check"]
    assert set(check) >= {"first_copy_loss", "second_copy_loss", "at_stake_nats", "best_induction_score", "passed"}
    assert check["passed"] is False and report["finding"] is False
    assert check["second_copy_loss"] > 1.0  # 20 steps: no copying yet
    hs = report["hypotheses"]
    assert {"naive", "refined", "induction-random"} <= set(hs)
    # nats recovered = L_base - L_hypothesis per seed: the identity recovers exactly the nats at stake
    assert abs(hs["identity"]["nats_recovered_mean"] - report["nats_at_stake"]["mean"]) < 1e-6
    assert report["reference"]["comparable"] is False and report["unit"] == "nats"
    assert "pipeline checks only" in (tmp_path / "report.md").read_text().split("\n", 4)[2]


def test_copy_losses_score_the_datasets_own_targets():
    """The copy losses read the dataset's targets (a copy running to the row's end is scored on
    its real last token), checked against a plain numpy log-softmax."""
    import jax.numpy as jnp
    import numpy as np

    copy_losses = script_namespace("causal_scrubbing")["copy_losses"]
    rng = np.random.default_rng(0)
    table = rng.normal(size=(7, 7)).astype(np.float32)  # logits at a position = a row per current token
    tokens = rng.integers(0, 7, (3, 5)).astype(np.int32)
    nxt = rng.integers(0, 7, (3, 5)).astype(np.int32)
    first = (rng.random((3, 5)) < 0.5).astype(np.float32)
    second = 1.0 - first
    got = copy_losses(lambda t: jnp.asarray(table)[t], tokens, nxt, first, second)
    logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
    nll = -logp[tokens, nxt]
    want = ((nll * first).sum() / first.sum(), (nll * second).sum() / second.sum())
    np.testing.assert_allclose(got, want, rtol=1e-5)
