"""scripts/orthogonal_steering.py end to end on tiny random HF folders (no tokenizer:
prompts are seeded random ids): a run killed after its first checkpoint and resumed gives
the same vectors as an uninterrupted run, and report.json holds every key the issue lists.
The kill is simulated in-process (an exception from the checkpoint hook, Llama) and done
for real (the script's process SIGKILLs itself right after its second checkpoint, Qwen2).
The script runs through runpy (tests/script_entry.py), never imported."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # make test-fast skips it (real weights, subprocesses or long runs)
from script_entry import ROOT, cli_env, entry, run_killed_at, script_namespace


REQUIRED = ("model", "source_layer", "target_layer", "k_vectors", "raw_cosine_max_abs", "norms",
            "effective_cosine_mean", "downstream_cosine_mean", "participation_ratio",
            "degeneracy_factor", "rho_grid", "effective_cosine_vs_rho", "degeneracy_vs_rho",
            "code_score", "mode_comparison", "shared_share", "specific_participation_ratio", "control_spread",
            "residual_participation_ratio", "closed_form_per_token", "behaviour_per_vector", "objective_positions",
            "closed_form_pr_vs_k", "behaviour_readings", "seed_spread", "decisive_reading", "lead", "k_over_d")
STAGES = ("raw", "effective", "target", "logits")


class Killed(Exception):
    pass


def assert_every_vector_file_loads(out: Path):
    """Every .safetensors the main job writes is a `lens.steering.vectors` vector file: vectors at
    resid_pre[layer] = after block source_layer, metadata as JSON."""
    from lens.steering.vectors import load_extras, load_vectors

    files = sorted(out.glob("*.safetensors"))
    seeds = {f.name for f in files if f.name.startswith("vectors_seed")}  # the other MELBO seeds' vectors
    assert {f.name for f in files} - seeds == {"base.safetensors", "checkpoint.safetensors", "vectors.safetensors"}
    for f in files:
        v, meta = load_vectors(f)
        assert meta["site"] == "resid_pre" and meta["layer"] == meta["source_layer"] + 1, f.name
        assert v.shape[-1] == 24 and np.isfinite(v).all(), f.name
        if f.name != "base.safetensors":
            assert load_extras(f)["theta0"].shape == (24,), f.name


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    """Qwen2 (Llama plus q/k/v biases): the architecture of the full-scale run."""
    from transformers import Qwen2Config

    from hf_tiny import save_tiny

    cfg = Qwen2Config(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny_qwen2_script")
    save_tiny(cfg, folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from hf_tiny import save_tiny, tiny_llama_config

    cfg = tiny_llama_config(4, max_positions=64)
    folder = tmp_path_factory.mktemp("tiny_llama_script")
    save_tiny(cfg, folder)
    return folder


def argv(folder, out, *extra):
    return ["--model", str(folder), "--out", str(out), "--k", "4", "--block", "2", "--steps", "5",
            "--rho-grid", "0.3,1", "--base-rho-grid", "0.5,1", "--gen-tokens", "3", "--gen-vectors", "4",
            "--gen-prompts", "1", "--gen-batch", "12", "--calib-prompts", "2", "--compare-k", "2",
            "--compare-seeds", "2", "--chunk", "4", "--control-seeds", "2", "--n-boot", "30",
            "--readings-prompts", "2", "--melbo-seeds", "2", "--behaviour-tokens", "3", *extra]


def test_killed_run_resumes_to_the_uninterrupted_vectors(tiny_folder, tmp_path):
    from lens.steering.vectors import load_extras, load_vectors

    main = script_namespace("orthogonal_steering")["main"]
    full = main(argv(tiny_folder, tmp_path / "full"))

    def kill(n_done):
        raise Killed(n_done)  # the run dies right after writing its first checkpoint

    with pytest.raises(Killed):
        main(argv(tiny_folder, tmp_path / "killed"), on_checkpoint=kill)
    saved, meta = load_vectors(tmp_path / "killed" / "checkpoint.safetensors")
    assert meta["n_done"] == 2 and saved.shape == (2, 24)
    assert not (tmp_path / "killed" / "report.json").exists()

    # resuming with other training settings is refused, and the checkpoint is left as it was
    before = (tmp_path / "killed" / "checkpoint.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="steps: checkpoint 5 vs now 6"):
        main(argv(tiny_folder, tmp_path / "killed", "--resume", "--steps", "6"))
    assert (tmp_path / "killed" / "checkpoint.safetensors").read_bytes() == before

    # Killed again in the second MELBO seed: after its first training block, then after
    # its first save of behaviour scores; each resume continues from what was saved.
    def kill_in_seed1_training(n_done):
        if n_done == 2 and (tmp_path / "killed" / "vectors_seed1.safetensors").exists():
            raise Killed(n_done)

    with pytest.raises(Killed):
        main(argv(tiny_folder, tmp_path / "killed", "--resume"), on_checkpoint=kill_in_seed1_training)
    assert load_vectors(tmp_path / "killed" / "vectors_seed1.safetensors")[1]["n_done"] == 2
    assert len(json.loads((tmp_path / "killed" / "behaviour_seed0.json").read_text())["rows"]) == 4

    def kill_in_seed1_scoring(seed, n_scored):
        if seed == 1:
            raise Killed(n_scored)

    with pytest.raises(Killed):
        main(argv(tiny_folder, tmp_path / "killed", "--resume"), on_scored=kill_in_seed1_scoring)
    assert load_vectors(tmp_path / "killed" / "vectors_seed1.safetensors")[1]["n_done"] == 4
    assert len(json.loads((tmp_path / "killed" / "behaviour_seed1.json").read_text())["rows"]) == 1  # 12 // 8 per call
    scored = []
    resumed = main(argv(tiny_folder, tmp_path / "killed", "--resume"), on_scored=lambda s, n: scored.append((s, n)))
    assert scored == [(1, 2), (1, 3), (1, 4)]  # only seed 1's three unscored vectors were generated
    for name in ("behaviour_seed0.json", "behaviour_seed1.json"):
        want, got = (json.loads((tmp_path / run / name).read_text()) for run in ("full", "killed"))
        assert got == want and len(want["rows"]) == 4, name
    np.testing.assert_array_equal(*(load_vectors(tmp_path / run / "vectors_seed1.safetensors")[0]
                                    for run in ("full", "killed")))
    assert resumed["seed_spread"] == full["seed_spread"]
    a, b = (load_vectors(tmp_path / run / "vectors.safetensors")[0] for run in ("full", "killed"))
    np.testing.assert_array_equal(b, a)
    ea, eb = (load_extras(tmp_path / run / "vectors.safetensors") for run in ("full", "killed"))
    np.testing.assert_array_equal(eb["theta0"], ea["theta0"])
    np.testing.assert_array_equal(eb["losses"], ea["losses"])
    assert_every_vector_file_loads(tmp_path / "killed")
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
    assert "Both readings" in (tmp_path / "killed" / "report.md").read_text()
    # Behaviour per vector: every found vector scored, clustered by its specific effect.
    beh = report["behaviour_per_vector"]
    assert len(beh["code_score"]) == 4 and report["objective_positions"] == "all"
    for stage in ("target", "logits"):
        assert sum(beh[stage]["cluster_sizes"]) == 4 and len(beh[stage]["labels"]) == 4
        assert 0 < beh[stage]["within_abs_diff"]["p"] <= 1
    assert "Behaviour per vector" in (tmp_path / "killed" / "report.md").read_text()
    # The readings: the raw-vector stage has no shared part beyond 1/K for these orthogonal
    # vectors only after the norm; every stage reports found and control spreads.
    for stage in ("effective", "target", "last", "last_normed", "logits", "target_with_first"):
        sh, sp = report["shared_share"][stage], report["specific_participation_ratio"][stage]
        assert sh["found_lo"] <= sh["found"] <= sh["found_hi"] and 0 <= sh["found"] <= 1
        assert 0 < sp["found"] <= 3 + 1e-6  # ceiling K - 1 = 3 for K = 4
        assert 0 < report["residual_participation_ratio"][stage]["found"] <= 3 + 1e-6
        spread = report["control_spread"][stage]["shared_share"]
        assert spread["min"] <= spread["mean"] <= spread["max"] and spread["n"] == 2
    # Values, not only keys: the raw-stage numbers and norms recomputed in float64 numpy
    # from the saved vectors (the downstream stages are checked against transformers +
    # PyTorch hooks in test_analysis_reference.py).
    found, theta0 = b.astype(np.float64), eb["theta0"].astype(np.float64)
    u = found / np.linalg.norm(found, axis=1, keepdims=True)
    cos = u @ u.T
    both = np.concatenate([theta0[None], found])
    ub = both / np.linalg.norm(both, axis=1, keepdims=True)
    assert report["raw_cosine_max_abs"] == pytest.approx(np.abs(ub @ ub.T - np.eye(5)).max(), abs=1e-6)
    norms = np.linalg.norm(found, axis=1)
    assert report["norms"]["base"] == pytest.approx(np.linalg.norm(theta0), rel=1e-6)
    assert report["norms"]["found_mean"] == pytest.approx(norms.mean(), rel=1e-6)
    # The checks: the closed form follows from the reported mean effective cosine
    # (numpy, float64); behaviour groups partition the K vectors; every headline number has
    # its spread over the 2 MELBO seeds; the decisive reading was declared (and written to
    # the folder) before the run, and the report leads with the answer.
    c = report["closed_form_pr"]["mean_cosine"]
    ks = [r["k"] for r in report["closed_form_pr_vs_k"]]
    assert ks[:3] == [2, 3, 4] and {800, 1558} <= set(ks)
    for r in report["closed_form_pr_vs_k"]:
        k = r["k"]
        assert r["closed_form"] == pytest.approx(k * k / ((1 + (k - 1) * c) ** 2 + (k - 1) * (1 - c) ** 2), rel=1e-5)
        assert (r["measured"] is None) == (k > 4)
    assert report["closed_form_pr_vs_k"][-2]["measured"] is None
    br = report["behaviour_readings"]
    assert br["code_writing"]["n"] + br["other"]["n"] == br["all"]["n"] == 4
    assert set(br["all"]["readings"]["logits"]) == {"shared_share", "specific_participation_ratio",
                                                    "residual_participation_ratio", "participation_ratio"}
    assert len(report["behaviour_scores"]["per_vector"]) == 4 and report["behaviour_scores"]["n_prompts"] == 8
    dec = report["decisive_reading"]
    key = f"{dec['reading']}/{dec['stage']}/over_control"
    sp = report["seed_spread"][key]
    assert sp["n"] == 2 and sp["min"] <= sp["mean"] <= sp["max"]
    assert json.loads((tmp_path / "killed" / "decisive_reading.json").read_text())["name"] == dec["name"]
    md = (tmp_path / "killed" / "report.md").read_text()
    assert md.index("## The answer") < md.index("## Raw table") and len(report["lead"]) <= 3
    pr = 16 / np.sum(cos ** 2)  # K^2 / ||C||_F^2, K = 4; measured agreement ~1e-7
    assert report["participation_ratio"]["raw"] == pytest.approx(pr, rel=1e-5)
    assert report["degeneracy_factor"]["raw"] == pytest.approx(4 / pr, rel=1e-5)


# A fast pipeline around the training phase: 4 blocks of 2 vectors; no calibration
# generations (--base-rho), no mode comparison, one rho.
FAST = ("--k", "8", "--steps", "5", "--base-rho", "0.5", "--compare-k", "0", "--rho-grid", "1",
        "--gen-tokens", "1", "--gen-vectors", "1", "--control-seeds", "1", "--n-boot", "10",
        "--readings-prompts", "1", "--melbo-seeds", "1")
SCRIPT = entry("orthogonal_steering")


def cache_env(cache):
    """A persistent compilation cache `cache` shared by this test's three processes."""
    return cli_env(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def test_sigkilled_run_resumes_to_the_uninterrupted_vectors(qwen2_folder, tmp_path):
    """A real kill (the process SIGKILLs itself after 2 of 8 vectors) on a tiny Qwen2
    folder, which is also the Qwen2 smoke test of the whole script (report.json's keys)."""
    from lens.steering.vectors import load_extras, load_vectors

    out, cache = tmp_path / "killed", tmp_path / "jax_cache"
    ckpt = out / "checkpoint.safetensors"
    logs = {}

    def run_to_end(name, args):
        proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=cache_env(cache),
                              capture_output=True, text=True, timeout=300)
        logs[name] = proc.stdout + proc.stderr
        assert proc.returncode == 0, logs[name][-3000:]

    def log_tail(name):
        return logs[name]

    # the process SIGKILLs itself right after the checkpoint with 2 of 8 vectors done
    proc = run_killed_at("orthogonal_steering", 2, argv(qwen2_folder, out, *FAST),
                         JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                         JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr)[-3000:]
    _, meta = load_vectors(ckpt)
    assert int(meta["n_done"]) == 2
    assert not (out / "report.json").exists()

    run_to_end("resumed", argv(qwen2_folder, out, *FAST, "--resume"))
    assert "resuming from 2 vectors" in log_tail("resumed")
    report = json.loads((out / "report.json").read_text())
    for key in REQUIRED:
        assert key in report, key
    assert report["k_vectors"] == 8 and report["raw_cosine_max_abs"] <= 1e-5

    # The uninterrupted run, given the killed run's theta0 files so that it skips the
    # calibration (theta0's determinism is the in-process test's business): a --resume
    # with no checkpoint trains all 8 vectors in one go.
    full = tmp_path / "full"
    full.mkdir()
    for name in ("base.safetensors", "calibration.json"):
        shutil.copy(out / name, full / name)
    run_to_end("full", argv(qwen2_folder, full, *FAST, "--resume"))
    assert "resuming from" not in log_tail("full")
    a, b = (load_vectors(run / "vectors.safetensors")[0] for run in (full, out))
    ea, eb = (load_extras(run / "vectors.safetensors") for run in (full, out))
    np.testing.assert_array_equal(eb["theta0"], ea["theta0"])
    np.testing.assert_array_equal(b, a)
    np.testing.assert_array_equal(eb["losses"], ea["losses"])
    assert_every_vector_file_loads(out)


def test_paper_preset_prints_its_plan_without_a_gpu(tmp_path, capsys):
    """--preset paper on this CPU machine: only the plan (Qwen1.5-1.8B's shape without a
    folder), K = 800 in 25 blocks of 32, 1,000 steps, lr 0.01; plan.json written."""
    main = script_namespace("orthogonal_steering")["main"]
    p = main(["--preset", "paper", "--out", str(tmp_path)])
    assert (p["k"], p["steps"], p["lr"], p["block"], p["n_blocks"], p["d_model"]) == (800, 1000, 0.01, 32, 25, 2048)
    assert p["fits"] and p["memory_GB"] < 80 and p["flops_total"] > 0
    assert json.loads((tmp_path / "plan.json").read_text())["k"] == 800
    assert "MELBO-ortho plan: K = 800" in capsys.readouterr().out
