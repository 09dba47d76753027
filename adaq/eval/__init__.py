"""Accuracy evaluation: adaq as an lm-eval backend, offline MMLU-Pro tasks, perplexity, side-by-side reports."""
