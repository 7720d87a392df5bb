"""One recipe on several processes: the accelerate launch and the FSDP-QLoRA settings.

Data parallelism needs nothing beyond a launcher (accelerate launch, torchrun): the Trainer splits every
global batch over the processes and rank 0 alone writes. FSDP additionally needs the packed 4-bit weights
stored in the compute dtype (`model.bnb_config(fsdp=True)`), because it shards only floating-point tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qlora_cli.config import TrainingConfig
from qlora_cli.errors import QloraError

# What `training.fsdp: true` hands the Trainer; configs/accelerate/fsdp_qlora.yaml says the same (a test checks).
# FSDP2 always trains the original parameters (FSDP1's use_orig_params); a model-level checkpointing would
# all-gather twice, so FSDP checkpoints the activations itself.
FSDP_QLORA = {
    "version": 2,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "cpu_ram_efficient_loading": True,
    "reshard_after_forward": True,
    "state_dict_type": "FULL_STATE_DICT",
}

def fsdp_config(training: TrainingConfig) -> dict[str, Any]:
    return {**FSDP_QLORA, "activation_checkpointing": training.gradient_checkpointing}


def join_processes() -> Any:
    """The launcher's process group (gloo on the CPU), joined before the Trainer so rank 0 alone prepares output_dir.

    Replicas are quieted before joining, because joining warns: on the CPU accelerate sets the thread count in
    every process that a launcher started without OMP_NUM_THREADS (torchrun with one process per node).
    """
    import torch
    from accelerate import PartialState

    if not is_main_process():
        quiet_replica()
    return PartialState(cpu=not torch.cuda.is_available())


def announce_processes(training: TrainingConfig, processes: int) -> None:
    import torch

    if processes > 1:
        engine = "FSDP" if training.fsdp else "DeepSpeed" if training.deepspeed else "DDP"
        print(
            f"{engine} over {processes} processes: global batch {processes * training.effective_batch_size} "
            f"({processes} x batch_size {training.batch_size} "
            f"x gradient_accumulation_steps {training.gradient_accumulation_steps})",
            file=sys.stderr,
        )
    if training.fsdp and not torch.cuda.is_available():
        print("training.fsdp: FSDP shards across GPUs only; on the CPU accelerate runs plain DDP", file=sys.stderr)


def is_main_process() -> bool:
    """Global rank 0. Not LOCAL_RANK: on a second node the first process has LOCAL_RANK 0 and is a replica."""
    return os.environ.get("RANK", "0") == "0"


def quiet_replica() -> None:
    """Ranks other than 0 would repeat every progress bar and warning; they keep errors only."""
    import warnings

    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore")


def launch_command(
    config: Path, overrides: list[str], *, num_processes: int, train_flags: Sequence[str] = ()
) -> list[str]:
    """`accelerate launch` of this same `qlora train`, one process per GPU (gloo processes on the CPU)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--main_process_port", "0",  # a free port, so two runs on one machine do not collide
        "--mixed_precision", "no", "--dynamo_backend", "no",  # the recipe decides the precision
        "-m", "qlora_cli", "train", "--config", str(config), *train_flags, *overrides,
    ]  # fmt: skip


def launch(config: Path, overrides: list[str], *, num_processes: int, train_flags: Sequence[str] = ()) -> None:
    import torch

    if "WORLD_SIZE" in os.environ:
        raise QloraError("--num-processes starts its own processes: drop it when running under a launcher")
    gpus = torch.cuda.device_count()
    if gpus and num_processes > gpus:
        raise QloraError(f"--num-processes {num_processes} but only {gpus} GPUs are visible")
    command = launch_command(config, overrides, num_processes=num_processes, train_flags=train_flags)
    code = subprocess.run(command).returncode
    if code != 0:
        raise QloraError(f"training failed in a worker process (exit code {code}); the first error above is the cause")
