"""The induction measurement: a 2-layer attention-only model whose weights are set by hand
(layer 0 head 0 = previous-token head, layer 1 head 0 = induction head) scores ~1 on
exactly those heads and predicts the second copy; a random model scores ~0."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens import models
from lens.circuits.induction import measure_induction, repeated_tokens, scores_from_patterns
from lens.models.core.config import ModelConfig

V, P = 40, 41  # vocab, context (probes of 1 + 2*20 tokens)
T = 20


def config() -> ModelConfig:
    # Residual layout: [token one-hot | position one-hot | previous token | predicted token]
    return ModelConfig(architecture="handbuilt", vocab_size=V, d_model=3 * V + P, n_layers=2, n_heads=2,
                       n_kv_heads=2, d_head=max(V, P), d_mlp=1, max_seq_len=P, norm_kind="rms",
                       norm_eps=1e-6, activation="gelu_new", gated_mlp=False, positional="learned",
                       attn_only=True)


def hand_built():
    c = config()
    tok, pos, prev, pred = 0, V, V + P, 2 * V + P  # offsets of the four subspaces
    m = models.init(c, jax.random.key(0))
    embed = np.zeros((V, c.d_model), np.float32)
    embed[np.arange(V), tok + np.arange(V)] = 1
    pos_embed = np.zeros((P, c.d_model), np.float32)
    pos_embed[np.arange(P), pos + np.arange(P)] = 1
    unembed = np.zeros((V, c.d_model), np.float32)
    unembed[np.arange(V), pred + np.arange(V)] = 1
    WQ, WK, WV, WO = (np.zeros((2, 2, *s), np.float32) for s in
                      [(c.d_model, c.d_head)] * 3 + [(c.d_head, c.d_model)])
    # layer 0 head 0: position p queries key position p - 1, and copies that token into `prev`
    WQ[0, 0, pos + np.arange(P), np.arange(P)] = 1.0
    WK[0, 0, pos + np.arange(P - 1), np.arange(1, P)] = 1.0
    WV[0, 0, tok + np.arange(V), np.arange(V)] = 1.0
    WO[0, 0, np.arange(V), prev + np.arange(V)] = 1.0
    # layer 1 head 0: current token t queries keys whose `prev` holds t; copies their token to `pred`
    WQ[1, 0, tok + np.arange(V), np.arange(V)] = 3.0
    WK[1, 0, prev + np.arange(V), np.arange(V)] = 1.0
    WV[1, 0, tok + np.arange(V), np.arange(V)] = 1.0
    WO[1, 0, np.arange(V), pred + np.arange(V)] = 10.0
    return eqx.tree_at(
        lambda m: (m.embed, m.pos_embed, m.unembed, m.blocks.W_Q, m.blocks.W_K, m.blocks.W_V, m.blocks.W_O),
        m, tuple(jnp.asarray(a) for a in (embed, pos_embed, unembed, WQ, WK, WV, WO)))


def test_hand_built_induction_head_scores_high_and_random_scores_low():
    report = measure_induction(hand_built(), jax.random.key(1), first_token=0, n=8, block_len=T, low=1)
    ind, prev = report.induction_score, report.previous_token_score
    assert ind[1, 0] > 0.95 and prev[0, 0] > 0.95
    # the zero heads attend uniformly: about 1/(1.5 T) on the induction target
    assert ind[0, 0] < 0.1 and ind[:, 1].max() < 0.1 and prev[1, 0] < 0.2
    assert report.heads_above("induction", 0.5) == [(1, 0)]
    assert report.heads_above("previous_token", 0.5) == [(0, 0)]
    assert report.loss_second_copy < 0.1 < 2.0 < report.loss_first_copy  # ln(40) = 3.7 if uniform

    rand = measure_induction(models.init(config(), jax.random.key(2)), jax.random.key(1), 0, n=8, block_len=T, low=1)
    assert rand.induction_score.max() < 0.1 and abs(rand.loss_drop) < 0.05


def test_scores_match_a_loop_over_positions():
    """The vectorised scores equal an explicit loop on random attention patterns."""
    rng = np.random.default_rng(0)
    p = rng.random((3, 2, 4, 2 * T + 1, 2 * T + 1))
    ind, prev = scores_from_patterns(p, T)
    for layer in range(2):
        for h in range(4):
            want_ind = np.mean([p[b, layer, h, i, i - T + 1] for b in range(3) for i in range(T + 1, 2 * T + 1)])
            want_prev = np.mean([p[b, layer, h, i, i - 1] for b in range(3) for i in range(1, 2 * T + 1)])
            assert ind[layer, h] == pytest.approx(want_ind, rel=1e-12)
            assert prev[layer, h] == pytest.approx(want_prev, rel=1e-12)


def test_repeated_tokens_are_repeats_of_distinct_ids():
    toks = repeated_tokens(jax.random.key(0), 5, T, V, first_token=7, low=1)
    assert toks.shape == (5, 2 * T + 1) and (toks[:, 0] == 7).all()
    np.testing.assert_array_equal(toks[:, 1:T + 1], toks[:, T + 1:])
    assert all(len(set(r[1:T + 1])) == T for r in toks) and toks[:, 1:].min() >= 1
    with pytest.raises(ValueError, match="distinct"):
        repeated_tokens(jax.random.key(0), 1, V, V, 0, low=1)


def test_repeated_tokens_three_copies_from_a_bounded_range():
    toks = repeated_tokens(jax.random.key(1), 4, T, V, first_token=0, low=2, high=2 + T + 1, copies=3)
    assert toks.shape == (4, 3 * T + 1)
    for c in (1, 2):  # every copy equals the first, element by element
        np.testing.assert_array_equal(toks[:, 1:T + 1], toks[:, 1 + c * T:1 + (c + 1) * T])
    assert toks[:, 1:].min() >= 2 and toks[:, 1:].max() < 2 + T + 1
    assert all(len(set(r[1:T + 1])) == T for r in toks)
    for bad, match in (({"high": V + 1}, "vocabulary"), ({"low": 5, "high": 5}, "vocabulary"),
                       ({"copies": 1}, "copies=1"), ({"low": 0, "high": T - 1}, "distinct")):
        with pytest.raises(ValueError, match=match):
            repeated_tokens(jax.random.key(0), 1, T, V, 0, **bad)
