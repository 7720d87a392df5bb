"""Exact match of greedy generations against held-out targets: a quick, honest 'did it learn?'."""

from __future__ import annotations

from qlora_cli.generate import generate_texts
from qlora_cli.model import LoadedModel


def exact_match(loaded: LoadedModel, sources: list[str], targets: list[str], *, max_new_tokens: int) -> float:
    predictions = generate_texts(loaded, sources, max_new_tokens=max_new_tokens)
    hits = sum(p.strip() == t.strip() for p, t in zip(predictions, targets))
    return hits / max(len(targets), 1)
