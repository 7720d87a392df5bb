"""A run's output_dir: every file name in it, how checkpoints are found, and how files are written safely.

Every command that reads or writes a run goes through here, so a name is defined once and "is this a
run / a checkpoint?" has one answer. Checkpoints are complete or absent: the Trainer writes a checkpoint
into `.staging/`, and it is renamed into place only once all of it is on disk (`publish`).

    output_dir/
      recipe.yaml                the resolved recipe: what makes a folder a run
      checkpoint-N/              adapter, optimizer, scheduler, RNG states, trainer_state.json (written last),
                                 recipe.yaml
      adapter_model.safetensors  the final adapter (or model), tokenizer, metrics.json, log_history.json,
      adapter_config.json        report.md + figures/, README.md (the model card)
      chat_eval.json             `qlora eval chat scores / elo` of review folders inside the run
      completed                  written last: the run finished
      .staging/                  saves in progress; cleared when a run starts
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from qlora_cli.config import Recipe, load_recipe
from qlora_cli.errors import QloraError

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
LOG_HISTORY_FILE = "log_history.json"  # the Trainer keeps its log history only inside checkpoints
COMPLETED_FILE = "completed"
REPORT_FILE = "report.md"
FIGURES_DIR = "figures"
CARD_FILE = "README.md"
MERGE_REPORT_FILE = "merge_report.json"  # what makes a folder a merged model
EXPORT_REPORT_FILE = "export_report.json"  # what makes a folder a GGUF export (`qlora export gguf`)
MODELFILE_FILE = "Modelfile"  # Ollama's recipe for a GGUF export
BASE_INIT_DIR = "base_init"  # lora.init pissa/olora/loftq: the adapter's start, and what the base became
BASE_INIT_FILE = "base_init.json"
PLAIN_LORA_DIR = "plain_lora"  # such an adapter written as plain LoRA against the untouched base (peft's conversion)
CHAT_EVAL_FILE = "chat_eval.json"  # `qlora eval chat scores / elo` of reviews kept inside the run
STAGING_DIR = ".staging"
TRAINER_STATE_FILE = "trainer_state.json"  # the Trainer writes it last: a checkpoint without it is incomplete
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT.fullmatch(path.name)
    return int(match[1]) if match else None


def trained_steps(checkpoint: Path) -> int | None:
    """The checkpoint's global step, or None when it is incomplete."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    return step if isinstance(step, int) else None


def is_checkpoint(path: Path) -> bool:
    """A `checkpoint-N` folder, or one moved elsewhere: the Trainer's state file is what only checkpoints hold."""
    return checkpoint_step(path) is not None or (path / TRAINER_STATE_FILE).exists()


def has_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG_FILE).is_file()


def find_recipe_file(folder: Path) -> Path | None:
    """The recipe a folder was trained with: beside it (a run, a merged model), or one level up (a checkpoint)."""
    folder = Path(folder)
    candidates = [folder / RECIPE_FILE]
    if checkpoint_step(folder) is not None:
        candidates.append(folder.parent / RECIPE_FILE)
    return next((c for c in candidates if c.is_file()), None)


def read_recipe(folder: Path) -> Recipe | None:
    """The recipe beside `folder` (see find_recipe_file), or None for a folder qlora did not train."""
    found = find_recipe_file(folder)
    return load_recipe(found) if found else None


