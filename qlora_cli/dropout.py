"""LoRA dropout that is cheap on the CPU.

PEFT drops out each LoRA layer's input with `nn.Dropout`, whose CPU kernel draws one random number per
element: on SmolLM2-135M at batch 4 that was a fifth of every training step (scripts/bench_train.py
--profile). `CpuDropout` draws one 64-bit number per four elements and compares 15 random bits of each
quarter with p (p is then a multiple of 1/32768: 0.1 drops 3277/32768 = 0.100006). Same expectation,
same scaling by 1 / (1 - p), the mask from torch's seeded generator; CUDA keeps `nn.Dropout`, which is fused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PROFILER_LABEL = "CpuDropout"  # what a torch.profiler trace names its forward (scripts/bench_train.py --profile)
_BITS = 15
_LOW_BITS = (1 << _BITS) - 1


class CpuDropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 < p < 1:
            raise ValueError(f"dropout probability must be in (0, 1), got {p}")
        self.p = p
        self._threshold = round(p * (1 << _BITS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        n = x.numel()
        with torch.profiler.record_function(PROFILER_LABEL):
            # random_() on int64 fills [0, 2**63): the low 15 bits of each 16-bit quarter are uniform
            quarters = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_().view(torch.int16)[:n]
            dropped = (quarters & _LOW_BITS) < self._threshold
            return x.masked_fill(dropped.view(x.shape), 0).mul_(1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_cpu_dropout(model: Any) -> int:
    """Swap PEFT's LoRA `nn.Dropout` modules for `CpuDropout` where the layer is on the CPU; returns how many."""
    from peft.tuners.lora import LoraLayer

    swapped = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, dropout in module.lora_dropout.items():
            on_cpu = module.lora_A[name].weight.device.type == "cpu"
            if on_cpu and type(dropout) is nn.Dropout and dropout.p > 0:
                module.lora_dropout[name] = CpuDropout(dropout.p)
                swapped += 1
    return swapped


def remove_lora_dropout(model: Any) -> int:
    """Every LoRA dropout becomes the identity (peft's own for dropout 0); returns how many were dropouts.

    TRL's `disable_dropout` reaches `nn.Dropout` modules only, not `CpuDropout`; preference training needs them
    all off, or the policy scores a pair differently from its reference copy at the very start."""
    from peft.tuners.lora import LoraLayer

    removed = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, dropout in module.lora_dropout.items():
                if not isinstance(dropout, nn.Identity):
                    module.lora_dropout[name] = nn.Identity()
                    removed += 1
    return removed
