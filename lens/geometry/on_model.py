"""Model-dependent geometry analyses: logit rankings, residual norms, effective cosines.

`lens.geometry` holds the model-free formulas; this module applies them to a real model and
a token batch, for `scripts/logit_geometry.py` and the real-activation tests:

  capture_batch        one vmapped forward over right-padded prompts -> resid / norm captures
  logit_rankings       how much of the model's top-k is cosine alone vs token norm alone
  norm_table           |resid| per layer (median, first token, max, outlier dims) and the
                       |v|/|x| that a given steering norm means at each layer
  effective_cosine_curve
                       cosine between the effects of two steering vectors, measured through
                       the model's own ln1 norm at real activations, versus rho = |v|/|x|,
                       next to the closed form

Axis names: B (prompts), seq, layers, d_model, vocab, N (analysed activations), R (rho
values), P (vector pairs per activation and rho).  Everything is float32; the norms are
computed with `models.core.layers.apply_norm`, i.e. exactly as the forward computes them.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

import lens.geometry as geo
from lens.geometry._common import HIGHEST
from lens.core.capture import last_real_index, pad_prompts
from lens import models
from lens.models.core import layers
from lens.models.core.transformer import Transformer
from lens.models.core.ranges import layer_context, range_error


# Rankings compared against the model's own (the actual logits).
SCORES = ("dot", "cosine", "token_norm", "euclidean", "cosine_unfolded")


# --------------------------------------------------------------------------- capture
class Batch(eqx.Module):
    """Right-padded prompts: tokens [B, seq], mask [B, seq] (True = real token)."""

    tokens: Int[Array, "B seq"]
    mask: Bool[Array, "B seq"]

    @property
    def last(self) -> Int[Array, " B"]:
        """Index of each prompt's last real token (`lens.core.capture.last_real_index`)."""
        return last_real_index(self.mask)


def make_batch(token_lists: list[list[int]], pad_id: int = 0) -> Batch:
    """Right-pad a list of token id lists into a `Batch` (`lens.core.capture.pad_prompts`)."""
    tokens, mask = pad_prompts(token_lists, pad_id)
    return Batch(jnp.asarray(tokens), jnp.asarray(mask))


@eqx.filter_jit
def capture_batch(model: Transformer, batch: Batch) -> models.ForwardOutput:
    """One forward per prompt (vmapped), capturing resid_pre/mid/post, the norm divisors
    and the final norm's input/output.  Shapes gain a leading B axis."""
    cap = models.Capture(resid=True, norms=True)
    return jax.vmap(lambda t, m: model.forward(t, attention_mask=m, capture=cap))(
        batch.tokens, batch.mask
    )


# ----------------------------------------------------------------- (a) logit rankings
def ranking_scores(
    model: Transformer, x: Float[Array, " d_model"]
) -> tuple[Float[Array, " vocab"], Float[Array, "5 vocab"]]:
    """(the model's logits, the five alternative scores `SCORES`) at final-norm input x.

    With xhat = to_sphere(x) and token vectors w_t = gamma * W_U[t] (the final norm's gain
    folded into the unembedding), the model's logit is `w_t . xhat + const_t`
    (const_t = W_U[t] . beta + b_t; 0 for RMSNorm models without bias).  Alternatives:
      dot             `w_t . xhat`                (the model without its constant)
      cosine          `cos(xhat, w_t)`            (direction alone)
      token_norm      `|w_t|`                     (the token prior alone; ignores x)
      euclidean       `-|xhat - w_t|^2`           (nearest token vector)
      cosine_unfolded `cos(xhat, W_U[t])`         (direction, ignoring the gain)
    """
    c = model.config
    gamma, beta, bias = model.final_norm_w, model.final_norm_b, model.unembed_b
    xhat = geo.to_sphere(x.astype(jnp.float32), c.norm_kind, c.norm_eps)
    dec = geo.decompose_logits(xhat, model.W_U.astype(jnp.float32), gamma, bias, beta)
    dot = dec.logits - dec.const
    euclid = 2.0 * dot - dec.token_norm**2 - dec.act_norm**2
    raw_norm = jnp.linalg.norm(model.W_U.astype(jnp.float32), axis=-1)
    raw_dot = jnp.einsum("vd,d->v", model.W_U.astype(jnp.float32), xhat, precision=HIGHEST)
    cos_unfolded = raw_dot / jnp.maximum(raw_norm * dec.act_norm, 1e-30)
    scores = jnp.stack([dot, dec.cosine, dec.token_norm, euclid, cos_unfolded])
    logits = dec.logits
    if c.final_logit_softcap is not None:  # monotone: rankings unchanged, but be exact
        logits = c.final_logit_softcap * jnp.tanh(logits / c.final_logit_softcap)
    return logits, scores


