"""The questions: the paper's 80 Vicuna questions and 953 OpenAssistant validation prompts, or a file.

A question file is FastChat's JSON Lines, `{question_id, text, category}`, or with `message_id` for
`question_id` as in the paper's OpenAssistant files (`records.py`). OpenAssistant prompts keep their earlier
turns in `text`, in Guanaco's `### Human: … ### Assistant: …` layout; they are split into messages, so each
model is asked in its own prompt format.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from qlora_cli.builtin import cache_dir
from qlora_cli.errors import QloraError
from qlora_cli.eval.chat.records import read_keyed

# The files the paper's scripts read: FastChat's Vicuna questions at the commit its eval_gpt_review.py names,
# and the OpenAssistant prompts of artidoro/qlora.
SOURCES = {
    "vicuna": "https://raw.githubusercontent.com/lm-sys/FastChat/b3c8bd71637d6c88206a360be436e7941b4fffb4/"
    "fastchat/eval/table/question.jsonl",
    "oa": "https://raw.githubusercontent.com/artidoro/qlora/05daee4ead5387636f6caf06a7941db789e75900/"
    "eval/prompts/oa_questions.jsonl",
}
# The paper's answers began with this system text (its generation prompts, `prompt` in its answer files).
PAPER_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_TURN = re.compile(r"### (Human|Assistant):")


@dataclass(frozen=True)
class Question:
    question_id: int | str
    text: str  # as the judge sees it
    category: str
    id_key: str = "question_id"  # or message_id: the key its questions file, and so its answers, name it by

    def messages(self, system: str | None) -> list[dict[str, str]]:
        """The conversation to answer; a Guanaco transcript becomes its turns, a plain question one user turn."""
        parts = _TURN.split(self.text)
        turns = [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
                 for role, content in zip(parts[1::2], parts[2::2])]  # fmt: skip
        if not turns or parts[0].strip():
            turns = [{"role": "user", "content": self.text}]
        if turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
            turns.pop()  # the open "### Assistant:" that asks for the reply
        return ([{"role": "system", "content": system}] if system else []) + turns


def load_questions(benchmark: str, limit: int | None = None) -> list[Question]:
    path = _download(benchmark) if benchmark in SOURCES else Path(benchmark)
    questions = read_questions(path)
    return questions[:limit] if limit else questions


def read_questions(path: Path) -> list[Question]:
    key, records = read_keyed(path, "questions file")
    questions = []
    for number, record in records:
        try:
            questions.append(Question(record[key], record["text"], record.get("category", "general"), key))
        except KeyError as exc:
            raise QloraError(f"{path}:{number}: expected FastChat's {{question_id, text, category}} ({exc})") from None
    if not questions:
        raise QloraError(f"{path} holds no questions")
    return questions


def _download(name: str) -> Path:
    target = cache_dir().parent / "benchmarks" / f"{name}_questions.jsonl"
    if target.is_file():
        return target
    try:
        with urllib.request.urlopen(SOURCES[name], timeout=60) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise QloraError(
            f"cannot download the {name} questions ({getattr(exc, 'reason', exc)}); offline, pass "
            f"--benchmark FILE with the questions as JSON Lines {{question_id, text, category}}"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(target)
    return target
