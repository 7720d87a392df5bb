"""Fixtures shared by the data tests; import them by name into a test module."""

from __future__ import annotations

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
