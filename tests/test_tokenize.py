"""Shared tokenization: BOS + source (masked), target + EOS (trained), each truncated on its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora_cli.config import DataConfig
from qlora_cli.data.formats import FORMATS
from qlora_cli.data.tokenize import IGNORE_INDEX, PaddingCollator, tokenize_example
from qlora_cli.model_kind import CausalLM, Seq2SeqLM
from tests.data_fixtures import tokenizer  # noqa: F401  (fixture)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_source_gets_bos_and_is_masked_target_gets_eos_and_is_trained(tokenizer):
    row = tokenize_example(tokenizer, "Repeat: apple", "apple", DataConfig(), kind=CausalLM())
    src, tgt = ids(tokenizer, "Repeat: apple"), ids(tokenizer, "apple")
    assert row["input_ids"] == [tokenizer.bos_token_id, *src, *tgt, tokenizer.eos_token_id]
    assert row["labels"] == [IGNORE_INDEX] * (len(src) + 1) + [*tgt, tokenizer.eos_token_id]
    assert (row["source_tokens"], row["target_tokens"]) == (len(src) + 1, len(tgt) + 1)
    assert row["length"] == len(row["input_ids"]) and not row["truncated"]


def test_train_on_source_trains_every_token(tokenizer):
    row = tokenize_example(tokenizer, "Repeat: apple", "apple", DataConfig(train_on_source=True), kind=CausalLM())
    assert row["labels"] == row["input_ids"]


def test_a_long_source_is_cut_without_eating_the_target(tokenizer):
    source = " ".join(["river stone cloud"] * 50)
    cfg = DataConfig(source_max_len=8, target_max_len=16)
    row = tokenize_example(tokenizer, source, "apple river", cfg, kind=CausalLM())
    target = [*ids(tokenizer, "apple river"), tokenizer.eos_token_id]
    assert row["source_tokens"] == 8 and row["truncated"]
    assert row["input_ids"][:8] == [tokenizer.bos_token_id, *ids(tokenizer, source)[:7]]
    assert row["input_ids"][8:] == target and row["labels"][8:] == target


def test_a_long_target_is_cut_to_target_max_len(tokenizer):
    target = " ".join(["zebra honey"] * 40)
    row = tokenize_example(tokenizer, "Say it.", target, DataConfig(target_max_len=5), kind=CausalLM())
    assert row["target_tokens"] == 5 and row["truncated"]
    assert row["labels"][-5:] == ids(tokenizer, target)[:5]  # EOS is the part that goes
    assert sum(label != IGNORE_INDEX for label in row["labels"]) == 5


def test_seq2seq_encoder_gets_source_and_eos_labels_are_the_target(tokenizer):
    row = tokenize_example(tokenizer, "Repeat: apple", "apple", DataConfig(), kind=Seq2SeqLM())
    assert row["input_ids"] == [*ids(tokenizer, "Repeat: apple"), tokenizer.eos_token_id]
    assert row["labels"] == [*ids(tokenizer, "apple"), tokenizer.eos_token_id]
    assert row["length"] == len(row["input_ids"]) + len(row["labels"])


def test_collator_pads_labels_with_ignore_index_so_padding_never_counts():
    batch = PaddingCollator(pad_token_id=0)([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [5], "labels": [5]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]


def test_collator_keeps_logits_only_where_some_row_predicts_a_label():
    batch = PaddingCollator(pad_token_id=0, logits_for_labels_only=True)([
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9]},  # positions 2 and 3 predict 8, 9
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},  # positions 0 and 1 predict 6, 7
    ])
    assert batch["logits_to_keep"].tolist() == [0, 1, 2, 3]  # position 4 predicts nothing in any row
    assert batch["shift_labels"].tolist() == [[-100, -100, 8, 9], [6, 7, -100, -100]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 6, 7, -100, -100]]


# --------------------------------------------------------------------------- BOS: as the model's own tokenizer


def _real_tokenizer(shared_data: Path | None, name: str):
    """LLaMA (adds `<s>`), a BLOOM tokenizer (has `<s>`, adds none), both in ../shared/data, and SmolLM2
    (`bos_token` `<|im_start|>`, adds none), the builtin real model."""
    from transformers import AutoTokenizer

    from qlora_cli.config import ModelConfig
    from qlora_cli.model import load_tokenizer

    if name == "smollm2":
        return load_tokenizer(ModelConfig(name_or_path="builtin:smollm2-135m-instruct"))
    folder = {"llama": "tokenizers/llama2_hf", "bloom": "models/basaran-tiny-random-bloom"}[name]
    return AutoTokenizer.from_pretrained(shared_data / folder)


@pytest.mark.parametrize(("name", "adds_bos"), [("llama", True), ("bloom", False), ("smollm2", False)])
def test_a_source_is_encoded_as_the_models_own_tokenizer_encodes_it(request, name, adds_bos):
    """A BOS goes first exactly where the tokenizer itself puts one: LLaMA, as the paper; SmolLM2 never saw one."""
    tok = _real_tokenizer(None if name == "smollm2" else request.getfixturevalue("shared_data"), name)
    source = "The following are multiple choice questions (with answers) about anatomy.\n\n"
    row = tokenize_example(tok, source, "A", DataConfig(), kind=CausalLM())
    assert row["input_ids"][: row["source_tokens"]] == tok(source)["input_ids"]
    assert (row["input_ids"][0] == tok.bos_token_id) is adds_bos


LLAMA2_CHAT = (  # Llama 2's layout: the template writes the BOS itself
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)
CONVERSATION = [
    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}
]  # fmt: skip


def test_a_chat_template_that_writes_the_bos_gets_no_second_one(shared_data):
    """Llama 2's template writes `<s>`, which its tokenizer adds again: the text keeps it once, as a token."""
    tok = _real_tokenizer(shared_data, "llama")
    tok.chat_template = LLAMA2_CHAT
    text = FORMATS["messages"].for_tokenizer(tok).conversation(CONVERSATION)
    assert text.startswith("[INST] Hi [/INST]") and "<s>" not in text
    ours = CausalLM().source_ids(tok, [tok(text, add_special_tokens=False)["input_ids"]])[0]
    assert ours == tok(text)["input_ids"] and ours.count(tok.bos_token_id) == 1


def test_a_chatml_prompt_keeps_the_im_start_that_is_smollm2s_bos_token():
    """SmolLM2's `bos_token` is `<|im_start|>`, the opening of every ChatML turn: none is cut, none added."""
    tok = _real_tokenizer(None, "smollm2")
    text = FORMATS["messages"].for_tokenizer(tok).conversation(CONVERSATION)
    assert text.startswith("<|im_start|>system\n")
    ours = CausalLM().source_ids(tok, [tok(text, add_special_tokens=False)["input_ids"]])[0]
    assert ours == tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)["input_ids"]
