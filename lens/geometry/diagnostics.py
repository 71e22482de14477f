"""Norm-ratio diagnostics: what does a steering norm |v| mean at each layer?

The effect of adding v to x depends on rho = |v| / |x| (for LayerNorm |P v| / |P x|; see
`orthogonal_pair_cosine_closed_form`), and residual norms grow by orders of magnitude with
depth.  The first token (BOS) is usually a huge-norm outlier, and a few "outlier dimensions"
carry most of the norm.  `norm_ratio_stats` summarises a captured residual stream
`resid [layers, seq, d_model]` so that a user sees at a glance what |v| means per layer.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from lens.geometry._common import Scalar, centre_last, check_kind, compute_dtype, safe_norm


class NormRatioStats(eqx.Module):
    """Per-layer / per-position norm statistics of a residual stream (float32).

    norms [layers, seq]: |x| ("rms") or |P x| ("layer") at every position;
    mean_norm / median_norm / min_norm / max_norm [layers]: over the valid positions
      (mask & not among the first `skip_first`);
    first_norm [layers]: the norm at position 0 (BOS); first_ratio = first_norm / median_norm;
    dim_rms [layers, d_model]: sqrt(mean over valid positions of x_i^2) per coordinate
      (of P x for "layer");
    dim_ratio [layers, d_model]: dim_rms / its median over coordinates;
    outlier_dims [layers, d_model]: dim_ratio >= outlier_factor;
    top_dims / top_dim_ratio [layers, n_top]: the n_top largest dim_ratio coordinates.
    Statistics over an empty set of positions are NaN.
    """

    norms: Float[Array, "layers seq"]
    mean_norm: Float[Array, " layers"]
    median_norm: Float[Array, " layers"]
    min_norm: Float[Array, " layers"]
    max_norm: Float[Array, " layers"]
    first_norm: Float[Array, " layers"]
    first_ratio: Float[Array, " layers"]
    dim_rms: Float[Array, "layers d_model"]
    dim_ratio: Float[Array, "layers d_model"]
    outlier_dims: Bool[Array, "layers d_model"]
    top_dims: Int[Array, "layers n_top"]
    top_dim_ratio: Float[Array, "layers n_top"]


def norm_ratio_stats(
    resid: Float[Array, "layers seq d_model"],
    kind: str = "rms",
    mask: Bool[Array, " seq"] | None = None,
    skip_first: int | Int[Array, ""] = 1,
    outlier_factor: Scalar = 6.0,
    n_top: int = 5,
) -> NormRatioStats:
    """Summarise |x| per layer and position, the BOS outlier and outlier dimensions.

    `norms[l, s] = |x_ls|` for kind="rms", `|P x_ls|` for kind="layer" (the part the norm
    sees).  Position statistics ignore masked-out positions (`mask` False, e.g. padding)
    and the first `skip_first` positions (default 1: the BOS outlier would dominate the
    max and mean); `first_norm` and `first_ratio = first_norm / median_norm` report the
    first position separately.  A coordinate i is an outlier dimension when its rms over
    valid positions is at least `outlier_factor` times the median coordinate rms (6 by
    default, a loose version of the usual "massive activation" criterion; raise it to be
    stricter).  n_top must be a Python int <= d_model.
    """
    check_kind(kind)
    n_layers, seq, d = resid.shape
    if not isinstance(n_top, int) or not 1 <= n_top <= d:
        raise ValueError(f"n_top must be a Python int in [1, d_model={d}], got {n_top!r}")
    x = resid.astype(compute_dtype(resid))
    if kind == "layer":
        x = centre_last(x)
    norms = safe_norm(x)  # [layers, seq]

    valid = jnp.arange(seq) >= skip_first
    if mask is not None:
        valid = valid & mask
    masked = jnp.where(valid[None, :], norms, jnp.nan)
    median_norm = jnp.nanmedian(masked, axis=-1)
    first_norm = norms[:, 0]

    n_valid = jnp.sum(valid)
    sq_sum = jnp.einsum("lsd,s->ld", x * x, valid.astype(x.dtype))
    dim_rms = jnp.sqrt(sq_sum / jnp.where(n_valid > 0, n_valid, jnp.nan))
    dim_ratio = dim_rms / jnp.median(dim_rms, axis=-1, keepdims=True)
    top_ratio, top_dims = jax.lax.top_k(jnp.nan_to_num(dim_ratio, nan=-jnp.inf), n_top)
    return NormRatioStats(
        norms=norms,
        mean_norm=jnp.nanmean(masked, axis=-1),
        median_norm=median_norm,
        min_norm=jnp.nanmin(masked, axis=-1),
        max_norm=jnp.nanmax(masked, axis=-1),
        first_norm=first_norm,
        first_ratio=first_norm / median_norm,
        dim_rms=dim_rms,
        dim_ratio=dim_ratio,
        outlier_dims=dim_ratio >= outlier_factor,
        top_dims=top_dims.astype(jnp.int32),
        top_dim_ratio=jnp.where(jnp.isneginf(top_ratio), jnp.nan, top_ratio),
    )


def norm_ratio(
    v: Float[Array, " d_model"],
    resid: Float[Array, "*batch d_model"],
    kind: str = "rms",
) -> Float[Array, "*batch"]:
    """`rho = |v| / |x|` ("rms") or `|P v| / |P x|` ("layer") for every activation x in
    `resid`: the ratio that decides how a steering vector v acts there (e.g. the argument
    of `orthogonal_pair_cosine_closed_form`).  Zero activations give inf (0/0 gives NaN)."""
    check_kind(kind)
    cdt = compute_dtype(v, resid)
    vf, x = v.astype(cdt), resid.astype(cdt)
    if kind == "layer":
        vf, x = centre_last(vf), centre_last(x)
    return safe_norm(vf) / safe_norm(x)
