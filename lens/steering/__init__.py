"""Steering vectors: contrastive vectors (ActAdd, CAA, PCA) and their storage, MELBO / MELBO-ortho
(`lens.steering.melbo`), and the behaviour score of generated text.

Modules:
  vectors     actadd / mean_difference / reply_mean_difference -> [d_model]; pair_differences -> [P, d_model];
              pca_of_differences -> [k, d_model]; calibrate_norm; save_vectors / load_vectors / load_extras;
              generate_with_vectors(model, prompts, vectors [K, d_model]) -> K lists of token lists
  code_score  code_score(text) -> float (how much a reply looks like code)
  prompts     the main job's prompt sets (CODE, PROSE, NEUTRAL, BEHAVIOUR), load_model, prompt makers, decoder
  melbo       unsupervised steering vectors: train_vectors -> MelboResult (vectors [n, d], losses [n, steps]);
              problem, stages (MELBO-ortho), decompose, analysis, behaviour, base_vector (theta0, the
              code CAA vector), experiment (the main job's phases) (see its __init__)
"""
