"""Reading the residual stream out: the logit lens and tuned lens, fitting tuned lenses, direct logit
attribution through the final norm.

Modules:
  logit_lens      residual_stack(model, tokens) -> [layers + 1, seq, d_model]; decode -> logits [..., vocab];
                  logit_lens / tuned_lens(model, tokens) -> log-probs [layers + 1, seq, vocab];
                  TunedLens (per-layer affine translators); save_tuned_lens / load_tuned_lens; check_lens_fits
  tuned_lens_fit  TunedLensLoss, decoded_kl (KL(model || lens) [scalar]), reference_optimizer (with
                  gradient accumulation), lens_scores(model, lens, rows) -> per-layer KL / agreement / CE; row_bytes
  tuned_lens_plan training_plan (bytes, FLOPs, hours of a fit before running it), plan_lines (its text)
  dla             residual_parts(model, tokens) -> [parts, seq, d_model]; part_names; logit_direction;
                  frozen_dla -> Attribution (parts [parts], constant); shapley_exact / shapley_sampled ->
                  [groups]; layer_groups -> (names, member [groups, parts]); disagreement(a [parts],
                  b [parts]) -> {rel_l1, abs_ratio, spearman, top5_overlap, top10_sign_flips}
"""
