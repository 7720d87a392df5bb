"""`qlora chat`: an interactive loop over `Generator`, keeping the history in the recipe's prompt format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TextIO

from transformers import TextStreamer

from qlora_cli.generate import Generator, Sampling, cut_at_stop, possible_stop_start

HELP = "/reset forgets the conversation, /exit (or end of input) quits."


@dataclass
class Conversation:
    """Past turns, rendered the way the model saw conversations in training (`Generator.render`)."""

    generator: Generator
    turns: list[tuple[str, str]] = field(default_factory=list)

    def prompt(self, message: str, max_new_tokens: int) -> str:
        """The history plus the new message; the oldest turns go first when it would not fit the model."""
        while True:
            messages = [
                {"role": role, "content": text}
                for user, reply in self.turns
                for role, text in (("user", user), ("assistant", reply))
            ]
            text = self.generator.render([*messages, {"role": "user", "content": message}])
            if not self.turns or self.generator.fits(text, max_new_tokens):
                return text
            self.turns.pop(0)


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
        held = 0 if stream_end else possible_stop_start(self.pending, self.stop)
        ready = self.pending[: len(self.pending) - held].rstrip()  # whitespace waits for what follows it
        self._emit(ready)
        self.pending = self.pending[len(ready) :]


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
