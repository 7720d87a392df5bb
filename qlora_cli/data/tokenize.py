"""Tokenization shared by every dataset: BOS + source, target + EOS, loss on the target only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qlora_cli.config import DataConfig

IGNORE_INDEX = -100


def tokenize_example(
    tokenizer: Any, source: str, target: str, cfg: DataConfig, *, seq2seq: bool
) -> dict[str, Any]:
    """Source and target are truncated separately, so a long source never eats the target."""
    src = tokenizer(source, add_special_tokens=False)["input_ids"]
    tgt = tokenizer(target, add_special_tokens=False)["input_ids"]
    return _assemble(tokenizer, src, tgt, cfg, seq2seq)


def tokenize_batch(tokenizer: Any, batch: dict[str, list], cfg: DataConfig, *, seq2seq: bool) -> dict[str, list]:
    sources = tokenizer(batch["source"], add_special_tokens=False)["input_ids"]
    targets = tokenizer(batch["target"], add_special_tokens=False)["input_ids"]
    rows = [_assemble(tokenizer, s, t, cfg, seq2seq) for s, t in zip(sources, targets)]
    return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}


def source_ids(tokenizer: Any, source_tokens: list[int], *, seq2seq: bool) -> list[int]:
    """The special tokens around a source: BOS first for decoder-only models, EOS last for seq2seq."""
    if seq2seq:
        return source_tokens + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + source_tokens


def _assemble(tokenizer: Any, src: list[int], tgt: list[int], cfg: DataConfig, seq2seq: bool) -> dict[str, Any]:
    src = source_ids(tokenizer, src, seq2seq=seq2seq)
    tgt = tgt + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    source_truncated = len(src) > cfg.source_max_len
    target_truncated = len(tgt) > cfg.target_max_len
    src, tgt = src[: cfg.source_max_len], tgt[: cfg.target_max_len]
    if seq2seq:
        input_ids, labels = src, tgt
    else:
        input_ids = src + tgt
        labels = (src if cfg.train_on_source else [IGNORE_INDEX] * len(src)) + tgt
    return {
        "input_ids": input_ids,
        "labels": labels,
        "length": len(input_ids) + (len(labels) if seq2seq else 0),
        "source_tokens": len(src),
        "target_tokens": len(tgt),
        "truncated": source_truncated or target_truncated,
    }


@dataclass
class PaddingCollator:
    """Right-pads each key to the longest in the batch; labels are padded with -100 so padding never counts."""

    pad_token_id: int
    padding_side: str = "right"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids = self._pad([f["input_ids"] for f in features], self.pad_token_id)
        batch = {
            "input_ids": input_ids,
            "attention_mask": self._pad([[1] * len(f["input_ids"]) for f in features], 0),
        }
        if "labels" in features[0]:
            batch["labels"] = self._pad([f["labels"] for f in features], IGNORE_INDEX)
        return batch

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            else:
                out[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        return out
