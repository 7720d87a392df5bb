"""The dataset registry: each entry turns one record of its native schema into (source, target) pairs.

Loss is computed on the target only (unless `data.train_on_source`), so the split between source and
target is the whole point of a format. The paper's code (artidoro/qlora, `format_dataset`) is the
reference for the eight instruction datasets. Formats with preferences also give `Pair`s (a prompt, a chosen
and a rejected reply: DPO, ORPO, and KTO unpaired) or `Judged` replies (KTO).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Callable, NamedTuple


class Example(NamedTuple):
    source: str
    target: str


class Pair(NamedTuple):
    prompt: str
    chosen: str
    rejected: str


class Judged(NamedTuple):
    prompt: str
    completion: str
    desirable: bool


class SkipRecord(Exception):
    """This record cannot be formatted (a missing field, an empty target); it is counted and skipped."""


def checked_pair(prompt: str, chosen: str, rejected: str) -> Pair:
    """A pair with nothing to prefer (an empty reply, the same reply twice) teaches nothing: skipped, counted."""
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply.strip():
            raise SkipRecord(f"empty {name} reply")
    if chosen.strip() == rejected.strip():
        raise SkipRecord("chosen and rejected replies are identical")
    return Pair(prompt, chosen, rejected)


@dataclass(frozen=True)
class DatasetFormat:
    name: str
    description: str
    # One record -> one Example, or a list when a record holds several (task instances, chat turns); None: the
    # format holds no supervised target (KTO's labelled replies).
    to_example: Callable[[dict[str, Any]], Example | list[Example]] | None
    prompt: Callable[[str], str]  # wraps a user's raw prompt the way training sources looked
    hub_id: str | None = None
    hub_config: str | None = None
    hub_data_files: str | None = None
    eval_split: str | None = None  # the hub split used for evaluation, when the dataset has one
    bind_tokenizer: Callable[[Any], DatasetFormat] | None = None  # for formats rendered by a chat template
    conversation: Callable[[list[dict[str, str]]], str] | None = None  # chat formats: the template renders it
    unused: Callable[[dict[str, Any]], str | None] | None = None  # a part of a record no example trains on
    to_pair: Callable[[dict[str, Any]], Pair] | None = None  # a chosen and a rejected reply (dpo, orpo, kto)
    to_judged: Callable[[dict[str, Any]], Judged] | None = None  # one reply labelled desirable or not (kto)

    @property
    def methods(self) -> tuple[str, ...]:
        """The training methods this format has data for; KTO reads a pair as two labelled replies."""
        return tuple(
            method
            for method, served in (
                ("sft", self.to_example),
                ("dpo", self.to_pair),
                ("orpo", self.to_pair),
                ("kto", self.to_pair or self.to_judged),
            )
            if served is not None
        )

    def judged(self, record: dict[str, Any]) -> list[Judged]:
        """KTO's rows: the record's labelled reply, or a pair's chosen (desirable) and rejected (undesirable)."""
        if self.to_judged is not None:
            return [self.to_judged(record)]
        pair = self.to_pair(record)  # type: ignore[misc]
        return [Judged(pair.prompt, pair.chosen, True), Judged(pair.prompt, pair.rejected, False)]

    def examples(self, record: dict[str, Any]) -> list[Example]:
        if self.to_example is None:
            raise SkipRecord(f"{self.name} has no supervised target")
        made = self.to_example(record)
        made = [made] if isinstance(made, Example) else made
        if not made:
            raise SkipRecord("no examples in record")
        return made

    def render_conversation(self, messages: list[dict[str, str]]) -> str:
        """`{role, content}` messages ending in a user turn, laid out as training laid out conversations."""
        if self.conversation is not None:
            return self.conversation(messages)
        return template_conversation(self.prompt, messages)

    def for_tokenizer(self, tokenizer: Any) -> DatasetFormat:
        """The format as used with `tokenizer`: chat formats render with its template, the rest ignore it."""
        return self.bind_tokenizer(tokenizer) if self.bind_tokenizer else self


