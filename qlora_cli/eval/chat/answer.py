"""Answers to a benchmark's questions, from a trained model here or from any OpenAI-compatible endpoint.

The answers file is JSON Lines, one `{question_id, answer_id, model_id, text, question, category, metadata}`
per question, appended as answers arrive: a second run with the same output continues where the first
stopped, under the key that file uses (`message_id` in the paper's OpenAssistant answers, `records.py`). The
paper sampled with top-p 0.9 and temperature 0.7, after its system text (`PAPER_SYSTEM`).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from qlora_cli.errors import QloraError
from qlora_cli.eval.chat.benchmarks import PAPER_SYSTEM, Question, load_questions
from qlora_cli.eval.chat.records import read_keyed


_NEXT_CONVERSATION = "A chat between a curious human and an artificial intelligence"
_TEXT_FIELDS = ("generation_truncated", "generation", "text")  # the paper's answers, then ours


@dataclass(frozen=True)
class AnswerRequest:
    benchmark: str  # vicuna, oa or a questions file
    output: Path
    adapter: Path | None = None
    model: str | None = None  # a local model, or the endpoint's model name
    config: Path | None = None
    endpoint: str | None = None  # an OpenAI-compatible base URL (…/v1)
    api_key_env: str = "OPENAI_API_KEY"
    system: str | None = PAPER_SYSTEM
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 512
    batch_size: int = 8
    seed: int = 0
    limit: int | None = None
    gguf_file: str | None = None  # a GGUF file in the local model's folder or hub repo
    compute_dtype: str | None = None  # --compute-dtype of a local model; None: as trained (auto for a plain model)


def answer(request: AnswerRequest) -> Path:
    if request.endpoint and (request.gguf_file or request.compute_dtype):
        option = "--gguf-file" if request.gguf_file else "--compute-dtype"
        raise QloraError(f"{option} is for a model loaded here: an --endpoint serves its own")
    questions = load_questions(request.benchmark, request.limit)
    key, answered = read_keyed_answers(request.output) if request.output.exists() else (None, [])
    key = key or questions[0].id_key
    done = {str(record[key]) for record in answered}
    todo = [q for q in questions if str(q.question_id) not in done]
    if not todo:
        print(f"{request.output}: all {len(questions)} questions already answered", file=sys.stderr)
        return request.output
    request.output.parent.mkdir(parents=True, exist_ok=True)
    source = _endpoint_answers(request, todo) if request.endpoint else _local_answers(request, todo)
    from tqdm.auto import tqdm

    with request.output.open("a", encoding="utf-8") as out, tqdm(total=len(todo), desc="Answering") as bar:
        for reply in source:
            out.write(json.dumps(_record(request, key, reply), ensure_ascii=False) + "\n")
            out.flush()
            bar.update()
    return request.output


def read_answers(path: Path) -> list[dict[str, Any]]:
    """The answers without their key, for readers that need only answer ids (a reference's)."""
    return read_keyed_answers(path)[1]


def read_keyed_answers(path: Path) -> tuple[str | None, list[dict[str, Any]]]:
    """The file's id key (`records.read_keyed`) and its answers: ours, or the paper's (`generation` instead of
    `text`, ids made from the text)."""
    key, rows = read_keyed(path, "answers file")
    records = []
    for number, record in rows:
        # The paper's files hold some empty generations (16 of 953 in 7b-flan-oa-…): an empty answer, not a bad record.
        text = next((record[field] for field in _TEXT_FIELDS if isinstance(record.get(field), str)), None)
        if text is None:
            raise QloraError(f"{path}:{number}: not an answer record (no {', '.join(_TEXT_FIELDS)} text)")
        # The paper's generations run on past the answer into a new conversation; its judge cut them there.
        text = text.split(_NEXT_CONVERSATION)[0] if "generation" in record else text
        records.append({
            **record,
            "text": text,
            "answer_id": record.get("answer_id") or uuid.uuid5(uuid.NAMESPACE_URL, text).hex,
            "model_id": record.get("model_id") or path.stem,
        })  # fmt: skip
    return key, records


class Reply(NamedTuple):
    model_id: str
    question: Question
    text: str
    compute_dtype: str | None  # what a model loaded here computed in; None from an endpoint


def _record(request: AnswerRequest, key: str, reply: Reply) -> dict[str, Any]:
    local = {"compute_dtype": reply.compute_dtype} if reply.compute_dtype else {}
    return {
        key: reply.question.question_id,
        "answer_id": uuid.uuid4().hex,
        "model_id": reply.model_id,
        "text": reply.text,
        "question": reply.question.text,
        "category": reply.question.category,
        "metadata": {
            "temperature": request.temperature, "top_p": request.top_p, "max_tokens": request.max_tokens,
            "system": request.system, "seed": request.seed, "source": request.endpoint or "local", **local,
        },  # fmt: skip
    }


def _local_answers(request: AnswerRequest, todo: list[Question]) -> Iterator[Reply]:
    from transformers import set_seed

    from qlora_cli.generate import Sampling, load_generator
    from qlora_cli.model import chosen_model

    model = chosen_model(request.model, request.gguf_file)
    generator = load_generator(model, request.adapter, request.config, compute_dtype=request.compute_dtype)
    model_id, compute = Path(request.adapter).name if request.adapter else str(request.model), generator.loaded.compute
    sampling = Sampling(request.max_tokens, request.temperature, request.top_p, request.batch_size)
    set_seed(request.seed)
    for start in range(0, len(todo), request.batch_size):
        batch = todo[start : start + request.batch_size]
        prompts = [generator.render(q.messages(request.system)) for q in batch]
        yield from (Reply(model_id, q, text, compute.name) for q, text in zip(batch, generator.generate(prompts, sampling)))


def _endpoint_answers(request: AnswerRequest, todo: list[Question]) -> Iterator[Reply]:
    if not request.model:
        raise QloraError("--endpoint needs --model: the model name the endpoint serves")
    client = openai_client(request.endpoint, request.api_key_env)

    def ask(question: Question) -> Reply:
        reply = client.chat.completions.create(
            model=request.model, messages=question.messages(request.system), temperature=request.temperature,
            top_p=request.top_p, max_tokens=request.max_tokens, seed=request.seed,
        )  # fmt: skip
        return Reply(request.model, question, reply.choices[0].message.content or "", None)

    with ThreadPoolExecutor(request.batch_size) as pool:
        yield from pool.map(ask, todo)


def openai_client(endpoint: str, api_key_env: str, max_retries: int = 8) -> Any:
    """Keys come from the environment only; the client retries 429 and 5xx with exponential backoff."""
    try:
        import openai
    except ImportError:
        raise QloraError("endpoints are called with the openai package: pip install openai") from None
    return openai.OpenAI(base_url=endpoint, api_key=os.environ.get(api_key_env) or "none", max_retries=max_retries,
                         timeout=600)  # fmt: skip
