"""Checkpoints that are complete or absent, found again on resume, and resumed exactly.

Trainer writes a checkpoint file by file, so a crash mid-save would leave a folder that looks like one.
Here Trainer writes into `<output_dir>/.staging/`, and the folder is renamed into place only once all of
it (adapter, optimizer, scheduler, RNG states, trainer state, recipe) is on disk.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml
from transformers import TrainerCallback

from qlora_cli.config import Recipe
from qlora_cli.errors import QloraError

RECIPE_FILE = "recipe.yaml"
STAGING = ".staging"
TRAINER_STATE = "trainer_state.json"  # Trainer writes it last: a checkpoint without it is incomplete
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")

# Recipe fields that change what a resumed run computes are everything except these.
NOT_TRAINING = (
    "output_dir",
    "eval",
    "data.max_eval_samples",
    "training.logging_steps",
    "training.save_steps",
    "training.save_total_limit",
    "training.eval_steps",
    "training.eval_batch_size",
    "training.report_to",
    "training.max_bad_steps",
    "training.gradient_checkpointing",
)


# --------------------------------------------------------------------------- finding checkpoints


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT.fullmatch(path.name)
    return int(match[1]) if match else None


def trained_steps(checkpoint: Path) -> int | None:
    """The checkpoint's global step, or None when it is incomplete."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    return step if isinstance(step, int) else None


def is_complete(checkpoint: Path) -> bool:
    return trained_steps(checkpoint) is not None


def restore_without_training(trainer: Any, checkpoint: Path) -> None:
    """For a checkpoint already at max_steps: Trainer.train would run one step past it, so only load it."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(str(checkpoint))  # the weights, however they were saved (adapter, sharded)
    trainer.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE))


def checkpoints(run_dir: Path, *, complete: bool = True) -> list[Path]:
    """checkpoint-N folders in `run_dir`, oldest step first; only complete ones unless `complete=False`."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted((p for p in found if not complete or is_complete(p)), key=checkpoint_step)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def find_resume_checkpoint(path: Path) -> Path:
    """`path` itself if it is a checkpoint, else the newest complete checkpoint in the run folder `path`."""
    if not path.exists():
        raise QloraError(f"cannot resume from {path}: no such folder")
    # A run folder holds a trainer_state.json too (for the report), beside its checkpoint-N folders.
    looks_like_checkpoint = (path / TRAINER_STATE).exists() and not checkpoints(path, complete=False)
    if checkpoint_step(path) is not None or looks_like_checkpoint:
        if not is_complete(path):
            raise QloraError(f"cannot resume from {path}: incomplete checkpoint (no readable {TRAINER_STATE})")
        return path
    newest = latest_checkpoint(path)
    skipped = [p.name for p in checkpoints(path, complete=False) if not is_complete(p)]
    if newest is None:
        note = f" (skipped incomplete {', '.join(skipped)})" if skipped else ""
        raise QloraError(
            f"nothing to resume in {path}: no complete checkpoint{note}; run without --resume to start over"
        )
    later = [name for name in skipped if checkpoint_step(Path(name)) > checkpoint_step(newest)]
    if later:
        print(f"Skipping incomplete {', '.join(later)}; resuming from {newest.name}", file=sys.stderr)
    return newest


# --------------------------------------------------------------------------- recipe drift


