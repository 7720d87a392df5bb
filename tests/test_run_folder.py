"""Checkpoints are complete or absent; resume finds the newest complete one; a changed recipe is caught."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from qlora_cli.checkpoint import (
    RECIPE_FILE,
    STAGING,
    AtomicCheckpoints,
    SeededLengthGrouping,
    check_recipe_drift,
    final_artifacts,
    find_resume_checkpoint,
    prune,
    recipe_drift,
    staged_folder,
)
from qlora_cli.config import validate_recipe
from qlora_cli.errors import QloraError
from tests.tiny import TINY_RECIPE


def _checkpoint(run: Path, step: int, *, complete: bool = True) -> Path:
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def _recipe(**training):
    raw = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    raw["training"].update(training)
    return validate_recipe(raw)


# --------------------------------------------------------------------------- finding a checkpoint


def test_resume_takes_the_newest_complete_checkpoint_and_skips_incomplete_ones(tmp_path, capsys):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 12, complete=False)  # crashed mid-save, by another tool
    (tmp_path / "checkpoint-14").mkdir()
    (tmp_path / "checkpoint-14" / "trainer_state.json").write_text('{"global_st')  # truncated
    assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert "Skipping incomplete checkpoint-12, checkpoint-14" in capsys.readouterr().err


def test_a_finished_run_folder_is_not_mistaken_for_a_checkpoint(tmp_path):
    """The final save writes trainer_state.json at the run's root (for the report) beside checkpoint-N."""
    _checkpoint(tmp_path, 3)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint-3"


def test_resume_from_an_explicit_checkpoint_or_nothing(tmp_path):
    explicit = _checkpoint(tmp_path, 4)
    assert find_resume_checkpoint(explicit) == explicit
    broken = _checkpoint(tmp_path, 6, complete=False)
    with pytest.raises(QloraError, match="incomplete checkpoint"):
        find_resume_checkpoint(broken)
    with pytest.raises(QloraError, match="no such folder"):
        find_resume_checkpoint(tmp_path / "missing")
    with pytest.raises(QloraError, match=r"nothing to resume .* \(skipped incomplete checkpoint-1\)"):
        empty = tmp_path / "run"
        _checkpoint(empty, 1, complete=False)
        find_resume_checkpoint(empty)


# --------------------------------------------------------------------------- recipe drift


def test_drift_lists_fields_that_change_training_and_ignores_the_rest():
    saved = _recipe().model_dump(mode="json")
    current = _recipe(learning_rate=1e-3, logging_steps=7, save_steps=9, report_to=["tensorboard"]).model_dump(
        mode="json"
    )
    current["output_dir"] = "elsewhere"
    current["eval"]["exact_match_samples"] = 5
    current["lora"]["target_modules"] = ["q_proj"]
    assert recipe_drift(saved, current) == [
        "lora.target_modules: 'all-linear' -> ['q_proj']",
        "training.learning_rate: 0.003 -> 0.001",
    ]


def test_changed_recipe_refuses_unless_forced(tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path, 4)
    (checkpoint / RECIPE_FILE).write_text(_recipe().to_yaml())
    check_recipe_drift(checkpoint, _recipe(logging_steps=3), force=False)  # not a training change
    with pytest.raises(QloraError, match=r"training.max_steps: 10 -> 20.*--force"):
        check_recipe_drift(checkpoint, _recipe(max_steps=20), force=False)
    check_recipe_drift(checkpoint, _recipe(max_steps=20), force=True)
    assert "training.max_steps: 10 -> 20" in capsys.readouterr().err


def test_drift_falls_back_to_the_run_folders_recipe(tmp_path):
    checkpoint = _checkpoint(tmp_path, 4)
    (tmp_path / RECIPE_FILE).write_text(_recipe(seed=1).to_yaml())
    with pytest.raises(QloraError, match="training.seed: 1 -> 42"):
        check_recipe_drift(checkpoint, _recipe(), force=False)


# --------------------------------------------------------------------------- atomic writes


def _save_step(callback: AtomicCheckpoints, run: Path, step: int) -> None:
    """What Trainer does around a save: on_step_end, write into args.output_dir, on_save."""
    args = SimpleNamespace(output_dir=str(run), should_save=True)
    state = SimpleNamespace(global_step=step)
    control = SimpleNamespace(should_save=True)
    callback.on_step_end(args, state, control)
    assert Path(args.output_dir) == run / STAGING
    staged = _checkpoint(Path(args.output_dir), step)
    (staged / "in-progress").write_text("")
    assert not (run / f"checkpoint-{step}" / "in-progress").exists()  # nothing visible until the save is complete
    callback.on_save(args, state, control)
    assert args.output_dir == str(run)


def test_checkpoints_are_published_whole_with_their_recipe_and_pruned(tmp_path):
    recipe = _recipe()
    callback = AtomicCheckpoints(tmp_path, recipe, keep=2)
    for step in (2, 4, 6):
        _save_step(callback, tmp_path, step)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert (tmp_path / "checkpoint-6" / RECIPE_FILE).read_text() == recipe.to_yaml()
    assert not any((tmp_path / STAGING).iterdir())


def test_publishing_over_an_existing_checkpoint_replaces_it(tmp_path):
    old = _checkpoint(tmp_path, 4)
    (old / "stale.txt").write_text("from an abandoned branch of the run")
    _save_step(AtomicCheckpoints(tmp_path, _recipe(), keep=None), tmp_path, 4)
    assert not (tmp_path / "checkpoint-4" / "stale.txt").exists()
    assert (tmp_path / "checkpoint-4" / "trainer_state.json").exists()


