"""lens.prediction.defences against independent computations: the defence rates counted
by a plain Python loop over positions, the per-lambda aggregation by hand, and the uniform
predictor's row of the predictor table from the model's own log-probs in numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens import models
from lens.prediction import scoring
from lens.prediction.defences import aggregate, defences, gaming_found, predictor_table, prompt_statistic
from lens.models.core.config import ModelConfig


def fake_scores(seed=0, n=3, t=7, vocab=11):
    rs = np.random.RandomState(seed)
    next_token = rs.randint(0, vocab, (n, t))
    next_token[:, -1] = -1  # the last position has no next token
    metrics = {"test_err": rs.exponential(1.0, (n, t)), "order": rs.randint(0, 2, (n, t)).astype(float),
               "top1": rs.randint(0, 2, (n, t)).astype(float), "kl": rs.exponential(0.5, (n, t)),
               "pred_top1": rs.randint(0, vocab, (n, t)).astype(np.float32)}
    metrics["pred_top1"][0, :3] = next_token[0, :3]  # some right, some wrong
    return scoring.Scores(metrics, next_token, 10)


def test_defences_match_a_loop_over_positions():
    s = fake_scores()
    tau, thr = 0.8, 0.4
    kept = [(i, j) for i in range(3) for j in range(7) if s.next_token[i, j] >= 0]
    wrong = [(i, j) for i, j in kept if s["pred_top1"][i, j] != s.next_token[i, j]]
    want = {
        "pass_rate": sum(s["test_err"][p] <= tau for p in kept) / len(kept),
        "exact_top10_order": sum(s["order"][p] for p in kept) / len(kept),
        "top1": sum(s["top1"][p] for p in kept) / len(kept),
        f"kl_below_{thr}": sum(s["kl"][p] <= thr for p in kept) / len(kept),
        "pass_rate_where_predictor_wrong": sum(s["test_err"][p] <= tau for p in wrong) / len(wrong),
        "fraction_predictor_wrong": len(wrong) / len(kept),
    }
    got = defences(s, tau, thr)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k
    assert 0 < got["fraction_predictor_wrong"] < 1  # both kinds of position present


def test_defences_refuse_scores_without_a_next_token():
    s = fake_scores()
    s.next_token[:] = -1
    with pytest.raises(ValueError, match="next token"):
        defences(s, 1.0, 0.5)


def test_prompt_statistic_averages_over_prompts_not_positions():
    s = fake_scores(n=4)
    s.next_token[2, 3:] = -1  # prompts of different lengths: a position count would weight them
    means = []
    for i in range(4):
        errs = [s["test_err"][i, j] for j in range(7) if s.next_token[i, j] >= 0]
        means.append(sum(errs) / len(errs))
    got = prompt_statistic(s, 0.9)
    assert got["mean_test_error"] == pytest.approx(sum(means) / 4, rel=1e-12)
    assert got["prompt_pass_rate"] == pytest.approx(sum(m <= 0.9 for m in means) / 4)
    assert got["passes"] == (sum(means) / 4 <= 0.9) and got["n_prompts"] == 4
    s.next_token[1, :] = -1
    with pytest.raises(ValueError, match="every prompt"):
        prompt_statistic(s, 0.9)


def test_gaming_found_by_its_definition():
    plain = [{"lam": 0.0, "seed": i, "pass": p, "code": c, "prose": 3.0} for i, (p, c) in enumerate([(0.3, 2.0), (0.4, 2.2)])]
    trade = {"lam": 1.0, "seed": 0, "pass": 0.9, "code": 2.5, "prose": 3.0}  # pass bought with capability
    small = {"lam": 1.0, "seed": 1, "pass": 0.4, "code": 2.0, "prose": 3.0}  # no gain over the best plain seed
    goodhart = {"lam": 3.0, "seed": 0, "pass": 0.6, "code": 2.1, "prose": 2.9}  # gain, capability within plain
    got = gaming_found(plain + [trade, small], "pass", ("code", "prose"))
    assert not got["found"] and got["runs"] == [] and got["plain_capability_max"] == {"code": 2.2, "prose": 3.0}
    got = gaming_found(plain + [trade, small, goodhart], "pass", ("code", "prose"))
    assert got["found"] and got["runs"] == [{"lam": 3.0, "seed": 0}] and "lam = 0" in got["definition"]
    with pytest.raises(ValueError, match="lam = 0"):
        gaming_found([trade], "pass", ("code",))


def test_aggregate_per_lambda():
    runs = [{"lam": 1.0, "seed": 0, "val_loss": 2.0, "pass_rate": 0.5, "note": "x"},
            {"lam": 0.0, "seed": 0, "val_loss": 3.0, "pass_rate": 0.2, "note": "x"},
            {"lam": 1.0, "seed": 1, "val_loss": 4.0, "pass_rate": 0.7, "note": "x"}]
    rows = aggregate(runs)
    assert [r["lam"] for r in rows] == [0.0, 1.0]
    zero, one = rows
    assert zero["seeds"] == [0] and zero["val_loss"] == 3.0 and zero["val_loss_std"] == 0.0
    assert one["seeds"] == [0, 1] and one["val_loss"] == 3.0
    assert one["val_loss_std"] == pytest.approx(math.sqrt(2.0))  # sample std of (2, 4)
    assert (one["pass_rate_min"], one["pass_rate_max"]) == (0.5, 0.7)
    assert "note" not in one and "seed" not in one  # only the floats are aggregated
    with pytest.raises(ValueError, match="no runs"):
        aggregate([])


def test_predictor_table_uniform_row_equals_numpy(tmp_path):
    """The uniform predictor's pass rates and KL recomputed from the model's log-probs:
    test_err = mean over the model's top-10 of |log p - log(1/V)|, KL(model || uniform) =
    log V - H(model); float32 model, tolerance 1e-4."""
    v, seq = 29, 12
    cfg = ModelConfig(architecture="gpt2", vocab_size=v, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_head=8,
                      d_mlp=32, max_seq_len=seq, norm_kind="layer", norm_eps=1e-5, activation="gelu_new",
                      gated_mlp=False, positional="learned", attn_bias=True, attn_out_bias=True, mlp_bias=True,
                      norm_bias=True, tie_embeddings=True)
    model = models.init(cfg, jax.random.key(3), 0.5)
    rs = np.random.RandomState(1)
    train_rows, eval_rows = rs.randint(0, v, (16, seq + 1)), rs.randint(0, v, (3, seq + 1))
    taus = (0.5, 2.0)
    table = predictor_table(model, train_rows, {"text": eval_rows}, taus, None, tmp_path)
    assert set(table) == {"text"}
    assert set(table["text"]) == {"unigram", "bigram", "trigram", "direct", "direct+mlp0", "uniform"}

    x = eval_rows[:, :-1]
    logp = np.asarray(jax.nn.log_softmax(jax.vmap(model)(jnp.asarray(x)).astype(jnp.float32), -1), np.float64)
    logp = logp[:, :-1]  # the last scored position has no next token in the row
    top = -np.sort(-logp, -1)[..., :10]
    err = np.abs(top + np.log(v)).mean(-1)
    kl = (np.exp(logp) * logp).sum(-1) + np.log(v)
    u = table["text"]["uniform"]
    assert u["n_positions"] == err.size
    assert u["kl"] == pytest.approx(kl.mean(), abs=1e-4)
    for tau in taus:
        assert u["pass_rate"][str(tau)] == pytest.approx((err <= tau).mean(), abs=1e-9)
    assert u["skip_10_most_common"]["n_positions"] < u["n_positions"]
