"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class QloraError(Exception):
    """A problem the user can fix (bad recipe, missing file, unreachable model); never a bug."""


class ConfigError(QloraError):
    """The recipe or its overrides are invalid; raised before any model is loaded."""
