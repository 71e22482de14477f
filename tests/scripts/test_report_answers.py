"""Reports open with their answer, and with a 'pipeline check only' verdict where the model
cannot do the task or the mechanism is absent (synthetic report dicts; the scripts' smoke
tests run them end to end)."""

from __future__ import annotations

import numpy as np

from script_entry import script_namespace


def _hyp(loss, rec, lo, hi):
    return {"loss_mean": loss, "loss_recovered_mean": rec, "loss_recovered_interval": [lo, hi]}


def test_causal_scrubbing_answer_and_verdict():
    answer = script_namespace("causal_scrubbing")["answer"]
    hs = {"identity": _hyp(1.0, 1.0, 1.0, 1.0), "empty": _hyp(2.0, 0.0, 0.0, 0.0),
          "two-tests": _hyp(1.2, 0.8, 0.7, 0.9), "label-only": _hyp(1.6, 0.4, 0.3, 0.5)}
    lines = answer({"hypotheses": hs, "baseline": "empty", "model_loss": 1.0})
    assert lines[0].startswith("**Answer.**") and "`two-tests` recovers the most loss: 80.0%" in lines[0]
    assert not any("Verdict" in x for x in lines)
    flat = {k: dict(h, loss_mean=1.005) for k, h in hs.items()}
    lines = answer({"hypotheses": flat, "baseline": "empty", "model_loss": 1.0})
    assert "**Verdict: pipeline check only.**" in lines[2] and "0.005 nats" in lines[2]


def test_lens_report_answer_and_verdict():
    answer = script_namespace("lens_report")["answer"]
    words = [["a", "x"], ["b", " Paris"], ["c", " Paris"], ["d", " Paris"]]  # 3 layers + output
    strong = answer([("logit lens", words, np.array([[0.1, 0.1], [0.1, 0.2], [0.1, 0.5], [0.1, 0.9]]))])
    assert strong[0] == ("**Answer.** the model predicts ' Paris' (p = 0.90) after the prompt; the logit "
                         "lens reads it from layer 1 of 3.")
    assert len(strong) == 2  # no verdict
    weak = answer([("logit lens", words, np.full((4, 2), 0.01))])
    assert weak[2].startswith("**Verdict: pipeline check only.** the model's own top-1 probability is 0.01")


def test_logit_geometry_answer():
    answer = script_namespace("logit_geometry")["answer"]
    r = {"rankings": {"scores": ["logit", "cosine"], "spearman_mean": [0.9, 0.4]},
         "effective_cosine": {"rho": [0.5, 1.0, 2.0], "closed_form": [0.1, 0.146, 0.3], "layer": 6,
                              "orthogonal": {"with_gain": [0.1, 0.2, 0.3], "max_abs_err_vs_closed": [1e-4, 3e-4]}}}
    (line, blank) = answer(r)
    assert line.startswith("**Answer.** `logit` ranks") and "Spearman 0.900" in line
    assert "effective cosine of 0.200 at layer 6 (closed form on the sphere 0.146" in line and "3.0e-04" in line


def test_orthogonal_report_answer_and_behaviour_verdict():
    answer = script_namespace("orthogonal_report")["answer"]
    summary = {"k_vectors": 8, "degeneracy_factor": {"raw": 1.0, "effective": 1.6, "target": 2.0, "logits": 4.0},
               "controls": {"random_control": {"target": 1.0, "logits": 2.0}}, "code_score": {"base": 0.5}}
    lines = answer(summary)
    assert lines[0] == ("**Answer.** the 8 MELBO-ortho vectors, orthogonal in storage, act as this many distinct "
                        "directions: 5.0 after the norm, 4.0 at the target layer (random control 8.0), 2.0 in "
                        "the logits (random control 4.0).")
    assert len(lines) == 2
    lines = answer(summary, {"calibrated": True, "wrote_code": False})
    assert lines[2].startswith("**Verdict on behaviour: pipeline check only.**")


def test_goodhart_answer():
    answer = script_namespace("goodhart")["answer"]
    rows = [{"lam": 0.0, "pass_rate": 0.1, "val_loss": 3.0}, {"lam": 4.0, "pass_rate": 0.6, "val_loss": 3.4}]
    line = answer({"settings": {"tau": 0.5}, "lambda_sweep": {"bigram": rows}})[0]
    assert line == ("**Answer.** toward the bigram, the pass rate at 0.5 nats goes from 0.100 (lambda 0) to "
                    "0.600 (lambda 4) while the validation loss goes from 3.000 to 3.400 nats.")


def test_modularity_answer_and_verdict():
    answer = script_namespace("modularity_report")["answer"]
    rec = [{"neurons_pruned": 0, "python-code": {"top1": 0.30}, "shakespeare": {"top1": 0.20}},
           {"neurons_pruned": 50, "python-code": {"top1": 0.10}, "shakespeare": {"top1": 0.18}}]
    report = {"selective_pruning": {"m": {"n_neurons": 500, "methods": {"ratio": {"records": rec}}}}}
    lines = answer(report)
    assert lines[0] == ("**Answer.** m: pruning 10% of MLP neurons lowers python-code top-1 by 0.200 (from 0.300) "
                        "and the retain corpora's by 0.020 on average.")
    rec[0]["python-code"]["top1"] = 0.01
    assert "**Verdict: pipeline check only.**" in answer(report)[2]


