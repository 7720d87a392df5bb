"""`qlora chat`: an interactive loop over `Generator`, keeping the history in the recipe's prompt format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TextIO

from transformers import TextStreamer

from qlora_cli.generate import Generator, Sampling, cut_at_stop

HELP = "/reset forgets the conversation, /exit (or end of input) quits."


@dataclass
class Conversation:
    """Past turns rendered the way the model saw conversations in training.

    Guanaco writes a conversation on one line, `### Human: … ### Assistant: … ### Human: …`, so turns of a
    one-line template are joined by a space; multi-line templates (alpaca) are separated by a blank line.
    """

    generator: Generator
    turns: list[tuple[str, str]] = field(default_factory=list)

    def prompt(self, message: str, max_new_tokens: int) -> str:
        """The history plus the new message; the oldest turns go first when it would not fit the model."""
        while True:
            parts = [self._turn(user, reply) for user, reply in self.turns]
            text = self._separator().join([*parts, self.generator.format(message)])
            if not self.turns or self.generator.fits(text, max_new_tokens):
                return text
            self.turns.pop(0)

    def _turn(self, user: str, reply: str) -> str:
        prompt = self.generator.format(user)
        return prompt + ("" if prompt[-1:].isspace() else " ") + reply

    def _separator(self) -> str:
        return "\n\n" if "\n" in self.generator.format("") else " "


class ReplyStreamer(TextStreamer):
    """Prints a reply as it is generated, holding back text that may turn out to start a stop string."""

    def __init__(self, tokenizer: Any, stop: list[str], out: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stop, self.out = stop, out
        self.pending, self.started, self.stopped = "", False, False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.stopped:
            return
        self.pending += text
        before_stop = cut_at_stop(self.pending, self.stop)
        if len(before_stop) < len(self.pending):
            self._emit(before_stop.rstrip())
            self.stopped = True
            return
        held = 0 if stream_end else self._possible_stop_start()
        ready = self.pending[: len(self.pending) - held].rstrip()  # whitespace waits for what follows it
        self._emit(ready)
        self.pending = self.pending[len(ready) :]

    def _possible_stop_start(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        tail = self.pending
        lengths = (n for s in self.stop for n in range(1, min(len(s), len(tail)) + 1) if s.startswith(tail[-n:]))
        return max(lengths, default=0)

    def _emit(self, text: str) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        self.out.write(text)
        self.out.flush()


def chat(generator: Generator, sampling: Sampling, stdin: TextIO, stdout: TextIO, *, interactive: bool) -> None:
    """Read a message per line, stream the reply; `interactive` adds the `> ` prompt a terminal user needs."""
    conversation = Conversation(generator)
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return
        message = line.strip()
        if not message:
            continue
        if message == "/reset":
            conversation.turns.clear()
            stdout.write("(conversation reset)\n")
            continue
        streamer = ReplyStreamer(generator.loaded.tokenizer, generator.stop_strings, stdout)
        prompt = conversation.prompt(message, sampling.max_new_tokens)
        reply = generator.generate([prompt], sampling, streamer=streamer)[0]
        stdout.write("\n")
        stdout.flush()
        conversation.turns.append((message, reply))
