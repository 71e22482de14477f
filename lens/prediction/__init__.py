"""The predict-the-model test: score a cheap predictor against a model's next-token
distribution, n-gram predictors, and the losses that game the test.
"""
