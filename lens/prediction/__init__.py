"""The predict-the-model test: how well does a cheap predictor reproduce a model's next-token
distribution, and can the test be gamed?

Modules:
  scoring   position_metrics / batch_metrics / chunk_metrics (log-probs [..., V] x2 -> top-k test
            error, top-1, recall, Jaccard, Spearman, order, KL); score(model_predictor, predictors,
            rows [N, seq]) -> per-position metrics; summarize(scores, tolerances) -> pass rates;
            predictors: model_predictor, direct_path, uniform_predictor, Factored
  ngram     count(rows, order, vocab) -> NGram (unigram / bigram / trigram tables); .predictor()
  gaming    GoodhartLoss (CE + lambda * KL(table || model)), DistillLoss, mean_kl: the losses that
            game the test, and the side models they use
  defences  defences(scores, tau, kl_threshold) -> stricter criteria; predictor_table; aggregate

On XLA:CPU with k <= 64 the per-row metrics run a native kernel (lens.kernels), with the same
results as the pure-JAX path (the specification); LENS_KERNELS=0 turns it off.
"""
