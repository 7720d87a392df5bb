"""QLoRA finetuning on Alpaca as a user writes it without this project: the paper's qlora.py (artidoro/qlora)
cut down to transformers + peft + bitsandbytes and ported to transformers 5. scripts/bench_train.py runs it
as its `plain` setup, the baseline `qlora train` is measured against; it also runs on its own:

    python scripts/plain_qlora.py --model HF_FOLDER --data alpaca.json --output-dir runs/plain

The paper's settings (qlora.py, scripts/finetune_guanaco_7b.sh): NF4 + double quantization computing in
bf16 on a GPU and fp32 on a CPU, prepare_model_for_kbit_training, LoRA r=64 alpha=16 on every linear layer
but the head, gradient checkpointing, paged_adamw_32bit, learning rate 2e-4 constant, max_grad_norm 0.3,
group_by_length (on characters, as qlora.py measures length), Alpaca prompts tokenized by the collator
with sources and targets cut separately. Only what transformers 5 renamed differs (group_by_length is
train_sampling_strategy, warmup_ratio a float warmup_steps, gradient_checkpointing activation_checkpointing).
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from typing import Any

import bitsandbytes as bnb
import torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer, TrainingArguments

IGNORE_INDEX = -100
ALPACA_PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response: "
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Hugging Face model folder or hub id")
    parser.add_argument("--data", required=True, help="an Alpaca JSON file {instruction, input, output}")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=10000)
    parser.add_argument("--max-train-samples", type=int)
    parser.add_argument("--source-max-len", type=int, default=384)
    parser.add_argument("--target-max-len", type=int, default=128)
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--lora-alpha", type=float, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.1, help="the paper: 0.1 up to 13B, 0.05 above")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available())
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--save-steps", type=int, default=250)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    compute_dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        device_map={"": "cuda:0" if torch.cuda.is_available() else "cpu"},
        dtype=compute_dtype,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
        ),
    )
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="right")
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        model.resize_token_embeddings(len(tokenizer))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        target_modules=find_all_linear_names(model),
        lora_dropout=args.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    for name, module in model.named_modules():  # qlora.py: norms in fp32, LoRA, head and embeddings in bf16
        if args.bf16 and ("lora_" in name or "lm_head" in name or "embed_tokens" in name):
            module.to(torch.bfloat16)
        if "norm" in name:
            module.to(torch.float32)
    return model, tokenizer


def find_all_linear_names(model: Any) -> list[str]:
    names = {name.split(".")[-1] for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    names.discard("lm_head")
    return sorted(names)


def load_data(args: argparse.Namespace) -> Any:
    def extract_alpaca(example: dict[str, Any]) -> dict[str, str]:
        prompt = ALPACA_PROMPT_DICT["prompt_input" if example.get("input", "") != "" else "prompt_no_input"]
        return {"input": prompt.format(**example)}

    dataset = load_dataset("json", data_files=args.data)["train"]
    dataset = dataset.map(extract_alpaca, remove_columns=["instruction"])
    dataset = dataset.remove_columns([c for c in dataset.column_names if c not in ("input", "output")])
    if args.max_train_samples is not None and len(dataset) > args.max_train_samples:
        dataset = dataset.select(range(args.max_train_samples))
    return dataset.map(lambda x: {"length": len(x["input"]) + len(x["output"])})


@dataclass
class DataCollatorForCausalLM:
    """qlora.py's collator: BOS + source and target + EOS tokenized per batch, loss on the target only."""

    tokenizer: Any
    source_max_len: int
    target_max_len: int

    def __call__(self, instances: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sources = [f"{self.tokenizer.bos_token}{example['input']}" for example in instances]
        targets = [f"{example['output']}{self.tokenizer.eos_token}" for example in instances]
        tokenized_sources = self.tokenizer(
            sources, max_length=self.source_max_len, truncation=True, add_special_tokens=False
        )
        tokenized_targets = self.tokenizer(
            targets, max_length=self.target_max_len, truncation=True, add_special_tokens=False
        )
        input_ids, labels = [], []
        for source, target in zip(tokenized_sources["input_ids"], tokenized_targets["input_ids"]):
            input_ids.append(torch.tensor(source + target))
            labels.append(torch.tensor([IGNORE_INDEX] * len(source) + copy.deepcopy(target)))
        input_ids = pad_sequence(input_ids, batch_first=True, padding_value=self.tokenizer.pad_token_id)
        labels = pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": input_ids.ne(self.tokenizer.pad_token_id), "labels": labels}


def build_trainer(argv: list[str] | None = None) -> Trainer:
    args = parse_args(argv)
    model, tokenizer = load_model(args)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0.03,
        optim="paged_adamw_32bit",
        max_grad_norm=0.3,
        weight_decay=0.0,
        adam_beta2=0.999,
        activation_checkpointing=True,
        train_sampling_strategy="group_by_length",
        logging_steps=args.logging_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=40,
        remove_unused_columns=False,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        report_to="none",
    )
    return Trainer(
        model=model,
        args=training_args,
        train_dataset=load_data(args),
        data_collator=DataCollatorForCausalLM(tokenizer, args.source_max_len, args.target_max_len),
        processing_class=tokenizer,
    )


def main() -> None:
    trainer = build_trainer()
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main()
