"""Analytic LayerNorm- and RMSNorm-aware geometry of activations, steering vectors, logits.

LayerNorm is `gamma * (P x) / sigma(x) + beta`, `P = I - 11^T/d`,
`sigma = sqrt(|P x|^2/d + eps)`: centring deletes the all-ones direction and normalising puts
`P x / sigma` on the sphere of radius sqrt(d) inside the hyperplane orthogonal to 1.  RMSNorm
is the same without centring.  What the model "sees" is that sphere point (then scaled by
gamma), so steering, orthogonality and logits are analysed on the sphere, not in storage.

Modules:
  norms          to_sphere, apply_norm, norm_jacobian / norm_jvp, displacements, centring
  orthogonality  effective cosine matrices and the idealised closed form (eps = 0 and eps kept)
  degeneracy     participation ratio, degeneracy factor, threshold clusters, the
                 equicorrelated closed form (PR vs K at a fixed pairwise cosine)
  logits         logit decomposition, ranking agreement (spearman, topk_overlap), logit-effect similarity
  sphere         geodesic angle, tangent projection, exp/log maps, slerp, rotate_towards
  diagnostics    residual-norm statistics per layer/position, |v|/|x| ratios
  on_model       the same geometry measured on a model (logit rankings, residual norms, effective
                 cosines at real activations): the one module here that imports `models`

Conventions: pure functions of arrays, jit/vmap-able; `kind` ("layer" | "rms") and sizes
such as `k` are static Python values (unknown kinds raise ValueError).  Arithmetic is float32
(float64 for float64 inputs) with full-precision matmuls; vector results are cast back to
the input's dtype, diagnostics stay float32.  Axis names: d (the normalised axis), d_model,
seq, layers, vocab, K (a set of steering vectors), B (a batch of activations).
"""

from lens.geometry.degeneracy import (
    degeneracy_factor,
    equicorrelated_participation_ratio,
    k_at_degeneracy,
    participation_ratio,
    threshold_clusters,
)
from lens.geometry.diagnostics import NormRatioStats, norm_ratio, norm_ratio_stats
from lens.geometry.logits import (
    RANKING_METHODS,
    LogitDecomposition,
    LogitEffectSimilarity,
    RankingAgreement,
    decompose_logits,
    logit_effect_similarity,
    ranking_agreement,
    spearman,
    topk_members,
    topk_overlap,
)
from lens.geometry.norms import (
    apply_norm,
    center,
    centering_projector,
    effective_displacement,
    first_order_displacement,
    norm_divisor,
    norm_jacobian,
    norm_jvp,
    to_sphere,
)
from lens.geometry.orthogonality import (
    cosine_matrix,
    effective_cosine_matrix,
    orthogonal_pair_cosine_closed_form,
    orthogonal_pair_cosine_eps,
)
from lens.geometry.sphere import (
    add_steering,
    exp_map,
    geodesic_angle,
    geodesic_interpolate,
    log_map,
    rotate_towards,
    tangent_project,
)

__all__ = [
    "RANKING_METHODS",
    "LogitDecomposition",
    "LogitEffectSimilarity",
    "NormRatioStats",
    "RankingAgreement",
    "add_steering",
    "apply_norm",
    "center",
    "centering_projector",
    "cosine_matrix",
    "decompose_logits",
    "degeneracy_factor",
    "effective_cosine_matrix",
    "equicorrelated_participation_ratio",
    "effective_displacement",
    "exp_map",
    "first_order_displacement",
    "geodesic_angle",
    "geodesic_interpolate",
    "k_at_degeneracy",
    "log_map",
    "logit_effect_similarity",
    "norm_divisor",
    "norm_jacobian",
    "norm_jvp",
    "norm_ratio",
    "norm_ratio_stats",
    "orthogonal_pair_cosine_closed_form",
    "orthogonal_pair_cosine_eps",
    "participation_ratio",
    "ranking_agreement",
    "spearman",
    "rotate_towards",
    "tangent_project",
    "threshold_clusters",
    "to_sphere",
    "topk_members",
    "topk_overlap",
]
