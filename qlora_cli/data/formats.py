"""The dataset registry: each entry turns one record of its native schema into a (source, target) pair.

Loss is computed on the target only (unless `data.train_on_source`), so the split between source and
target is the whole point of a format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple


class Example(NamedTuple):
    source: str
    target: str


class SkipRecord(Exception):
    """This record cannot be formatted (a missing field, an empty target); it is counted and skipped."""


@dataclass(frozen=True)
class DatasetFormat:
    name: str
    description: str
    to_example: Callable[[dict[str, Any]], Example]
    prompt: Callable[[str], str]  # wraps a user's raw prompt the way training sources looked
    hub_id: str | None = None
    hub_config: str | None = None
    hub_data_files: str | None = None
    eval_split: str | None = None  # the hub split used for evaluation, when the dataset has one


def field(record: dict[str, Any], name: str) -> str:
    value = record.get(name)
    if value is None:
        raise SkipRecord(f"missing field {name!r}")
    if not isinstance(value, str):
        raise SkipRecord(f"field {name!r} is {type(value).__name__}, not text")
    return value


def non_empty(target: str) -> str:
    if not target.strip():
        raise SkipRecord("empty target")
    return target


ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: "
)


def alpaca_source(instruction: str, input_text: str = "") -> str:
    if input_text.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _alpaca(record: dict[str, Any]) -> Example:
    instruction = field(record, "instruction")
    input_text = record.get("input") or ""
    return Example(alpaca_source(instruction, input_text), non_empty(field(record, "output")))


def guanaco_prompt(text: str) -> str:
    return f"### Human: {text} ### Assistant:"


def _oasst1(record: dict[str, Any]) -> Example:
    """The paper's openassistant-guanaco: a whole `### Human: … ### Assistant: …` conversation is the target."""
    return Example("", non_empty(field(record, "text")))


def _prompt_completion(record: dict[str, Any]) -> Example:
    return Example(field(record, "prompt"), non_empty(field(record, "completion")))


def _input_output(record: dict[str, Any]) -> Example:
    return Example(field(record, "input"), non_empty(field(record, "output")))


def _as_is(text: str) -> str:
    return text


FORMATS: dict[str, DatasetFormat] = {
    fmt.name: fmt
    for fmt in [
        DatasetFormat(
            "alpaca",
            "Stanford Alpaca: {instruction, input, output} in the Stanford prompt",
            _alpaca,
            prompt=alpaca_source,
            hub_id="tatsu-lab/alpaca",
        ),
        DatasetFormat(
            "oasst1",
            "OpenAssistant conversations in Guanaco form: {text: '### Human: … ### Assistant: …'}",
            _oasst1,
            prompt=guanaco_prompt,
            hub_id="timdettmers/openassistant-guanaco",
            eval_split="test",
        ),
        DatasetFormat(
            "prompt-completion",
            "generic {prompt, completion}",
            _prompt_completion,
            prompt=_as_is,
        ),
        DatasetFormat(
            "input-output",
            "generic {input, output}",
            _input_output,
            prompt=_as_is,
        ),
    ]
}