def recipe_drift(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: old -> new` for each field that differs and changes training."""
    old, new = _flatten(saved), _flatten(current)
    missing = "<unset>"
    return [
        f"{key}: {old.get(key, missing)!r} -> {new.get(key, missing)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key, missing) != new.get(key, missing) and not _not_training(key)
    ]


def check_recipe_drift(checkpoint: Path, recipe: Recipe, *, force: bool) -> None:
    """Refuse to resume with a recipe that would train differently from the one the checkpoint came from."""
    saved_file = next((f for f in (checkpoint / RECIPE_FILE, checkpoint.parent / RECIPE_FILE) if f.is_file()), None)
    if saved_file is None:
        print(f"warning: {checkpoint} has no {RECIPE_FILE}; cannot check that the recipe is unchanged", file=sys.stderr)
        return
    saved = yaml.safe_load(saved_file.read_text()) or {}
    differences = recipe_drift(saved, recipe.model_dump(mode="json"))
    if not differences:
        return
    listed = "; ".join(differences)
    if not force:
        raise QloraError(
            f"the recipe differs from the one {checkpoint} was trained with ({saved_file}) in fields that change "
            f"training: {listed}. Resume with the same recipe, or pass --force to continue anyway"
        )
    print(f"warning: resuming with a changed recipe (--force): {listed}", file=sys.stderr)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _not_training(key: str) -> bool:
    return any(key == field or key.startswith(field + ".") for field in NOT_TRAINING)


# --------------------------------------------------------------------------- atomic writes


def clear_staging(run_dir: Path) -> None:
    """Remove what a crashed save left behind; it was never published, so nothing of value is lost."""
    shutil.rmtree(run_dir / STAGING, ignore_errors=True)


def publish(staged: Path, target: Path) -> None:
    """Flush a fully written folder to disk and rename it to `target`, replacing an older one atomically."""
    for file in staged.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    if target.exists():
        replaced = staged.with_name(staged.name + ".replaced")
        target.rename(replaced)
        staged.rename(target)
        shutil.rmtree(replaced)
    else:
        staged.rename(target)


def remove(checkpoint: Path, staging: Path) -> None:
    """Move out of sight first, so a crash while deleting never leaves a half-deleted checkpoint-N."""
    staging.mkdir(exist_ok=True)
    doomed = staging / f"{checkpoint.name}.removed"
    checkpoint.rename(doomed)
    shutil.rmtree(doomed)


def prune(run_dir: Path, keep: int | None) -> None:
    """`save_total_limit`: keep the newest `keep` complete checkpoints."""
    if keep is None:
        return
    for old in checkpoints(run_dir)[:-keep]:
        remove(old, run_dir / STAGING)


@contextmanager
def staged_folder(run_dir: Path, name: str, what: str) -> Iterator[Path]:
    """Write `what` into `<run_dir>/.staging/<name>`; a failure removes it and says what is left intact."""
    staged = run_dir / STAGING / name
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        yield staged
    except Exception as exc:
        raise QloraError(save_failure(exc, staged, run_dir, what)) from exc


@contextmanager
def final_artifacts(run_dir: Path) -> Iterator[Path]:
    """Write the run's final files into a staged folder, then rename each into `run_dir`."""
    with staged_folder(run_dir, "final", "the final adapter") as staged:
        yield staged
        for file in sorted(staged.iterdir()):
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(file, run_dir / file.name)
    clear_staging(run_dir)


def save_failure(exc: BaseException, staged: Path, run_dir: Path, what: str) -> str:
    """One line naming what could not be written, why, and that earlier checkpoints are intact.

    torch.save reports a full disk only as "unexpected pos ...", so little free space counts as full too.
    """
    free = shutil.disk_usage(staged.parent if staged.parent.exists() else run_dir).free
    shutil.rmtree(staged, ignore_errors=True)
    cause = _root_cause(exc)
    full = _disk_full(exc) or free < 16 * 2**20
    reason = f"disk full ({free / 2**20:.1f} MiB free)" if full else f"{type(cause).__name__}: {cause}"
    intact = ", ".join(p.name for p in checkpoints(run_dir)) or "none yet"
    remedy = "Free some space" if full else "Fix that"
    return (
        f"could not write {what} in {run_dir}: {reason}. The partial copy was removed; earlier checkpoints "
        f"are intact ({intact}). {remedy}, then continue with --resume"
    )


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


def _disk_full(exc: BaseException | None) -> bool:
    while exc is not None:
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class AtomicCheckpoints(TrainerCallback):
    """Points Trainer at `.staging/` for each save, then publishes the checkpoint with its recipe and prunes.

    Must run after every callback that may request a save (added last), since it acts on `should_save`.
    """

    def __init__(self, run_dir: Path, recipe: Recipe, keep: int | None) -> None:
        self.run_dir = run_dir
        self.recipe_yaml = recipe.to_yaml()
        self.keep = keep
        self.saving_step: int | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.saving_step = state.global_step if control.should_save else None
        args.output_dir = str(self.run_dir / STAGING if control.should_save else self.run_dir)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        args.output_dir = str(self.run_dir)
        _barrier()  # every rank has written its RNG state / optimizer shard into the staged folder
        if args.should_save:
            staged = self.run_dir / STAGING / f"checkpoint-{state.global_step}"
            (staged / RECIPE_FILE).write_text(self.recipe_yaml)
            publish(staged, self.run_dir / staged.name)
            prune(self.run_dir, self.keep)
        self.saving_step = None

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        args.output_dir = str(self.run_dir)

    @contextmanager
    def reporting_failures(self) -> Iterator[None]:
        """A failure while a checkpoint was being written becomes one clear error; others pass through."""
        try:
            yield
        except Exception as exc:
            staged = self.run_dir / STAGING / f"checkpoint-{self.saving_step}"
            if self.saving_step is None or not staged.exists():  # e.g. evaluation failed on a save step
                raise
            raise QloraError(save_failure(exc, staged, self.run_dir, staged.name)) from exc


class SeededLengthGrouping(TrainerCallback):
    """Make the `group_by_length` order a function of (seed, epoch) so a resume replays it exactly.

    Trainer's LengthGroupedSampler draws its order from the global RNG when an epoch starts; after a
    resume that lands in a later epoch, that RNG is not where the uninterrupted run had it.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_epoch_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None, **kwargs: Any) -> None:
        import torch
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sampler = _find_sampler(train_dataloader, LengthGroupedSampler)
        if sampler is not None:
            epoch = int(state.epoch or 0)
            sampler.generator = torch.Generator().manual_seed(self.seed + epoch)


def _find_sampler(loader: Any, kind: type) -> Any | None:
    """Walk the dataloader / accelerate wrappers down to a sampler of type `kind`."""
    node, seen = loader, 0
    while node is not None and seen < 8:
        if isinstance(node, kind):
            return node
        node = getattr(node, "batch_sampler", None) or getattr(node, "sampler", None)
        seen += 1
    return None


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
