"""Packing: many tokenized examples in one row, each still a document of its own.

Rows are filled best-fit decreasing, no example split. Each document's position ids restart at 0 and its first
label is masked (the previous document's last token must not learn to predict it); the collator then passes no
attention mask, so transformers builds a block-diagonal causal mask from the position ids on its sdpa, eager and
flex paths (masking_utils.find_packed_sequence_indices; we allow the first two), and flash-attention gets the documents' lengths
(`cu_seq_lens_*`): without them it would isolate documents in a batch of one row only. What would break that
isolation is refused before any weight is loaded (`packing_problem`); tests/test_packing.py proves the rest.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from qlora_cli.config import DataConfig
from qlora_cli.errors import QloraError
from qlora_cli.model_kind import IGNORE_INDEX

# Model types whose attention masks come from transformers' create_causal_mask, where documents are told apart by
# position ids: each is checked on a tiny random model by tests/test_packing.py.
PACKABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")
# Attention implementations that isolate documents given position ids (sdpa, eager) or their lengths (flash).
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")
PACKABLE_ATTENTION = ("sdpa", "eager", *FLASH_ATTENTION)


@dataclass(frozen=True)
class PackedRows:
    """The training rows, and what they hold: said when a run starts and by `qlora data preview`."""

    rows: Any  # datasets.Dataset: input_ids, labels, position_ids, length, examples, truncated
    examples: int
    tokens: int
    max_len: int

    @property
    def examples_per_row(self) -> float:
        return self.examples / len(self.rows)

    @property
    def tokens_per_row(self) -> float:
        return self.tokens / len(self.rows)

    @property
    def fill(self) -> float:
        """Real tokens over the rows' capacity: padding and empty tails are the rest."""
        return self.tokens / (len(self.rows) * self.max_len)

    def describe(self) -> str:
        return (
            f"{self.examples:,} examples packed into {len(self.rows):,} rows of up to {self.max_len:,} tokens: "
            f"{self.examples_per_row:.1f} examples and {self.tokens_per_row:,.0f} tokens a row on average, "
            f"{100 * self.fill:.1f}% of the rows filled"
        )


def batch_fill(lengths: list[int], batch_size: int, seed: int) -> float:
    """Real tokens over the tokens of padded batches of `batch_size`, the rows drawn in a seeded random order."""
    import random

    order = list(lengths)
    random.Random(seed).shuffle(order)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(order) / sum(len(batch) * max(batch) for batch in batches)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into as few bins of `capacity` as best-fit decreasing finds: the longest first,
    each into the fullest bin it still fits (never more than 11/9 of the fewest bins possible, plus one). Ties
    keep the input order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            room, b = capacity - lengths[i], len(bins) - 1
        else:
            room, b = free.pop(at)
            bins[b].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def pack(examples: Any, cfg: DataConfig) -> PackedRows:
    """Tokenized causal-LM examples (input_ids, labels, length, truncated) -> packed rows."""
    import datasets

    lengths = examples["length"]
    too_long = [n for n in lengths if n > cfg.max_packed_len]
    if too_long:
        raise QloraError(
            f"data.max_packed_len={cfg.max_packed_len} is shorter than {len(too_long):,} of {len(lengths):,} training "
            f"examples (the longest has {max(too_long):,} tokens after truncating to data.source_max_len="
            f"{cfg.source_max_len} and data.target_max_len={cfg.target_max_len}); packing never splits an example: "
            f"raise data.max_packed_len to {max(too_long):,}, or lower the two max lengths"
        )
    input_ids, labels, truncated = examples["input_ids"], examples["labels"], examples["truncated"]
    rows: dict[str, list] = {key: [] for key in ("input_ids", "labels", "position_ids", "length", "examples")}
    rows["truncated"] = []
    for members in best_fit_decreasing(lengths, cfg.max_packed_len):
        members.sort()  # documents in dataset order within a row
        rows["input_ids"].append([token for i in members for token in input_ids[i]])
        rows["labels"].append([label for i in members for label in [IGNORE_INDEX, *labels[i][1:]]])
        rows["position_ids"].append([position for i in members for position in range(lengths[i])])
        rows["length"].append(sum(lengths[i] for i in members))
        rows["examples"].append(len(members))
        rows["truncated"].append(sum(truncated[i] for i in members))
    return PackedRows(datasets.Dataset.from_dict(rows), len(lengths), sum(lengths), cfg.max_packed_len)


def packing_problem(model_config: Any, attn_implementation: str | None) -> str | None:
    """Why packing would let documents see each other with this model, or None: checked before loading weights."""
    if getattr(model_config, "is_encoder_decoder", False):
        return (
            f"data.packing: {model_config.model_type} is an encoder-decoder model; packing is for decoder-only models "
            "(set data.packing=false)"
        )
    if model_config.model_type not in PACKABLE_MODEL_TYPES:
        return (
            f"data.packing: not proven to keep packed documents apart for model type {model_config.model_type!r} "
            f"(proven: {', '.join(PACKABLE_MODEL_TYPES)}); set data.packing=false"
        )
    if attn_implementation is not None and attn_implementation not in PACKABLE_ATTENTION:
        return (
            f"data.packing: model.attn_implementation={attn_implementation!r} would let packed documents attend to each "
            f"other; use one of {', '.join(PACKABLE_ATTENTION)}, or set data.packing=false"
        )
    return None


def flash_lengths(position_ids: Any) -> dict[str, Any]:
    """Flash-attention's varlen arguments for rows whose documents restart their position ids at 0: the rows are
    flattened into one sequence, and every document (padding included, one token each) is a span of it."""
    import torch

    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().reshape(-1).to(torch.int32)
    cumulative = torch.cat([starts, torch.tensor([flat.numel()], dtype=torch.int32)])
    longest = int(cumulative.diff().max())
    return {"cu_seq_lens_q": cumulative, "cu_seq_lens_k": cumulative, "max_length_q": longest, "max_length_k": longest}


def real_tokens(batch: dict[str, Any], pad_token_id: int) -> int:
    """Tokens of a batch of packed rows that are not padding: padding is a row's tail of pad tokens at position 0
    (a one-token document made of the pad token alone would be counted out; its label is masked anyway)."""
    padding = (batch["input_ids"] == pad_token_id) & (batch["position_ids"] == 0)
    tail = padding.flip(-1).int().cumprod(-1).sum()
    return int(batch["input_ids"].numel() - tail)