def test_modularity_answer_of_the_sparsity_tables():
    answer = script_namespace("modularity_report")["answer"]
    table = [{"split": "coact", "router": "oracle", "fraction": 0.5, "loss_increase": 1.11},
             {"split": "coact", "router": "mlp", "fraction": 0.5, "loss_increase": 1.38},
             {"split": "random", "router": "oracle", "fraction": 0.5, "loss_increase": 1.99},
             {"split": "random", "router": "mlp", "fraction": 0.5, "loss_increase": 2.4},
             {"split": "random", "router": "oracle", "fraction": 0.25, "loss_increase": 0.5}]  # not the largest fraction
    oracle = [{"fraction": 0.25, "loss_increase": 0.385}, {"fraction": 0.5, "loss_increase": 0.057}]
    sparse = [{"predictor": "trained", "neuron_frac": 0.5, "head_frac": 1.0, "loss_increase": 6.43},
              {"predictor": "trained", "neuron_frac": 0.5, "head_frac": 0.3, "loss_increase": 6.2},
              {"predictor": "untrained", "neuron_frac": 0.5, "head_frac": 1.0, "loss_increase": 8.3}]
    report = {"moefication": {"m": {"table": table, "per_neuron_oracle": oracle}},
              "contextual_sparsity": {"m": {"recall_reference": {"trained": {"recall": 0.892, "classifier_sparsity": 0.47}},
                                            "sparse_forward": sparse}}}
    assert answer(report)[0] == (
        "**Answer.** m: keeping 50% of the MLP neurons per token costs +0.057 nats (per-neuron oracle), 50% of the "
        "experts +1.11 with oracle routing (best split: coact) and +1.38 with its trained router; m: the Deja Vu "
        "predictors recall 0.892 of the active neurons (the reference's definition, 47% predicted on) and running "
        "every layer on its predicted 50% costs +6.43 nats.")
    assert "nothing was run" in answer({"moefication": {"m": {"skipped": "d_mlp 7"}}})[0]


def test_tuned_lens_answer_and_verdict():
    answer = script_namespace("train_tuned_lens")["answer"]
    # the last row is the model itself: top-1 agreement with itself is always 1, so the verdict
    # reads the model's own cross-entropy against uniform (ln 1000 = 6.91 nats)
    report = {"logit_lens": {"kl": [2.0, 1.0, 0.0], "top1": [0.1, 0.2, 1.0], "ce": [5.0, 4.0, 3.0]},
              "tuned_lens": {"kl": [1.0, 1.5, 0.0], "top1": [0.2, 0.2, 1.0]}, "vocab_size": 1000}
    lines = answer(report)
    assert lines[0] == ("**Answer.** the tuned lens is closer to the model's output than the logit lens at 1 of 2 "
                        "layers (mean KL 1.250 vs 1.500 nats).")
    assert not any("Verdict" in x for x in lines)  # 3.0 nats < 0.9 x 6.91
    report["logit_lens"]["ce"][-1] = 6.5  # > 0.9 x ln 1000 = 6.22: the model cannot predict the text
    assert answer(report)[2].startswith("**Verdict: pipeline check only.** the model's own next-token "
                                        "cross-entropy on the test text is 6.50 nats/token")


def test_orthogonal_readings_answer():
    answer = script_namespace("orthogonal_readings")["answer"]
    ans = {"choices": {"k": 6}, "participation_ratio": {"logits": {}},
           "shared_share": {"logits": {"found": 0.6, "control_mean": 0.1}},
           "specific_participation_ratio": {"logits": {"found": 2.0, "control_mean": 4.5}}}
    assert answer(ans)[0] == ("**Answer.** logits: shared share 0.60 (control 0.10), specific PR 2.0 of 5 "
                              "(control 4.5).")


def test_dla_norm_report_opens_with_its_answer():
    report_lines = script_namespace("dla_norm")["report_lines"]
    stat = lambda m: {"median": m, "min": m, "max": m}  # noqa: E731
    d = lambda l1: {k: stat(v) for k, v in dict(rel_l1=l1, abs_ratio=1.0, spearman=0.8, top5_overlap=0.6,  # noqa: E731
                                                top10_sign_flips=1.0).items()}
    r = {"model": "m", "norm": "rms", "groups": ["g0", "g1"], "parts": ["p0", "p1", "p2"],
         "settings": {"prompts": 2, "seq": 8, "quantity": "q", "group_shapley": "exact", "permutations": 4},
         "disagreement_groups": d(0.5), "disagreement_parts": d(0.30), "control_parts_two_seeds": d(0.05),
         "control_groups_two_seeds": None, "frozen_shapley_vs_a_max_abs": 1e-7, "prompts": []}
    lines = report_lines(r)
    assert lines[2].startswith("**Answer.** frozen-scale DLA (a) and the Shapley attribution over the final norm "
                               "(b) differ by a median relative L1 of 0.300 over 3 parts")
    assert lines[2].endswith("against 0.050 between two Shapley seeds: the difference is larger than the "
                             "estimator's noise.")


def test_tuned_lens_test_shares_fill_from_the_larger_splits():
    """The default preset's 1,600 test rows of 65 SmolLM2 tokens: python-docs' test split has
    454, fewer than an even third (534); it gives all 454 and the others split the rest."""
    shares = script_namespace("train_tuned_lens")["test_shares"]
    assert shares(1600, [1239, 454, 2100]) == [573, 454, 573]
    assert shares(9, [10, 10, 10]) == [3, 3, 3]                # even when every split has its share
    assert shares(10, [10, 10, 10]) == [4, 3, 3]               # the remainder to the first corpora
    assert shares(7, [1, 2, 10]) == [1, 2, 4]
    assert sum(shares(1601, [1239, 454, 2100])) == 1601
    import pytest
    with pytest.raises(SystemExit, match="--eval-rows 40 exceeds the test splits' 30 rows"):
        shares(40, [10, 10, 10], ["a", "b", "c"], 65)
