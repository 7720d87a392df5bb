"""The run folder: checkpoints complete or absent, the newest complete one found on resume, one set of file names."""

from __future__ import annotations

import errno
import json

import pytest

from qlora_cli.errors import QloraError
from qlora_cli.run_folder import (
    LOG_HISTORY_FILE,
    RECIPE_FILE,
    STAGING_DIR,
    RunFolder,
    find_recipe_file,
    is_checkpoint,
    resume_checkpoint,
)
from tests.tiny import fake_checkpoint, tiny_recipe




# --------------------------------------------------------------------------- finding a checkpoint


def test_resume_takes_the_newest_complete_checkpoint_and_skips_incomplete_ones(tmp_path, capsys):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 12, complete=False)  # crashed mid-save, by another tool
    (tmp_path / "checkpoint-14").mkdir()
    (tmp_path / "checkpoint-14" / "trainer_state.json").write_text('{"global_st')  # truncated
    assert resume_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert "Skipping incomplete checkpoint-12, checkpoint-14" in capsys.readouterr().err


def test_a_finished_run_folder_is_not_mistaken_for_a_checkpoint(tmp_path):
    """The run root keeps its log history under its own name, so only checkpoints hold trainer_state.json."""
    fake_checkpoint(tmp_path, 3)
    (tmp_path / LOG_HISTORY_FILE).write_text("[]")
    (tmp_path / RECIPE_FILE).write_text("output_dir: x\n")
    assert not is_checkpoint(tmp_path)
    assert resume_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    moved = tmp_path / "kept-aside"
    (tmp_path / "checkpoint-3").rename(moved)  # a checkpoint under another name is still one
    assert is_checkpoint(moved) and resume_checkpoint(moved) == moved


def test_recipe_is_found_beside_a_folder_or_above_a_checkpoint(tmp_path):
    checkpoint = fake_checkpoint(tmp_path, 2)
    assert find_recipe_file(checkpoint) is None
    (tmp_path / RECIPE_FILE).write_text("output_dir: x\n")
    assert find_recipe_file(checkpoint) == tmp_path / RECIPE_FILE
    (checkpoint / RECIPE_FILE).write_text("output_dir: y\n")
    assert find_recipe_file(checkpoint) == checkpoint / RECIPE_FILE
    other = tmp_path / "merged"
    other.mkdir()
    assert find_recipe_file(other) is None  # only a checkpoint looks one level up


def test_log_history_of_a_finished_run_or_of_its_newest_checkpoint(tmp_path):
    run = RunFolder(tmp_path)
    with pytest.raises(QloraError, match="no log history in the run or its checkpoints yet"):
        run.log_history()
    for step in (2, 10):
        folder = fake_checkpoint(tmp_path, step)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": [{"step": step}]}))
    assert run.log_history() == [{"step": 10}]  # by step, not by name (checkpoint-2 sorts after checkpoint-10)
    (tmp_path / LOG_HISTORY_FILE).write_text(json.dumps([{"step": 12}]))
    assert run.log_history() == [{"step": 12}]
    (tmp_path / LOG_HISTORY_FILE).write_text('[{"step": ')
    with pytest.raises(QloraError, match=rf"{LOG_HISTORY_FILE}:1: invalid JSON"):
        run.log_history()


def test_metrics_and_completed_marker(tmp_path):
    run = RunFolder(tmp_path)
    assert run.read_metrics() is None and not run.is_completed() and not run.is_run()
    run.write_recipe("output_dir: x\n")
    (tmp_path / "metrics.json").write_text('{"steps": 3}')
    run.mark_completed()
    assert run.is_run() and run.is_completed() and run.read_metrics() == {"steps": 3}