def test_prune_keeps_newest_complete_ones_by_step_not_by_name(tmp_path):
    for step in (9, 10, 100):
        _checkpoint(tmp_path, step)
    prune(tmp_path, keep=1)
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-100"]


def test_disk_full_while_saving_is_one_clear_error_and_keeps_earlier_checkpoints(tmp_path):
    _checkpoint(tmp_path, 2)
    callback = AtomicCheckpoints(tmp_path, _recipe(), keep=2)
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=True)
    with pytest.raises(QloraError) as caught:
        with callback.reporting_failures():
            callback.on_step_end(args, SimpleNamespace(global_step=4), SimpleNamespace(should_save=True))
            partial = _checkpoint(Path(args.output_dir), 4, complete=False)
            raise OSError(errno.ENOSPC, "No space left on device", str(partial / "optimizer.pt"))
    message = str(caught.value)
    assert "could not write checkpoint-4" in message and "disk full" in message
    assert "earlier checkpoints are intact (checkpoint-2)" in message and "--resume" in message
    assert not partial.exists()
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").exists()


def test_errors_outside_a_save_pass_through(tmp_path):
    callback = AtomicCheckpoints(tmp_path, _recipe(), keep=2)
    with pytest.raises(ZeroDivisionError):
        with callback.reporting_failures():
            raise ZeroDivisionError
    with pytest.raises(ZeroDivisionError):  # a save step whose evaluation fails before anything is written
        with callback.reporting_failures():
            args = SimpleNamespace(output_dir=str(tmp_path))
            callback.on_step_end(args, SimpleNamespace(global_step=4), SimpleNamespace(should_save=True))
            raise ZeroDivisionError


def test_final_artifacts_appear_only_when_all_are_written(tmp_path):
    with pytest.raises(QloraError, match="could not write the final adapter"):
        with final_artifacts(tmp_path) as staged:
            (staged / "adapter_model.safetensors").write_bytes(b"half")
            raise RuntimeError("killed")
    assert not (tmp_path / "adapter_model.safetensors").exists()
    with final_artifacts(tmp_path) as staged:
        (staged / "adapter_model.safetensors").write_bytes(b"all")
        (staged / "metrics.json").write_text("{}")
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == b"all"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors", "metrics.json"]


def test_staged_folder_starts_empty(tmp_path):
    (tmp_path / STAGING / "x").mkdir(parents=True)
    (tmp_path / STAGING / "x" / "leftover").write_text("from a crash")
    with staged_folder(tmp_path, "x", "x") as staged:
        assert not any(staged.iterdir())


# --------------------------------------------------------------------------- data order


def test_group_by_length_order_depends_on_seed_and_epoch_only():
    import torch
    from accelerate.data_loader import skip_first_batches
    from torch.utils.data import DataLoader
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = [(i * 7) % 23 + 1 for i in range(64)]
    loader = DataLoader(list(range(64)), batch_size=4, sampler=LengthGroupedSampler(4, lengths=lengths))
    callback = SeededLengthGrouping(seed=42)

    def order(epoch: float, rng_seed: int) -> list[int]:
        callback.on_epoch_begin(None, SimpleNamespace(epoch=epoch), None, train_dataloader=loader)
        torch.manual_seed(rng_seed)  # the global RNG, wherever dropout left it
        return [int(i) for batch in loader for i in batch]

    assert order(1.0, rng_seed=0) == order(1.5, rng_seed=123)
    assert order(0.0, rng_seed=0) != order(1.0, rng_seed=0)
    resumed = skip_first_batches(loader, 3)  # how Trainer fast-forwards on resume
    callback.on_epoch_begin(None, SimpleNamespace(epoch=1.25), None, train_dataloader=loader)
    assert [int(i) for b in resumed for i in b] == order(1.0, rng_seed=5)[12:]


# --------------------------------------------------------------------------- a real full disk


def _can_mount_tmpfs() -> bool:
    import subprocess

    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d; rmdir $d"
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and mount for a small private tmpfs")
def test_disk_full_during_a_real_run_keeps_the_earlier_checkpoint(tmp_path):
    """`qlora train` on a 2.5 MiB tmpfs: checkpoint-2 (~1.8 MiB) fits, checkpoint-4 does not."""
    import os
    import shlex
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.tiny import write_recipe

    recipe = write_recipe(tmp_path, training={"max_steps": 4, "save_steps": 2}, lora={"r": 16})
    disk = tmp_path / "disk"
    disk.mkdir()
    train = shlex.join([sys.executable, "-m", "qlora_cli", "train", "--config", str(recipe), f"output_dir={disk}/run"])
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=2560k tmpfs {disk} && {train}; "
         f"cp -r {disk}/run {tmp_path}/after"],  # fmt: skip
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: could not write checkpoint-4"), result.stderr[-3000:]
    assert "disk full" in last_line
    assert "earlier checkpoints are intact (checkpoint-2)" in last_line
    after = tmp_path / "after"
    assert sorted(p.name for p in after.glob("checkpoint-*")) == ["checkpoint-2"]
    assert find_resume_checkpoint(after) == after / "checkpoint-2"
    assert not (after / STAGING / "checkpoint-4").exists()
