"""How far MoEfication's experts are from learned ones: run MoEfication's splits on a real
mixture of experts whose experts are merged into one dense MLP, and score how well each
split recovers the true expert partition (adjusted Rand index).

    moe = train_moe(moe_config(...), train_rows, val_rows, steps, out_dir)    # or any MoE
    merged = merge_experts(moe)                   # dense, d_mlp = experts * expert width
    acts = expert_activations(moe, rows)          # the MoE's own forward
    scores = recovery(moe, acts)                  # {method: ARI per layer}

The merged MLP.  Expert e's neurons become neurons e*m .. (e+1)*m - 1 of one dense gated
MLP: W_in, W_gate = the experts' [d_model, m] matrices concatenated along the neuron axis,
W_out = their [m, d_model] matrices stacked.  A router's weight is a per-token gate, which
no fixed weight can hold, so it is folded into the ACTIVATIONS, not the weights:

    routed a_i(x) = w_{e(i)}(x) * n_i(x)      (w = the MoE's combining weights, zero
                                               outside its top k; n = the expert's neuron)
    MoE output    = sum_i a_i(x) W_out[i]     EXACTLY (tested)

The merged MLP run as a plain dense MLP (every neuron with weight 1, `merged(tokens)`)
equals the MoE only where every combining weight is 1, which a softmax router never
gives; its activations on the MoE's own stream are the unrouted n_i(x).

Splits scored (each expert the true expert width m, E experts, per layer):
  weights       MoEfication's ParamSplit: balanced k-means on the merged MLP's normalised
                [gate | up] weight rows (`moefication.split_by_weights`);
  coact_routed  co-activation of the routed activations a_i (MoEfication's statistic:
                a neuron is active when |a| is among the top `active_frac` of the token's);
  coact_dense   the same on the unrouted n_i (what a dense model's neurons would show);
  random        equal blocks of a random permutation (the control), several draws.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lens.modularity.moefication import _normalise, balanced_kmeans, split_by_weights, split_random
from lens.models.core.config import ModelConfig
from lens.models.core.interventions import Capture
from lens.models.core.transformer import Transformer


# ------------------------------------------------------------------ adjusted Rand index
def adjusted_rand_index(a: Int[np.ndarray, " n"], b: Int[np.ndarray, " n"]) -> float:
    """Hubert & Arabie's adjusted Rand index of two labelings of the same n items: 1 for
    identical partitions (up to renaming), 0 in expectation for independent random ones.

    From the contingency table n_ij: index = sum_ij C(n_ij, 2), expected = sum_i C(a_i, 2)
    sum_j C(b_j, 2) / C(n, 2), max = (sum_i C(a_i, 2) + sum_j C(b_j, 2)) / 2;
    ARI = (index - expected) / (max - expected) (1.0 when max == expected: both trivial)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"need two labelings of the same n >= 2 items; got {a.shape} and {b.shape}")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), np.int64)
    np.add.at(table, (ai, bi), 1)
    pairs = lambda x: (x * (x - 1) / 2.0).sum()  # noqa: E731
    index = pairs(table)
    sa, sb = pairs(table.sum(1)), pairs(table.sum(0))
    expected = sa * sb / (a.size * (a.size - 1) / 2.0)
    top = (sa + sb) / 2.0
    if top == expected:
        return 1.0
    return float((index - expected) / (top - expected))


# ------------------------------------------------------------------ the model
def moe_config(vocab_size: int, *, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
               n_experts: int = 8, expert_width: int = 32, k: int = 2, seq_len: int = 32,
               norm_topk_prob: bool = True) -> ModelConfig:
    """A tiny Mixtral-style config (RMSNorm, RoPE, SwiGLU experts, top-k routing)."""
    return ModelConfig(
        architecture="mixtral", vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=n_heads, d_head=d_model // n_heads, d_mlp=expert_width,
        max_seq_len=seq_len, norm_kind="rms", norm_eps=1e-5, activation="silu", gated_mlp=True,
        positional="rope", n_experts=n_experts, experts_per_token=k, norm_topk_prob=norm_topk_prob)


def _check_moe(model: Transformer) -> ModelConfig:
    c = model.config
    if not c.is_moe:
        raise ValueError(f"a mixture of experts is needed (n_experts > 0); got a dense "
                         f"{c.architecture!r} model")
    return c


def true_labels(model: Transformer) -> Int[np.ndarray, "layers n"]:
    """The true partition of the merged MLP's neurons: neuron e*m + j belongs to expert e."""
    c = _check_moe(model)
    return np.tile(np.repeat(np.arange(c.n_experts, dtype=np.int32), c.d_mlp), (c.n_layers, 1))


def merge_experts(model: Transformer) -> Transformer:
    """The MoE with its experts concatenated into one dense gated MLP of n_experts * d_mlp
    neurons (expert e = neurons e*m .. (e+1)*m - 1) and no router (see the module doc: the
    router's weights go into the activations, `routed_activations`)."""
    c = _check_moe(model)
    b = model.blocks
    L, E, d, m = c.n_layers, c.n_experts, c.d_model, c.d_mlp
    cat = lambda w: jnp.transpose(w, (0, 2, 1, 3)).reshape(L, d, E * m)  # noqa: E731
    blocks = dataclasses.replace(
        b, W_in=cat(b.W_in_experts), W_gate=cat(b.W_gate_experts),
        W_out=b.W_out_experts.reshape(L, E * m, d),
        W_router=None, W_in_experts=None, W_gate_experts=None, W_out_experts=None)
    config = dataclasses.replace(c, n_experts=0, experts_per_token=0, d_mlp=E * m,
                                 architecture=f"{c.architecture}-merged")
    return dataclasses.replace(model, config=config, blocks=blocks)


