"""Steering vectors: contrastive vectors (ActAdd, CAA, PCA) and their storage, MELBO / MELBO-ortho
(`lens.steering.melbo`), and the behaviour score of generated text.
"""
