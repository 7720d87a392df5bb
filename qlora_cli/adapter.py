"""A trained adapter folder, checked once, with the base model and recipe it was trained with.

`qlora train` writes the adapter, its tokenizer and `recipe.yaml` side by side; an adapter from elsewhere
has only peft's `adapter_config.json`, which records the base model and nothing about quantization.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_cli.config import BASE_CHANGING_INITS, ModelConfig, QuantizationConfig, Recipe
from qlora_cli.data.formats import FORMATS, DatasetFormat
from qlora_cli.errors import QloraError
from qlora_cli.run_folder import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHT_FILES,
    PLAIN_LORA_DIR,
    TOKENIZER_CONFIG_FILE,
    read_recipe,
    safetensors_problem,
)


@dataclass(frozen=True)
class TrainedAdapter:
    path: Path
    config: dict[str, Any]  # adapter_config.json
    recipe: Recipe | None  # the run's recipe, when qlora trained it

    @property
    def quantization(self) -> QuantizationConfig:
        """How the base was quantized in training; without a recipe, the paper's NF4 + double quant."""
        return self.recipe.quantization if self.recipe else QuantizationConfig()

    def base_model(self, override: ModelConfig | None = None) -> ModelConfig:
        """The recorded base (the recipe's, else peft's), with the tokenizer training saved beside the adapter."""
        tokenizer = str(self.path) if (self.path / TOKENIZER_CONFIG_FILE).is_file() else None
        if self.recipe:
            cfg = self.recipe.model
            updates: dict[str, Any] = {"tokenizer": tokenizer or cfg.tokenizer}
            if override:
                updates |= {"name_or_path": override.name_or_path, "gguf_file": override.gguf_file}
            return cfg.model_copy(update=updates)
        if override:
            return override.model_copy(update={"tokenizer": tokenizer or override.tokenizer})
        name = self.config.get("base_model_name_or_path")
        if not name:
            raise QloraError(f"{self.path / ADAPTER_CONFIG_FILE} records no base model: pass the base model explicitly")
        return ModelConfig(name_or_path=name, tokenizer=tokenizer, revision=self.config.get("revision"))


    def plain_lora(self) -> TrainedAdapter | None:
        """Training's conversion of a PiSSA/OLoRA/LoftQ adapter to plain LoRA against the untouched base, if any."""
        folder = self.path / PLAIN_LORA_DIR
        if not (folder / ADAPTER_CONFIG_FILE).is_file():
            return None
        return TrainedAdapter(folder, json.loads((folder / ADAPTER_CONFIG_FILE).read_text()), self.recipe)

    def needs(self) -> list[str]:
        """What a LoRA loader must support beyond plain LoRA to load this adapter as trained."""
        c = self.config
        init = str(c.get("init_lora_weights", True)).split("_niter_")[0]
        return [
            feature
            for feature, used in (
                ("DoRA", c.get("use_dora")),
                ("trained biases", c.get("bias", "none") != "none"),
                ("rsLoRA scaling", c.get("use_rslora")),
                ("trainable token rows", c.get("trainable_token_indices")),
                ("fully trained embeddings", c.get("modules_to_save")),
                (f"the base its {init} start changed", init in BASE_CHANGING_INITS),
            )
            if used
        ]


def read_adapter(path: str | Path) -> TrainedAdapter:
    path = Path(path).expanduser()
    if not path.exists():
        raise QloraError(f"adapter folder not found: {path}")
    if not path.is_dir():
        raise QloraError(f"adapter {path} is not a folder")
    config_file = path / ADAPTER_CONFIG_FILE
    if not config_file.is_file():
        raise QloraError(f"{path} is not a PEFT adapter folder (no {ADAPTER_CONFIG_FILE})")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise QloraError(f"{config_file}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise QloraError(f"{config_file} is not a PEFT adapter config (no peft_type)")
    if not any((path / name).is_file() for name in ADAPTER_WEIGHT_FILES):
        raise QloraError(f"{path} has no adapter weights ({' or '.join(ADAPTER_WEIGHT_FILES)})")
    weights = path / ADAPTER_WEIGHT_FILES[0]
    problem = safetensors_problem(weights) if weights.is_file() else None
    if problem:
        raise QloraError(problem)
    return TrainedAdapter(path, config, read_recipe(path))


def prompt_format(recipe: Recipe | None, tokenizer: Any) -> DatasetFormat | None:
    """How the recipe's dataset wrapped prompts in training; None (prompts as given) without a recipe."""
    return FORMATS[recipe.data.dataset].for_tokenizer(tokenizer) if recipe else None
