"""Per-token stage effects (lens.steering.melbo.stages) against transformers in float64."""

import numpy as np

import np_reference as R
from lens.steering.melbo import decompose, stages
from lens.steering.melbo.problem import make_problem
from test_differential import MASK, PROMPTS, TOK, add_hook, hf64, hf_run

S, T = 0, 1


def _setup(k=5):
    hf, ours = hf64("llama")
    problem = make_problem(ours, TOK[:2], MASK[:2], S, T)
    q, _ = np.linalg.qr(np.random.RandomState(4).randn(ours.config.d_model, k))
    return hf, ours, problem, (q.T * 5.0).astype(np.float32)


def test_token_effects_match_transformers_hooks():
    hf, ours, problem, v = _setup()
    eff = stages.token_effects(problem, v, chunk=2)  # padded last chunk
    for i, p in enumerate(PROMPTS[:2]):
        n = len(p)
        _, h0, f0 = hf_run(hf, p)
        lp0 = R.log_softmax(hf_run(hf, p)[0])
        for k in range(len(v)):
            logits, h, f = hf_run(hf, p, hooks=[add_hook(hf, S + 1, v[k])])
            R_close = lambda a, b: np.abs(a - b).max() / np.abs(b).max()  # noqa: E731
            assert R_close(eff["target"][k, i, :n], h[T + 1] - h0[T + 1]) < 1e-5
            assert R_close(eff["last"][k, i, :n], f - f0) < 1e-5
            assert R_close(eff["last_normed"][k, i, :n], h[-1] - h0[-1]) < 1e-5  # HF's last entry is normed
            if n < TOK.shape[1]:
                assert np.abs(eff["target"][k, i, n:]).max() == 0  # padding zeroed
            # the logit metric: Gram of S-mapped effects == Gram of centred log-prob changes
            d = R.log_softmax(logits) - lp0
            d = d - d.mean(-1, keepdims=True)
            mapped = R.f64(eff["logits"][k, i, :n])
            assert abs((mapped * mapped).sum() - (d * d).sum()) < 1e-4 * (d * d).sum()


def test_logit_gram_cross_terms_match_explicit_logits():
    hf, ours, problem, v = _setup(3)
    eff = stages.token_effects(problem, v, chunk=3)
    p = PROMPTS[0]
    lp0 = R.log_softmax(hf_run(hf, p)[0])
    d = []
    for k in range(3):
        x = R.log_softmax(hf_run(hf, p, hooks=[add_hook(hf, S + 1, v[k])])[0]) - lp0
        d.append((x - x.mean(-1, keepdims=True)).ravel())
    d = np.stack(d)
    mapped = R.f64(eff["logits"][:, 0, : len(p)]).reshape(3, -1)
    np.testing.assert_allclose(mapped @ mapped.T, d @ d.T, rtol=1e-4, atol=1e-6 * np.abs(d @ d.T).max())


def test_stage_readings_shapes_choices_and_reference():
    _, ours, problem, v = _setup(6)
    out = stages.stage_readings(problem, v, reference=v.sum(0) / 3, n_boot=50)
    names = {"effective", "effective_first_order", "target", "target_with_first", "last", "last_with_first",
             "last_normed", "last_normed_with_first", "logits", "logits_with_first"}
    assert set(out) == names
    n_real = int(np.asarray(MASK[:2]).sum())
    assert out["target"]["units"] == n_real - 2 and out["target_with_first"]["units"] == n_real
    for name, r in out.items():
        for key in ("participation_ratio", "specific_participation_ratio", "residual_participation_ratio",
                    "shared_share"):
            assert r[key]["lo"] <= r[key]["point"] <= r[key]["hi"], (name, key)
        assert -1 <= r["shared_cos_reference"] <= 1
    # the readings are those of decompose on the same effects
    eff = stages.token_effects(problem, v)
    tgt = eff["target"][:, :, 1:][:, np.asarray(MASK[:2])[:, 1:]]
    assert abs(out["target"]["shared_share"]["point"] - decompose.shared_specific(tgt)["shared_share"]) < 1e-6


def test_answer_contract_and_spreads():
    _, ours, problem, v = _setup(6)
    theta0 = np.random.RandomState(1).randn(ours.config.d_model).astype(np.float32) * 5
    # found = vectors orthogonal to theta0, so the control is the same kind of draw
    v = v - np.outer(v @ theta0, theta0) / (theta0 @ theta0)
    ans = stages.answer(problem, v, theta0, control_seeds=(0, 1, 2), n_boot=30)
    for key in ("shared_share", "specific_participation_ratio", "residual_participation_ratio", "participation_ratio",
                "control_spread", "closed_form_per_token", "shared_cos_theta0"):
        assert key in ans
    for stage, spread in ans["control_spread"].items():
        for reading, s in spread.items():
            assert s["min"] <= s["mean"] <= s["max"] and s["n"] == 3
            assert ans[reading][stage]["control_mean"] == s["mean"]
        assert 0 <= ans["shared_share"][stage]["found"] <= 1
    assert ans["choices"]["n_tokens"] == int(np.asarray(MASK[:2]).sum())
    cf = ans["closed_form_per_token"]
    assert 0 < cf["pooled_per_token"] < 0.5 and 0 < cf["at_mean_rho"] < 0.5
    # found_gram: the pooled Gram of the found effects, = E E^T of the flattened effects
    # (float64 by hand), and nothing numpy is left in the JSON-able part.
    eff = stages.unit_effects(problem, v)["target"].astype(np.float64).reshape(len(v), -1)
    np.testing.assert_allclose(ans["found_gram"]["target"], eff @ eff.T, rtol=1e-4, atol=1e-4 * np.abs(eff @ eff.T).max())
    import json

    json.dumps({k: x for k, x in ans.items() if k not in stages.NOT_JSON})


def test_k_curve_matches_readings_of_the_first_k():
    _, ours, problem, v = _setup(8)
    theta0 = np.random.RandomState(2).randn(ours.config.d_model).astype(np.float32)
    curve = stages.k_curve(problem, v, theta0, [2, 5, 8])
    eff = stages.unit_effects(problem, v[:5])
    assert curve["target"]["found"]["k"] == [2, 5, 8]
    want = decompose.shared_specific(eff["target"])
    assert abs(curve["target"]["found"]["specific_participation_ratio"][1] - want["specific_participation_ratio"]) < 1e-4
    assert abs(curve["logits"]["found"]["participation_ratio"][1]
               - decompose.shared_specific(eff["logits"])["participation_ratio"]) < 1e-4
    assert set(curve) == {"effective", "effective_first_order", "target", "last", "last_normed", "logits"}


def test_bad_vectors_are_refused_before_any_compute():
    import pytest

    _, ours, problem, v = _setup(3)
    bad = v.copy()
    bad[1, 4] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        stages.token_effects(problem, bad)
    with pytest.raises(ValueError, match="NaN/inf"):
        stages.effective_effects(problem, bad)
    with pytest.raises(ValueError, match="d_model"):
        stages.unit_effects(problem, v[:, :-1])
