"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/chat/completions, /v1/completions, /health.

Requests are checked here, completely, before they reach the engine; every refusal is OpenAI's error JSON
with a 4xx status and the offending field in `param`, so clients (the `openai` package, evaluation tools,
chat UIs) report it as they would for OpenAI's own API.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from typing import Any, AsyncIterator, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from qlora_cli.data.formats import SkipRecord
from qlora_cli.model import LoadedModel
from qlora_cli.serve.engine import Engine, Job
from qlora_cli.serve.models import Limits, ServedModel


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(self.status, "invalid_request_error")
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


# --------------------------------------------------------------------------- request schemas (OpenAI's)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields this server has no use for (user, ...)

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[_TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)  # the newer name of max_tokens


class CompletionRequest(_Request):
    prompt: Union[str, list[str]]
    max_tokens: int | None = Field(16, gt=0)  # OpenAI's default for completions


# --------------------------------------------------------------------------- the app


def create_app(engine: Engine, served: dict[str, ServedModel], *, api_key: str | None, limits: Limits) -> FastAPI:
    app = FastAPI(title="qlora serve", lifespan=_lifespan(engine))
    created = int(time.time())
    active = _Counter()
    loaded = engine.loaded

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.middleware("http")
    async def _guard(request: Request, call_next: Any) -> Any:
        if request.url.path.startswith("/v1/"):
            if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
                return ApiError(401, "Incorrect API key provided", code="invalid_api_key").response()
            length = request.headers.get("content-length")
            if length is not None and int(length) > limits.max_body_bytes:
                return ApiError(413, f"request body over {limits.max_body_bytes} bytes", code="body_too_large").response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(served), "compute_dtype": loaded.compute.name,
                "active_requests": active.value, "batches": engine.batch_count,
                "largest_batch": engine.largest_batch}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "qlora"} for name in served],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        model = _served(served, body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if messages[-1]["role"] != "user":
            raise ApiError(400, "the last message must be the user's: the reply is generated after it", "messages")
        try:
            prompt = model.generator.render(messages)
        except (SkipRecord, ValueError) as exc:
            raise ApiError(400, f"cannot render the messages in this model's prompt format: {exc}", "messages")
        job = _job(body, model, loaded, prompt, "messages", limits, body.max_completion_tokens or body.max_tokens)
        return await _respond(engine, job, body, request, active, limits, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        model = _served(served, body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "this server completes one prompt per request", "prompt")
        job = _job(body, model, loaded, prompts[0], "prompt", limits, body.max_tokens)
        return await _respond(engine, job, body, request, active, limits, chat=False)

    return app


def _lifespan(engine: Engine) -> Any:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:  # uvicorn has let in-flight requests finish (SIGINT/SIGTERM), then re-raises the signal
            engine.stop()
            print("Stopped: every request in flight was answered", file=sys.stderr)

    return lifespan


class _Counter:
    def __init__(self) -> None:
        self.value = 0


def _served(served: dict[str, ServedModel], name: str) -> ServedModel:
    if name not in served:
        raise ApiError(404, f"The model `{name}` does not exist; this server has {', '.join(served)}", "model",
                       "model_not_found")  # fmt: skip
    return served[name]


def _job(
    body: _Request, model: ServedModel, loaded: LoadedModel, prompt: str, field: str, limits: Limits,
    max_tokens: int | None,
) -> Job:  # fmt: skip
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    prompt_ids = loaded.prompt_ids([prompt])[0]
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    room = context - len(prompt_ids) if context else limits.max_tokens
    if room <= 0:
        raise ApiError(400, f"the {field} are {len(prompt_ids)} tokens, longer than the model's context of "
                       f"{context} tokens", field, "context_length_exceeded")  # fmt: skip
    if max_tokens is None:
        max_tokens = min(limits.max_tokens, room)
    elif max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens is {max_tokens}, over this server's limit of {limits.max_tokens}",
                       "max_tokens")  # fmt: skip
    elif max_tokens > room:
        raise ApiError(400, f"the model's context is {context} tokens, but {len(prompt_ids)} in the {field} plus "
                       f"max_tokens {max_tokens} exceed it", "max_tokens", "context_length_exceeded")  # fmt: skip
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return Job(model.name, prompt_ids, max_tokens, emit=lambda text, reason: None, temperature=body.temperature,
               top_p=body.top_p, stop=stop, seed=body.seed)  # fmt: skip


async def _respond(
    engine: Engine, job: Job, body: _Request, request: Request, active: _Counter, limits: Limits, *, chat: bool
) -> Any:
    if active.value >= limits.max_concurrent:
        raise ApiError(429, f"{active.value} requests are in progress, this server's limit: try again shortly",
                       code="too_many_requests")  # fmt: skip
    events: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    job.emit = lambda text, reason: loop.call_soon_threadsafe(events.put_nowait, (text, reason))
    active.value += 1
    engine.submit(job)
    reply = _Reply(job, body, chat=chat)
    if body.stream:
        return StreamingResponse(_stream(reply, events, active), media_type="text/event-stream")
    try:
        while True:
            try:
                text, reason = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return None
                continue
            if text:
                reply.text += text
            if reason is not None:
                break
    finally:
        active.value -= 1
    if reason.startswith("error"):
        raise ApiError(500, f"generation failed: {reason.removeprefix('error: ')}", code="generation_failed")
    return reply.final(reason)


async def _stream(reply: _Reply, events: asyncio.Queue, active: _Counter) -> AsyncIterator[str]:
    """Server-sent events; a client that goes away cancels this generator, and with it the row."""
    try:
        yield _sse(reply.chunk(role=True))
        while True:
            text, reason = await events.get()
            if text:
                yield _sse(reply.chunk(text=text))
            if reason is not None:
                yield _sse(reply.chunk(finish=reason if not reason.startswith("error") else "error"))
                if (reply.body.stream_options or {}).get("include_usage"):
                    yield _sse({**reply.chunk(), "choices": [], "usage": reply.usage()})
                yield "data: [DONE]\n\n"
                return
    finally:
        reply.job.cancelled.set()  # a no-op once the row has ended
        active.value -= 1


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Reply:
    """The response objects of one request, in OpenAI's chat or completion shape."""

    def __init__(self, job: Job, body: _Request, *, chat: bool) -> None:
        self.job, self.body, self.chat = job, body, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.text = ""

    def usage(self) -> dict[str, int]:
        prompt, completion = len(self.job.prompt_ids), self.job.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def final(self, reason: str) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text}, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": self.text, "logprobs": None, "finish_reason": reason}
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [choice], "usage": self.usage()}

    def chunk(self, *, text: str | None = None, role: bool = False, finish: str | None = None) -> dict[str, Any]:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.job.model}


def _validation_error(exc: RequestValidationError) -> ApiError:
    """The first problem, with the field path clients show (`messages.0.content`)."""
    error = exc.errors()[0]
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {error.get('ctx', {}).get('error', '')}".rstrip(": "))
    field = ".".join(location) or None
    return ApiError(400, f"{field}: {error.get('msg')}" if field else str(error.get("msg")), field)