@dataclass(frozen=True)
class RunFolder:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def recipe_file(self) -> Path:
        return self.path / RECIPE_FILE

    @property
    def staging(self) -> Path:
        return self.path / STAGING_DIR

    def is_run(self) -> bool:
        return self.recipe_file.is_file()

    def is_completed(self) -> bool:
        return (self.path / COMPLETED_FILE).exists()

    def is_empty(self) -> bool:
        if self.path.exists() and not self.path.is_dir():
            raise QloraError(f"output_dir {self.path} is a file, not a folder: choose another output_dir")
        return not self.path.exists() or not any(self.path.iterdir())

    def checkpoint(self, step: int) -> Path:
        return self.path / checkpoint_name(step)

    def checkpoints(self, *, complete: bool = True) -> list[Path]:
        """checkpoint-N folders, oldest step first; only complete ones unless `complete=False`."""
        if not self.path.is_dir():
            return []
        found = [p for p in self.path.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
        return sorted((p for p in found if not complete or trained_steps(p) is not None), key=checkpoint_step)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    # ------------------------------------------------------------------ what training leaves

    def write_recipe(self, recipe_yaml: str) -> None:
        self.recipe_file.write_text(recipe_yaml)

    def read_metrics(self) -> dict[str, Any] | None:
        """metrics.json, written when training ends; None while a run is unfinished."""
        file = self.path / METRICS_FILE
        return _read_json(file) if file.is_file() else None

    def log_history(self) -> list[dict[str, Any]]:
        """The finished run's log history, else the newest checkpoint's (a run still in progress)."""
        candidates = [self.path / LOG_HISTORY_FILE]
        candidates += [c / TRAINER_STATE_FILE for c in reversed(self.checkpoints(complete=False))]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise QloraError(f"{self.path}: no log history in the run or its checkpoints yet; nothing to report")
        history = _read_json(found)
        if found.name == TRAINER_STATE_FILE:
            history = history.get("log_history") if isinstance(history, dict) else None
        if not isinstance(history, list):
            raise QloraError(f"{found}: holds no log history (a list of logged entries)")
        return history

    def read_chat_eval(self) -> dict[str, Any]:
        file = self.path / CHAT_EVAL_FILE
        return _read_json(file) if file.is_file() else {}

    def write_chat_eval(self, key: str, rows: list[dict[str, Any]]) -> None:
        """Keep the newest table of each kind (`relative`, `elo`) for the run report."""
        (self.path / CHAT_EVAL_FILE).write_text(json.dumps({**self.read_chat_eval(), key: rows}, indent=2) + "\n")

    @classmethod
    def enclosing(cls, path: Path) -> RunFolder | None:
        """The run a path lies in (the path itself or a folder above it), if any."""
        for folder in (Path(path).resolve(), *Path(path).resolve().parents):
            if (folder / RECIPE_FILE).is_file():
                return cls(folder)
        return None

    def mark_completed(self) -> None:
        (self.path / COMPLETED_FILE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")

    # ------------------------------------------------------------------ in use, and replaced safely

    @property
    def previous(self) -> Path:
        """Where `--overwrite` keeps the run it replaces until the new one completes (beside it: same disk)."""
        return self.path.with_name(f".{self.path.name}.previous")

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One process trains into a run folder at a time. The OS releases the lock when the process dies;
        readers (report, generate, merge) never take it. The lock file sits beside the folder, which
        `--overwrite` moves."""
        try:
            import fcntl
        except ImportError:  # Windows: no lock
            yield
            return
        lock_file = self.path.with_name(f".{self.path.name}.lock")
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_file, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise QloraError(
                    f"output_dir {self.path} is in use by {holder}: wait for it to finish, or choose another output_dir"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()} (qlora train)")
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def set_aside(self) -> None:
        """Move this run out of the way for `--overwrite`; `restore` or `discard_previous` settles it."""
        shutil.rmtree(self.previous, ignore_errors=True)
        self.path.rename(self.previous)

    def restore(self) -> None:
        """Put the run that `--overwrite` set aside back in place of whatever the new run left."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.previous.rename(self.path)

    def discard_previous(self) -> None:
        shutil.rmtree(self.previous, ignore_errors=True)

    # ------------------------------------------------------------------ writing safely

    def clear_staging(self) -> None:
        """Remove what a crashed save left behind; it was never published, so nothing of value is lost."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def staged_checkpoint(self, step: int) -> Path:
        return self.staging / checkpoint_name(step)

    def publish_checkpoint(self, step: int, recipe_yaml: str, keep: int | None) -> Path:
        """Move a fully written staged checkpoint into place, with its recipe; then keep the newest `keep`."""
        staged = self.staged_checkpoint(step)
        (staged / RECIPE_FILE).write_text(recipe_yaml)
        target = self.checkpoint(step)
        publish(staged, target)
        if keep is not None:
            for old in self.checkpoints()[:-keep]:
                self._remove(old)
        return target

    def _remove(self, checkpoint: Path) -> None:
        """Move out of sight first, so a crash while deleting never leaves a half-deleted checkpoint-N."""
        self.staging.mkdir(exist_ok=True)
        doomed = self.staging / f"{checkpoint.name}.removed"
        checkpoint.rename(doomed)
        shutil.rmtree(doomed)

    @contextmanager
    def final_files(self) -> Iterator[Path]:
        """Write the run's final files into a staged folder, then rename each into the run folder."""
        staged = self.staging / "final"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        try:
            yield staged
            for file in sorted(staged.iterdir()):
                _fsync(file)
                os.replace(file, self.path / file.name)
        except Exception as exc:
            raise QloraError(self.save_failure(exc, staged, "the final adapter")) from exc
        self.clear_staging()

    def save_failure(self, exc: BaseException, staged: Path, what: str) -> str:
        """One line naming what could not be written, why, and that earlier checkpoints are intact.

        torch.save reports a full disk only as "unexpected pos ...", so little free space counts as full too.
        """
        free = shutil.disk_usage(staged.parent if staged.parent.exists() else self.path).free
        shutil.rmtree(staged, ignore_errors=True)
        cause = _root_cause(exc)
        full = _disk_full(exc) or free < 16 * 2**20
        reason = f"disk full ({free / 2**20:.1f} MiB free)" if full else f"{type(cause).__name__}: {cause}"
        intact = ", ".join(p.name for p in self.checkpoints()) or "none yet"
        remedy = "Free some space" if full else "Fix that"
        return (
            f"could not write {what} in {self.path}: {reason}. The partial copy was removed; earlier checkpoints "
            f"are intact ({intact}). {remedy}, then continue with --resume"
        )


# What the Trainer needs to continue exactly where a checkpoint stopped (weights, optimizer, schedule, RNG, state).
_EXACT_RESUME = {
    "weights": ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "model-*.safetensors",
                "pytorch_model*.bin", "pytorch_model_fsdp*"),
    "optimizer state": ("optimizer.pt", "optimizer*", "global_step*"),
    "learning-rate scheduler": ("scheduler.pt",),
    "RNG state": ("rng_state*.pth",),
    TRAINER_STATE_FILE: (TRAINER_STATE_FILE,),
}  # fmt: skip


def resume_problems(checkpoint: Path, *, rank: int | None = None) -> list[str]:
    """What keeps a resume from being exact: parts missing, or files truncated or corrupt.

    `rank`: one of several processes, which reads its own RNG state; the Trainer only logs its absence (a node
    without a shared filesystem whose copy of the checkpoint lacks it resumed silently inexactly).
    """
    parts = dict(_EXACT_RESUME)
    if rank is not None:
        del parts["RNG state"]
        parts[f"RNG state of process {rank} (rng_state_{rank}.pth)"] = (f"rng_state_{rank}.pth",)
    problems = [f"no {part}" for part, patterns in parts.items() if not any(any(checkpoint.glob(p)) for p in patterns)]
    for file in sorted(checkpoint.iterdir()) if checkpoint.is_dir() else []:
        if file.suffix in (".pt", ".pth") and not zipfile.is_zipfile(file):  # torch.save writes a zip archive
            problems.append(f"{file.name} is truncated or corrupt")
        elif file.suffix == ".safetensors" and safetensors_problem(file):
            problems.append(f"{file.name} is truncated or corrupt")
    if trained_steps(checkpoint) is None and not any(TRAINER_STATE_FILE in p for p in problems):
        problems.append(f"{TRAINER_STATE_FILE} is unreadable")
    return problems


def safetensors_problem(file: Path) -> str | None:
    """A one-line reason when `file` is not a readable safetensors file (its header is parsed, not the weights)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except Exception as exc:  # SafetensorError, OSError: whatever the file is, it is not one
        return f"{file}: not a readable safetensors file ({str(exc).splitlines()[0][:120]})"
    return None


def resume_checkpoint(path: Path) -> Path:
    """`path` itself if it is a checkpoint, else the newest complete checkpoint in the run folder `path`."""
    path = Path(path)
    if not path.exists():
        raise QloraError(f"cannot resume from {path}: no such folder")
    if is_checkpoint(path):
        if trained_steps(path) is None:
            raise QloraError(f"cannot resume from {path}: incomplete checkpoint (no readable {TRAINER_STATE_FILE})")
        return path
    run = RunFolder(path)
    newest = run.latest_checkpoint()
    skipped = [p for p in run.checkpoints(complete=False) if trained_steps(p) is None]
    if newest is None:
        note = f" (skipped incomplete {', '.join(p.name for p in skipped)})" if skipped else ""
        raise QloraError(
            f"nothing to resume in {path}: no complete checkpoint{note}; run without --resume to start over"
        )
    later = [p.name for p in skipped if checkpoint_step(p) > checkpoint_step(newest)]
    if later:
        print(f"Skipping incomplete {', '.join(later)}; resuming from {newest.name}", file=sys.stderr)
    return newest


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A folder written beside `target` and published in its place only once complete."""
    staged = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    publish(staged, target)


def publish(staged: Path, target: Path) -> None:
    """Flush a fully written folder to disk and rename it to `target`, replacing an older one atomically."""
    for file in staged.rglob("*"):
        if file.is_file():
            _fsync(file)
    if target.exists():
        replaced = staged.with_name(staged.name + ".replaced")
        target.rename(replaced)
        staged.rename(target)
        shutil.rmtree(replaced)
    else:
        staged.rename(target)


def _fsync(file: Path) -> None:
    with open(file, "rb") as handle:
        os.fsync(handle.fileno())


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise QloraError(f"{file}:{exc.lineno}: invalid JSON: {exc.msg}") from None


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
