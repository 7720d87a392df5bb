"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class QloraError(Exception):
    """A problem the user can fix (bad recipe, missing file, unreachable model); never a bug."""


class ConfigError(QloraError):
    """The recipe or its overrides are invalid; raised before any model is loaded."""


class TrainingInterrupted(QloraError):
    """SIGINT/SIGTERM stopped `qlora train` after a full checkpoint; the exit code follows the shell's 128+N."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
