"""SIGTERM a real `qlora train`, resume it, and end with exactly the uninterrupted run's adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli
from tests.tiny import write_recipe

MAX_STEPS = 10  # 4 steps per epoch (8 examples, batch 2): the stop lands in epoch 1 and the resume crosses epoch 2
SINGLE_THREAD = {"OMP_NUM_THREADS": "1"}  # two runs share the CPU; oversubscribed threads are ~5x slower


def _start(recipe: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "qlora_cli", "train", "--config", str(recipe), f"output_dir={out}"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **SINGLE_THREAD},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"run ended before {path.name} appeared:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted run and, beside it, a run stopped by SIGTERM after checkpoint-4, then resumed."""
    root = tmp_path_factory.mktemp("resume")
    recipe = write_recipe(root, training={"max_steps": MAX_STEPS})
    reference, interrupted = root / "reference", root / "interrupted"
    reference_run = _start(recipe, reference)
    interrupted_run = _start(recipe, interrupted)
    _wait_for(interrupted / "checkpoint-4", interrupted_run)
    interrupted_run.send_signal(signal.SIGTERM)
    _, stop_err = interrupted_run.communicate(timeout=600)
    stopped = {
        "code": interrupted_run.returncode,
        "err": stop_err,
        "checkpoints": sorted(p.name for p in interrupted.glob("checkpoint-*")),
        "files": sorted(p.name for p in interrupted.iterdir()),
    }
    stopped["saved"] = sorted(p.name for p in (interrupted / stopped["checkpoints"][-1]).iterdir())
    resumed = run_cli("train", "--config", str(recipe), f"output_dir={interrupted}", "--resume", env=SINGLE_THREAD)
    _, reference_err = reference_run.communicate(timeout=600)
    assert reference_run.returncode == 0, reference_err[-3000:]
    return dict(recipe=recipe, reference=reference, interrupted=interrupted, stopped=stopped, resumed=resumed)


def _step(checkpoint_name: str) -> int:
    return int(checkpoint_name.removeprefix("checkpoint-"))


def test_sigterm_finishes_the_step_saves_a_full_checkpoint_and_says_how_to_resume(runs):
    stopped = runs["stopped"]
    assert stopped["code"] == 128 + signal.SIGTERM, stopped["err"][-3000:]
    last = stopped["checkpoints"][-1]
    assert 4 <= _step(last) < MAX_STEPS
    assert f"SIGTERM: stopped after step {_step(last)} of {MAX_STEPS}" in stopped["err"]
    command = f"qlora train --config {runs['recipe']} output_dir={runs['interrupted']} --resume"
    assert f"Resume with: {command}" in stopped["err"]
    assert "completed" not in stopped["files"] and "adapter_model.safetensors" not in stopped["files"]
    assert len(stopped["checkpoints"]) <= 2  # save_total_limit
    for part in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert part in stopped["saved"]


def test_resume_ends_with_the_uninterrupted_adapter_and_step_count(runs):
    assert runs["resumed"].returncode == 0, runs["resumed"].stderr[-3000:]
    ours = load_file(runs["interrupted"] / "adapter_model.safetensors")
    theirs = load_file(runs["reference"] / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-5
    states = [json.loads((run / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text()) for run in
              (runs["interrupted"], runs["reference"])]
    assert states[0]["global_step"] == states[1]["global_step"] == MAX_STEPS
    losses = [[(e["step"], e["loss"]) for e in s["log_history"] if "loss" in e] for s in states]
    assert [s for s, _ in losses[0]] == list(range(1, MAX_STEPS + 1))
    assert torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5)


def test_resume_refuses_a_recipe_that_trains_differently(runs, cli, tmp_path):
    code, _, err = cli(
        "train", "--config", str(runs["recipe"]), f"output_dir={tmp_path / 'fork'}", "training.learning_rate=0.1",
        "lora.r=4", "training.logging_steps=3", "--resume-from", str(runs["interrupted"]),
    )  # fmt: skip
    assert code == 2
    assert "training.learning_rate: 0.003 -> 0.1" in err and "lora.r: 8 -> 4" in err
    assert "logging_steps" not in err  # does not change training
    assert "--force" in err


def test_resume_with_no_checkpoint_refuses_instead_of_starting_over(cli, tmp_path):
    recipe = write_recipe(tmp_path)
    code, _, err = cli("train", "--config", str(recipe), f"output_dir={tmp_path / 'empty'}", "--resume")
    assert code == 2 and "nothing to resume" in err


def test_overwrite_and_resume_together_are_refused(cli, tmp_path):
    recipe = write_recipe(tmp_path)
    code, _, err = cli("train", "--config", str(recipe), f"output_dir={tmp_path / 'x'}", "--resume", "--overwrite")
    assert code == 2 and "--overwrite and --resume" in err


def test_resuming_a_run_whose_last_checkpoint_is_final_only_writes_the_adapter(runs, cli, tmp_path):
    """E.g. the disk filled up while the final adapter was written: no step past max_steps is trained."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["interrupted"], run)
    (run / "completed").unlink()
    (run / "adapter_model.safetensors").unlink()
    code, _, err = cli("train", "--config", str(runs["recipe"]), f"output_dir={run}", "--resume")
    assert code == 0, err[-3000:]
    final = load_file(run / "adapter_model.safetensors")
    saved = load_file(run / f"checkpoint-{MAX_STEPS}" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], saved[k]) for k in saved)
    assert json.loads((run / "metrics.json").read_text())["steps"] == MAX_STEPS
    assert not (run / f"checkpoint-{MAX_STEPS + 1}").exists()
