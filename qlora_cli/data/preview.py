"""`qlora data preview`: the examples exactly as training will see them, masked and trained parts marked.

It runs the same `prepare_data` as `qlora train` (so the same cache), with the tokenizer but no weights; for
training.method dpo/orpo/kto, `prepare_preference_data`: prompt, chosen and rejected (or labelled) replies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

from qlora_cli.config import Recipe
from qlora_cli.data.loading import PreparedData, prepare_data
from qlora_cli.data.packing import batch_fill, packing_problem
from qlora_cli.data.preference import PreferenceData, prepare_preference_data
from qlora_cli.errors import QloraError
from qlora_cli.model_kind import ModelKind, kind_of


@dataclass
class DataPreview:
    recipe: Recipe
    data: PreparedData | PreferenceData
    tokenizer: Any
    kind: ModelKind
    rows: list[dict[str, Any]]  # the first N training examples, tokenized


def preview_data(recipe: Recipe, num: int) -> DataPreview:
    from qlora_cli.model import load_tokenizer, model_config

    config = model_config(recipe.model)
    if recipe.data.packing and (problem := packing_problem(config, recipe.model.attn_implementation)):
        raise QloraError(problem)
    tokenizer = load_tokenizer(recipe.model)
    kind = kind_of(config)
    method, seed = recipe.training.method, recipe.training.seed
    if method == "sft":
        data: PreparedData | PreferenceData = prepare_data(recipe.data, tokenizer, kind=kind, seed=seed)
    else:
        data = prepare_preference_data(recipe.data, method, tokenizer, seed=seed)
    rows = list(data.train.select(range(min(num, len(data.train)))))
    return DataPreview(recipe, data, tokenizer, kind, rows)


def json_lines(preview: DataPreview) -> Iterator[str]:
    if isinstance(preview.data, PreferenceData):
        texts = ("prompt", *preview.data.replies, *(("label",) if preview.data.method == "kto" else ()))
        keys = (*texts, "prompt_tokens", *(f"{reply}_tokens" for reply in preview.data.replies), "truncated")
    else:
        keys = ("source", "target", "source_tokens", "target_tokens", "truncated")
    for row in preview.rows:
        yield json.dumps({key: row[key] for key in keys}, ensure_ascii=False)


def summary(preview: DataPreview) -> str:
    if isinstance(preview.data, PreferenceData):
        return _preference_summary(preview, preview.data)
    cfg, data = preview.recipe.data, preview.data
    where = cfg.path or ", ".join(cfg.data_files or []) or "the hub"
    eval_n = len(data.eval) if data.eval is not None else 0
    skipped = sum(data.skipped.values())
    reasons = f" ({', '.join(f'{n} {reason}' for reason, n in data.skipped.most_common())})" if skipped else ""
    loss_on = "source and target" if cfg.train_on_source and preview.kind.can_train_on_source else "the target only"
    lines = [
        f"{cfg.dataset} from {where}: {len(data.train):,} train and {eval_n:,} eval examples; "
        f"{data.truncated:,} truncated, {skipped:,} skipped{reasons}",
        f"source at most {cfg.source_max_len} tokens, target at most {cfg.target_max_len}; loss on {loss_on}",
    ]
    if data.packed is not None:
        lines.append(f"packing: {data.packed.describe()}")
    lines.append(_batch_fill(preview))
    return "\n".join(lines)


def longest_row(data: PreparedData | PreferenceData, target_max_len: int) -> int:
    """Tokens in the longest training row: a packed row, an example, or a prompt with its longer reply (EOS
    included, cut at `target_max_len`): TRL pads chosen and rejected to one length."""
    if isinstance(data, PreferenceData):
        replies = zip(*(data.train[f"{reply}_tokens"] for reply in data.replies))
        prompts = data.train["prompt_tokens"]
        return max(prompt + min(max(lengths), target_max_len) for prompt, lengths in zip(prompts, replies))
    rows = data.packed.rows if data.packed is not None else data.train
    return max(rows["length"])


def _batch_fill(preview: DataPreview) -> str:
    """How much of a training batch is real tokens, packed and not, in a random order as training draws them."""
    batch, seed, data = preview.recipe.training.batch_size, preview.recipe.training.seed, preview.data
    unpacked = f"a batch of {batch} examples is {100 * batch_fill(data.train['length'], batch, seed):.1f}% real tokens"
    if data.packed is None:
        return f"{unpacked} (random order; training.group_by_length pads less)"
    packed = batch_fill(data.packed.rows["length"], batch, seed)
    return (
        f"a batch of {batch} rows is {100 * packed:.1f}% real tokens ({100 * packed * data.packed.fill:.1f}% of "
        f"{batch} x {data.packed.max_len:,} tokens); unpacked, {unpacked} (random order)"
    )


def _preference_summary(preview: DataPreview, data: PreferenceData) -> str:
    cfg, method = preview.recipe.data, data.method
    where = cfg.path or ", ".join(cfg.data_files or []) or "the hub"
    eval_n = len(data.eval) if data.eval is not None else 0
    skipped = sum(data.skipped.values())
    reasons = f" ({', '.join(f'{n} {reason}' for reason, n in data.skipped.most_common())})" if skipped else ""
    unit = "replies" if method == "kto" else "pairs"
    lines = [
        f"{cfg.dataset} from {where} for {method}: {len(data.train):,} train and {eval_n:,} eval {unit}; "
        f"{data.truncated:,} with a reply cut at data.target_max_len, {skipped:,} skipped{reasons}",
        f"prompt at most {cfg.source_max_len} tokens (masked), each reply at most {cfg.target_max_len} "
        "(scored; TRL appends EOS)",
    ]
    if method == "kto":
        desirable = sum(data.train["label"])
        lines.append(f"{desirable:,} desirable and {len(data.train) - desirable:,} undesirable training replies")
    for column in ("prompt", *data.replies):
        counts = data.train[f"{column}_tokens"]
        lines.append(f"{column} tokens: mean {sum(counts) / len(counts):.0f}, max {max(counts)}")
    return "\n".join(lines)


def text_report(preview: DataPreview) -> str:
    """Each example as the token ids decode back, so truncation and BOS/EOS show as they will be trained."""
    if isinstance(preview.data, PreferenceData):
        return _preference_report(preview, preview.data)
    source_trained = preview.recipe.data.train_on_source and preview.kind.can_train_on_source
    blocks = [summary(preview)]
    for number, row in enumerate(preview.rows, start=1):
        n_source = row["source_tokens"]
        source_ids, target_ids = preview.kind.source_and_target(row)
        source_mark = "trained" if source_trained else "masked"
        header = (
            f"── example {number}: source {n_source} tokens ({source_mark}), "
            f"target {row['target_tokens']} tokens (trained)" + (", truncated" if row["truncated"] else "")
        )
        source_text, target_text = preview.tokenizer.decode(source_ids), preview.tokenizer.decode(target_ids)
        blocks.append("\n".join([header, _marked(source_mark, source_text), _marked("trained", target_text)]))
    return "\n\n".join(blocks)


def _marked(label: str, text: str, width: int = 7) -> str:
    lines = text.split("\n") or [""]
    return "\n".join(f"{label if i == 0 else '':>{width}} │ {line}" for i, line in enumerate(lines))


def _preference_report(preview: DataPreview, data: PreferenceData) -> str:
    """Each pair (or labelled reply) as text: the prompt masked, the replies scored."""
    blocks = [summary(preview)]
    for number, row in enumerate(preview.rows, start=1):
        if data.method == "kto":
            verdict = "desirable" if row["label"] else "undesirable"
            replies = [(verdict, row["completion"], row["completion_tokens"])]
        else:
            replies = [(name, row[name], row[f"{name}_tokens"]) for name in data.replies]
        header = f"── {'reply' if data.method == 'kto' else 'pair'} {number}: prompt {row['prompt_tokens']} tokens (masked), " + ", ".join(
            f"{name} {tokens} tokens" for name, _, tokens in replies
        ) + (", cut at data.target_max_len" if row["truncated"] else "")
        width = max(len(name) for name, _, _ in [("masked", "", 0), *replies])
        lines = [header, _marked("masked", row["prompt"], width)]
        lines += [_marked(name, text, width) for name, text, _ in replies]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
