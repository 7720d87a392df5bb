"""Held-out prompts and knowledge probes, answered before and after training: did it learn, and what did it keep?

Held-out answers are scored by exact match. A knowledge probe is a general question the base model answers right;
it counts as kept when the reply still contains its answer, so finetuning that taught the task by forgetting
everything else shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from qlora_cli.config import KnowledgeProbe
from qlora_cli.generate import generate_texts
from qlora_cli.model import LoadedModel

SHOWN = 3  # held-out answers kept side by side for the summary


@dataclass(frozen=True)
class Replies:
    held_out: list[str]
    knowledge: list[str]


@dataclass(frozen=True)
class Questions:
    """Held-out sources (formatted as in training) with their targets, and knowledge probes to ask in `prompt`."""

    sources: list[str]
    targets: list[str]
    probes: list[KnowledgeProbe]
    prompt: Callable[[str], str]  # the recipe's prompt format
    max_new_tokens: int
    batch_size: int

    def ask(self, loaded: LoadedModel) -> Replies:
        """Greedy replies, all prompts in one generation loop."""
        prompts = self.sources + [self.prompt(probe.question) for probe in self.probes]
        texts = generate_texts(loaded, prompts, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        replies = [text.strip() for text in texts]
        return Replies(replies[: len(self.sources)], replies[len(self.sources) :])

    def metrics(self, before: Replies, after: Replies) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if self.sources:
            metrics["exact_match_before"] = exact_match(before.held_out, self.targets)
            metrics["exact_match_after"] = exact_match(after.held_out, self.targets)
            metrics["exact_match_samples"] = len(self.sources)
            shown = list(zip(self.sources, self.targets, before.held_out, after.held_out))[:SHOWN]
            metrics["held_out_answers"] = [
                {"prompt": source, "expected": target.strip(), "before": base, "after": tuned}
                for source, target, base, tuned in shown
            ]
        if self.probes:
            rows = list(zip(self.probes, before.knowledge, after.knowledge))
            metrics["knowledge_probes"] = len(rows)
            metrics["knowledge_before"] = sum(knows(probe, base) for probe, base, _ in rows)
            metrics["knowledge_after"] = sum(knows(probe, tuned) for probe, _, tuned in rows)
            metrics["knowledge_lost"] = [
                {"question": probe.question, "answer": probe.answer, "before": base, "after": tuned}
                for probe, base, tuned in rows
                if knows(probe, base) and not knows(probe, tuned)
            ]
        return metrics


def knows(probe: KnowledgeProbe, reply: str) -> bool:
    return probe.answer.casefold() in reply.casefold()


def exact_match(replies: list[str], targets: list[str]) -> float:
    return sum(reply.strip() == target.strip() for reply, target in zip(replies, targets)) / max(len(targets), 1)