@eqx.filter_jit
def logit_rankings(
    model: Transformer, x: Float[Array, "N d_model"], ks: tuple[int, ...] = (1, 10, 100)
) -> dict[str, Float[Array, "..."]]:
    """Agreement of each alternative ranking with the model's, at N final-norm inputs.

    Returns `overlap [len(ks), 5, N]` (top-k overlap with the model's top-k, per k, score
    and activation), `spearman [5, N]` (over the whole vocabulary) and `max_logit_err [N]`
    (|decomposed logits - model.unembed_resid logits|, a built-in consistency check).
    `ks` is static.
    """
    def one(xi):
        logits, scores = ranking_scores(model, xi)
        ref_logits, _ = model.unembed_resid(xi[None, :])
        overlap = jnp.stack([geo.topk_overlap(scores, logits[None], k)[:, 0] for k in ks])
        return overlap, geo.spearman(scores, logits[None])[:, 0], jnp.max(jnp.abs(logits - ref_logits[0]))

    overlap, spearman, err = jax.lax.map(one, x)  # map: one vocab-sized sort at a time
    return {
        "overlap": jnp.moveaxis(overlap, 0, -1),
        "spearman": jnp.moveaxis(spearman, 0, -1),
        "max_logit_err": err,
    }


# --------------------------------------------------------------------- (b) norm table
def norm_table(
    model: Transformer,
    out: models.ForwardOutput,
    batch: Batch,
    steer_norms: tuple[float, ...] = (1.0, 4.0, 8.0, 16.0, 32.0),
    outlier_factor: float = 6.0,
) -> dict[str, np.ndarray]:
    """|resid| per layer over a batch: what the norm sees (|x| RMSNorm, |P x| LayerNorm).

    Rows are resid_pre[0..L-1] (what block l's ln1 reads) and a last row "final" (the
    final norm's input).  Statistics over all real tokens except each prompt's first:
    median / max norm, and per-coordinate rms outliers (`lens.geometry.norm_ratio_stats`,
    factor `outlier_factor`).  `first` is the median over prompts of the first token's
    norm (the BOS / attention-sink outlier).  `rho[l, j] = steer_norms[j] / median[l]`
    is the ratio a steering vector of norm steer_norms[j] has at layer l (for LayerNorm,
    of its centred part), and `cos_closed[l, j]` the closed-form effective cosine of two
    orthogonal vectors of that norm there.
    """
    acts = out.activations
    stats, first = _norm_stats(acts.resid_pre, acts.final_norm_in, batch.mask,
                               model.config.norm_kind, outlier_factor)
    rho = jnp.asarray(steer_norms, jnp.float32)[None, :] / stats.median_norm[:, None]
    return {
        "median": np.asarray(stats.median_norm),
        "max": np.asarray(stats.max_norm),
        "first": np.asarray(first),
        "first_ratio": np.asarray(first / stats.median_norm),
        "n_outlier_dims": np.asarray(jnp.sum(stats.outlier_dims, axis=-1)),
        "top_dims": np.asarray(stats.top_dims),
        "top_dim_ratio": np.asarray(stats.top_dim_ratio),
        "steer_norms": np.asarray(steer_norms, np.float32),
        "rho": np.asarray(rho),
        "cos_closed": np.asarray(geo.orthogonal_pair_cosine_closed_form(rho)),
    }


