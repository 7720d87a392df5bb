"""What a recipe needs from this machine, checked once before a run loads anything.

The recipe document itself is valid (config.py); here: the trackers and DeepSpeed are installed, the
DeepSpeed config can be read and its ZeRO stage can shard 4-bit weights, the launcher's environment
agrees with the recipe, FSDP's storage dtype equals the compute dtype `auto` resolves to here, and
`training.loss=fused` has a CUDA GPU and liger-kernel.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path

from qlora_cli.config import Recipe, fsdp_storage_problem
from qlora_cli.errors import QloraError

ZERO3_WITH_4BIT = (
    "DeepSpeed ZeRO-3 cannot shard 4-bit bitsandbytes weights: use ZeRO-2 (configs/deepspeed/zero2.json) "
    "or FSDP (training.fsdp=true)"
)


def preflight(recipe: Recipe, environ: Mapping[str, str] = os.environ) -> None:
    check_trackers(recipe.training.report_to)
    check_launch(recipe, environ)
    if recipe.training.deepspeed:
        check_deepspeed(recipe)
    if recipe.training.loss == "fused":
        from qlora_cli.loss import fused_problem
        from qlora_cli.model import device_for_process

        if problem := fused_problem(device_for_process()):
            raise QloraError(f"training.loss=fused: {problem}")
    if recipe.training.fsdp:
        from qlora_cli.model import dtype_name, resolve_compute_dtype

        compute = dtype_name(resolve_compute_dtype(recipe.quantization.compute_dtype))
        problem = fsdp_storage_problem(recipe.quantization, compute)
        if problem:
            raise QloraError(problem)


def check_trackers(report_to: list[str]) -> None:
    """transformers would fail only after the model has loaded."""
    from transformers.integrations import is_mlflow_available, is_tensorboard_available, is_wandb_available

    installed = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    for name in report_to:
        if name in installed and not installed[name]():
            raise QloraError(f"training.report_to: {name} is not installed: pip install 'qlora-cli[{name}]'")


def check_launch(recipe: Recipe, environ: Mapping[str, str]) -> None:
    """Combinations that only show once we know how the processes were launched."""
    if environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not recipe.training.fsdp:
        raise QloraError(
            "launched with an FSDP accelerate config, but the recipe has training.fsdp=false: add training.fsdp=true "
            "so the 4-bit weights are stored in a dtype FSDP can shard"
        )
    if environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" and recipe.quantization.bits == 4:
        raise QloraError(ZERO3_WITH_4BIT)


def check_deepspeed(recipe: Recipe) -> None:
    if recipe.quantization.bits == 4 and deepspeed_zero_stage(recipe.training.deepspeed) == 3:
        raise QloraError(ZERO3_WITH_4BIT)
    if importlib.util.find_spec("deepspeed") is None:
        raise QloraError("training.deepspeed needs DeepSpeed: pip install 'qlora-cli[deepspeed]'")


def deepspeed_zero_stage(path: str) -> int:
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise QloraError(f"training.deepspeed: config file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise QloraError(f"training.deepspeed: {path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    return int(config.get("zero_optimization", {}).get("stage", 0)) if isinstance(config, dict) else 0
