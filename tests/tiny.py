"""A recipe small enough for end-to-end tests of `qlora train` on the CPU (seconds, not minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

TINY_RECIPE = {
    "output_dir": "runs/tiny",
    "model": {"name_or_path": "builtin:tiny-llama"},
    "quantization": {"bits": 4},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
    "data": {
        "dataset": "alpaca",
        "path": "builtin:demo-instructions",
        "source_max_len": 48,
        "target_max_len": 16,
        "eval_size": 0,
        "max_train_samples": 8,
    },
    "training": {
        "batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 3.0e-3,
        "max_steps": 10,
        "logging_steps": 1,
        "save_steps": 2,
        "save_total_limit": 2,
    },
}


def write_recipe(folder: Path, name: str = "tiny.yaml", **sections: dict) -> Path:
    """TINY_RECIPE with `sections` merged in, written to folder/name."""
    recipe = {key: dict(value) if isinstance(value, dict) else value for key, value in TINY_RECIPE.items()}
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def tiny_recipe(**training):
    """TINY_RECIPE as a validated Recipe, with `training` fields changed."""
    from qlora_cli.config import validate_recipe

    raw = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    raw["training"].update(training)
    return validate_recipe(raw)


def fake_checkpoint(run: Path, step: int, *, complete: bool = True) -> Path:
    """A checkpoint-N folder as the Trainer leaves it; without trainer_state.json when the save was cut short."""
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder
