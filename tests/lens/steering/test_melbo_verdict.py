"""lens.steering.melbo.verdict (the main job's answer) and lens.steering.melbo.plan against
hand computations: groups by behaviour, spreads over seeds, the plan's FLOPs and bytes."""

import numpy as np
import pytest

from lens.steering.melbo import decompose as D
from lens.steering.melbo import verdict as V


def fake_readings(k=6, n_ctrl=2, seed=0):
    rs = np.random.RandomState(seed)
    grams, ctrls = {}, {}
    for st in V.BEHAVIOUR_STAGES:
        e = rs.randn(k, 12)
        grams[st] = e @ e.T
        ctrls[st] = [(lambda x: x @ x.T)(rs.randn(k, 12)) for _ in range(n_ctrl)]
    return {"found_gram": grams, "control_grams": ctrls}


def test_writes_code_and_behaviour_readings_groups():
    scores = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]], float)
    w = V.writes_code(scores, 1)
    assert w.tolist() == [True, False, True, False, True, False]
    assert V.writes_code(scores, 2).tolist() == [False, False, True, False, False, False]
    with pytest.raises(ValueError, match="min_replies"):
        V.writes_code(scores, 0)
    rd = fake_readings()
    out = V.behaviour_readings(rd, w, "rule")
    assert (out["code_writing"]["n"], out["other"]["n"], out["all"]["n"]) == (3, 3, 6)
    cell = out["code_writing"]["readings"]["logits"]["residual_participation_ratio"]
    want = D.subset_readings(rd["found_gram"]["logits"], [0, 2, 4])["residual_participation_ratio"]
    ctrl = [D.subset_readings(g, [0, 1, 2])["residual_participation_ratio"] for g in rd["control_grams"]["logits"]]
    assert cell["found"] == pytest.approx(want)
    assert cell["control_mean"] == pytest.approx(np.mean(ctrl)) and cell["control_min"] == pytest.approx(min(ctrl))
    assert cell["found_over_control"] == pytest.approx(want / np.mean(ctrl))
    assert V.behaviour_readings(rd, np.eye(6, dtype=bool)[0], "r")["code_writing"] == {"n": 1, "readings": None}


def test_seed_spread_and_headline():
    recs = [{"a": 1.0, "b": 2}, {"a": 3.0, "b": 2}, {"a": 2.0, "b": 5}]
    sp = V.seed_spread(recs)
    assert sp["a"] == {"per_seed": [1.0, 3.0, 2.0], "mean": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert sp["b"]["mean"] == pytest.approx(3.0)
    rd = fake_readings(k=4)
    for r in V.READINGS:
        rd[r] = {st: {"found": 2.0, "control_mean": 4.0} for st in V.BEHAVIOUR_STAGES}
    h = V.headline(rd, np.array([True, False, False, True]), np.ones((4, 8)), np.ones((4, 5)), np.full(4, 3.0), 2.0, 8)
    assert h["k_over_d"] == 0.5 and h["code_rate"] == 0.5 and h["norm_over_theta0"] == 1.5
    assert h["residual_participation_ratio/logits/over_control"] == 0.5
    assert h["effective_cosine_mean"] == pytest.approx(D.gram_cosine_mean(rd["found_gram"]["effective"]))


def test_plan_counts_flops_and_bytes_on_the_skeleton():
    """The plan of a tiny Qwen2 shape: weights bytes = 4 x the parameter count from the
    config's shapes (by hand), FLOPs = 4 N T per vector with N the weights of the trained-through
    blocks, plus attention; nothing is allocated."""
    from lens.models.families import family_module
    from lens.steering.melbo import plan

    hf = {"model_type": "qwen2", "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 4,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 61, "max_position_embeddings": 64,
          "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1e4, "hidden_act": "silu"}
    cfg = family_module(hf).config_from_hf(hf)
    p = plan.melbo_plan(cfg, k=9, steps=10, block=4, source=0, target=2, n_tokens=5, xla_cost=True)
    d, m, dh = 24, 40, 6
    per_block = d + 4 * d * dh + 2 * (2 * d * dh) + 4 * dh * d + (4 * dh + 2 * 2 * dh) + d + 3 * d * m  # norms, q/k/v/o, biases, mlp
    assert p["active_weights"] == 2 * per_block
    assert p["weights_GB"] * 1e9 == pytest.approx(4 * (61 * d + d + 4 * per_block))
    attn = 4 * 5 * 5 * 4 * dh * 2
    assert p["flops_per_block_step"] == 4 * (4 * 2 * per_block * 5 + 2 * attn)
    assert p["n_blocks"] == 3 and p["flops_total"] == p["flops_per_block_step"] * 10 * 3 and p["fits"]
    assert p["xla_flops_per_block_step"] > 0
    with pytest.raises(ValueError, match="exceed d_model"):
        plan.melbo_plan(cfg, k=24, steps=1, block=4, source=0, target=2, n_tokens=5)