class ExpertActivations(eqx.Module):
    """The MoE's own forward on rows, flattened over tokens: `dense` n_i(x) and `routed`
    w_{e(i)}(x) n_i(x), both [layers, tokens, experts * d_mlp]; `mlp_out` [layers, tokens,
    d_model] (the MoE's MLP output, for the exactness check)."""

    dense: Float[Array, "layers tokens n"]
    routed: Float[Array, "layers tokens n"]
    mlp_out: Float[Array, "layers tokens d_model"]


@eqx.filter_jit
def _acts(model, rows):
    def one(t):
        a = model.forward(t, capture=Capture(neurons=True, router=True, sublayers=True)).activations
        return a.expert_neurons, a.expert_weights, a.mlp_out

    n, w, out = jax.vmap(one)(rows)  # [B, layers, seq, E, m], [B, layers, seq, E]
    routed = n * w[..., None].astype(n.dtype)
    flat = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])  # noqa: E731
    dense, routed, out = flat(n), flat(routed), flat(out)
    return dense.reshape(*dense.shape[:2], -1), routed.reshape(*routed.shape[:2], -1), out


def expert_activations(model: Transformer, rows: Int[np.ndarray, "N seq"], chunk: int = 8) -> ExpertActivations:
    """Every expert neuron's activation on `rows` (the MoE's forward), dense and routed."""
    _check_moe(model)
    rows = np.asarray(rows, np.int32)
    if rows.ndim != 2:
        raise ValueError(f"rows must be [N, seq]; got {rows.shape}")
    parts = [_acts(model, jnp.asarray(rows[i:i + chunk])) for i in range(0, len(rows), chunk)]
    return ExpertActivations(*(np.concatenate([np.asarray(p[j]) for p in parts], axis=1) for j in range(3)))


def coactivation_counts(acts: Float[np.ndarray, "tokens n"], active_frac: float = 0.1) -> Float[np.ndarray, "n n"]:
    """MoEfication's statistic for a gated MLP (`moefication.coactivation`): per neuron
    pair, the tokens where both are active, a neuron active when its |a| is among the top
    `active_frac` of that token's |a| (ties at the threshold count)."""
    a = np.abs(np.asarray(acts, np.float32))
    if not 0 < active_frac <= 1:
        raise ValueError(f"active_frac must be in (0, 1]; got {active_frac}")
    k = max(1, int(round(active_frac * a.shape[-1])))
    thresh = -np.partition(-a, k - 1, axis=-1)[:, k - 1:k]
    on = ((a >= thresh) & (a > 0)).astype(np.float64)
    return on.T @ on


def split_coactivation(acts: Float[np.ndarray, "layers tokens n"], n_experts: int,
                       active_frac: float = 0.1) -> Int[np.ndarray, "layers n"]:
    """Balanced k-means (MoEfication's split) on each neuron's normalised co-activation row."""
    return np.stack([balanced_kmeans(_normalise(coactivation_counts(a, active_frac)), n_experts)
                     for a in np.asarray(acts)])


def recovery(model: Transformer, acts: ExpertActivations, active_frac: float = 0.1,
             random_draws: int = 10, seed: int = 0) -> dict[str, Float[np.ndarray, "... layers"]]:
    """ARI between each split of the merged MLP and the true experts, per layer:
    {"weights": [layers], "coact_routed": [layers], "coact_dense": [layers],
     "random": [random_draws, layers]}."""
    c = _check_moe(model)
    truth = true_labels(model)
    merged = merge_experts(model)
    splits = {
        "weights": split_by_weights(merged, expert_size=c.d_mlp),
        "coact_routed": split_coactivation(acts.routed, c.n_experts, active_frac),
        "coact_dense": split_coactivation(acts.dense, c.n_experts, active_frac),
    }
    out = {name: np.array([adjusted_rand_index(s[layer], truth[layer]) for layer in range(c.n_layers)])
           for name, s in splits.items()}
    out["random"] = np.array([[adjusted_rand_index(s[layer], truth[layer]) for layer in range(c.n_layers)]
                              for s in (split_random(merged, c.d_mlp, seed + i) for i in range(random_draws))])
    return out


# ------------------------------------------------------------------ training
def load_balancing_loss(router_logits: Float[Array, "layers seq experts"],
                        chosen: Int[Array, "layers seq k"]) -> Float[Array, ""]:
    """Switch / Mixtral auxiliary loss, mean over layers: E * sum_e f_e P_e, f_e = the
    fraction of (token, slot) choices going to expert e, P_e = its mean router probability
    (1 when perfectly balanced)."""
    E = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    f = jax.nn.one_hot(chosen, E).mean(axis=(1, 2))  # [layers, E]
    return (E * (f * probs.mean(axis=1)).sum(-1)).mean()


class MoELoss(eqx.Module):
    """Next-token cross-entropy + `aux_coef` * load_balancing_loss (for `train`'s loss_fn)."""

    aux_coef: float = 0.01

    def __call__(self, model: Transformer, rows: Int[Array, "batch seq"]) -> Float[Array, ""]:
        def one(t):
            out = model.forward(t[:-1], capture=Capture(router=True))
            logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
            nll = -jnp.take_along_axis(logp, t[1:, None], axis=-1).mean()
            return nll, load_balancing_loss(out.activations.router_logits, out.activations.chosen_experts)

        nll, aux = jax.vmap(one)(rows)
        return nll.mean() + self.aux_coef * aux.mean()


def expert_usage(acts: ExpertActivations, n_experts: int) -> Float[np.ndarray, "layers experts"]:
    """Fraction of tokens routed to each expert (its combining weight > 0), per layer."""
    r = np.asarray(acts.routed)
    per = np.abs(r.reshape(*r.shape[:2], n_experts, -1)).max(-1) > 0
    return per.mean(axis=1)
