"""scripts/bench_quant.py's choice of texts for `--steps 0`: the same number of tokens in every scored text."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from bench_quant import fixed_length  # noqa: E402

from qlora_cli.errors import QloraError  # noqa: E402


def rows(*lengths: int) -> list[dict]:
    return [{"input_ids": list(range(n)), "labels": [-100] + list(range(1, n))} for n in lengths]


def test_texts_shorter_than_the_length_are_passed_over_and_longer_ones_cut_to_it():
    picked = fixed_length(rows(5, 2, 4, 7, 9), 3, 4, source="data.jsonl")
    assert picked == [
        {"input_ids": [0, 1, 2, 3], "labels": [-100, 1, 2, 3]},
        {"input_ids": [0, 1, 2, 3], "labels": [-100, 1, 2, 3]},
        {"input_ids": [0, 1, 2, 3], "labels": [-100, 1, 2, 3]},
    ]


def test_the_first_texts_long_enough_are_taken_in_order():
    data = [{"input_ids": [i] * 3, "labels": [i] * 3} for i in range(6)]
    assert [r["input_ids"][0] for r in fixed_length(data, 2, 3, source="d")] == [0, 1]


def test_too_few_long_texts_is_an_error_naming_the_data():
    with pytest.raises(QloraError, match=r"data.jsonl: only 1 texts have 6 tokens or more, --examples asks for 2"):
        fixed_length(rows(5, 6, 3), 2, 6, source="data.jsonl")
