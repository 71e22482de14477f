"""Logit geometry: a logit is a token norm times an activation norm times a cosine.

With the final norm's output `gamma * xhat + beta` (xhat = to_sphere(x)) and unembedding
W_U [vocab, d_model] (+ optional bias b), the logit of token t is
  `l_t = W_U[t] . (gamma * xhat) + (W_U[t] . beta + b_t)
       = |gamma * W_U[t]| * |xhat| * cos(xhat, gamma * W_U[t]) + const_t`.
Since |xhat| is the same for every token, the model ranks tokens by direction AND token
norm; Euclidean nearest-neighbour ranking (`argmin |x - w_t|`, equivalently the argmax of
`x.w_t - |w_t|^2/2`) is a different ranking.  Models with a final logit soft-cap (Gemma)
apply `cap * tanh(l / cap)` afterwards: monotone, so rankings are unaffected, but the
decomposition here is of the pre-cap logits.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from lens.core.stats import kl_divergence, ranks
from lens.geometry._common import HIGHEST, compute_dtype, safe_inverse, safe_norm
from lens.geometry.orthogonality import cosine_matrix

RANKING_METHODS = ("dot", "cosine", "euclidean", "token_norm")


class LogitDecomposition(eqx.Module):
    """`logits = token_norm * act_norm[..., None] * cosine + const` (to float32 rounding).

    token_norm[t] = |gamma * W_U[t]|; act_norm = |xhat| (per position);
    cosine[..., t] = cos(xhat, gamma * W_U[t]) (0 where either norm is 0);
    const[t] = W_U[t] . beta + bias[t] (0 if neither is given).
    """

    token_norm: Float[Array, " vocab"]
    act_norm: Float[Array, "*seq"]
    cosine: Float[Array, "*seq vocab"]
    const: Float[Array, " vocab"]
    logits: Float[Array, "*seq vocab"]

    def reconstruct(self) -> Float[Array, "*seq vocab"]:
        """Recombine the parts: `token_norm * act_norm * cosine + const`."""
        return self.token_norm * self.act_norm[..., None] * self.cosine + self.const


def decompose_logits(
    xhat: Float[Array, " d_model"] | Float[Array, "seq d_model"],
    W_U: Float[Array, "vocab d_model"],
    gamma: Float[Array, " d_model"] | None = None,
    bias: Float[Array, " vocab"] | None = None,
    beta: Float[Array, " d_model"] | None = None,
) -> LogitDecomposition:
    """Split every logit into token-norm, activation-norm, cosine and constant parts.

    `logits[..., t] = (gamma * W_U[t]) . xhat + W_U[t] . beta + bias[t]`, decomposed as in
    `LogitDecomposition`.  gamma is folded into the token vectors (not the activation), so
    act_norm is the norm of the sphere point the model computed (sqrt(d) for eps = 0).
    `bias` is the unembedding bias, `beta` the final LayerNorm's bias.  All in float32
    with full-precision matmuls; pass the pre-soft-cap setting.
    """
    cdt = compute_dtype(xhat, W_U)
    w = W_U.astype(cdt)
    x = xhat.astype(cdt)
    g = jnp.ones(w.shape[-1], cdt) if gamma is None else gamma.astype(cdt)
    dot = jnp.einsum("vd,...d->...v", w, g * x, precision=HIGHEST)
    sq_tok = jnp.einsum("vd,d->v", w * w, g * g, precision=HIGHEST)
    token_norm = jnp.where(sq_tok > 0, jnp.sqrt(jnp.where(sq_tok > 0, sq_tok, 1.0)), 0.0)
    act_norm = safe_norm(x)
    cosine = dot * safe_inverse(token_norm * act_norm[..., None])
    const = jnp.zeros(w.shape[0], cdt)
    if beta is not None:
        const = const + jnp.einsum("vd,d->v", w, beta.astype(cdt), precision=HIGHEST)
    if bias is not None:
        const = const + bias.astype(cdt)
    return LogitDecomposition(token_norm, act_norm, cosine, const, dot + const)


class RankingAgreement(eqx.Module):
    """How similarly four scores rank the vocabulary, as [4, 4] matrices indexed by
    `methods` = ("dot", "cosine", "euclidean", "token_norm").

    topk_overlap[i, j] = |top_k(score_i) & top_k(score_j)| / k;
    spearman[i, j] = Spearman rank correlation over the whole vocabulary.
    """

    topk_overlap: Float[Array, "4 4"]
    spearman: Float[Array, "4 4"]
    k: int = eqx.field(static=True)
    methods: tuple[str, ...] = eqx.field(static=True, default=RANKING_METHODS)

    def get(self, a: str, b: str) -> tuple[Float[Array, ""], Float[Array, ""]]:
        """(top-k overlap, Spearman) between methods a and b, e.g. ("dot", "cosine")."""
        i, j = self.methods.index(a), self.methods.index(b)
        return self.topk_overlap[i, j], self.spearman[i, j]


def topk_members(scores: Float[Array, "*rows vocab"], k: int) -> Float[Array, "*rows vocab"]:
    """1.0 where a token is among its row's top k scores (`jax.lax.top_k`), else 0.0."""
    flat = scores.reshape(-1, scores.shape[-1])
    _, top = jax.lax.top_k(flat, k)
    member = jnp.zeros(flat.shape, jnp.float32).at[jnp.arange(flat.shape[0])[:, None], top].set(1.0)
    return member.reshape(scores.shape)