def test_resume_from_an_explicit_checkpoint_or_nothing(tmp_path):
    explicit = fake_checkpoint(tmp_path, 4)
    assert resume_checkpoint(explicit) == explicit
    broken = fake_checkpoint(tmp_path, 6, complete=False)
    with pytest.raises(QloraError, match="incomplete checkpoint"):
        resume_checkpoint(broken)
    with pytest.raises(QloraError, match="no such folder"):
        resume_checkpoint(tmp_path / "missing")
    with pytest.raises(QloraError, match=r"nothing to resume .* \(skipped incomplete checkpoint-1\)"):
        empty = tmp_path / "run"
        fake_checkpoint(empty, 1, complete=False)
        resume_checkpoint(empty)


# --------------------------------------------------------------------------- atomic writes


def _publish(run: RunFolder, step: int, recipe_yaml: str = "output_dir: x\n", keep: int | None = None) -> None:
    """What QloraTrainer does around a save: the Trainer writes into staging, then the folder is published."""
    staged = fake_checkpoint(run.staging, step)
    assert staged == run.staged_checkpoint(step)
    (staged / "in-progress").write_text("")
    assert not (run.checkpoint(step) / "in-progress").exists()  # nothing visible until it is published
    run.publish_checkpoint(step, recipe_yaml, keep=keep)


def test_checkpoints_are_published_whole_with_their_recipe_and_pruned(tmp_path):
    run, recipe = RunFolder(tmp_path), tiny_recipe()
    for step in (2, 4, 6):
        _publish(run, step, recipe.to_yaml(), keep=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert (tmp_path / "checkpoint-6" / RECIPE_FILE).read_text() == recipe.to_yaml()
    assert not any((tmp_path / STAGING_DIR).iterdir())


def test_publishing_over_an_existing_checkpoint_replaces_it(tmp_path):
    old = fake_checkpoint(tmp_path, 4)
    (old / "stale.txt").write_text("from an abandoned branch of the run")
    _publish(RunFolder(tmp_path), 4)
    assert not (tmp_path / "checkpoint-4" / "stale.txt").exists()
    assert (tmp_path / "checkpoint-4" / "trainer_state.json").exists()


def test_prune_keeps_newest_complete_ones_by_step_not_by_name(tmp_path):
    for step in (9, 10):
        fake_checkpoint(tmp_path, step)
    _publish(RunFolder(tmp_path), 100, keep=1)
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-100"]


def test_a_failed_save_is_one_clear_line_and_removes_the_partial_copy(tmp_path):
    fake_checkpoint(tmp_path, 2)
    run = RunFolder(tmp_path)
    partial = fake_checkpoint(run.staging, 4, complete=False)
    full = OSError(errno.ENOSPC, "No space left on device", str(partial / "optimizer.pt"))
    message = run.save_failure(full, partial, "checkpoint-4")
    assert "could not write checkpoint-4" in message and "disk full" in message
    assert "earlier checkpoints are intact (checkpoint-2)" in message and "--resume" in message
    assert not partial.exists()
    other = run.save_failure(PermissionError("read-only"), fake_checkpoint(run.staging, 6), "checkpoint-6")
    assert "PermissionError: read-only" in other and "Fix that" in other


def test_final_files_appear_only_when_all_are_written(tmp_path):
    run = RunFolder(tmp_path)
    with pytest.raises(QloraError, match="could not write the final adapter"):
        with run.final_files() as staged:
            (staged / "adapter_model.safetensors").write_bytes(b"half")
            raise RuntimeError("killed")
    assert not (tmp_path / "adapter_model.safetensors").exists()
    with run.final_files() as staged:
        (staged / "adapter_model.safetensors").write_bytes(b"all")
        (staged / "metrics.json").write_text("{}")
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == b"all"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors", "metrics.json"]


def test_final_files_start_from_an_empty_staging_folder(tmp_path):
    (tmp_path / STAGING_DIR / "final").mkdir(parents=True)
    (tmp_path / STAGING_DIR / "final" / "leftover").write_text("from a crash")
    with RunFolder(tmp_path).final_files() as staged:
        assert not any(staged.iterdir())


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
    assert resume_checkpoint(after) == after / "checkpoint-2"
    assert not (after / STAGING_DIR / "checkpoint-4").exists()