@functools.partial(jax.jit, static_argnames=("kind",))
def _norm_stats(
    resid_pre: Float[Array, "B layers seq d_model"],
    final_in: Float[Array, "B seq d_model"],
    mask: Bool[Array, "B seq"],
    kind: str,
    outlier_factor: float,
) -> tuple[geo.NormRatioStats, Float[Array, " rows"]]:
    """norm_ratio_stats over rows = layers + final, positions pooled over prompts (all
    real tokens but each prompt's first), and the median first-token norm per row."""
    resid = jnp.concatenate([resid_pre, final_in[:, None]], axis=1)  # [B, L+1, seq, d]
    n_b, n_rows, seq, d = resid.shape
    flat = jnp.moveaxis(resid, 0, 1).reshape(n_rows, n_b * seq, d)
    valid = (mask & (jnp.arange(seq) > 0)[None, :]).reshape(-1)
    stats = geo.norm_ratio_stats(flat, kind, mask=valid, skip_first=0,
                                 outlier_factor=outlier_factor, n_top=3)
    first = jnp.median(stats.norms.reshape(n_rows, n_b, seq)[:, :, 0], axis=1)
    return stats, first


# ------------------------------------------------------- (c) effective cosine vs rho
def _orthonormal_pair(
    g: Float[Array, "2 d"], c: Float[Array, " d"], kind: str, orthogonal: bool
) -> Float[Array, "2 d"]:
    """Two unit vectors from Gaussian draws g: orthogonal to c, to each other and
    (LayerNorm) to the all-ones direction; or, with orthogonal=False, the two Gaussian
    directions themselves (centred for LayerNorm, so |P v| is the scaled norm)."""
    if kind == "layer":
        g = g - jnp.mean(g, axis=-1, keepdims=True)
    if orthogonal:
        chat = c / jnp.linalg.norm(c)
        g = g - jnp.outer(g @ chat, chat)
        u1 = g[0] / jnp.linalg.norm(g[0])
        u2 = g[1] - (g[1] @ u1) * u1
        u2 = u2 - (u2 @ chat) * chat  # re-orthogonalise: float32 Gram-Schmidt drifts
        return jnp.stack([u1, u2 / jnp.linalg.norm(u2)])
    return g / jnp.linalg.norm(g, axis=-1, keepdims=True)


def effective_cosine_curve(
    model: Transformer,
    xs: Float[Array, "N d_model"],
    layer: Int[Array, ""] | int,
    rhos: Float[Array, " R"],
    n_pairs: int = 8,
    orthogonal: bool = True,
    seed: int = 0,
) -> dict[str, Float[Array, "R N P"]]:
    """Cosine between the effects of two steering vectors, through the model's ln1 norm.

    For every activation x in `xs` (rows of resid_pre[layer]), rho in `rhos` and P =
    `n_pairs` random pairs: draw v1, v2 (Gaussian draws from numpy's generator with
    `seed`, made orthogonal by `_orthonormal_pair`; numpy rather than jax.random because
    compiling threefry for this shape costs seconds on a CPU), scale them to
    `|P v| = rho |P x|` (|v| = rho |x| for RMSNorm), add each to x and pass x, x+v1,
    x+v2 through `models.core.layers.apply_norm` with that layer's ln1 weight, bias and eps.
    Returns float32 [R, N, P] arrays:
      sphere      cos(e1, e2), e_k = (N(x+v_k) - N(x)) / gamma: the sphere displacement
                  (what `lens.geometry.effective_displacement` computes; the closed form's
                  subject).  Coordinates with gamma = 0 are dropped.
      with_gain   cos of the raw output differences N(x+v_k) - N(x) (what the block's
                  next matmul sees; the gain re-weights coordinates).
      first_order cos(J v1, J v2), J the sphere map's Jacobian at x (0 for orthogonal
                  pairs: J is a projector that fixes them, so it cannot see the shared
                  shrinkage along -x that makes the exact effects correlate).
      closed      `lens.geometry.orthogonal_pair_cosine_eps(rho, eps d / |P x|^2)` for that x.
      storage     cos(v1, v2) (0 for orthogonal pairs, ~N(0, 1/d) for random ones).
    `n_pairs` and `orthogonal` are static; `layer` may be traced.
    """
    rhos = jnp.asarray(rhos, jnp.float32)
    shape = (rhos.shape[0], xs.shape[0], n_pairs, 2, xs.shape[-1])
    gauss = np.random.default_rng(seed).standard_normal(shape, np.float32)
    return _curve(jnp.asarray(gauss), model, xs, layer, rhos, orthogonal)


