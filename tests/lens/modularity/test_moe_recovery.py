"""lens.modularity.moe_recovery: the adjusted Rand index against a hand-computed example,
the merged MLP against the MoE it came from, and the splits on a MoE whose experts are
separable by construction."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens.modularity import moe_recovery as R
from lens.models import Capture

CONFIG = R.moe_config(vocab_size=53, d_model=16, n_layers=2, n_heads=2, n_experts=4, expert_width=8,
                      k=2, seq_len=16)
ROWS = np.random.RandomState(0).randint(0, 53, size=(4, 16))


def random_moe(seed: int, std: float = 0.2):
    """A random MoE of CONFIG drawn with numpy (models.init compiles one sampler per
    weight shape, slow on a busy CPU): matrices ~ N(0, std), norm gains 1."""
    from lens.models.io.convert import assemble, expected_shapes

    rng = np.random.RandomState(seed)
    top, block = expected_shapes(CONFIG)
    draw = lambda name, shape: (np.ones(shape, np.float32) if name.endswith("norm_w") or name in ("ln1_w", "ln2_w")  # noqa: E731
                                else (std * rng.randn(*shape)).astype(np.float32))
    t = {n: draw(n, s) for n, s in top.items() if s is not None}
    layers = [{n: draw(n, s) for n, s in block.items() if s is not None} for _ in range(CONFIG.n_layers)]
    return assemble(CONFIG, t, layers)


@eqx.filter_jit
def _logits_and_neurons(model, tokens):
    out = model.forward(tokens, capture=Capture(neurons=True))
    return out.logits, out.activations.neurons


def test_ari_hand_computed():
    # a = {0,1,2 | 3,4,5}, b = {0,1 | 2,3 | 4,5}: contingency [[2,1,0],[0,1,2]];
    # index = C(2,2) + C(2,2) = 2; sum_a C(3,2) * 2 = 6; sum_b C(2,2) * 3 = 3; C(6,2) = 15;
    # expected = 6 * 3 / 15 = 1.2; max = (6 + 3) / 2 = 4.5; ARI = 0.8 / 3.3 = 8 / 33.
    a, b = [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]
    assert R.adjusted_rand_index(a, b) == pytest.approx(8 / 33, abs=1e-12)
    assert R.adjusted_rand_index(b, a) == pytest.approx(8 / 33, abs=1e-12)
    assert R.adjusted_rand_index([5, 5, 7, 7], [1, 1, 0, 0]) == 1.0  # a renaming
    # {0,1 | 2,3} vs {0,2 | 1,3}: index 0, expected 2 * 2 / 6, max 2: ARI = -(2/3) / (4/3) = -0.5
    assert R.adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5, abs=1e-12)
    with pytest.raises(ValueError, match="same n"):
        R.adjusted_rand_index([0, 1], [0, 1, 2])


def test_merged_mlp_is_the_moe_with_router_weights_in_the_activations():
    moe = random_moe(1)
    acts = R.expert_activations(moe, ROWS, chunk=4)
    merged = R.merge_experts(moe)
    assert merged.config.d_mlp == 32 and not merged.config.is_moe
    # routed activations through the merged W_out give the MoE's MLP output exactly
    w_out = np.asarray(merged.blocks.W_out)
    out = np.einsum("ltn,lnd->ltd", acts.routed, w_out)
    np.testing.assert_allclose(out, acts.mlp_out, atol=1e-5)
    # layer 0 reads the same stream in both models: the merged neurons are the dense ones
    merged_logits, neurons = _logits_and_neurons(merged, jnp.asarray(ROWS[0]))
    np.testing.assert_allclose(np.asarray(neurons[0]), acts.dense[0, :16], atol=1e-5)
    # the plain merged model is NOT the MoE (every expert at weight 1)
    moe_logits = _logits_and_neurons(moe, jnp.asarray(ROWS[0]))[0]
    assert np.abs(np.asarray(merged_logits) - np.asarray(moe_logits)).max() > 1e-3
    # each token uses exactly k experts
    usage = R.expert_usage(acts, 4)
    np.testing.assert_allclose(usage.sum(-1), 2.0)
    with pytest.raises(ValueError, match="mixture of experts"):
        R.merge_experts(merged)


def test_splits_recover_experts_separable_by_weights():
    """Experts whose neurons' gate / up rows cluster around one direction per expert: the
    weight split recovers them exactly (ARI 1); random splits score near 0."""
    moe = random_moe(2, std=0.02)
    rng = np.random.RandomState(3)
    L, E, d, m = 2, 4, 16, 8
    centres = rng.randn(L, E, d, 1) * 3.0
    w_in = centres + 0.1 * rng.randn(L, E, d, m)
    w_gate = centres + 0.1 * rng.randn(L, E, d, m)
    b = moe.blocks
    import dataclasses

    moe = dataclasses.replace(moe, blocks=dataclasses.replace(
        b, W_in_experts=jnp.asarray(w_in, jnp.float32), W_gate_experts=jnp.asarray(w_gate, jnp.float32)))
    acts = R.expert_activations(moe, ROWS)
    scores = R.recovery(moe, acts, random_draws=5)
    np.testing.assert_allclose(scores["weights"], 1.0)
    assert scores["random"].shape == (5, 2) and np.abs(scores["random"]).mean() < 0.2
    # routed activations are zero outside the chosen experts: co-activation sees the routing
    assert scores["coact_routed"].shape == (2,) and scores["coact_dense"].shape == (2,)


def test_load_balancing_loss_is_one_when_balanced():
    E = 4
    logits = jnp.zeros((2, 8, E))  # uniform probabilities
    chosen = jnp.tile(jnp.arange(8)[:, None] % E, (2, 1, 1))  # every expert equally often
    assert float(R.load_balancing_loss(logits, chosen)) == pytest.approx(1.0, abs=1e-6)
    skewed = jnp.zeros((2, 8, 1), jnp.int32)
    assert float(R.load_balancing_loss(logits, skewed)) == pytest.approx(1.0, abs=1e-6)  # f=1, P=1/E: E*1/E
    peaked = jnp.zeros((2, 8, E)).at[..., 0].set(5.0)
    assert float(R.load_balancing_loss(peaked, skewed)) > 3.0


@pytest.mark.slow
def test_moe_loss_gradient_reaches_the_router():
    moe = random_moe(1)
    g = eqx.filter_jit(eqx.filter_grad(lambda m, rows: R.MoELoss(0.01)(m, rows)))(moe, jnp.asarray(ROWS[:2]))
    assert float(jnp.abs(g.blocks.W_router).sum()) > 0
