"""Hugging Face model cards: README.md with YAML front matter, for a trained adapter or a full finetune.

`qlora train` writes one into output_dir, replacing PEFT's empty template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from qlora_cli.config import Recipe
from qlora_cli.model_kind import ModelKind
from qlora_cli.report import hub_dataset, markdown_table, recipe_rows, result_rows
from qlora_cli.run_folder import CARD_FILE, PLAIN_LORA_DIR

PAPER = "https://arxiv.org/abs/2305.14314"
_TORCH_DTYPES = {"auto": "torch.bfloat16", "bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}


def write_model_card(
    folder: str | Path,
    recipe: Recipe,
    kind: ModelKind,
    metrics: dict[str, Any] | None,
    *,
    log_history: Iterable[dict[str, Any]] = (),
) -> Path:
    """Write folder/README.md for the adapter it holds, or the whole model (`lora.enabled: false`)."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    adapter = recipe.lora.enabled
    base = recipe.model.name_or_path
    dataset = hub_dataset(recipe.data)
    tags = ["qlora", "lora"] if recipe.lora.enabled else ["full-finetune"]
    if recipe.quantization.bits == 4:
        tags += ["4-bit", recipe.quantization.quant_type]
    tags.append(f"base_model:adapter:{base}" if adapter else f"base_model:finetune:{base}")
    data = ModelCardData(
        base_model=base,
        library_name="peft" if adapter else "transformers",
        license="other",
        tags=tags,
        datasets=[dataset] if dataset else None,
        pipeline_tag=kind.pipeline_tag,
    )
    history = list(log_history)
    body = [
        f"# {folder.resolve().name}",
        _intro(recipe),
        "## Training\n\n" + markdown_table(recipe_rows(recipe, metrics), ("", "")),
    ]
    results = result_rows(metrics, history)
    if results:
        body.append("## Results\n\n" + markdown_table(results, ("metric", "value")))
    body += [
        "## How to use\n\n```python\n" + _snippet(folder, recipe, kind) + "```",
        "## Prompt format\n\nTraining prompts looked like this; prompt the model the same way:\n\n```text\n"
        + _prompt_example(recipe)
        + "\n```",
        "## Recipe\n\nTrain again with `qlora train --config recipe.yaml`:\n\n```yaml\n" + recipe.to_yaml() + "```",
        "## License\n\n`license: other` above is a placeholder: set it to what the base model's and the training "
        "data's licenses allow before publishing.",
    ]
    path = folder / CARD_FILE
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(body) + "\n").save(path)
    return path


def _intro(recipe: Recipe) -> str:
    if not recipe.lora.enabled:
        return (
            f"Every weight of `{recipe.model.name_or_path}` finetuned (no LoRA) with the `qlora` CLI on "
            f"`{recipe.data.dataset}`-format data; this folder loads like any transformers model."
        )
    q = recipe.quantization
    frozen = f"{q.bits}-bit {q.quant_type.upper()}" if q.bits == 4 else f"{q.bits}-bit"
    return (
        f"Finetuned the [QLoRA]({PAPER}) way with the `qlora` CLI: `{recipe.model.name_or_path}` stayed frozen in "
        f"{frozen} while LoRA adapters trained on `{recipe.data.dataset}`-format data. This folder holds the "
        "adapter only; load it on top of the base model."
    )


def _snippet(folder: Path, recipe: Recipe, kind: ModelKind) -> str:
    auto_class = kind.auto_class
    dtype = _TORCH_DTYPES[recipe.quantization.compute_dtype]
    where = str(folder)
    if not recipe.lora.enabled:
        return (
            "import torch\n"
            f"from transformers import {auto_class}, AutoTokenizer\n\n"
            f'model = {auto_class}.from_pretrained("{where}", dtype={dtype}, device_map="auto")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n'
        )
    q = recipe.quantization
    if q.bits == 4:
        loading = (
            "    quantization_config=BitsAndBytesConfig(\n"
            "        load_in_4bit=True,\n"
            f'        bnb_4bit_quant_type="{q.quant_type}",\n'
            f"        bnb_4bit_use_double_quant={q.double_quant},\n"
            f"        bnb_4bit_compute_dtype={dtype},\n"
            "    ),\n"
        )
    elif q.bits == 8:
        loading = "    quantization_config=BitsAndBytesConfig(load_in_8bit=True),\n"
    else:
        loading = f"    dtype={dtype},\n"
    return (
        "import torch\n"
        "from peft import PeftModel\n"
        f"from transformers import {auto_class}, AutoTokenizer, BitsAndBytesConfig\n\n"
        f"base = {auto_class}.from_pretrained(\n"
        f'    "{recipe.model.name_or_path}",\n'
        f"{loading}"
        '    device_map="auto",\n'
        ")\n"
        f"{_adapter_line(folder, recipe)}"
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n'
    )


def _adapter_line(folder: Path, recipe: Recipe) -> str:
    """A PiSSA/OLoRA/LoftQ adapter fits only the base its start changed: peft loads its plain-LoRA conversion."""
    if recipe.lora.changes_base:
        return (
            f"# lora.init={recipe.lora.init} changed the base this adapter trained on; its conversion to plain LoRA\n"
            f"# fits the untouched base (`qlora generate --adapter {folder}` rebuilds the base it trained on)\n"
            f'model = PeftModel.from_pretrained(base, "{folder / PLAIN_LORA_DIR}")\n'
        )
    return f'model = PeftModel.from_pretrained(base, "{folder}")  # or the adapter\'s hub id once pushed\n'


def _prompt_example(recipe: Recipe) -> str:
    from qlora_cli.data.formats import FORMATS

    return FORMATS[recipe.data.dataset].prompt("<your prompt>")
