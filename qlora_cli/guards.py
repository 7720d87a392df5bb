"""Stop a run without losing it: on SIGINT/SIGTERM after a full checkpoint, on NaN/inf losses before they
reach the weights; and check the adapter before it is written."""

from __future__ import annotations

import signal
import sys
import threading
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import TrainerCallback

from qlora_cli.errors import QloraError, TrainingInterrupted
from qlora_cli.run_folder import checkpoint_name

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop(TrainerCallback):
    """The first SIGINT/SIGTERM lets the current optimizer step finish, then saves and stops; a second aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @contextmanager
    def handling_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # Python delivers signals to the main thread only
            return
        previous = {signum: signal.signal(signum, self._request_stop) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _request_stop(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
            "(send it again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if any_rank(self.signum is not None, args.device):
            self.signum = self.signum or signal.SIGTERM  # another rank was signalled
            control.should_save = True
            control.should_training_stop = True

    def interrupted(self, state: Any, run_dir: Path) -> TrainingInterrupted:
        name = signal.Signals(self.signum).name
        return TrainingInterrupted(
            f"{name}: stopped after step {state.global_step} of {state.max_steps}; "
            f"checkpoint saved to {run_dir / checkpoint_name(state.global_step)}",
            self.signum,
        )


class NonFiniteLossGuard(TrainerCallback):
    """A NaN/inf loss skips its optimizer step, so the weights stay those of the last good step; after
    `max_bad_steps` such steps the next one stops the run (and QloraTrainer saves no checkpoint of it)."""

    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps = max_bad_steps
        self.bad_steps: list[int] = []
        self.stopped_at: int | None = None
        self._finite: torch.Tensor | None = None  # stays on the device: one sync per step, not per micro-batch

    def watch(self, loss: torch.Tensor) -> None:
        """Each training micro-batch's loss, as QloraTrainer.compute_loss computed it: from the model's output or
        from the chunked loss over its hidden states (where the model's output holds no loss)."""
        finite = torch.isfinite(loss.detach()).all()
        self._finite = finite if self._finite is None else self._finite & finite

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        bad = any_rank(self._finite is not None and not bool(self._finite), args.device)
        self._finite = None
        if not bad:
            return
        step = state.global_step + 1
        self.bad_steps.append(step)
        if not args.fp16:  # with fp16 the GradScaler already skips steps whose gradients are not finite
            for param in model.parameters():
                param.grad = None  # optimizers skip parameters without a gradient
        if len(self.bad_steps) > self.max_bad_steps:
            self.stopped_at = step
            control.should_training_stop = True
        else:
            print(
                f"warning: non-finite loss at step {step}; skipped its update "
                f"({len(self.bad_steps)} of training.max_bad_steps={self.max_bad_steps} tolerated)",
                file=sys.stderr,
            )

    def failure(self, last_checkpoint: Path | None) -> QloraError:
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        steps = ", ".join(map(str, self.bad_steps))
        return QloraError(
            f"training stopped: non-finite (NaN/inf) loss at step {self.stopped_at} (bad steps: {steps}; "
            f"training.max_bad_steps={self.max_bad_steps}); {kept}; the final adapter was not written. "
            "Lower training.learning_rate or training.max_grad_norm, check the data, or use fp32/bf16 compute"
        )


def any_rank(flag: bool, device: Any) -> bool:
    """True on every process if it is true on any: all ranks must take the same branch."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# --------------------------------------------------------------------------- the adapter at the end


def fingerprint(model: Any) -> dict[str, tuple[float, float]]:
    """Sum and sum of squares of each trainable tensor: tells whether training moved it, without a copy."""
    return {
        name: (p.detach().double().sum().item(), p.detach().double().square().sum().item())
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def check_adapter(model: Any, initial: dict[str, tuple[float, float]]) -> list[str]:
    """Refuse non-finite weights; return warnings for an adapter that has no effect or never changed."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    broken = [name for name, p in params.items() if not torch.isfinite(p).all()]
    if broken:
        raise QloraError(f"refusing to write the adapter: {len(broken)} tensors hold NaN/inf (first: {broken[0]})")
    warnings = []
    if fingerprint(model) == initial:
        warnings.append(
            "the adapter is unchanged from its initialization: training did not move it "
            "(learning rate 0 during warmup? every label masked?)"
        )
    if _has_no_effect(params):
        warnings.append("the adapter is all zeros: it has no effect on the model")
    return warnings


def _has_no_effect(params: dict[str, torch.Tensor]) -> bool:
    """LoRA adds B @ A: a layer's update is zero when either factor is; without LoRA, when every tensor is."""
    factors: dict[str, list[torch.Tensor]] = defaultdict(list)
    for name, p in params.items():
        for part in (".lora_A.", ".lora_B."):
            if part in name:
                factors[name.replace(part, ".")].append(p)
    if factors:
        return all(any(not f.any() for f in pair) for pair in factors.values())
    return all(not p.any() for p in params.values())
