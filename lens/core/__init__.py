"""Core machinery: capture activations, build edits (interventions as data), run vmapped sweeps,
shard them over devices, fold norm weights, and the small statistics every package shares.

Modules:
  capture   run_with_cache(model, tokens, capture) -> (logits [seq, vocab], Activations);
            resid_at / head_outputs / head_output (one layer's [seq, d_model] / [seq, heads, d_model]);
            pad_prompts(rows) -> (tokens [B, T], mask [B, T]); last_real_index(mask) -> [B]
  edits     Edits builders, each -> Edits with [layers, ...] fields: add (steering vectors),
            patch (site from models.core.interventions.PATCH_SITES), freeze_norm_scale, custom (any pure
            fn(x, layer, positions) of the residual; vmaps over its array fields); stack_edits(K edits) ->
            [K, layers, ...]; combine; check_edits; first_edited_layer; re-exports the two modules below
  ablations ablate_direction, ablate_heads, ablate_neurons, ablate_expert_neurons (MoE): zero / mean /
            resample ablation and projection, each -> Edits
  edit_checks  check_layers / check_positions / check_vectors and the cache-shape checks (the boundary)
  sweep     sweep_vectors(model, tokens, vectors [K, d_model], ...) -> SweepResult (KL [K, ...], logits);
            sweep_edits(model, tokens, stacked Edits) -> EditsSweep; run_edits; add_vectors;
            chunk_size_for (K per chunk under a memory budget)
  sharding  make_mesh, place / replicate / shard_weights (arrays over devices), round_chunk, to_host
  folding   fold_norms / centre_writers / centre_unembed / fold_and_centre: model -> same-logits model
  stats     ranks([..., n]) -> [..., n]; spearman([..., n], [..., n]) -> [...];
            kl_divergence(logp [..., V], logq [..., V]) -> [...] (nats)
"""
