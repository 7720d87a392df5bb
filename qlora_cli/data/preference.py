"""Data for training.method dpo, orpo and kto: records -> the text rows TRL's trainers tokenize.

TRL tokenizes the prompt and each reply itself (and appends EOS); what it would drop or cut without a word is
decided here, by the recipe's limits, and counted: a prompt longer than `data.source_max_len` is dropped (no
reply token would be left to prefer), a reply longer than `data.target_max_len` is cut there (TRL's
`max_length` is the sum of the two, truncating the end). Pairs with an empty or no different reply are skipped
by the formats (data/formats.py), and a KTO set with one label only is refused.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from qlora_cli.config import DataConfig
from qlora_cli.data.formats import FORMATS
from qlora_cli.data.loading import Rows, describe_source, formatted_splits, skips
from qlora_cli.errors import QloraError

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
JUDGED_COLUMNS = ("prompt", "completion", "label")


@dataclass
class PreferenceData:
    train: Any  # datasets.Dataset: prompt, chosen, rejected (kto: prompt, completion, label) and their token counts
    eval: Any | None
    method: str
    skipped: Counter = field(default_factory=Counter)
    packed: None = None  # never packed: data.packing is refused for preference methods

    @property
    def replies(self) -> tuple[str, ...]:
        return PAIR_COLUMNS[1:] if self.method != "kto" else ("completion",)

    @property
    def truncated(self) -> int:
        """Rows with a reply cut at data.target_max_len."""
        return sum(self.train["truncated"]) + (sum(self.eval["truncated"]) if self.eval is not None else 0)


def prepare_preference_data(cfg: DataConfig, method: str, tokenizer: Any, *, seed: int) -> PreferenceData:
    fmt = FORMATS[cfg.dataset].for_tokenizer(tokenizer)
    skipped: Counter = Counter()
    if method == "kto":
        rows = Rows(lambda record: [tuple(r) for r in fmt.judged(record)], JUDGED_COLUMNS, blank=("", "", False))
    else:
        rows = Rows(lambda record: [tuple(fmt.to_pair(record))], PAIR_COLUMNS)  # type: ignore[misc]
    train, evaluation = formatted_splits(cfg, fmt, rows, skipped, seed=seed)
    data = PreferenceData(train, evaluation, method, skipped)
    data.train = _within_limits(data.train, data, cfg, tokenizer, "train")
    if data.eval is not None:
        data.eval = _within_limits(data.eval, data, cfg, tokenizer, "eval")
    if len(data.train) == 0:
        raise QloraError(f"dataset {describe_source(cfg, fmt)} has no usable {method} rows ({skips(skipped)})")
    if method == "kto":
        data.train = data.train.shuffle(seed=seed)  # TRL's KTO reads rows in order; a pair's two rows would meet
        _check_labels(data.train, describe_source(cfg, fmt))
    return data


def _within_limits(split: Any, data: PreferenceData, cfg: DataConfig, tokenizer: Any, name: str) -> Any:
    limit = f"prompt longer than data.source_max_len={cfg.source_max_len} tokens"
    replies = data.replies

    def count(batch: dict[str, list]) -> dict[str, list]:
        counts = {"prompt_tokens": _lengths(tokenizer, batch["prompt"], special=True)}
        for reply in replies:
            counts[f"{reply}_tokens"] = [n + 1 for n in _lengths(tokenizer, batch[reply])]  # + the EOS TRL appends
        counts["truncated"] = [
            any(counts[f"{reply}_tokens"][i] > cfg.target_max_len for reply in replies) for i in range(len(batch["prompt"]))
        ]
        return counts

    counted = split.map(count, batched=True, desc=f"Counting {name} tokens")
    kept = counted.filter(lambda row: row["prompt_tokens"] <= cfg.source_max_len, desc="Dropping long prompts")
    if len(kept) < len(counted):
        data.skipped[limit] += len(counted) - len(kept)
    return kept


def _lengths(tokenizer: Any, texts: list[str], *, special: bool = False) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def _check_labels(train: Any, source: str) -> None:
    desirable = sum(train["label"])
    undesirable = len(train) - desirable
    if not desirable or not undesirable:
        missing = "undesirable (label false)" if desirable else "desirable (label true)"
        raise QloraError(
            f"{source}: KTO needs desirable and undesirable replies, and the training rows hold {desirable:,} "
            f"desirable and {undesirable:,} undesirable: add {missing} ones"
        )
