"""Each registered dataset turns a record of its real native schema into the paper's (source, target)."""

from __future__ import annotations

import pytest

from qlora_cli.data.formats import FORMATS, Example, SkipRecord
from tests.data_fixtures import tokenizer  # noqa: F401  (fixture)

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName the capital.\n\n### Input:\nFrance\n\n### Response: "
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName a fruit.\n\n### Response: "
)

CASES = [
    ("alpaca", {"instruction": "Name the capital.", "input": "France", "output": "Paris"},
     [(ALPACA_WITH_INPUT, "Paris")]),
    ("alpaca", {"instruction": "Name a fruit.", "input": "", "output": "A pear."}, [(ALPACA_NO_INPUT, "A pear.")]),
    (
        "oasst1",
        {"text": "### Human: Hola, ¿qué tal?### Assistant: Muy bien.### Human: Gracias### Assistant: De nada."},
        [("", "### Human: Hola, ¿qué tal?### Assistant: Muy bien.### Human: Gracias### Assistant: De nada.")],
    ),
    (
        "oasst1",
        {"input": "### Human: What is NF4? ### Assistant:", "output": "A 4-bit data type.", "lang": "en"},
        [("", "### Human: What is NF4? ### Assistant: A 4-bit data type.")],
    ),
    (
        "hh-rlhf",
        {
            "chosen": "\n\nHuman: Can you help me?\n\nAssistant: Sure, with what?",
            "rejected": "\n\nHuman: Can you help me?\n\nAssistant: No.",
        },
        [("", "\n\nHuman: Can you help me?\n\nAssistant: Sure, with what?")],
    ),
    (
        "self-instruct",
        {"prompt": "Make a list of 3 fruits.\n\nOutput:", "completion": " apple, pear, fig<|endoftext|>"},
        [("Make a list of 3 fruits.\n\nOutput:", " apple, pear, fig")],
    ),
    (
        "self-instruct",
        {
            "id": "seed_task_7",
            "name": "sorting",
            "instruction": "Sort the numbers.",
            "instances": [{"input": "3 1 2", "output": "1 2 3"}, {"input": "", "output": "Nothing to sort."}],
            "is_classification": False,
        },
        [("Sort the numbers.\nInput: 3 1 2\nOutput:", " 1 2 3"), ("Sort the numbers.\nOutput:", " Nothing to sort.")],
    ),
    (
        "unnatural-instructions",
        {
            "instruction": "You are given a word. Write its plural.",
            "instances": [
                {
                    "instruction_with_input": "You are given a word. Write its plural.\nWord: mouse",
                    "input": "Word: mouse",
                    "constraints": "None.",
                    "output": "mice",
                },
                {
                    "instruction_with_input": "You are given a word. Write its plural.\nWord: cat",
                    "input": "Word: cat",
                    "constraints": "None.",
                    "output": "cats",
                },
            ],
            "reformulations": [
                {
                    "instruction": "Pluralize the word.",
                    "instruction_with_input": "Pluralize the word.\nWord: mouse",
                    "input": "Word: mouse",
                    "output": "mice",
                }
            ],
        },
        [
            ("You are given a word. Write its plural.\nWord: mouse", "mice"),
            ("You are given a word. Write its plural.\nWord: cat", "cats"),
        ],
    ),
    (
        "flan-v2",
        {
            "inputs": "Premise: A dog runs.\nHypothesis: An animal moves.\nDoes the premise entail the hypothesis?",
            "targets": "yes",
            "task_source": "Flan2021",
            "task_name": "anli_r1",
            "template_type": "zs_opt",
        },
        [("Premise: A dog runs.\nHypothesis: An animal moves.\nDoes the premise entail the hypothesis?", "yes")],
    ),
    (
        "flan-v2",
        {"prompt": "Is this review positive? 'Great film.'\n", "completion": "yes<|endoftext|>", "template": "imdb_1"},
        [("Is this review positive? 'Great film.'\n", "yes")],
    ),
    (
        "flan-v2",
        {"question": "Is 7 prime?", "answer": "yes", "chain_of_thought": "7 has no divisors but 1 and 7.",
         "source_file": "cot/aqua_train.tsv"},
        [
            (
                "Question: Is 7 prime? Think carefully first, then make a decision:",
                "7 has no divisors but 1 and 7. So the answer is yes.",
            )
        ],
    ),
    (
        "chip2",
        {
            "text": "<human>: What is the boiling point of water?\n<bot>: 100 degrees Celsius.",
            "metadata": {"source": "unified_chip2"},
        },
        [("What is the boiling point of water?", "100 degrees Celsius.")],
    ),
    (
        "longform",
        {"input": "Write a paragraph about rivers.", "output": "Rivers carry water.", "source": "Wiki", "subset": "x"},
        [("Write a paragraph about rivers.", "Rivers carry water.")],
    ),
    ("input-output", {"input": "2+2=", "output": "4"}, [("2+2=", "4")]),
    ("input-output", {"input": "2+2=", "output": 4}, [("2+2=", "4")]),  # CSV readers make numbers of answers
    ("prompt-completion", {"prompt": "Q: hi\nA:", "completion": " hello"}, [("Q: hi\nA:", " hello")]),
]


