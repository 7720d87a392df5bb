"""The recipes shipped with qlora, found wherever qlora is installed, so a user can name one instead of a path.

They live in the checkout's top-level `configs/` and ship in the wheel as the data package `qlora_cli.configs`
(see `[tool.setuptools.package-dir]` in pyproject.toml).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from qlora_cli.errors import QloraError

PACKAGE = "qlora_cli.configs"


def recipes_dir() -> Path:
    """Asked of the import system, not derived from `__file__`: the folder sits beside `qlora_cli/` in a
    checkout (editable install) but inside it in a wheel.

    A real folder is required, not any Traversable, because recipes name their `extends:` parents by relative path.
    """
    try:
        folder = resources.files(PACKAGE)
    except ModuleNotFoundError:
        raise QloraError(
            f"bundled recipes not found: package {PACKAGE} is missing from this install of qlora; reinstall it "
            "(`pip install -e .` in a checkout)"
        ) from None
    if not isinstance(folder, Path) or not folder.is_dir():
        raise QloraError(f"bundled recipes not found: {PACKAGE} is not a folder on disk ({folder}); reinstall qlora")
    return folder


def bundled_recipe_files() -> list[Path]:
    """Only the top level: `base/`, `accelerate/` and `deepspeed/` hold pieces that recipes extend, not recipes."""
    return sorted(recipes_dir().glob("*.yaml"))


def find_bundled_recipe(name: str) -> Path | None:
    """None for a name with a folder part: that is a path the user meant, and must not fall back to a bundled file.

    Matched against the listed files rather than opened, so the answer is the same on case-insensitive disks and
    `base/` pieces are never returned.
    """
    if not name or "/" in name or "\\" in name:
        return None
    stem = name.removesuffix(".yaml")
    return next((path for path in bundled_recipe_files() if path.stem == stem), None)