@eqx.filter_jit
def _curve(
    gauss: Float[Array, "R N P 2 d_model"],
    model: Transformer,
    xs: Float[Array, "N d_model"],
    layer: Int[Array, ""] | int,
    rhos: Float[Array, " R"],
    orthogonal: bool,
) -> dict[str, Float[Array, "R N P"]]:
    """The jitted body of `effective_cosine_curve` (see there)."""
    c = model.config
    kind, eps = c.norm_kind, c.norm_eps
    w = model.blocks.ln1_w[layer].astype(jnp.float32)
    b = None if model.blocks.ln1_b is None else model.blocks.ln1_b[layer]
    keep = (w != 0).astype(jnp.float32)
    inv_w = keep / jnp.where(w != 0, w, 1.0)
    d = xs.shape[-1]

    def norm(z):
        return layers.apply_norm(z, kind, w, b, eps)[0].astype(jnp.float32)

    def cos(a, b_):
        return jnp.sum(a * b_, -1) / jnp.sqrt(jnp.sum(a * a, -1) * jnp.sum(b_ * b_, -1))

    def one(g, x, rho):
        x = x.astype(jnp.float32)
        cx = x - jnp.mean(x) if kind == "layer" else x
        s = jnp.linalg.norm(cx)
        v = rho * s * _orthonormal_pair(g, cx, kind, orthogonal)  # [2, d]
        base = norm(x)
        diff = jax.vmap(norm)(x[None, :] + v) - base[None, :]  # [2, d]
        sphere = diff * inv_w
        lin = jax.vmap(lambda vk: geo.norm_jvp(x, vk, kind, eps))(v)
        t = eps * d / jnp.square(s)
        return {
            "sphere": cos(sphere[0], sphere[1]),
            "with_gain": cos(diff[0], diff[1]),
            "first_order": cos(lin[0], lin[1]),
            "closed": geo.orthogonal_pair_cosine_eps(rho, t),
            "storage": cos(v[0], v[1]),
        }

    over_p = jax.vmap(one, in_axes=(0, None, None))
    over_n = jax.vmap(over_p, in_axes=(0, 0, None))
    return jax.vmap(over_n, in_axes=(0, None, 0))(gauss, xs, rhos)


def summarise_curve(curve: dict[str, Float[Array, "R N P"]]) -> dict[str, np.ndarray]:
    """Mean over activations and pairs of every curve, plus the 10th/90th percentile of
    the measured sphere cosine and its max |error| against the eps-aware closed form."""
    out = {k: np.asarray(jnp.mean(v, axis=(1, 2))) for k, v in curve.items()}
    flat = np.asarray(curve["sphere"]).reshape(curve["sphere"].shape[0], -1)
    out["sphere_p10"] = np.percentile(flat, 10, axis=-1)
    out["sphere_p90"] = np.percentile(flat, 90, axis=-1)
    out["max_abs_err_vs_closed"] = np.asarray(
        jnp.max(jnp.abs(curve["sphere"] - curve["closed"]), axis=(1, 2))
    )
    return out


