"""An LLM judge compares two systems' answers, question by question, in both presentation orders.

Judge prompts use FastChat's schema (`{prompt_id, system_prompt, prompt_template, defaults, category}`), so
the paper's published prompt files work as they are (`--judge-prompts`); a prompt whose `category` matches
the question's (coding, math) is used for it, else the first. Every review is appended to its file the
moment it arrives, and a rerun skips every review already there: an interrupted judging run continues
where it stopped and never pays twice. Reviews name their question by the answers' key (`records.py`):
`message_id` for the paper's OpenAssistant answers, else `question_id`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_cli.errors import QloraError
from qlora_cli.eval.chat.answer import openai_client, read_keyed_answers
from qlora_cli.eval.chat.benchmarks import load_questions
from qlora_cli.eval.chat.records import one_key, read_records
from qlora_cli.eval.chat.reviews import parse_pairwise, parse_relative, read_reviews

_TEMPLATE = (
    "[Question]\n{question}\n\n[The Start of Assistant 1's Answer]\n{answer_1}\n\n[The End of Assistant 1's Answer]"
    "\n\n[The Start of Assistant 2's Answer]\n{answer_2}\n\n[The End of Assistant 2's Answer]\n\n[System]\n{prompt}\n\n"
)
_SYSTEM = "You are a careful, impartial judge of the answers two AI assistants gave to a user."
# Our own wording of the paper's two judge modes; --judge-prompts takes the paper's published files instead.
DEFAULT_PROMPTS = {
    "relative": [{
        "prompt_id": 1, "category": "general", "system_prompt": _SYSTEM, "prompt_template": _TEMPLATE,
        "defaults": {"prompt": (
            "Judge how helpful, relevant, accurate and detailed each answer is for the user's question. Give each "
            "assistant a score from 1 to 10, higher is better. On the first line write only the two scores, for "
            "Assistant 1 and then Assistant 2, separated by a space. From the next line on, explain your scores. "
            "Do not let the order in which the answers appear, or their length, sway you."
        )},
    }],
    "pairwise": [{
        "prompt_id": 1, "category": "general", "system_prompt": _SYSTEM, "prompt_template": _TEMPLATE,
        "defaults": {"prompt": (
            "Compare how helpful, relevant, accurate and detailed the two answers are for the user's question. "
            "Explain your comparison first. Do not let the order in which the answers appear, or their length, "
            "sway you. Then, on the last line, write only one number: 1 if Assistant 1's answer is better, 2 if "
            "Assistant 2's answer is better, 3 if they are equally good."
        )},
    }],
}  # fmt: skip


@dataclass(frozen=True)
class JudgeRequest:
    answers: tuple[Path, Path]
    mode: str  # relative | pairwise
    endpoint: str
    judge_model: str
    output_dir: Path
    judge_prompts: Path | None = None
    benchmark: str | None = None  # for answer files that do not carry their question (the paper's)
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.2
    max_tokens: int = 1024
    concurrency: int = 4
    max_retries: int = 8
    dry_run: bool = False


@dataclass(frozen=True)
class Call:
    """One review to ask for: a question, two answers in one order, the prompt it gets."""

    file: Path
    question_id: Any
    id_key: str  # question_id or message_id, as the answers name it
    first: dict[str, Any]
    second: dict[str, Any]
    system: str
    user: str
    prompt_id: int

    @property
    def key(self) -> tuple:
        return (str(self.question_id), self.first["answer_id"], self.second["answer_id"])


def judge(request: JudgeRequest) -> list[Path]:
    if request.mode not in DEFAULT_PROMPTS:
        raise QloraError(f"--mode {request.mode!r}: relative or pairwise")
    calls = plan_calls(request)
    files = sorted({call.file for call in calls})
    done = {file: _done(file, request, calls[0].id_key) for file in files}
    pending = [call for call in calls if call.key not in done[call.file]]
    tokens = sum(len(call.system) + len(call.user) for call in pending) // 4
    print(
        f"{len(pending)} judge calls to make ({len(calls) - len(pending)} of {len(calls)} already reviewed), about "
        f"{tokens:,} prompt tokens (4 characters a token) and up to {len(pending) * request.max_tokens:,} completion "
        f"tokens from {request.judge_model}",
        file=sys.stderr,
    )
    if request.dry_run or not pending:
        return files
    client = openai_client(request.endpoint, request.api_key_env, request.max_retries)
    request.output_dir.mkdir(parents=True, exist_ok=True)
    handles = {file: file.open("a", encoding="utf-8") for file in files}
    failures: list[Exception] = []
    from tqdm.auto import tqdm

    try:
        with ThreadPoolExecutor(request.concurrency) as pool, tqdm(total=len(pending), desc="Judging") as bar:
            asked = {pool.submit(_ask, client, request, call): call for call in pending}
            for reply in as_completed(asked):  # written as each arrives: an interruption loses none paid for
                call = asked[reply]
                try:
                    text = reply.result()
                except Exception as exc:  # refused for good (4xx), or out of retries: asked again next run
                    failures.append(exc)
                    continue
                handles[call.file].write(json.dumps(_review(request, call, text), ensure_ascii=False) + "\n")
                handles[call.file].flush()
                bar.update()
    finally:
        for handle in handles.values():
            handle.close()
    if failures:
        first = str(failures[0]).splitlines()[0]
        raise QloraError(
            f"{len(failures)} of {len(pending)} judge calls failed (first: {type(failures[0]).__name__}: {first}); "
            f"the {len(pending) - len(failures)} reviews received are saved: rerun to ask for the rest"
        )
    return files


def plan_calls(request: JudgeRequest) -> list[Call]:
    """Every question both systems answered, in both orders."""
    (key_1, first), (key_2, second) = (read_keyed_answers(path) for path in request.answers)
    key = one_key({request.answers[0]: key_1, request.answers[1]: key_2})
    names = [first[0]["model_id"] if first else "a", second[0]["model_id"] if second else "b"]
    if names[0] == names[1]:
        names = [path.stem for path in request.answers]
    questions = _question_texts(request, key, first + second)
    prompts = _prompts(request)
    by_question = [{str(a[key]): a for a in answers} for answers in (first, second)]
    shared = [q for q in by_question[0] if q in by_question[1]]
    if not shared:
        raise QloraError(f"{request.answers[0]} and {request.answers[1]} answer no question in common")
    calls = []
    for one, two in ((0, 1), (1, 0)):
        file = request.output_dir / f"{_slug(names[one])}-vs-{_slug(names[two])}-reviews-{request.mode}.jsonl"
        for question_id in shared:
            a, b = by_question[one][question_id], by_question[two][question_id]
            question, category = questions[question_id]
            prompt = next((p for p in prompts if p.get("category") == category), prompts[0])
            user = prompt["prompt_template"].format(question=question, answer_1=a["text"], answer_2=b["text"],
                                                    **prompt.get("defaults", {}))  # fmt: skip
            calls.append(Call(file, a[key], key, {**a, "model_id": names[one]}, {**b, "model_id": names[two]},
                              prompt["system_prompt"], user, prompt["prompt_id"]))  # fmt: skip
    return calls


def _question_texts(request: JudgeRequest, key: str, answers: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    texts = {str(a[key]): (a["question"], a.get("category", "general")) for a in answers if "question" in a}
    missing = {str(a[key]) for a in answers} - texts.keys()
    if missing:
        if request.benchmark is None:
            raise QloraError(
                f"the answers do not carry their questions ({len(missing)} without): pass --benchmark vicuna, oa "
                "or the questions file"
            )
        texts.update({str(q.question_id): (q.text, q.category) for q in load_questions(request.benchmark)})
    return texts


def _prompts(request: JudgeRequest) -> list[dict[str, Any]]:
    if request.judge_prompts is None:
        return DEFAULT_PROMPTS[request.mode]
    prompts = [prompt for _, prompt in read_records(request.judge_prompts, "judge prompts")]
    try:
        for prompt in prompts:
            prompt["system_prompt"], prompt["prompt_template"], prompt["prompt_id"]  # noqa: B018
    except (KeyError, TypeError) as exc:
        raise QloraError(f"--judge-prompts {request.judge_prompts}: not FastChat judge prompts ({exc})") from None
    return prompts


def _done(file: Path, request: JudgeRequest, key: str) -> set[tuple]:
    """The reviews this judge already wrote; their file must name questions as the answers do, as new ones will."""
    if not file.exists():
        return set()
    file_key, reviews = read_reviews(file)
    one_key({file: file_key, request.answers[0]: key})
    return {
        (str(review[key]), review["answer1_id"], review["answer2_id"])
        for review in reviews
        if (review.get("metadata") or {}).get("judge") == request.judge_model
    }


def _ask(client: Any, request: JudgeRequest, call: Call) -> str:
    reply = client.chat.completions.create(
        model=request.judge_model,
        messages=[{"role": "system", "content": call.system}, {"role": "user", "content": call.user}],
        temperature=request.temperature,
        max_tokens=request.max_tokens,
    )
    return reply.choices[0].message.content or ""


def _review(request: JudgeRequest, call: Call, text: str) -> dict[str, Any]:
    score: Any = parse_relative(text) if request.mode == "relative" else parse_pairwise(text)
    return {
        "review_id": uuid.uuid4().hex,
        call.id_key: call.question_id,
        "answer1_id": call.first["answer_id"],
        "answer2_id": call.second["answer_id"],
        "reviewer_id": call.prompt_id,
        "metadata": {
            "judge": request.judge_model, "mode": request.mode, "temperature": request.temperature,
            "answer1_model": call.first["model_id"], "answer2_model": call.second["model_id"],
            "prompt_sha256": hashlib.sha256((call.system + call.user).encode()).hexdigest(),
        },  # fmt: skip
        "text": text,
        "score": score,
    }


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "-" for c in name).strip("-") or "model"
