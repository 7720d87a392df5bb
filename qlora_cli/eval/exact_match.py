"""Exact match of greedy generations against held-out targets: a quick, honest 'did it learn?'."""

from __future__ import annotations

from typing import Any

from qlora_cli.generate import generate_texts


def exact_match(
    model: Any, tokenizer: Any, sources: list[str], targets: list[str], *, seq2seq: bool, max_new_tokens: int
) -> float:
    predictions = generate_texts(model, tokenizer, sources, seq2seq=seq2seq, max_new_tokens=max_new_tokens)
    hits = sum(p.strip() == t.strip() for p, t in zip(predictions, targets))
    return hits / max(len(targets), 1)