def topk_overlap(a: Float[Array, "M vocab"], b: Float[Array, "N vocab"], k: int) -> Float[Array, "M N"]:
    """`|top_k(a_i) & top_k(b_j)| / k` for every pair of rows (k a static Python int)."""
    return jnp.einsum("iv,jv->ij", topk_members(a, k), topk_members(b, k), precision=HIGHEST) / k


def spearman(a: Float[Array, "M vocab"], b: Float[Array, "N vocab"]) -> Float[Array, "M N"]:
    """Spearman rank correlation of every row of `a` with every row of `b`, over the
    vocabulary.  Ordinal ranks (ties broken by token index), so it is the exact Spearman
    coefficient when there are no ties: `1 - 6 sum (r_i - r_j)^2 / (n (n^2 - 1))`, computed
    as the Pearson correlation of centred ranks; clipped to [-1, 1] against rounding."""
    n = a.shape[-1]
    ca = ranks(a, ties="ordinal") - (n - 1) / 2.0
    cb = ranks(b, ties="ordinal") - (n - 1) / 2.0
    denom = n * (n * n - 1) / 12.0  # sum of squared centred ranks (Python float)
    return jnp.clip(jnp.einsum("iv,jv->ij", ca, cb, precision=HIGHEST) / max(denom, 1.0), -1.0, 1.0)


def ranking_agreement(
    x: Float[Array, " d_model"],
    W_U: Float[Array, "vocab d_model"],
    k: int,
    gamma: Float[Array, " d_model"] | None = None,
) -> RankingAgreement:
    """Compare token rankings by dot product (what the model does), cosine, Euclidean
    distance and token norm alone.

    With token vectors `w_t = gamma * W_U[t]` (gamma folded in as in `decompose_logits`):
      dot:        `x . w_t`
      cosine:     `x . w_t / (|x| |w_t|)`
      euclidean:  `-|x - w_t|^2 = 2 x.w_t - |w_t|^2 - |x|^2` (nearest token first)
      token_norm: `|w_t|` (independent of x: how much the token prior alone explains)
    Top-k overlap (`topk_overlap`) needs a static Python int 1 <= k <= vocab; Spearman is
    `spearman` (ordinal ranks).  Biases shift dot ranking; fold them in by hand if any.
    """
    vocab = W_U.shape[0]
    if not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be a Python int in [1, vocab={vocab}], got {k!r}")
    dec = decompose_logits(x, W_U, gamma)
    dot = dec.logits
    x_norm = dec.act_norm
    euclid = 2.0 * dot - dec.token_norm**2 - x_norm**2
    scores = jnp.stack([dot, dec.cosine, euclid, dec.token_norm])  # [4, vocab]

    return RankingAgreement(topk_overlap(scores, scores, k), spearman(scores, scores), k)