def non_first_positions(
    resid: Float[Array, "B seq d_model"], batch: Batch
) -> Float[Array, "N d_model"]:
    """All real tokens except each prompt's first (the huge-norm sink), as rows (numpy
    boolean indexing: N depends on the data, so this is not jitted)."""
    seq = batch.mask.shape[1]
    keep = np.asarray(batch.mask & (jnp.arange(seq) > 0)[None, :])
    return jnp.asarray(np.asarray(resid)[keep])


# ------------------------------------------------------------------------ everything
def analyse(
    model: Transformer,
    batch: Batch,
    layer: int | None = None,
    rhos: np.ndarray | None = None,
    steer_norms: tuple[float, ...] = (1.0, 4.0, 8.0, 16.0, 32.0),
    ks: tuple[int, ...] = (1, 10, 100),
    n_pairs: int = 8,
    seed: int = 0,
) -> dict:
    """(a) + (b) + (c) for one model and batch, as a JSON-ready dict of lists.

    Rankings are taken at each prompt's last real token; the effective-cosine curves at
    resid_pre[layer] (default: the middle layer) over every real token but the first.
    """
    c = model.config
    layer = c.n_layers // 2 if layer is None else layer
    if not 0 <= layer < c.n_layers:
        raise range_error("layer", layer, 0, c.n_layers, layer_context(c.n_layers))
    rhos = np.logspace(-2, 2, 25) if rhos is None else np.asarray(rhos)
    rhos_j = jnp.asarray(rhos, jnp.float32)
    ks = tuple(k for k in ks if k <= c.vocab_size)
    out = capture_batch(model, batch)
    acts = out.activations

    x_last = acts.final_norm_in[jnp.arange(batch.tokens.shape[0]), batch.last]
    rank = logit_rankings(model, x_last, ks)
    table = norm_table(model, out, batch, steer_norms)
    xs = non_first_positions(acts.resid_pre[:, layer], batch)
    ortho = summarise_curve(effective_cosine_curve(model, xs, layer, rhos_j, n_pairs, True, seed))
    rand = summarise_curve(effective_cosine_curve(model, xs, layer, rhos_j, n_pairs, False, seed + 1))
    gains = model.blocks.ln1_w[layer]

    def lists(d):
        return {k: np.asarray(v).tolist() for k, v in d.items()}

    return {
        "config": {"norm_kind": c.norm_kind, "norm_eps": c.norm_eps, "n_layers": c.n_layers,
                   "d_model": c.d_model, "vocab": c.vocab_size},
        "n_prompts": int(batch.tokens.shape[0]),
        "n_tokens": int(np.asarray(batch.mask).sum()),
        "rankings": {
            "scores": list(SCORES), "ks": list(ks),
            "overlap_mean": np.asarray(jnp.mean(rank["overlap"], -1)).tolist(),  # [ks, 5]
            "spearman_mean": np.asarray(jnp.mean(rank["spearman"], -1)).tolist(),  # [5]
            "overlap": np.asarray(rank["overlap"]).tolist(),
            "spearman": np.asarray(rank["spearman"]).tolist(),
            "max_logit_err": float(jnp.max(rank["max_logit_err"])),
        },
        "norm_table": lists(table),
        "effective_cosine": {
            "layer": layer, "n_activations": int(xs.shape[0]), "n_pairs": n_pairs,
            "rho": rhos.tolist(),
            "closed_form": np.asarray(geo.orthogonal_pair_cosine_closed_form(rhos_j)).tolist(),
            "orthogonal": lists(ortho), "random": lists(rand),
            "ln1_gain": {"min": float(jnp.min(gains)), "max": float(jnp.max(gains)),
                         "mean": float(jnp.mean(gains)), "std": float(jnp.std(gains))},
            "resid_norm_median": float(table["median"][layer]),
        },
    }
