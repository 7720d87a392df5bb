"""Fixtures shared by the data tests; import them by name into a test module."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """The builtin tiny LLaMA's BPE tokenizer (BOS <s>, EOS </s>, no chat template)."""
    from qlora_cli.config import ModelConfig
    from qlora_cli.model import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama"))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.fixture
def hendrycks(tmp_path: Path) -> Path:
    """Two subjects in two categories; a choice with a comma and quotes, as the real CSVs have."""
    root = tmp_path / "mmlu"
    dev = [[f"Dev question {i}?", f"a{i}", f"b{i}", f"c{i}", f"d{i}", "ABCD"[i % 4]] for i in range(5)]
    for subject in ("high_school_physics", "philosophy"):
        _write_csv(root / "dev" / f"{subject}_dev.csv", dev)
        _write_csv(
            root / "test" / f"{subject}_test.csv",
            [
                ["What is 2+2?", "3", "4", '"five", maybe', "22", "B"],
                ["Which one is a unit of force?", "newton", "joule", "watt", "pascal", "A"],
                ["Pick D.", "no", "no", "no", "yes", "D"],
            ],
        )
    return root
