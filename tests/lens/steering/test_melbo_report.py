"""lens.steering.melbo.report (the main job's report.json record) against hand computations:
the closed form at the measured mean cosine by its formula in numpy, the measured PR by the
eigenvalues of the Gram, K / d, the seed spread as plain means, the lead's three sentences."""

import numpy as np
import pytest

from lens.steering.melbo import report as R
from lens.steering.melbo import verdict as V


def equicorrelated_gram(k, c, jitter=0.0, seed=0):
    """Unit vectors with pairwise cosine c (plus a small symmetric perturbation)."""
    g = np.full((k, k), c) + (1 - c) * np.eye(k)
    if jitter:
        e = np.random.RandomState(seed).randn(k, k) * jitter
        g = g + (e + e.T) / 2
        np.fill_diagonal(g, 1.0)
    return g


def closed_form(k, c):
    return k**2 / ((1 + (k - 1) * c) ** 2 + (k - 1) * (1 - c) ** 2)


def eig_pr(g):
    lam = np.linalg.eigvalsh(np.asarray(g, np.float64))
    return lam.sum() ** 2 / (lam**2).sum()


def fake_readings(k=6):
    g = equicorrelated_gram(k, 0.1, jitter=0.02)
    rs = np.random.RandomState(1)
    grams, ctrls = {}, {}
    for st in V.BEHAVIOUR_STAGES:
        e = rs.randn(k, 12)
        grams[st] = e @ e.T
        ctrls[st] = [(lambda x: x @ x.T)(rs.randn(k, 12)) for _ in range(2)]
    grams["effective"] = g
    ctrls["effective"] = [equicorrelated_gram(k, 0.1, jitter=0.02, seed=5)]
    rd = {"found_gram": grams, "control_grams": ctrls, "effective_unit_cos": np.linspace(0.05, 0.15, 40)}
    for r in V.READINGS:
        rd[r] = {st: {"found": 2.0 + i, "control_mean": 4.0} for i, st in enumerate(V.BEHAVIOUR_STAGES)}
    return rd


def test_closed_form_summary_follows_the_measured_cosine():
    """Rows K = 2..6 measured (eigenvalue PR of the leading sub-Gram, 1e-5 relative) and
    K = 800 / 1,558 extrapolated: the closed form at the Gram's mean off-diagonal cosine."""
    rd = fake_readings(k=6)
    g = rd["found_gram"]["effective"]
    c = g[~np.eye(6, dtype=bool)].mean()
    cf = R.closed_form_summary(rd, rho_mean=0.7)
    rows = {r["k"]: r for r in cf["rows"]}
    assert sorted(rows) == [2, 3, 4, 5, 6, 800, 1558]
    assert cf["mean_cosine"] == pytest.approx(c, rel=1e-6)
    for k, row in rows.items():
        assert row["closed_form"] == pytest.approx(closed_form(k, c), rel=1e-5)
        if k <= 6:
            assert row["measured"] == pytest.approx(eig_pr(g[:k, :k]), rel=1e-5)
            assert row["control_measured"] == pytest.approx(eig_pr(rd["control_grams"]["effective"][0][:k, :k]),
                                                            rel=1e-5)
        else:
            assert row["measured"] is None
    k10 = cf["k_at_10x"]  # the first K whose closed-form degeneracy K / PR reaches 10
    assert k10 / closed_form(k10, c) >= 10 > (k10 - 1) / closed_form(k10 - 1, c)
    assert [a["rho"] for a in cf["at_rho"]] == [0.7, 1.0, 2.0]


def test_main_job_summary_adds_every_key_and_leads_with_three_sentences():
    rd = fake_readings(k=6)
    cf = R.closed_form_summary(rd, rho_mean=0.7)
    writes = np.array([True, False, True, False, True, False])
    scores = writes[:, None] * np.array([[1.0, 0, 0, 0, 0, 0, 0, 0]])
    rule = R.code_writing_rule(1, 48, 8)
    beh = V.behaviour_readings(rd, writes, rule)
    records = []
    for seed, scale in ((0, 1.0), (1, 0.5), (2, 2.0)):
        rs = {r: {st: {"found": v["found"] * scale, "control_mean": v["control_mean"]} for st, v in rd[r].items()}
              for r in V.READINGS}
        h = V.headline(rs | {"found_gram": rd["found_gram"]}, writes, scores, np.ones((6, 3)), np.full(6, 3.0), 2.0, 12,
                       control_means=R.control_means(rd))
        records.append(h | {"seed": seed})
    out = R.main_job_summary({"k_vectors": 6, "model": "m"}, closed_form=cf, behaviour_readings=beh,
                             behaviour_scores=scores, writes=writes, seed_records=records, seed=0, d_model=12)
    assert out["k_over_d"] == 0.5 and out["k_at_original_d_ratio"] == 1024 and out["model"] == "m"
    assert out["decisive_reading"] == V.DECISIVE and "rows" not in out["closed_form_pr"]
    assert out["closed_form_pr_vs_k"] == cf["rows"] and "rows" in cf  # the input is left as it was
    assert out["behaviour_scores"]["per_vector"] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    key = "residual_participation_ratio/logits/over_control"
    assert out["seed_spread"][key]["mean"] == pytest.approx(np.mean([r[key] for r in records]))
    assert out["seed_spread"][key]["per_seed"] == [r[key] for r in records] and "seed" not in out["seed_spread"]
    assert len(out["lead"]) == 3 and "3 MELBO seeds" in out["lead"][0]
    assert rule == ("a vector writes code when >= 1 of its greedy replies (48 tokens) to 8 non-coding prompts "
                    "hold real Python (lens.steering.code_score)")
    samples = R.behaviour_samples([["a", "b"], ["c", "d"]], np.array([[1.0, 0.0], [0.0, 0.5]]))
    assert [(s["label"], s["prompt"], s["code"]) for s in samples] == [
        ("behaviour_found_0", "0", 1.0), ("behaviour_found_0", "1", 0.0),
        ("behaviour_found_1", "0", 0.0), ("behaviour_found_1", "1", 0.5)]


def test_found_only_readings_reshapes_stage_readings():
    sr = {st: {r: {"point": float(i + j)} for j, r in enumerate(V.READINGS)} | {"gram": np.eye(2) * i}
          for i, st in enumerate(("effective", "logits"))}
    rd = R.found_only_readings(sr)
    j = V.READINGS.index("residual_participation_ratio")
    assert rd["residual_participation_ratio"]["logits"] == {"found": 1.0 + j}
    assert rd["found_gram"]["logits"].tolist() == (np.eye(2)).tolist()
