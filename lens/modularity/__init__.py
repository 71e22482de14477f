"""Modularity: capability-selective neuron pruning, MoEfication, contextual sparsity (Deja Vu).

Modules:
  neurons              check_neuron_rows(model, rows) -> int32 [N, T]; chunks; masked_forward(model,
                       tokens [seq], mask_fn, params [layers, ...]) -> logits [seq, vocab]; LayerView;
                       top_k_mask(scores [*rows, n], k) -> bool [*rows, n]
  pruning              activation_stats -> ActivationStats; neuron_scores -> [layers, d_mlp]; head_scores ->
                       [layers, heads]; top_unpruned / random_unpruned -> masks; prune / pruning_edits;
                       save_masks / load_masks; next_token_metrics (with 95% intervals over rows);
                       differential_drop; PruningConfig (incl. compute_dtype); selective_pruning (the loop)
  moefication          split_by_weights / split_by_coactivation / split_random -> labels [layers, d_mlp];
                       (sign_free=True for gated MLPs); centroid_routers / mlp_routers / train_routers ->
                       Routers; expert_forward(model, tokens, labels, routers, k, layers=None) -> logits
                       [*batch, seq, vocab]; neuron_oracle_forward (per-neuron, no grouping);
                       expert_mass_share; balanced_kmeans
  moe_recovery         adjusted_rand_index(a [n], b [n]) -> float; merge_experts(moe) -> dense Transformer;
                       expert_activations(moe, rows [N, seq]) -> dense / routed [layers, tokens, E*m];
                       recovery -> {split: ARI [layers]}; MoELoss (next-token + load balancing)
  contextual_sparsity  Predictors (low-rank, per layer); train_predictors; recall_at -> {fraction: recall};
                       predicted_sparse_forward -> logits [*batch, seq, vocab]
  sparsity_data        collect_sparsity_data -> SparsityData (memmapped per-layer inputs / targets /
                       labels); split_rows (held-out rows); active_label (the DejaVu reference's label)
  plateau_fit          PlateauRule (the stop rule), FitConfig (routers() / predictors()), fit_layer (one
                       layer's mini-batch loop with held-out evals), fit_summary
  router_predictor_fit fit_routers / fit_predictors (per layer, to a PlateauRule; SavedFits: each
                       layer saved as it finishes, a stopped run resumes); recall_counts;
                       reference_recall (the DejaVu reference's label and recall)
  pruning_study        PruningStudy (what decides a study), run_pruning_study (the ratio method + random
                       and forget-only baselines, saved run by run) -> (report section, masks);
                       first_step_selective; draw_summary; merge_studies (a study run in parts, joined)
  resume               saved_result (a finished piece saved under its key, reused or refused);
                       saved_pruning_run; rows_digest, tree_digest (what goes into a key)
  sparsity_study       moe_splits, fit_sparsity, moe_study, dejavu_study (scripts/modularity.py's sections)
"""