def template_conversation(prompt: Callable[[str], str], messages: list[dict[str, str]]) -> str:
    """Each user turn wrapped in `prompt`, each reply after it; system text first.

    Guanaco writes a conversation on one line, `### Human: … ### Assistant: … ### Human: …`, so turns of a
    one-line template are joined by a space; multi-line templates (alpaca) are separated by a blank line.
    """
    separator = "\n\n" if "\n" in prompt("") else " "
    parts: list[str] = []
    answering = False  # the last part is a question waiting for its reply
    for message in messages:
        if message["role"] == "assistant" and answering:
            parts[-1] += ("" if parts[-1][-1:].isspace() else " ") + message["content"]
        else:  # a question; system text, or a reply before any question, as it is
            parts.append(prompt(message["content"]) if message["role"] == "user" else message["content"])
        answering = message["role"] == "user"
    return separator.join(parts)


def field(record: dict[str, Any], name: str) -> str:
    value = record.get(name)
    if value is None:
        raise SkipRecord(f"missing field {name!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # CSV readers turn numeric answers into numbers
    if not isinstance(value, str):
        raise SkipRecord(f"field {name!r} is {type(value).__name__}, not text")
    return value


def non_empty(target: str) -> str:
    if not target.strip():
        raise SkipRecord("empty target")
    return target


def items(record: dict[str, Any], name: str) -> list[dict[str, Any]]:
    value = record.get(name)
    if isinstance(value, dict):  # a datasets Sequence of structs arrives as a dict of lists
        value = [dict(zip(value, row)) for row in zip(*value.values())]
    if not isinstance(value, list) or not value:
        raise SkipRecord(f"missing field {name!r}")
    if not all(isinstance(item, dict) for item in value):
        raise SkipRecord(f"field {name!r} is not a list of objects")
    return value


def _as_is(text: str) -> str:
    return text


# --------------------------------------------------------------------------- alpaca

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
    return Example(alpaca_source(instruction, str(input_text)), non_empty(field(record, "output")))


# --------------------------------------------------------------------------- generic pairs

END_OF_TEXT = "<|endoftext|>"  # GPT-3 finetuning files end completions with it; we append the tokenizer's EOS


def _prompt_completion(record: dict[str, Any]) -> Example:
    completion = field(record, "completion").removesuffix(END_OF_TEXT)
    return Example(field(record, "prompt"), non_empty(completion))


def _input_output(record: dict[str, Any]) -> Example:
    return Example(field(record, "input"), non_empty(field(record, "output")))


# --------------------------------------------------------------------------- conversations trained whole


def guanaco_prompt(text: str) -> str:
    return f"### Human: {text} ### Assistant:"


def _oasst1(record: dict[str, Any]) -> Example:
    """The Guanaco text is trained whole; a Guanaco prompt/reply pair (the paper's eval files) is joined."""
    if "input" in record and "output" in record:
        text = f"{field(record, 'input')} {non_empty(field(record, 'output'))}"
    else:
        text = field(record, "text")
    return Example("", non_empty(text))


def hh_rlhf_prompt(text: str) -> str:
    return f"\n\nHuman: {text}\n\nAssistant:"


def _hh_rlhf(record: dict[str, Any]) -> Example:
    return Example("", non_empty(field(record, "chosen")))


HH_ASSISTANT = "\n\nAssistant:"


def _hh_rlhf_pair(record: dict[str, Any]) -> Pair:
    """The transcripts share every turn but the last reply: the prompt ends with the last shared `Assistant:`."""
    chosen, rejected = field(record, "chosen"), field(record, "rejected")
    shared = len(os.path.commonprefix([chosen, rejected]))
    end = chosen.rfind(HH_ASSISTANT, 0, shared)  # the marker lies wholly inside the shared text
    if end < 0:
        raise SkipRecord("chosen and rejected share no conversation ending in 'Assistant:'")
    end += len(HH_ASSISTANT)
    replies = chosen[end:], rejected[end:]
    if any("\n\nHuman:" in reply for reply in replies):
        raise SkipRecord("chosen and rejected differ before their last reply")
    return checked_pair(chosen[:end], *replies)


# --------------------------------------------------------------------------- generic preferences


def _preference_pair(record: dict[str, Any]) -> Pair:
    return checked_pair(field(record, "prompt"), field(record, "chosen"), field(record, "rejected"))


def _preference_chosen(record: dict[str, Any]) -> Example:
    return Example(field(record, "prompt"), non_empty(field(record, "chosen")))


def _kto_judged(record: dict[str, Any]) -> Judged:
    label = record.get("label")
    if not isinstance(label, bool) and label not in (0, 1):
        raise SkipRecord(f"label {label!r} is not true or false")
    completion = field(record, "completion")
    if not completion.strip():
        raise SkipRecord("empty completion")
    return Judged(field(record, "prompt"), completion, bool(label))


# --------------------------------------------------------------------------- task collections


def self_instruct_prompt(text: str) -> str:
    return f"{text}\nOutput:"


def _self_instruct(record: dict[str, Any]) -> Example | list[Example]:
    """The hub's finetuning file is {prompt, completion}; seed tasks are {instruction, instances}.

    Seed-task instances get the first of Self-Instruct's own finetuning templates.
    """
    if "instances" not in record:
        return _prompt_completion(record)
    instruction = field(record, "instruction").strip()
    examples = []
    for instance in items(record, "instances"):
        input_text = field(instance, "input").strip() if instance.get("input") else ""
        source = f"{instruction}\nInput: {input_text}\nOutput:" if input_text else self_instruct_prompt(instruction)
        examples.append(Example(source, " " + non_empty(field(instance, "output")).strip()))
    return examples


def _unnatural_instructions(record: dict[str, Any]) -> list[Example]:
    """Core instances only, as the paper's code does (reformulations are left out)."""
    return [
        Example(field(instance, "instruction_with_input"), non_empty(field(instance, "output")))
        for instance in items(record, "instances")
    ]


FLAN_COT_PROMPT = "Question: {question} Think carefully first, then make a decision:"  # a FLAN v2 CoT template


def _flan_v2(record: dict[str, Any]) -> Example:
    """Mixture rows are {inputs, targets}; the T0 submix sample {prompt, completion}; CoT sources are raw."""
    if "inputs" in record or "targets" in record:
        return Example(field(record, "inputs"), non_empty(field(record, "targets")))
    if "chain_of_thought" in record:
        source = FLAN_COT_PROMPT.format(question=field(record, "question"))
        reasoning = non_empty(field(record, "chain_of_thought"))
        return Example(source, f"{reasoning} So the answer is {field(record, 'answer')}.")
    return _prompt_completion(record)


def _chip2(record: dict[str, Any]) -> Example:
    text = field(record, "text")
    human, bot, rest = text.partition("\n<bot>: ")
    if not bot:
        raise SkipRecord("no '<bot>:' turn")
    return Example(human.replace("<human>: ", ""), non_empty(rest.split("\n<bot>: ")[0]))


# --------------------------------------------------------------------------- chat messages

# Base models have no chat template: conversations are then laid out the way Guanaco was trained.
GUANACO_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %} {% endif %}"
    "{% if m['role'] == 'user' %}### Human: {% elif m['role'] == 'assistant' %}### Assistant: {% endif %}"
    "{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %} {% endif %}### Assistant:{% endif %}"
)
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatRenderer:
    """Renders `messages` with the tokenizer's chat template; one example per assistant turn.

    The source is the conversation up to that turn (plus the generation prompt), the target is what the
    template adds for the reply; a BOS the tokenizer adds and the EOS are left to tokenization, which adds them.
    """

    tokenizer: Any

    def render(self, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
        template = None if getattr(self.tokenizer, "chat_template", None) else GUANACO_CHAT_TEMPLATE
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as exc:  # jinja raises TemplateError for conversations the template rejects
            raise SkipRecord(f"chat template: {exc}") from None

    def to_examples(self, record: dict[str, Any]) -> list[Example]:
        messages = [self._message(m) for m in items(record, "messages")]
        examples = []
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            non_empty(message["content"])
            examples.append(self._reply(messages[: turn + 1]))
        if not examples:
            raise SkipRecord("no assistant turn")
        return examples

    def to_pair(self, record: dict[str, Any]) -> Pair:
        """{chosen, rejected} conversations differing in their last (assistant) turn, or TRL's conversational
        {prompt, chosen, rejected}: the shared turns, then one reply each."""
        shared = [self._message(m) for m in items(record, "prompt")] if "prompt" in record else []
        chosen, rejected = (
            self._reply(shared + [self._message(m) for m in items(record, name)]) for name in ("chosen", "rejected")
        )
        if chosen.source != rejected.source:
            raise SkipRecord("chosen and rejected conversations differ before their last reply")
        return checked_pair(chosen.source, chosen.target, rejected.target)

    def chosen_examples(self, record: dict[str, Any]) -> list[Example]:
        """Supervised training on a pair file: the chosen conversation's replies."""
        shared = record.get("prompt") if isinstance(record.get("prompt"), list) else []
        return self.to_examples({"messages": shared + items(record, "chosen")})

    def _reply(self, messages: list[dict[str, str]]) -> Example:
        """The conversation's last turn (an assistant reply) as the target, what comes before as the source."""
        if messages[-1]["role"] != "assistant":
            raise SkipRecord("conversation does not end with an assistant reply")
        prompt = self.render(messages[:-1], generation_prompt=True)
        full = self.render(messages, generation_prompt=False)
        if not full.startswith(prompt):
            raise SkipRecord("chat template renders the reply in a way that changes the prompt before it")
        return Example(self._strip_bos(prompt), self._strip_eos(full[len(prompt) :]))

    def prompt(self, text: str) -> str:
        return self.conversation([{"role": "user", "content": text}])

    def conversation(self, messages: list[dict[str, str]]) -> str:
        return self._strip_bos(self.render(messages, generation_prompt=True))

    @staticmethod
    def _message(message: dict[str, Any]) -> dict[str, str]:
        role = message.get("role")
        if role not in ROLES:
            raise SkipRecord(f"message role {role!r} is not one of {', '.join(ROLES)}")
        return {"role": role, "content": field(message, "content")}

    def _strip_bos(self, text: str) -> str:
        """A template's own BOS, where tokenization adds it again; kept where the tokenizer adds none (SmolLM2's
        `bos_token` is `<|im_start|>`, the opening of every ChatML turn)."""
        from qlora_cli.model_kind import bos_prefix  # torch: not at import, `qlora data formats` needs none

        bos = self.tokenizer.bos_token
        return text.removeprefix(bos) if bos and bos_prefix(self.tokenizer) else text

    def _strip_eos(self, text: str) -> str:
        """Also the whitespace after it (ChatML's newline): nothing after EOS is ever generated."""
        eos, reply = self.tokenizer.eos_token, text.rstrip()
        return reply.removesuffix(eos) if eos and reply.endswith(eos) else text


def _trailing_question(record: dict[str, Any]) -> str | None:
    """A conversation that ends with the user's turn trains on its replies; that last turn has none."""
    try:
        messages = items(record, "messages")
    except SkipRecord:
        return None
    return "trailing user turn without a reply (that turn dropped)" if messages[-1].get("role") == "user" else None


def _chat_format(tokenizer: Any) -> DatasetFormat:
    renderer = ChatRenderer(tokenizer)
    return replace(
        FORMATS["messages"], to_example=renderer.to_examples, unused=_trailing_question, **_rendered_by(renderer)
    )


def _chat_pairs_format(tokenizer: Any) -> DatasetFormat:
    renderer = ChatRenderer(tokenizer)
    return replace(
        FORMATS["chat-pairs"], to_example=renderer.chosen_examples, to_pair=renderer.to_pair, **_rendered_by(renderer)
    )


def _rendered_by(renderer: ChatRenderer) -> dict[str, Any]:
    """What a chat format bound to a tokenizer takes from its renderer: prompts and conversations as trained."""
    return {"prompt": renderer.prompt, "conversation": renderer.conversation, "bind_tokenizer": None}


def _needs_tokenizer(_: Any) -> Any:
    raise RuntimeError("the messages format renders with a chat template: use FORMATS[...].for_tokenizer(tokenizer)")


# --------------------------------------------------------------------------- registry

FORMATS: dict[str, DatasetFormat] = {
    fmt.name: fmt
    for fmt in [
        DatasetFormat(
            "alpaca",
            "{instruction, input, output} in the Stanford Alpaca prompt",
            _alpaca,
            prompt=alpaca_source,
            hub_id="tatsu-lab/alpaca",
        ),
        DatasetFormat(
            "oasst1",
            "OASST1 as Guanaco text {text} ('### Human: ... ### Assistant: ...'), trained whole",
            _oasst1,
            prompt=guanaco_prompt,
            hub_id="timdettmers/openassistant-guanaco",
            eval_split="test",
        ),
        DatasetFormat(
            "hh-rlhf",
            "Anthropic HH-RLHF {chosen, rejected}: sft trains the chosen transcript whole; dpo/orpo/kto split off "
            "the shared conversation as the prompt",
            _hh_rlhf,
            prompt=hh_rlhf_prompt,
            hub_id="Anthropic/hh-rlhf",
            eval_split="test",
            to_pair=_hh_rlhf_pair,
        ),
        DatasetFormat(
            "self-instruct",
            "Self-Instruct {prompt, completion}, or seed tasks {instruction, instances: [{input, output}]}",
            _self_instruct,
            prompt=self_instruct_prompt,
            hub_id="yizhongw/self_instruct",
            hub_config="self_instruct",
        ),
        DatasetFormat(
            "unnatural-instructions",
            "Unnatural Instructions {instruction, instances: [{instruction_with_input, output}]}",
            _unnatural_instructions,
            prompt=_as_is,
            hub_id="mrm8488/unnatural-instructions-core",
        ),
        DatasetFormat(
            "flan-v2",
            "FLAN v2 {inputs, targets} (SirNeural/flan_v2); also {prompt, completion} and CoT sources",
            _flan_v2,
            prompt=_as_is,
            hub_id="SirNeural/flan_v2",
        ),
        DatasetFormat(
            "chip2",
            "OIG unified_chip2 {text: '<human>: ...\\n<bot>: ...'}",
            _chip2,
            prompt=_as_is,
            hub_id="laion/OIG",
            hub_data_files="unified_chip2.jsonl",
        ),
        DatasetFormat(
            "longform",
            "LongForm {input, output}",
            _input_output,
            prompt=_as_is,
            hub_id="akoksal/LongForm",
            eval_split="validation",
        ),
        DatasetFormat(
            "input-output",
            "generic {input, output}",
            _input_output,
            prompt=_as_is,
        ),
        DatasetFormat(
            "prompt-completion",
            "generic {prompt, completion}; a trailing <|endoftext|> is dropped",
            _prompt_completion,
            prompt=_as_is,
        ),
        DatasetFormat(
            "messages",
            "chat {messages: [{role, content}]} in the tokenizer's chat template; loss on assistant turns",
            _needs_tokenizer,
            prompt=_needs_tokenizer,
            bind_tokenizer=_chat_format,
        ),
        DatasetFormat(
            "preference",
            "generic {prompt, chosen, rejected} (text); sft trains prompt -> chosen",
            _preference_chosen,
            prompt=_as_is,
            to_pair=_preference_pair,
        ),
        DatasetFormat(
            "chat-pairs",
            "chat {chosen, rejected} conversations differing in the last assistant turn (or TRL's {prompt, chosen, "
            "rejected} message lists), in the tokenizer's chat template",
            _needs_tokenizer,
            prompt=_needs_tokenizer,
            bind_tokenizer=_chat_pairs_format,
            to_pair=_needs_tokenizer,
        ),
        DatasetFormat(
            "kto",
            "KTO {prompt, completion, label}: one reply, label true (desirable) or false",
            None,
            prompt=_as_is,
            to_judged=_kto_judged,
        ),
    ]
}


def formats_table() -> str:
    rows = [("NAME", "METHODS", "HUB COPY", "NATIVE SCHEMA")]
    rows += [
        (fmt.name, ",".join(fmt.methods), fmt.hub_id or "(local files only)", fmt.description)
        for fmt in FORMATS.values()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        f"{name:<{widths[0]}}  {methods:<{widths[1]}}  {hub:<{widths[2]}}  {schema}" for name, methods, hub, schema in rows
    )
