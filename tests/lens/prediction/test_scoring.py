"""lens.prediction.scoring, lens.prediction.ngram, lens.prediction.gaming against independent computations: numpy
loops for the metrics, brute-force dictionaries for the n-gram tables, a numpy LayerNorm
for the direct path, a plain lens.training.train run for lam = 0."""

import collections
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from lens import models
from lens.prediction import gaming, ngram, scoring
from lens.training import train
from lens.models.core.config import ModelConfig


def tiny_gpt2(vocab=29, layers=2, d=16, seq=16) -> ModelConfig:
    return ModelConfig(architecture="gpt2", vocab_size=vocab, d_model=d, n_layers=layers, n_heads=2, n_kv_heads=2,
                       d_head=d // 2, d_mlp=2 * d, max_seq_len=seq, norm_kind="layer", norm_eps=1e-5,
                       activation="gelu_new", gated_mlp=False, positional="learned", attn_bias=True,
                       attn_out_bias=True, mlp_bias=True, norm_bias=True, tie_embeddings=True)


def tiny_llama(vocab=29) -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=vocab, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2,
                       d_head=4, d_mlp=24, max_seq_len=16, norm_kind="rms", norm_eps=1e-5, activation="silu",
                       gated_mlp=True, positional="rope", tie_embeddings=False)


def peaked(config, seed=0):
    """A random model with large weights, so its distributions are far from uniform."""
    return models.init(config, jax.random.key(seed), initializer_range=0.4)


from np_reference import log_softmax_np, metrics_np  # noqa: E402


def test_batch_metrics_jitted_vmapped_equal_a_numpy_loop():
    rng = np.random.default_rng(0)
    B, T, V, k = 3, 7, 23, 5
    m = log_softmax_np(rng.normal(size=(B, T, V)) * 2)
    p = log_softmax_np(m + rng.normal(size=(B, T, V)) * 0.7)
    p[0, 0] = m[0, 0]  # one exact match: order 1, spearman 1
    p[1, 2] = np.round(p[1, 2], 0)  # ties inside the model's top-k: average ranks
    got = scoring.batch_metrics(jnp.asarray(m, jnp.float32), jnp.asarray(p, jnp.float32), k)
    for b in range(B):
        for t in range(T):
            want = metrics_np(m[b, t], p[b, t], k)
            for name, w in want.items():
                assert float(got[name][b, t]) == pytest.approx(w, abs=2e-5), (name, b, t)
    assert float(got["order"][0, 0]) == 1.0 and float(got["spearman"][0, 0]) == pytest.approx(1.0)


def test_the_model_as_its_own_predictor_passes_everything():
    model = peaked(tiny_gpt2())
    rows = np.random.default_rng(1).integers(0, 29, (5, 11))
    me = scoring.model_predictor(model)
    s = scoring.score(me, {"self": me}, rows, k=4, chunk_rows=2)["self"]
    summary = scoring.summarize(s, tolerances=(0.0, 0.1))
    assert summary["pass_rate"] == {"0.0": 1.0, "0.1": 1.0}
    assert summary["top1"] == summary["recall"] == summary["order"] == 1.0
    assert summary["spearman"] == pytest.approx(1.0) and summary["kl"] < 1e-6
    assert summary["n_positions"] == 5 * 10  # the last position has no next token in the row


def test_a_uniform_predictor_scores_at_chance():
    model = peaked(tiny_gpt2(), seed=3)
    V, k = 29, 6
    rows = np.random.default_rng(2).integers(0, V, (4, 9))
    s = scoring.score(scoring.model_predictor(model), {"u": scoring.uniform_predictor(V)}, rows, k=k)["u"]
    m = log_softmax_np(np.stack([np.asarray(model(r)) for r in rows]))[:, :-1]
    top = np.argsort(-m, -1, kind="stable")[..., :k]
    err = np.abs(np.take_along_axis(m, top, -1) + np.log(V)).mean(-1)
    kl = np.log(V) + (np.exp(m) * m).sum(-1)  # log V - entropy
    # a constant predictor ranks by id: its top-k is {0..k-1}, its top-1 token 0
    recall = np.isin(top, np.arange(k)).sum(-1) / k
    summary = scoring.summarize(s, tolerances=(0.5, 1.0))
    assert summary["kl"] == pytest.approx(kl.mean(), rel=1e-4)
    assert summary["test_err"] == pytest.approx(err.mean(), rel=1e-4)
    assert summary["pass_rate"]["1.0"] == pytest.approx((err <= 1.0).mean())
    assert summary["top1"] == pytest.approx((top[..., 0] == 0).mean())
    assert summary["recall"] == pytest.approx(recall.mean())
    assert summary["spearman"] == 0.0  # no ranking at all


