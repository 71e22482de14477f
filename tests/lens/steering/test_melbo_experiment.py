"""lens.steering.melbo.experiment (the main job's non-training steps) against independent
computations: cosines in numpy, means by hand, a checkpoint written and read back."""

import numpy as np
import pytest

from lens.steering import vectors
from lens.steering.melbo import experiment


def test_raw_cosine_max_abs_and_mean_score():
    rs = np.random.RandomState(0)
    q, _ = np.linalg.qr(rs.randn(6, 4))
    theta0, found = q[:, 0] * 3, (q[:, 1:].T * 2).astype(np.float32)
    assert experiment.raw_cosine_max_abs(theta0, found) < 1e-6  # orthogonal rows
    tilted = found.copy()
    tilted[0] = 0.6 * q[:, 0] + 0.8 * q[:, 1]  # cos 0.6 with theta0, 0 with the other rows
    assert experiment.raw_cosine_max_abs(theta0, tilted) == pytest.approx(0.6, abs=1e-6)
    scores = {"found_0": 0.2, "found_1": 0.4, "foundrescaled_0": 1.0, "base": 0.5}
    assert experiment.mean_score(scores, "found_") == pytest.approx(0.3)
    assert experiment.mean_score(scores, "random_") is None


def test_resume_checkpoint_refuses_other_settings(tmp_path):
    ckpt = tmp_path / "checkpoint.safetensors"
    theta0 = np.arange(4, dtype=np.float32)
    meta = {"model": "m", "layer": 2, "site": "resid_pre", "method": "melbo-ortho", "steps": 5, "lr": 0.1}
    v = np.eye(4, dtype=np.float32)[:2]
    losses = np.ones((2, 5), np.float32)
    vectors.save_vectors(ckpt, v, meta | {"n_done": 2}, extras={"theta0": theta0, "losses": losses})
    got = experiment.resume_checkpoint(ckpt, meta, theta0)
    np.testing.assert_array_equal(got.vectors, v)
    np.testing.assert_array_equal(got.losses, losses)
    with pytest.raises(SystemExit, match="steps: checkpoint 5 vs now 6"):
        experiment.resume_checkpoint(ckpt, meta | {"steps": 6}, theta0)
    with pytest.raises(SystemExit, match="theta0 differs"):
        experiment.resume_checkpoint(ckpt, meta, theta0 + 1)


def test_behaviour_per_vector_needs_four_scored_vectors():
    found = np.eye(5, dtype=np.float32)
    scores = {f"found_{i}": float(i % 2) for i in range(5)}
    gram = np.eye(5)
    assert experiment.behaviour_per_vector(found, scores, {"found_gram": {"target": gram, "logits": gram}},
                                           gen_vectors=3, n_prompts=1, max_new_tokens=4) is None
    out = experiment.behaviour_per_vector(found, scores, {"found_gram": {"target": gram, "logits": gram}},
                                          gen_vectors=4, n_prompts=1, max_new_tokens=4)
    assert out["code_score"] == [0.0, 1.0, 0.0, 1.0] and out["n_prompts"] == 1
    assert sum(out["target"]["cluster_sizes"]) == 4 and sum(out["logits"]["cluster_sizes"]) == 4
