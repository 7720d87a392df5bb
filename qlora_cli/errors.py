"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class QloraError(Exception):
    """A problem the user can fix (bad recipe, missing file, unreachable model); never a bug."""


class ConfigError(QloraError):
    """The recipe or its overrides are invalid; raised before any model is loaded."""


class TrainingInterrupted(QloraError):
    """SIGINT/SIGTERM stopped `qlora train` after a full checkpoint; the exit code follows the shell's 128+N."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


@contextmanager
def refusing_pickled_code(source: object) -> Iterator[None]:
    """torch.load(weights_only=True) refuses a pickle that would run code; say so in one line."""
    try:
        yield
    except pickle.UnpicklingError as exc:
        raise QloraError(
            f"refusing to load {source}: a .bin/.pt file there holds Python objects, not only tensors "
            "(read with weights_only=True); re-save it as safetensors"
        ) from exc


def read_text(path: Path, what: str) -> str:
    """A UTF-8 file a command reads (prompts, questions, answers, reviews); unreadable is one line naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QloraError(f"{what} {path} is not UTF-8 text") from None
    except OSError as exc:
        raise QloraError(f"cannot read {what} {path}: {exc.strerror}") from None
