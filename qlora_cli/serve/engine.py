"""Generation for the server: requests that arrive together are generated together, each row on its own terms.

One worker thread owns the model. It takes the oldest waiting request and every other waiting request for
the same model (up to `max_batch_size`), and generates them as one left-padded batch through
`model.generate`, so the kernels are those `qlora generate` uses. Inside the batch every row keeps its
own sampling (temperature, top_p, seed: `RowSampler`) and its own end (max_tokens, stop strings, EOS, a
client gone: `RowWatcher`). A row's reply is complete the moment the row ends, whatever the rest of its
batch still does, and a batch whose clients all left stops at once.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from qlora_cli.generate import cut_at_stop, possible_stop_start
from qlora_cli.model import LoadedModel
from qlora_cli.serve.models import ServedModel


@dataclass
class Job:
    """One request: what to generate, and where its text goes (`emit` is called from the worker thread)."""

    model: str
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[str | None, str | None], None]  # (text delta, finish reason); reason set once, at the end
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    completion_tokens: int = 0


class Engine:
    def __init__(self, loaded: LoadedModel, models: dict[str, ServedModel], *, max_batch_size: int = 16) -> None:
        self.loaded = loaded
        self.models = models
        self.max_batch_size = max_batch_size
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._worker = threading.Thread(target=self._run, name="qlora-generate", daemon=True)
        self.batch_count = 0  # batches generated, and the largest: /health shows them
        self.largest_batch = 0

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        """After the jobs already waiting; the server stops taking new ones first."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._worker.join()

    def submit(self, job: Job) -> None:
        with self._wake:
            self._waiting.append(job)
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._stopping:
                    self._wake.wait()
                if not self._waiting:
                    return
                batch = self._next_batch()
            try:
                self._generate(batch)
            except Exception as exc:  # never leave a client waiting; the error reaches it as the finish reason
                for job in batch:
                    job.emit(None, f"error: {type(exc).__name__}: {exc}")

    def _next_batch(self) -> list[Job]:
        """The oldest waiting job and the next ones for the same model, in arrival order."""
        model = self._waiting[0].model
        batch = [job for job in self._waiting if job.model == model and not job.cancelled.is_set()]
        batch = batch[: self.max_batch_size]
        taken = {id(job) for job in batch}  # by identity: two requests may be equal field for field
        self._waiting = deque(job for job in self._waiting if id(job) not in taken and not job.cancelled.is_set())
        return batch

    @torch.no_grad()
    def _generate(self, jobs: list[Job]) -> None:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        if not jobs:
            return
        self.batch_count += 1
        self.largest_batch = max(self.largest_batch, len(jobs))
        served = self.models[jobs[0].model]
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        if served.adapter is not None:
            model.set_adapter(served.adapter)
        batch = self.loaded.batch([job.prompt_ids for job in jobs])
        watcher = RowWatcher(jobs, tokenizer, batch["input_ids"].shape[1], served.stop)
        config = GenerationConfig(
            max_new_tokens=max(job.max_tokens for job in jobs),
            do_sample=False,  # RowSampler has already chosen each row's token
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model.generate(
            **batch,
            generation_config=config,
            logits_processor=LogitsProcessorList([RowSampler(jobs)]),
            stopping_criteria=StoppingCriteriaList([watcher]),
        )
        watcher.finish_all("length")


class RowSampler:
    """Per-row temperature, top_p and seed inside one greedy `generate`: the chosen token is the only one left."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self.generators = [_generator(job.seed) if job.temperature > 0 else None for job in jobs]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row, (job, generator) in enumerate(zip(self.jobs, self.generators)):
            if generator is None:
                continue  # temperature 0: greedy takes the largest logit as it is
            probs = torch.softmax(scores[row].float() / job.temperature, dim=-1)
            if job.top_p < 1.0:
                ordered, order = probs.sort(descending=True)
                outside = ordered.cumsum(0) - ordered > job.top_p  # keep the smallest set reaching top_p
                probs[order[outside]] = 0.0
            token = torch.multinomial(probs.cpu(), 1, generator=generator).item()
            scores[row] = torch.where(torch.arange(scores.shape[1], device=scores.device) == token, 0.0, -float("inf"))
        return scores


class RowWatcher:
    """A stopping criterion that streams each row's new text and ends a row on its own stop conditions."""

    def __init__(self, jobs: list[Job], tokenizer: Any, prompt_length: int, stop: tuple[str, ...]) -> None:
        self.jobs, self.tokenizer, self.prompt_length = jobs, tokenizer, prompt_length
        self.stops = [tuple(dict.fromkeys((*stop, *job.stop))) for job in jobs]
        self.sent = ["" for _ in jobs]  # text already emitted, stripped of leading whitespace
        self.done = [False for _ in jobs]

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        eos = self.tokenizer.eos_token_id
        for row, job in enumerate(self.jobs):
            if self.done[row]:
                continue
            if job.cancelled.is_set():
                self._finish(row, None)
                continue
            tokens = input_ids[row, self.prompt_length :].tolist()
            ended = bool(tokens) and tokens[-1] == eos
            job.completion_tokens = len(tokens) - ended
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
            before_stop = cut_at_stop(text, self.stops[row])
            if len(before_stop) < len(text):
                self._emit(row, before_stop.rstrip())
                self._finish(row, "stop")
            elif ended:
                self._emit(row, text.rstrip())
                self._finish(row, "stop")
            elif job.completion_tokens >= job.max_tokens:
                self._emit(row, text.rstrip())
                self._finish(row, "length")
            else:  # hold back what may open a stop string, a partly decoded character, trailing whitespace
                held = possible_stop_start(text, self.stops[row])
                ready = text[: len(text) - held].rstrip().removesuffix("\ufffd")
                self._emit(row, ready)
        return torch.tensor(self.done, device=input_ids.device)

    def finish_all(self, reason: str) -> None:
        """Rows `generate` ended for its own reasons (max_new_tokens of the batch, EOS it saw first)."""
        for row, job in enumerate(self.jobs):
            if not self.done[row]:
                self._finish(row, None if job.cancelled.is_set() else reason)

    def _emit(self, row: int, text: str) -> None:
        if len(text) > len(self.sent[row]) and text.startswith(self.sent[row]):
            self.jobs[row].emit(text[len(self.sent[row]) :], None)
            self.sent[row] = text

    def _finish(self, row: int, reason: str | None) -> None:
        self.done[row] = True
        self.jobs[row].emit(None, reason or "cancelled")



def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