@pytest.mark.parametrize(("name", "record", "expected"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_native_record_gives_paper_source_and_target(name, record, expected):
    examples = FORMATS[name].examples(record)
    assert [(e.source, e.target) for e in examples] == expected


def test_every_paper_dataset_is_registered_with_a_hub_copy():
    paper = ["oasst1", "hh-rlhf", "alpaca", "self-instruct", "unnatural-instructions", "flan-v2", "chip2", "longform"]
    assert all(FORMATS[name].hub_id for name in paper)
    self_instruct = FORMATS["self-instruct"]
    assert (self_instruct.hub_id, self_instruct.hub_config) == ("yizhongw/self_instruct", "self_instruct")
    assert (FORMATS["chip2"].hub_id, FORMATS["chip2"].hub_data_files) == ("laion/OIG", "unified_chip2.jsonl")
    assert FORMATS["hh-rlhf"].eval_split == "test" and FORMATS["oasst1"].eval_split == "test"


def test_instances_stored_as_a_sequence_of_structs_read_the_same():
    """`datasets` hands a Sequence({...}) column over as a dict of lists, as some hub copies store instances."""
    record = {"instruction": "x", "instances": {"instruction_with_input": ["a", "b"], "output": ["A", "B"]}}
    assert FORMATS["unnatural-instructions"].examples(record) == [Example("a", "A"), Example("b", "B")]


@pytest.mark.parametrize(
    ("name", "record", "reason"),
    [
        ("alpaca", {"instruction": "x", "input": ""}, "missing field 'output'"),
        ("alpaca", {"instruction": "x", "output": "  "}, "empty target"),
        ("alpaca", {"instruction": ["x"], "output": "y"}, "field 'instruction' is list, not text"),
        ("chip2", {"text": "<human>: hi there"}, "no '<bot>:' turn"),
        ("unnatural-instructions", {"instruction": "x", "instances": []}, "missing field 'instances'"),
        ("hh-rlhf", {"rejected": "x"}, "missing field 'chosen'"),
    ],
)
def test_unformattable_record_is_skipped_with_its_reason(name, record, reason):
    with pytest.raises(SkipRecord, match=reason):
        FORMATS[name].examples(record)


def test_prompts_wrap_a_question_the_way_training_sources_began():
    """generate/chat wrap a user's prompt with these; it must match what the model was trained on."""
    assert FORMATS["oasst1"].prompt("Hi") == "### Human: Hi ### Assistant:"
    guanaco = FORMATS["oasst1"].examples({"input": "### Human: Hi ### Assistant:", "output": "Hello"})[0]
    assert guanaco.target.startswith(FORMATS["oasst1"].prompt("Hi"))
    hh = FORMATS["hh-rlhf"].examples({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello"})[0]
    assert hh.target.startswith(FORMATS["hh-rlhf"].prompt("Hi"))
    assert FORMATS["alpaca"].prompt("Name a fruit.") == ALPACA_NO_INPUT
    seed = {"instruction": "Sort.", "instances": [{"input": "", "output": "ok"}]}
    assert FORMATS["self-instruct"].examples(seed)[0].source == FORMATS["self-instruct"].prompt("Sort.")
    assert FORMATS["longform"].prompt("Write.") == "Write."


# --------------------------------------------------------------------------- chat messages

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_messages_use_the_tokenizer_chat_template_one_example_per_assistant_turn(tokenizer):
    tokenizer.chat_template = CHATML
    try:
        examples = FORMATS["messages"].for_tokenizer(tokenizer).examples(CONVERSATION)
    finally:
        tokenizer.chat_template = None
    first = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert examples == [
        Example(first, "Hello!<|im_end|>\n"),
        Example(first + "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", "4<|im_end|>\n"),
    ]


def test_messages_without_a_chat_template_use_the_guanaco_layout(tokenizer):
    chat = FORMATS["messages"].for_tokenizer(tokenizer)
    examples = chat.examples(CONVERSATION)
    assert examples == [
        Example("Be brief. ### Human: Hi ### Assistant:", " Hello!"),
        Example("Be brief. ### Human: Hi ### Assistant: Hello! ### Human: 2+2? ### Assistant:", " 4"),
    ]
    assert chat.prompt("Hi") == FORMATS["oasst1"].prompt("Hi")


@pytest.mark.parametrize("template", [CHATML, None], ids=["chat-template", "guanaco-layout"])
def test_a_conversation_to_answer_is_rendered_as_training_rendered_its_sources(tokenizer, template):
    """What `qlora serve` and `qlora chat` send is, token for token, what the reply was trained after."""
    tokenizer.chat_template = template
    try:
        chat = FORMATS["messages"].for_tokenizer(tokenizer)
        sources = [example.source for example in chat.examples(CONVERSATION)]
        asked = [chat.render_conversation(CONVERSATION["messages"][:n]) for n in (2, 4)]
    finally:
        tokenizer.chat_template = None
    assert asked == sources


def test_a_guanaco_conversation_is_one_line_as_in_the_oasst1_text():
    text = FORMATS["oasst1"].render_conversation(CONVERSATION["messages"][:4])
    assert text == "Be brief. ### Human: Hi ### Assistant: Hello! ### Human: 2+2? ### Assistant:"
    alpaca = FORMATS["alpaca"].render_conversation(CONVERSATION["messages"][1:4])
    assert alpaca == FORMATS["alpaca"].prompt("Hi") + "Hello!\n\n" + FORMATS["alpaca"].prompt("2+2?")


def test_messages_strip_the_bos_and_eos_that_tokenization_adds(tokenizer):
    ends_with_eos = CHATML.replace("<|im_end|>\n{% endfor %}", "{{ eos_token }}{% endfor %}")
    tokenizer.chat_template = "{{ bos_token }}" + ends_with_eos
    try:
        examples = FORMATS["messages"].for_tokenizer(tokenizer).examples({"messages": CONVERSATION["messages"][1:3]})
    finally:
        tokenizer.chat_template = None
    assert examples == [Example("<|im_start|>user\nHi</s><|im_start|>assistant\n", "Hello!")]


def test_an_end_of_turn_that_is_the_eos_is_not_trained_twice(tokenizer):
    """SmolLM2's ChatML: `<|im_end|>` is the EOS and each turn ends `<|im_end|>\n`; tokenization adds the EOS."""
    tokenizer.chat_template = CHATML.replace("<|im_end|>\n{% endfor %}", "{{ eos_token }}\n{% endfor %}")
    try:
        examples = FORMATS["messages"].for_tokenizer(tokenizer).examples({"messages": CONVERSATION["messages"][1:3]})
    finally:
        tokenizer.chat_template = None
    assert examples == [Example("<|im_start|>user\nHi</s>\n<|im_start|>assistant\n", "Hello!")]


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([{"role": "user", "content": "Hi"}], "no assistant turn"),
        ([{"role": "robot", "content": "Hi"}], "message role 'robot'"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}], "empty target"),
    ],
)
def test_unusable_conversations_are_skipped(tokenizer, messages, reason):
    with pytest.raises(SkipRecord, match=reason):
        FORMATS["messages"].for_tokenizer(tokenizer).examples({"messages": messages})


def test_formats_that_need_no_tokenizer_ignore_it(tokenizer):
    assert FORMATS["alpaca"].for_tokenizer(tokenizer) is FORMATS["alpaca"]
