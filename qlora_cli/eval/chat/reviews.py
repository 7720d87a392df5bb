"""Review records in FastChat's JSON Lines (the paper's `ratings-gpt4/*` files), and reading a judge's reply.

One file holds one pair of systems in one presentation order: `{review_id, question_id, answer1_id,
answer2_id, reviewer_id, metadata, text, score}`, with `message_id` (an OASST1 UUID) for `question_id` in the
paper's OpenAssistant files. `score` is `[s1, s2]` in relative mode and 1, 2 or 3 in pairwise mode (first
better, second better, tie); -1 (or [-1, -1]) marks a reply that could not be read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_cli.errors import QloraError
from qlora_cli.eval.chat.records import one_key, read_keyed

UNPARSED_RELATIVE = [-1.0, -1.0]
UNPARSED_PAIRWISE = -1
_NUMBER = r"(\d+(?:\.\d+)?)"
# What the paper's file names end with after `<first>-vs-<second>`, and ours (metadata names the systems too).
_SUFFIX = re.compile(r"(-gpt-?4-reviewer(-threeclass)?|-reviews-(relative|pairwise))$")


def parse_relative(text: str) -> list[float]:
    """The two scores: on the first line (the paper's parser, FastChat's `parse_score`), else where the math
    prompt asks for them, at the end: `Assistant 1: x … Assistant 2: y`, else the last `(x, y)` tuple."""
    first = text.split("\n")[0].replace(",", " ").split()
    if len(first) == 2:
        try:
            return [float(first[0]), float(first[1])]
        except ValueError:
            pass
    one = re.findall(rf"Assistant 1\s*:\s*{_NUMBER}", text)
    two = re.findall(rf"Assistant 2\s*:\s*{_NUMBER}", text)
    if one and two:
        return [float(one[-1]), float(two[-1])]
    pairs = re.findall(rf"\(\s*{_NUMBER}\s*,\s*{_NUMBER}\s*\)", text)
    if pairs:
        return [float(pairs[-1][0]), float(pairs[-1][1])]
    return list(UNPARSED_RELATIVE)


def parse_pairwise(text: str) -> int:
    """The last line: 1, 2 or 3 (the paper's `parse_three_class_score`)."""
    try:
        verdict = int(text.strip().split("\n")[-1].strip())
    except ValueError:
        return UNPARSED_PAIRWISE
    return verdict if verdict in (1, 2, 3) else UNPARSED_PAIRWISE


@dataclass(frozen=True)
class ReviewFile:
    path: Path
    mode: str  # relative | pairwise
    first: str  # the system whose answers were shown first
    second: str
    reviews: list[dict[str, Any]]
    key: str | None  # question_id or message_id: `review[key]` is the question a review is of; None if empty

    @property
    def unparsed(self) -> int:
        bad = UNPARSED_RELATIVE if self.mode == "relative" else UNPARSED_PAIRWISE
        return sum(_score(r) == bad for r in self.reviews)


def read_review_dir(folder: Path) -> list[ReviewFile]:
    folder = Path(folder)
    if not folder.is_dir():
        raise QloraError(f"review folder not found: {folder}")
    files = [read_review_file(path) for path in sorted(folder.glob("*.jsonl"))]
    files = [f for f in files if f.reviews]
    if not files:
        raise QloraError(f"{folder} holds no review files (*.jsonl with FastChat review records)")
    one_key({f.path: f.key for f in files})
    return files


def read_reviews(path: Path) -> tuple[str | None, list[dict[str, Any]]]:
    """The file's id key (`records.read_keyed`) and its review records, each checked for what is read of it."""
    key, records = read_keyed(path, "review file")
    for number, record in records:
        try:
            record["answer1_id"], record["answer2_id"], record["text"]  # noqa: B018
        except KeyError as exc:
            raise QloraError(f"{path}:{number}: not a review record ({exc})") from None
    return key, [record for _, record in records]


def read_review_file(path: Path) -> ReviewFile:
    key, reviews = read_reviews(path)
    mode = "relative" if reviews and isinstance(reviews[0].get("score"), list) else "pairwise"
    meta = reviews[0].get("metadata") or {} if reviews else {}
    first, second = meta.get("answer1_model"), meta.get("answer2_model")
    if not (first and second):
        stem = _SUFFIX.sub("", path.stem)
        if stem.count("-vs-") != 1:
            raise QloraError(f"{path.name}: cannot tell the two systems (name it <first>-vs-<second>.jsonl)")
        first, second = stem.split("-vs-")
    return ReviewFile(path, mode, first, second, reviews, key)


def _score(review: dict[str, Any]) -> Any:
    score = review.get("score")
    if isinstance(score, list):
        return [float(s) for s in score]
    return score
