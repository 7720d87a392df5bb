"""The JSON Lines files of the chatbot evaluation: questions, answers, reviews, judge prompts.

Questions, answers and reviews name the question they belong to by one of two keys: `question_id` in
FastChat's files (the Vicuna benchmark, ours), `message_id` (an OASST1 UUID) in the paper's OpenAssistant
files. `read_keyed` decides which, once for all of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlora_cli.errors import QloraError, read_text

# In this order: the paper's oa_questions.jsonl has both (the same UUID) and is read by message_id, the key of
# the paper's OpenAssistant answers and reviews, so answers to it can be judged beside those and join them.
ID_KEYS = ("message_id", "question_id")
_ACCEPTED = "question_id (FastChat/Vicuna files) or message_id (the paper's OpenAssistant files)"


def read_records(path: Path, what: str) -> list[tuple[int, Any]]:
    """(line number, parsed JSON) for every non-empty line; a line that is not JSON is one error naming it."""
    records = []
    for number, line in enumerate(read_text(path, what).splitlines(), start=1):
        if line.strip():
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise QloraError(f"{path}:{number}: invalid JSON in the {what}: {exc.msg}") from None
    return records


def read_keyed(path: Path, what: str) -> tuple[str | None, list[tuple[int, dict[str, Any]]]]:
    """The key the file names questions by (None when it is empty), and its records: each must have that key,
    so `record[key]` is its question's id."""
    key, first, records = None, 0, []
    for number, record in read_records(path, what):
        used = next((k for k in ID_KEYS if isinstance(record, dict) and record.get(k) is not None), None)
        if used is None:
            raise QloraError(f"{path}:{number}: no question id in this {what} record: expected {_ACCEPTED}")
        if key is None:
            key, first = used, number
        elif used != key:
            raise QloraError(f"{path}:{number}: keyed by {used}, but line {first} by {key}: a file uses one key")
        records.append((number, record))
    return key, records


def one_key(keys: dict[Path, str | None]) -> str | None:
    """The key of files read together (None when all are empty). A mix is refused: it is most likely two
    benchmarks' files in one folder or pair, and reviews written from it could carry only one key."""
    named = [(path, key) for path, key in keys.items() if key is not None]
    for path, key in named[1:]:
        if key != named[0][1]:
            raise QloraError(
                f"{named[0][0]} is keyed by {named[0][1]} and {path} by {key}: files read together use one key, "
                f"{_ACCEPTED}"
            )
    return named[0][1] if named else None
