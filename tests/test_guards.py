"""Signals stop a run after a checkpoint; NaN/inf losses never reach the weights; a dead adapter is flagged."""

from __future__ import annotations

import math
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qlora_cli.errors import QloraError
from qlora_cli.guards import GracefulStop, NonFiniteLossGuard, check_adapter, fingerprint
from tests.tiny import write_recipe

ARGS = SimpleNamespace(device="cpu", fp16=False)


def _control() -> SimpleNamespace:
    return SimpleNamespace(should_save=False, should_training_stop=False)


def test_first_signal_asks_for_a_checkpoint_and_a_stop_second_aborts():
    stop = GracefulStop()
    original = signal.getsignal(signal.SIGTERM)
    control = _control()
    with stop.handling_signals():
        stop.on_step_end(ARGS, None, control)
        assert not control.should_save
        signal.raise_signal(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        stop.on_step_end(ARGS, None, control)
        assert control.should_save and control.should_training_stop
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is original
    error = stop.interrupted(SimpleNamespace(global_step=7, max_steps=10), Path("runs/x"))
    assert error.exit_code == 143 and "stopped after step 7 of 10" in str(error) and "checkpoint-7" in str(error)


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=(self.weight * x).sum())


def _step(guard: NonFiniteLossGuard, model: _Toy, value: float, step: int) -> SimpleNamespace:
    control = _control()
    loss = model(torch.full((3,), value)).loss
    guard.watch(loss)  # as QloraTrainer.compute_loss hands it every training loss
    loss.backward()
    guard.on_pre_optimizer_step(ARGS, SimpleNamespace(global_step=step - 1), control, model=model)
    return control


def test_nan_loss_skips_its_update_and_stops_after_max_bad_steps(capsys):
    model = _Toy().train()
    guard = NonFiniteLossGuard(max_bad_steps=1)
    assert not _step(guard, model, 1.0, step=1).should_training_stop
    assert model.weight.grad is not None  # a good step keeps its gradient
    model.weight.grad = None
    control = _step(guard, model, math.nan, step=2)
    assert model.weight.grad is None and not control.should_training_stop  # tolerated, update skipped
    assert "non-finite loss at step 2" in capsys.readouterr().err
    control = _step(guard, model, math.inf, step=3)
    assert control.should_training_stop and guard.stopped_at == 3  # QloraTrainer then saves no checkpoint of it
    message = str(guard.failure(Path("runs/x/checkpoint-2")))
    assert "step 3" in message and "bad steps: 2, 3" in message and "runs/x/checkpoint-2" in message


def _lora_model() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return get_peft_model(base, LoraConfig(r=2, target_modules=["0", "2"]))


def test_adapter_check_warns_when_untouched_and_refuses_nan():
    model = _lora_model()
    initial = fingerprint(model)
    warnings = check_adapter(model, initial)
    assert any("unchanged" in w for w in warnings) and any("all zeros" in w for w in warnings)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "0.lora_B" in n).add_(0.1)
    assert check_adapter(model, initial) == []  # one layer moved: the adapter does something
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n)[0, 0] = math.nan
    with pytest.raises(QloraError, match="NaN/inf"):
        check_adapter(model, initial)


# --------------------------------------------------------------------------- end to end


def test_nan_loss_stops_the_run_names_the_step_and_keeps_the_last_good_checkpoint(cli, tmp_path):
    # fp16 compute with a huge learning rate overflows at the second step, every time
    recipe = write_recipe(tmp_path, quantization={"compute_dtype": "fp16"}, training={"learning_rate": 1e5})
    out = tmp_path / "run"
    code, _, err = cli("train", "--config", str(recipe), f"output_dir={out}", "training.save_steps=1")
    assert code == 2
    assert "non-finite (NaN/inf) loss at step 2" in err and f"{out / 'checkpoint-1'}" in err
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "completed").exists()


def test_untrained_adapter_is_flagged_and_artifacts_are_safetensors(cli, tmp_path):
    # a one-step run still in warmup trains with learning rate 0
    recipe = write_recipe(
        tmp_path, training={"lr_scheduler": "constant_with_warmup", "warmup_ratio": 0.5, "max_steps": 1}
    )
    out = tmp_path / "run"
    code, _, err = cli("train", "--config", str(recipe), f"output_dir={out}")
    assert code == 0, err
    assert "warning: the adapter is unchanged" in err and "warning: the adapter is all zeros" in err
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"adapter_model.safetensors", "checkpoint-1/adapter_model.safetensors", "completed"} <= written
    pickled_weights = [f for f in written if f.endswith((".bin", ".pt", ".pth")) and "model" in f]
    assert pickled_weights == []
    assert not (out / ".staging").exists()
