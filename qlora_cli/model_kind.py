"""Decoder-only (LLaMA) and encoder-decoder (T5) models: every place they differ, and nowhere else.

A loaded model carries its kind (`LoadedModel.kind`); tokenization, generation, MMLU scoring and the merge
check ask it instead of branching on a flag of their own.
"""

from __future__ import annotations

from typing import Any, Union

import torch


class CausalLM:
    """The source and target are one sequence; the loss covers the target part."""

    name = "causal"
    auto_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    pipeline_tag = "text-generation"
    padding_side = "left"  # for inference batches: every row's last position is its prompt's end
    shares_prompt_prefixes = True  # a cache of shared leading tokens can be reused (MMLU's shots)
    can_train_on_source = True  # data.train_on_source

    def source_ids(self, tokenizer: Any, rows: list[list[int]]) -> list[list[int]]:
        """BOS first exactly where the tokenizer itself would put it (`bos_prefix`)."""
        bos = bos_prefix(tokenizer)
        return [bos + tokens for tokens in rows]

    def training_example(self, source: list[int], target: list[int], *, train_on_source: bool) -> dict[str, Any]:
        masked = source if train_on_source else [IGNORE_INDEX] * len(source)
        return {"input_ids": source + target, "labels": masked + target, "length": len(source) + len(target)}

    def source_and_target(self, example: dict[str, Any]) -> tuple[list[int], list[int]]:
        n = example["source_tokens"]
        return example["input_ids"][:n], example["input_ids"][n:]

    def forward_inputs(self, example: dict[str, Any], device: Any) -> dict[str, torch.Tensor]:
        """A tokenized example as the model reads it with teacher forcing (the labels stay out: no loss)."""
        return {"input_ids": torch.tensor([example["input_ids"]], device=device)}

    def next_token_logits(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).logits[:, -1, :]

    def generated_tokens(self, generated: torch.Tensor, prompt_length: int) -> torch.Tensor:
        return generated[:, prompt_length:]


class Seq2SeqLM:
    """The encoder reads the source, the decoder writes the target."""

    name = "seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"
    peft_task_type = "SEQ_2_SEQ_LM"
    pipeline_tag = "text2text-generation"
    padding_side = "right"
    shares_prompt_prefixes = False
    can_train_on_source = False  # the decoder never predicts the source

    def source_ids(self, tokenizer: Any, rows: list[list[int]]) -> list[list[int]]:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return [tokens + eos for tokens in rows]

    def training_example(self, source: list[int], target: list[int], *, train_on_source: bool) -> dict[str, Any]:
        return {"input_ids": source, "labels": target, "length": len(source) + len(target)}

    def source_and_target(self, example: dict[str, Any]) -> tuple[list[int], list[int]]:
        return example["input_ids"], example["labels"]

    def forward_inputs(self, example: dict[str, Any], device: Any) -> dict[str, torch.Tensor]:
        """The decoder reads the answer, shifted right, as in training."""
        return {
            "input_ids": torch.tensor([example["input_ids"]], device=device),
            "labels": torch.tensor([example["labels"]], device=device),
        }

    def next_token_logits(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder's first token."""
        rows = batch["input_ids"].shape[0]
        start_id, device = model.config.decoder_start_token_id, batch["input_ids"].device
        start = torch.full((rows, 1), start_id, dtype=torch.long, device=device)
        return model(**batch, decoder_input_ids=start).logits[:, 0, :]

    def generated_tokens(self, generated: torch.Tensor, prompt_length: int) -> torch.Tensor:
        return generated


ModelKind = Union[CausalLM, Seq2SeqLM]
IGNORE_INDEX = -100  # labels the loss skips


def bos_prefix(tokenizer: Any) -> list[int]:
    """`[bos_token_id]` where the tokenizer starts every encoding with its BOS (LLaMA), else `[]`.

    A model learned its texts as its tokenizer encodes them: SmolLM2, Qwen and GPT-2 style tokenizers add no
    BOS (SmolLM2's `bos_token` is `<|im_start|>`), and a BOS in front of an MMLU prompt is then a text the model
    never saw, which moves its answers away from lm-evaluation-harness's.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer(["x"])["input_ids"][0][:1] == [bos] else []


def kind_of(model_config: Any) -> ModelKind:
    """From a transformers config: no weights needed."""
    return Seq2SeqLM() if getattr(model_config, "is_encoder_decoder", False) else CausalLM()
