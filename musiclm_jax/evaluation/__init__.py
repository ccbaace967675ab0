"""Evaluation metrics and evaluators run by `python -m musiclm_jax.eval` (one evaluator per model family)."""
