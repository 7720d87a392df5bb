"""Evaluations: exact match on held-out examples, MMLU."""
