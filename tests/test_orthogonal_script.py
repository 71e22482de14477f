"""scripts/orthogonal_steering.py end to end on a tiny random Llama folder (no tokenizer:
prompts are seeded random ids): a run killed after its first checkpoint and resumed gives
the same vectors as an uninterrupted run, and report.json holds every key the issue lists."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

REQUIRED = ("model", "source_layer", "target_layer", "k_vectors", "raw_cosine_max_abs", "norms",
            "effective_cosine_mean", "downstream_cosine_mean", "participation_ratio",
            "degeneracy_factor", "rho_grid", "effective_cosine_vs_rho", "degeneracy_vs_rho",
            "code_score", "mode_comparison")
STAGES = ("raw", "effective", "target", "logits")


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import LlamaConfig

    from hf_tiny import save_tiny

    cfg = LlamaConfig(
        vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=6, max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("tiny_llama_script")
    save_tiny(cfg, folder)
    return folder


def argv(folder, out, *extra):
    return ["--model", str(folder), "--out", str(out), "--k", "4", "--block", "2", "--steps", "5",
            "--rho-grid", "0.3,1", "--base-rho-grid", "0.5,1", "--gen-tokens", "3", "--gen-vectors", "2",
            "--gen-prompts", "1", "--gen-batch", "12", "--calib-prompts", "2", "--compare-k", "2",
            "--compare-seeds", "2", "--chunk", "4", *extra]


def test_killed_run_resumes_to_the_uninterrupted_vectors(tiny_folder, tmp_path):
    import orthogonal_steering as script
    from orthogonal_report import load_vectors

    full = script.main(argv(tiny_folder, tmp_path / "full"))

    def kill(n_done):
        raise Killed(n_done)  # the run dies right after writing its first checkpoint

    with pytest.raises(Killed):
        script.main(argv(tiny_folder, tmp_path / "killed"), on_checkpoint=kill)
    saved, meta = load_vectors(tmp_path / "killed" / "checkpoint.safetensors")
    assert meta["n_done"] == "2" and saved["vectors"].shape == (2, 24)
    assert not (tmp_path / "killed" / "report.json").exists()

    resumed = script.main(argv(tiny_folder, tmp_path / "killed", "--resume"))
    a, _ = load_vectors(tmp_path / "full" / "vectors.safetensors")
    b, _ = load_vectors(tmp_path / "killed" / "vectors.safetensors")
    np.testing.assert_array_equal(b["found"], a["found"])
    np.testing.assert_array_equal(b["theta0"], a["theta0"])
    np.testing.assert_array_equal(b["losses"], a["losses"])
    assert resumed["raw_cosine_max_abs"] <= 1e-5 and full["k_vectors"] == 4

    report = json.loads((tmp_path / "killed" / "report.json").read_text())
    for key in REQUIRED:
        assert key in report, key
    assert {"base", "found_mean"} <= set(report["norms"])
    assert {"exact", "first_order"} <= set(report["effective_cosine_mean"])
    for key in ("participation_ratio", "degeneracy_factor"):
        assert set(STAGES) <= set(report[key]), key
    assert len(report["effective_cosine_vs_rho"]["exact"]) == len(report["rho_grid"]) == 2
    assert {"base", "ortho_mean", "random_control", "unsteered"} <= set(report["code_score"])
    mc = report["mode_comparison"]
    assert len(mc["runs"]["sequential"]) == 2 and len(mc["runs"]["batched"]) == 2
    assert {"loss_last", "norm_mean", "effective_exact_degeneracy"} <= set(mc["summary"])
    assert len(report["base_vector"]["table"]) == 4  # 2 designs x 2 rho
    for png in report["plots"]:
        assert (tmp_path / "killed" / png).stat().st_size > 0
    assert "Batched vs sequential" in (tmp_path / "killed" / "report.md").read_text()