class LogitEffectSimilarity(eqx.Module):
    """Pairwise similarity of K steering vectors' effects at the logits (position-mean).

    kl[i, j]           = KL(p_i || p_j) in nats (p_k = softmax of steered logits k)
    js[i, j]           = Jensen-Shannon divergence in nats (symmetric, <= ln 2)
    topk_overlap[i, j] = |S_i & S_j| / k, S_k = the k tokens whose log-prob rose most
    cosine[i, j]       = cosine of centred logit changes, pooled over positions
    kl_from_base[k]    = KL(p_k || p_base), the size of each effect
    promoted[k, ..., :] = S_k as token ids, most promoted first
    """

    kl: Float[Array, "K K"]
    js: Float[Array, "K K"]
    topk_overlap: Float[Array, "K K"]
    cosine: Float[Array, "K K"]
    kl_from_base: Float[Array, " K"]
    promoted: Int[Array, "K *pos k"]


def logit_effect_similarity(
    logits_steered: Float[Array, "K *pos vocab"],
    logits_base: Float[Array, "*pos vocab"],
    k: int = 10,
) -> LogitEffectSimilarity:
    """Compare K vectors' effects on the next-token distribution.

    Per position, with `log p_k = log_softmax(logits_steered[k])`,
    `log q = log_softmax(logits_base)` and `delta_k = log p_k - log q`:
      `KL[i, j] = sum_t p_i (log p_i - log p_j)`,
      `JS[i, j] = (KL(p_i || m) + KL(p_j || m)) / 2`, `m = (p_i + p_j) / 2`,
      `S_k = top_k(delta_k)`, `overlap[i, j] = |S_i & S_j| / k`,
    each averaged over the positions (any number of position axes, or none).  `cosine`
    uses `delta_k - mean_t(delta_k)` (= the centred logit change, softmax-shift free),
    concatenated over positions as in `effective_cosine_matrix`.  Divergences are computed
    term by term from log-probs (no entropy differences), so identical effects give
    exactly 0; small negative rounding is clipped to 0.  Logits must be finite.
    """
    n_vec, vocab = logits_steered.shape[0], logits_steered.shape[-1]
    if logits_steered.shape[1:] != logits_base.shape:
        raise ValueError(
            f"logits_steered {logits_steered.shape} must be [K, *base.shape]; "
            f"base is {logits_base.shape}"
        )
    if not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be a Python int in [1, vocab={vocab}], got {k!r}")
    pos_shape = logits_base.shape[:-1]
    cdt = compute_dtype(logits_steered, logits_base)
    steered = logits_steered.astype(cdt).reshape(n_vec, -1, vocab)  # [K, P, vocab]
    base = logits_base.astype(cdt).reshape(-1, vocab)  # [P, vocab]

    logp = jax.nn.log_softmax(steered, axis=-1)
    logq = jax.nn.log_softmax(base, axis=-1)
    kl_from_base = jnp.mean(kl_divergence(logp, logq), axis=-1)

    def row(logp_i):  # [P, vocab]
        kl = kl_divergence(logp_i, logp)  # [K, P]
        logm = jnp.logaddexp(logp_i, logp) - jnp.log(2.0)
        js = 0.5 * (kl_divergence(logp_i, logm) + kl_divergence(logp, logm))
        return jnp.mean(kl, axis=-1), jnp.mean(js, axis=-1)

    kl, js = jax.lax.map(row, logp)
    # The diagonals are exactly 0 mathematically; logaddexp(a, a) - ln 2 may miss a by an ulp.
    off_diag = 1.0 - jnp.eye(n_vec, dtype=cdt)
    kl, js = kl * off_diag, 0.5 * (js + js.T) * off_diag  # JS is symmetric; remove rounding

    delta = logp - logq
    _, promoted = jax.lax.top_k(delta, k)  # [K, P, k]
    member = topk_members(delta, k)
    n_pos = base.shape[0]
    overlap = jnp.einsum("kpv,jpv->kj", member, member, precision=HIGHEST) / (k * n_pos)

    centred = delta - jnp.mean(delta, axis=-1, keepdims=True)
    cosine = cosine_matrix(centred.reshape(n_vec, -1))
    return LogitEffectSimilarity(
        kl=jnp.maximum(kl, 0.0),
        js=jnp.maximum(js, 0.0),
        topk_overlap=overlap,
        cosine=cosine,
        kl_from_base=jnp.maximum(kl_from_base, 0.0),
        promoted=promoted.reshape((n_vec, *pos_shape, k)),
    )
