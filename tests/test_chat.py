import io
import sys

from qlora_cli.chat import Conversation, ReplyStreamer
from qlora_cli.data.formats import FORMATS
from qlora_cli.generate import Generator, Sampling, load_generator
from tests.trained import llama_adapter  # noqa: F401 (fixture)


class Fits:
    """A stand-in for the model's length check: the prompt fits when it has at most `limit` characters."""

    def __init__(self, fmt, limit=10_000):
        self.generator = Generator(loaded=None, prompt_format=fmt)
        self.limit = limit

    def render(self, messages):
        return self.generator.render(messages)

    def fits(self, prompt, max_new_tokens):
        return len(prompt) <= self.limit


def test_guanaco_history_is_one_conversation_line():
    conversation = Conversation(Fits(FORMATS["oasst1"]))
    conversation.turns.append(("Hi", "Hello!"))
    expected = "### Human: Hi ### Assistant: Hello! ### Human: And now? ### Assistant:"
    assert conversation.prompt("And now?", 16) == expected


def test_alpaca_turns_are_separated_by_a_blank_line():
    conversation = Conversation(Fits(FORMATS["alpaca"]))
    conversation.turns.append(("Hi", "Hello!"))
    first = FORMATS["alpaca"].prompt("Hi") + "Hello!"
    assert conversation.prompt("More", 16) == first + "\n\n" + FORMATS["alpaca"].prompt("More")


def test_oldest_turns_are_dropped_when_the_history_does_not_fit():
    conversation = Conversation(Fits(FORMATS["oasst1"], limit=80))
    conversation.turns += [("one", "a" * 30), ("two", "b")]
    prompt = conversation.prompt("three", 16)
    assert prompt == "### Human: two ### Assistant: b ### Human: three ### Assistant:"
    assert conversation.turns == [("two", "b")]


def test_streamer_holds_back_a_possible_stop_string_and_cuts_there():
    out = io.StringIO()
    streamer = ReplyStreamer(tokenizer=None, stop=["### Human:"], out=out)
    streamer.on_finalized_text(" Paris is nice. ##")
    assert out.getvalue() == "Paris is nice."  # " ##" may open " ### Human:"
    streamer.on_finalized_text("# Hum")
    streamer.on_finalized_text("an: next question")
    streamer.on_finalized_text(" more", stream_end=True)
    assert out.getvalue() == "Paris is nice."


def test_streamer_flushes_held_text_at_the_end():
    out = io.StringIO()
    streamer = ReplyStreamer(tokenizer=None, stop=["### Human:"], out=out)
    streamer.on_finalized_text("C# #")
    streamer.on_finalized_text("", stream_end=True)
    assert out.getvalue() == "C# #"


def test_two_turns_through_stdin_with_reset_and_exit(cli, monkeypatch, tmp_path, llama_adapter):
    adapter = llama_adapter
    # Chat in the Guanaco format, whatever the adapter was trained on, to exercise the `### Human:` stop string.
    recipe = tmp_path / "guanaco.yaml"
    recipe.write_text((adapter / "recipe.yaml").read_text().replace("dataset: alpaca", "dataset: oasst1"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi there\nTell me more\n/reset\nTell me more\n/exit\nunread\n"))
    code, out, err = cli(
        "chat", "--adapter", str(adapter), "--config", str(recipe), "--temperature", "0", "--max-new-tokens", "5"
    )
    assert code == 0, err
    assert "/reset" in err  # the banner
    generator = load_generator(None, adapter, recipe)
    assert generator.stop_strings == ["### Human:"]
    sampling = Sampling(max_new_tokens=5)
    first = generator.generate([generator.format("Hi there")], sampling)[0]
    with_history = Conversation(generator)
    with_history.turns.append(("Hi there", first))
    second = generator.generate([with_history.prompt("Tell me more", 5)], sampling)[0]
    # after /reset the second message is answered as a fresh conversation, without the first turn
    after_reset = generator.generate([generator.format("Tell me more")], sampling)[0]
    assert out == f"{first}\n{second}\n(conversation reset)\n{after_reset}\n"  # a reply may hold newlines
