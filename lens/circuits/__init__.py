"""Circuits: clean / corrupted task pairs (IOI, facts), induction heads, activation / path /
attribution patching, causal scrubbing.

Modules:
  tasks               ioi_pairs / factual_pairs -> [PromptPair]; stack_pairs -> (clean [P, seq],
                      corrupted [P, seq], correct [P], wrong [P]); performance (does the model do it)
  induction           repeated_tokens -> [B, 2T]; measure_induction -> InductionReport (scores [layers, heads])
  patching            activation_patching(model, clean, corrupted, metric, site) -> grid [*P, layers, seq | heads];
                      metrics logit_diff_metric / normalized_metric / kl_metric; grid_axes, mix_shape, check_pair
  attribution         attribution_patching -> the same grid to first order; atp_star -> |effect| grid;
                      attention_pattern -> [heads, seq, seq]; compare_estimate(effect, estimate) -> dict;
                      effect_stats(effect, atp, qk, star, topk) -> dict of compare_estimate per estimate
  path_patching       path_patching(model, clean, corrupted, metric, receivers) -> [*P, layers, heads];
                      path_completeness; reading: completeness_meaning, additivity_sums, path_shares
  head_roles          head_roles(model, groups, heads) -> per head: END->IO / END->S attention, DLA to
                      IO - S, induction / duplicate / previous-token scores, role_name (a guide, not a proof)
  scrubbing           scrub(model, tokens [N, seq], hypothesis, loss_fn, targets) -> ScrubResult (losses [seeds, N]);
                      compare(hypotheses) -> report dict; loss_recovered, mean_interval, compare_to;
                      re-exports the hypothesis nodes of scrubbing_nodes
  scrubbing_nodes     Node trees: Output, Embed, Head, MLP, HeadInput, MLPInput, Resid; samplers Exact,
                      Uncond, Cond; identity / empty / full_tree; validate
  scrubbing_sampling  feature_indexes; sample_runs(hypothesis, n, rng, indexes) -> (Plan, runs [N, R], draws)
  scrubbing_runs      plain_runs(model, tokens [N, seq]) -> PlainRuns; treeified_logits(_from) -> [seq, vocab];
                      checked_dataset, chunk_indices, run_chunks, plain_bytes, default_workers
  scrubbing_examples  the worked examples: a trained induction model, balanced parentheses, synthetic
                      induction (models, data [N, seq], hypotheses, loss functions)
"""
