"""MELBO and MELBO-ortho steering vectors, and the analysis of how distinct they are.

    from lens.steering import melbo
    problem = melbo.make_problem(model, tokens, mask, source=7, target=15)
    found = melbo.melbo(problem, 16, melbo.MelboConfig(radius=8.0))
    ortho = melbo.melbo_ortho(problem, theta0, 32, melbo.OrthoConfig(steps=1000),
                              run=melbo.MelboRunConfig(mode="batched", block_size=8), on_block=save)
    # several devices: each block is sharded over them (MelboRunConfig.mesh to choose, see block_sharding.py)

Modules: `problem` (the split forward and the objectives' losses), `objectives` (MELBO and
MELBO-ortho: optimiser, init, one projected step), `basis` (the orthonormal basis of earlier
vectors), `train` (jitted optax loops, sequential and batched, checkpoint/resume),
`block_sharding` (the devices a batched block is split over), `score_checkpoint` (behaviour
scores saved per vector as they complete), `analysis` (raw / effective / downstream /
logit similarity of a set of vectors, controls, the norm-ratio sweep), `stages` and
`decompose` (the readings per stage: shared share, specific / residual / raw PR, the closed
form vs K), `behaviour` (do close effects behave alike), `verdict` (the main job's answer:
the decisive reading declared in advance, readings by behaviour, seed spreads), `report`
(the main job's report.json record: the closed form vs K, the summary and its lead), `plan`
(a run's FLOPs / memory / time on paper).
"""

from lens.steering.melbo.problem import (
    MelboProblem,
    make_problem,
    masked_mean_positions,
    melbo_loss,
    ortho_loss,
    ortho_reference,
    pad_prompts,
    layer_after,
    steered_run,
    steered_target,
    without_first_position,
)
from lens.steering.melbo.basis import extend_basis, gram_schmidt, project_off
from lens.steering.melbo.block_sharding import block_mesh
from lens.steering.melbo.objectives import MelboConfig, OrthoConfig
from lens.steering.melbo.train import (
    MelboRunConfig,
    MelboResult,
    melbo,
    melbo_ortho,
    train_vectors,
    vector_key,
)
from lens.steering.melbo.analysis import (
    SteeredEffects,
    analyse_vectors,
    analysis_mesh,
    cosine_stats,
    median_source_norm,
    random_orthogonal_controls,
    rescale,
    rho_sweep,
    source_activations,
    steered_effects,
)
