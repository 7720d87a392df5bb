"""The bundled recipes in `configs/`: list them, or copy one out as a standalone file to edit."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from qlora_cli.bundled_recipes import bundled_recipe_files, find_bundled_recipe
from qlora_cli.config import Recipe, load_recipe
from qlora_cli.errors import QloraError


@dataclass
class BundledRecipe:
    name: str
    path: Path
    recipe: Recipe

    @property
    def size(self) -> str:
        """The model size the paper names the run by (LLaMA-30B is the paper's 33B); from the file name."""
        found = re.search(r"-(\d+b)$", self.name)
        return found.group(1).upper() if found else "-"


def bundled_recipes() -> list[BundledRecipe]:
    recipes = [BundledRecipe(path.stem, path, load_recipe(path)) for path in bundled_recipe_files()]
    return sorted(recipes, key=lambda r: (r.name.removesuffix(f"-{r.size.lower()}"), int(r.size[:-1] or 0)))


def recipe_table(recipes: list[BundledRecipe]) -> str:
    header = ("RECIPE", "DATASET", "SIZE", "BATCH", "LR", "STEPS", "SOURCE/TARGET", "MODEL")
    rows = [header]
    for item in recipes:
        r = item.recipe
        rows.append(
            (
                item.name,
                r.data.dataset,
                item.size,
                str(r.training.effective_batch_size),
                f"{r.training.learning_rate:g}",
                str(r.training.max_steps),
                f"{r.data.source_max_len}/{r.data.target_max_len}",
                r.model.name_or_path,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    lines.append("\nBATCH is per process (micro batch x accumulation). Copy one to edit: qlora recipes copy NAME DEST")
    return "\n".join(lines)


def copy_recipe(name: str, dest: Path, *, force: bool = False) -> Path:
    """Write the recipe with its `extends:` chain and defaults resolved, so the copy stands alone."""
    source = find_bundled_recipe(name)
    if source is None:
        names = [path.stem for path in bundled_recipe_files()]
        close = difflib.get_close_matches(name.removesuffix(".yaml"), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else "; `qlora recipes` lists them"
        raise QloraError(f"no bundled recipe {name!r}{hint}")
    stem = source.stem
    target = dest / f"{stem}.yaml" if dest.is_dir() else dest
    if target.exists() and not force:
        raise QloraError(f"{target} exists: pass --force to replace it")
    recipe = load_recipe(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"# qlora recipe {stem}, copied with everything it extends resolved\n{recipe.to_yaml()}")
    return target
