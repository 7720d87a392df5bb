"""Batched generation with left padding; prompts are encoded exactly as training encoded sources."""

from __future__ import annotations

from typing import Any

import torch

from qlora_cli.data.tokenize import PaddingCollator, source_ids


@torch.no_grad()
def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    seq2seq: bool,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[str]:
    """Return only the generated continuation of each prompt; temperature 0 is greedy."""
    was_training = model.training
    model.eval()
    collate = PaddingCollator(tokenizer.pad_token_id, padding_side="right" if seq2seq else "left")
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [
            {"input_ids": source_ids(tokenizer, tokenizer(p, add_special_tokens=False)["input_ids"], seq2seq=seq2seq)}
            for p in prompts[start : start + batch_size]
        ]
        batch = {k: v.to(device) for k, v in collate(encoded).items()}
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
        new_tokens = generated if seq2seq else generated[:, batch["input_ids"].shape[1] :]
        outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    if was_training:
        model.train()
    return outputs