def test_summary_skips_common_tokens_and_breaks_down_by_frequency():
    rng = np.random.default_rng(4)
    n, t = 6, 8
    nt = rng.integers(0, 10, (n, t))
    nt[:, -1] = -1
    err = rng.random((n, t)).astype(np.float32)
    s = scoring.Scores({m: err for m in scoring.METRICS}, nt, 3)
    counts = np.arange(10)[::-1] * 10.0  # token 0 most frequent
    out = scoring.summarize(s, tolerances=(0.5,), token_counts=counts, skip_most_common=2, buckets=(5,))
    keep = (nt >= 2)
    assert out["n_positions"] == keep.sum()
    assert out["pass_rate"]["0.5"] == pytest.approx((err[keep] <= 0.5).mean())
    assert out["by_frequency"]["[0,5)"]["n_positions"] == ((nt >= 2) & (nt < 5)).sum()
    assert sum(b["n_positions"] for b in out["by_position"].values()) == keep.sum()


def test_bad_rows_are_refused():
    me = scoring.model_predictor(peaked(tiny_gpt2()))
    with pytest.raises(ValueError, match="out of range"):
        scoring.score(me, {"x": me}, np.array([[1, 2, 29]]))
    with pytest.raises(ValueError, match="k = 99"):
        scoring.score(me, {"x": me}, np.array([[1, 2, 3]]), k=99)
    with pytest.raises(ValueError, match="order"):
        ngram.count(np.array([[1, 2]]), 4, 29)
    # a Factored predictor whose index points past its table: an error, not a clamped row
    bad = lambda b: scoring.Factored(jnp.zeros((2, 29)), jnp.full(b.shape, 2, jnp.int32))  # noqa: E731
    with pytest.raises(ValueError, match="index out of range"):
        scoring.score(me, {"bad": bad}, np.array([[1, 2, 3]]))


# --------------------------------------------------------------------- n-grams
def brute_force_logp(rows, order, V, alpha):
    """Witten-Bell by dictionaries, one position at a time."""
    uni = collections.Counter(int(x) for r in rows for x in r)
    total = sum(uni.values())
    counts = {n: collections.defaultdict(collections.Counter) for n in range(2, order + 1)}
    for r in rows:
        for n in range(2, order + 1):
            for i in range(n - 1, len(r)):
                counts[n][tuple(int(x) for x in r[i - n + 1:i])][int(r[i])] += 1

    def p(w, ctx):
        if not ctx:
            return (uni[w] + alpha) / (total + alpha * V)
        lower = p(w, ctx[1:])
        c = counts[len(ctx) + 1].get(ctx)
        if not c:
            return lower
        return (c[w] + len(c) * lower) / (sum(c.values()) + len(c))

    def at(r, t):
        ctx = tuple(int(x) for x in r[max(0, t - order + 2):t + 1])
        return [math.log(p(w, ctx)) for w in range(V)]

    return at


