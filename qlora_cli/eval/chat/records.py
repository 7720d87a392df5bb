"""The JSON Lines files of the chatbot evaluation: questions, answers, reviews, judge prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlora_cli.errors import QloraError, read_text


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
