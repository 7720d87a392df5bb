"""Which 4-bit matmul bitsandbytes runs on the CPU: decided here, on purpose, never as a side effect of `eval()`.

On a CPU with AVX512-BF16, `bitsandbytes.nn.Linear4bit.forward` in eval mode, on an input that needs no
grad, rewrites its weight and quant state in place into a packed layout for a fused bf16 kernel. That kernel
has no backward (training after it backpropagates through a kernel autograd does not know), computes in
bf16 whatever the compute dtype, and leaves a quant state that `dequantize_4bit` and a merge misread.
So every model is loaded with that switch set here: off for training, for scoring (MMLU) and for the
reference a merge is checked against; on only for generation where the model computes in bf16 anyway, so the
fused kernel does the arithmetic the model would have done. It is fast one token at a time and slow on a
prompt's rows: on a 2-core Xeon with AMX, a 576 -> 1536 NF4 layer took 0.054 ms for one row (dequantize +
matmul 0.35 ms) but 8.1 ms for 736 rows (dequantize + matmul 0.96 ms): scripts/bench_cpu_kernels.py,
docs/benchmarks.md §10.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEQUANTIZE = "dequantize+matmul"
PACKED = "packed-bf16"

# bitsandbytes looks for a faster fused kernel in the `kernels` package, which fetches it from the hub at
# import. Without that package it falls back to its own compiled CPU kernel: nothing a user must act on.
_KERNELS_HUB_LOGGER = "bitsandbytes.backends.cpu.ops"
_KERNELS_HUB_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"

# Each kind of bf16 unit, torch's check for it, and words in the oneDNN ISA names that reach it
# (AVX512_CORE_AMX, AVX10_1_512_AMX..., AVX512_CORE_BF16, AVX512_CORE_FP16, ALL); the best first.
_BF16_UNITS = (
    ("AMX", "_is_amx_tile_supported", ("AMX", "ALL")),
    ("AVX512-BF16", "_is_avx512_bf16_supported", ("AMX", "BF16", "FP16", "AVX10", "ALL")),
)


def bf16_matrix_units(*, within_isa_cap: bool = True) -> str | None:
    """The CPU's native bf16 matrix units as torch's own CPU feature checks see them; None on AVX2-only CPUs.

    Where they exist, a bf16 matmul is several times faster than fp32; where not, ~60x slower. Units that a
    cap on oneDNN's instructions (`onednn_isa_cap`) leaves out do not count: torch's matmuls cannot reach
    them (a 672 x 576 x 1536 bf16 matmul under `ONEDNN_MAX_CPU_ISA=AVX2` on a Xeon with AMX: 34 GFLOP/s,
    against 230 in fp32).
    """
    import torch

    cap = onednn_isa_cap() if within_isa_cap else None
    isa = cap[1] if cap else "ALL"
    for name, check, allowed_by in _BF16_UNITS:
        if any(word in isa for word in allowed_by) and getattr(torch.cpu, check, lambda: False)():
            return name
    return None


def bf16_matmul_slowdown(size: int = 256, repeats: int = 3) -> float:
    """How many times longer a size x size matmul takes in bf16 than in fp32 on this CPU (best of `repeats`)."""
    import time

    import torch

    def best_time(dtype: torch.dtype) -> float:
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        a @ b  # the first call sets up oneDNN's kernel
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best_time(torch.bfloat16) / best_time(torch.float32)


def onednn_isa_cap() -> tuple[str, str] | None:
    """(variable, ISA) where the environment caps the instructions oneDNN, which runs torch's CPU matmuls, may use."""
    for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # oneDNN reads both, the first one first
        isa = os.environ.get(variable, "").strip().upper()
        if isa and isa not in ("ALL", "DEFAULT"):
            return variable, isa
    return None


def packed_kernel_available() -> bool:
    """What bitsandbytes itself checks before registering its fused CPU kernel."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def choose_cpu_kernel(model: Any, compute_dtype: torch.dtype, device: str, *, inference: bool) -> str | None:
    """Set every 4-bit layer's CPU path; returns its name for settings and reports (None: no 4-bit layers)."""
    import torch

    packed = inference and device == "cpu" and compute_dtype == torch.bfloat16 and packed_kernel_available()
    if not use_packed_kernel(model, packed):
        return None
    return PACKED if packed else DEQUANTIZE


def use_packed_kernel(model: Any, enabled: bool) -> int:
    """Set the instance switch bitsandbytes reads in every forward; returns how many 4-bit layers have it."""
    import bitsandbytes as bnb

    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = enabled
    return len(layers)


class _DropMissingKernelsPackage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(_KERNELS_HUB_WARNING) and "No module named 'kernels'" in message)


def quiet_missing_kernels_package() -> None:
    """Drop bitsandbytes' import-time warning about the `kernels` package (through its logger; idempotent).

    Installed when `qlora_cli` is imported, before bitsandbytes (which transformers imports with almost anything):
    the logger object exists from then on and keeps the filter.
    """
    logger = logging.getLogger(_KERNELS_HUB_LOGGER)
    if not any(isinstance(f, _DropMissingKernelsPackage) for f in logger.filters):
        logger.addFilter(_DropMissingKernelsPackage())