@pytest.mark.parametrize("order", [1, 2, 3])
def test_ngram_tables_equal_a_brute_force_count(order):
    text = "the cat sat on the mat. the cat ate the rat; a bat sat on a cat."
    chars = sorted(set(text))
    V = len(chars) + 2  # two ids never seen
    ids = np.array([chars.index(c) for c in text])
    rows = ids[: 8 * (len(ids) // 8)].reshape(-1, 8)
    table = ngram.count(rows, order, V, alpha=0.5)
    probe = np.array([ids[3:10], ids[40:47]])
    got = np.asarray(table.log_probs(probe))
    want = brute_force_logp(rows, order, V, 0.5)
    for b in range(2):
        for t in range(probe.shape[1]):
            np.testing.assert_allclose(got[b, t], want(probe[b], t), rtol=0, atol=2e-5)
    if order == 2:
        dense = table.dense_bigram()
        np.testing.assert_allclose(np.log(dense[probe[0]]), got[0], atol=2e-5)


def test_ngram_counts_match_unique_pairs_on_larger_rows():
    rng = np.random.default_rng(5)
    V = 300
    rows = rng.integers(0, V, (40, 33))
    table = ngram.count(rows, 3, V)
    pairs = collections.Counter((int(a), int(b)) for r in rows for a, b in zip(r[:-1], r[1:]))
    lv = table.levels[0]
    assert lv.count.sum() == sum(pairs.values()) and len(lv.next) == len(pairs)
    i = np.searchsorted(lv.contexts, rows[0, 0])
    got = dict(zip(lv.next[lv.start[i]:lv.start[i + 1]].tolist(), lv.count[lv.start[i]:lv.start[i + 1]].tolist()))
    assert got == {b: c for (a, b), c in pairs.items() if a == rows[0, 0]}


# ----------------------------------------------------------------- direct path
@pytest.mark.parametrize("config", [tiny_gpt2(), tiny_llama()], ids=["gpt2", "llama"])
def test_direct_path_equals_the_model_with_every_block_output_zeroed(config):
    model = peaked(config, seed=1)
    rows = jnp.asarray(np.random.default_rng(6).integers(0, 29, (3, 13)), jnp.int32)
    for through_mlp in (False, True):
        edits = scoring.direct_path_edits(config, through_mlp)
        zeroed = jax.vmap(lambda t: model(t, edits=edits))(rows)
        got = jax.jit(jax.vmap(lambda t: scoring.direct_path_logits(model, t, through_mlp)))(rows)
        np.testing.assert_allclose(np.asarray(got), np.asarray(zeroed), rtol=1e-5, atol=1e-5)
    if config.architecture == "gpt2":  # and both equal LayerNorm(embed + pos) @ W_U^T in numpy
        x = np.asarray(model.embed, np.float64)[np.asarray(rows)] + np.asarray(model.pos_embed, np.float64)[:13]
        y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        y = y * np.asarray(model.final_norm_w) + np.asarray(model.final_norm_b)
        want = y @ np.asarray(model.embed, np.float64).T
        direct = jax.vmap(lambda t: scoring.direct_path_logits(model, t))(rows)
        np.testing.assert_allclose(np.asarray(direct), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------ training terms
@pytest.mark.slow  # a script end to end, a subprocess or a training run
def test_distillation_lowers_held_out_kl(tmp_path):
    teacher = peaked(tiny_gpt2(), seed=7)
    rng = np.random.default_rng(8)
    rows, held_out = rng.integers(0, 29, (64, 9)), rng.integers(0, 29, (16, 9))
    student = models.init(tiny_gpt2(layers=1), jax.random.key(9))
    before = gaming.mean_kl(teacher, student, held_out)
    cfg = train.TrainConfig(steps=60, batch_size=8, lr=1e-2, warmup_steps=5, eval_every=60, eval_batches=1,
                            checkpoint_every=60)
    out = train.train(student, rows, held_out, cfg, tmp_path,
                      train.TrainOptions(progress=False, loss_fn=gaming.DistillLoss(teacher)))
    after = gaming.mean_kl(teacher, out.model, held_out)
    assert after < 0.7 * before, (before, after)


@pytest.mark.slow  # a script end to end, a subprocess or a training run
def test_goodhart_term_equals_numpy_and_lam_zero_is_plain_training(tmp_path):
    config = tiny_gpt2(layers=1)
    rng = np.random.default_rng(10)
    rows, val = rng.integers(0, 29, (32, 9)), rng.integers(0, 29, (8, 9))
    table = ngram.count(rows, 2, 29).dense_bigram()
    model = models.init(config, jax.random.key(0))
    # the loss, against numpy: CE + lam * KL(bigram row || model)
    lam = 0.7
    got = float(gaming.GoodhartLoss(lam, jnp.log(jnp.asarray(table, jnp.float32)))(model, jnp.asarray(rows[:3])))
    lp = log_softmax_np(np.stack([np.asarray(model(r[:-1])) for r in rows[:3]]))
    ce = -np.mean(np.take_along_axis(lp, rows[:3, 1:, None], -1))
    tgt = table[rows[:3, :-1]]
    kl = np.mean((tgt * (np.log(tgt) - lp)).sum(-1))
    assert got == pytest.approx(ce + lam * kl, rel=1e-5)
    cfg = train.TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=6, eval_batches=1,
                            checkpoint_every=6)
    plain = train.train(model, rows, val, cfg, tmp_path / "plain", train.TrainOptions(progress=False)).model
    zero = train.train(model, rows, val, cfg, tmp_path / "zero",
                       train.TrainOptions(progress=False,
                                          loss_fn=gaming.GoodhartLoss(0.0, jnp.log(jnp.asarray(table, jnp.float32))))).model
    for a, b in zip(jax.tree.leaves(eqx.filter(plain, eqx.is_array)), jax.tree.leaves(eqx.filter(zero, eqx.is_array))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit for bit
