"""scripts/orthogonal_readings.py --preset smoke on a run folder of a tiny random model."""

import json

import numpy as np
import pytest

from lens.steering import vectors
from lens_tiny import tiny
from script_entry import script_namespace

pytestmark = pytest.mark.slow  # make test-fast skips it (real weights, subprocesses or long runs)


def fake_run(tmp_path, n_done=4):
    _, model, folder = tiny("llama")
    d = model.config.d_model
    q, _ = np.linalg.qr(np.random.RandomState(0).randn(d, 7))
    theta0 = (q[:, 0] * 4).astype(np.float32)
    rows = (q[:, 1:].T * 5).astype(np.float32)  # 6 rows, only the first n_done trained
    meta = {"model": str(folder), "layer": 1, "site": "resid_pre", "method": "melbo-ortho",
            "source_layer": 0, "target_layer": 1, "n_done": n_done}  # as the main job writes it
    vectors.save_vectors(tmp_path / "checkpoint.safetensors", rows, meta,
                          extras={"theta0": theta0, "losses": np.zeros((6, 2), np.float32)})
    return tmp_path, rows[:n_done]


def test_smoke_on_a_checkpoint(tmp_path):
    run, found = fake_run(tmp_path)
    ans = script_namespace("orthogonal_readings")["main"](["--run", str(run), "--preset", "smoke", "--k-curve", "2,3,4,6"])
    saved = json.loads((run / "readings.json").read_text())
    assert saved["choices"]["k"] == 4 == len(found)  # only the n_done trained vectors
    for key in ("shared_share", "specific_participation_ratio", "control_spread", "closed_form_per_token", "pr_vs_k"):
        assert key in saved
    assert saved["pr_vs_k"]["target"]["found"]["k"] == [2, 3, 4]  # K = 6 > 4 found is dropped
    for name in ("readings.md", "readings.png", "pr_vs_k.png"):
        assert (run / name).stat().st_size > 0
    assert ans["participation_ratio"]["target"]["found"] == pytest.approx(
        saved["participation_ratio"]["target"]["found"])


def test_bad_arguments_are_clear(tmp_path, capsys):
    parse_args = script_namespace("orthogonal_readings")["parse_args"]
    with pytest.raises(SystemExit):
        parse_args(["--run", str(tmp_path)])
    assert "neither vectors.safetensors nor checkpoint.safetensors" in capsys.readouterr().err
    fake_run(tmp_path)
    with pytest.raises(SystemExit):
        parse_args(["--run", str(tmp_path), "--k-curve", "1,4"])
    assert "--k-curve needs sizes >= 2" in capsys.readouterr().err
