import json

import pytest

from qlora_cli.adapter import prompt_format, read_adapter
from qlora_cli.config import ModelConfig, load_recipe
from qlora_cli.errors import QloraError
from tests.conftest import REPO

TINY = "model.name_or_path=builtin:tiny-llama"


def fake_adapter(folder, *, config=None, weights=True, recipe=False, tokenizer=False):
    folder.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "base_model_name_or_path": "org/base"} if config is None else config
    (folder / "adapter_config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    if weights:
        import torch
        from safetensors.torch import save_file

        save_file({"base_model.model.w.lora_A.weight": torch.zeros(1)}, folder / "adapter_model.safetensors")
    if recipe:
        (folder / "recipe.yaml").write_text(load_recipe(REPO / "configs/demo.yaml", [TINY]).to_yaml())
    if tokenizer:
        (folder / "tokenizer_config.json").write_text("{}")
    return folder


def test_missing_folder(tmp_path):
    with pytest.raises(QloraError, match="adapter folder not found"):
        read_adapter(tmp_path / "nope")


def test_folder_without_adapter_config_is_not_peft(tmp_path):
    with pytest.raises(QloraError, match="not a PEFT adapter folder"):
        read_adapter(tmp_path)


def test_invalid_adapter_config_names_file_and_line(tmp_path):
    fake_adapter(tmp_path / "a", config='{\n  "peft_type": LORA\n}')
    with pytest.raises(QloraError, match=r"adapter_config.json:2: invalid JSON"):
        read_adapter(tmp_path / "a")


def test_adapter_without_weights(tmp_path):
    fake_adapter(tmp_path / "a", weights=False)
    with pytest.raises(QloraError, match="no adapter weights"):
        read_adapter(tmp_path / "a")


def test_base_without_recipe_is_peft_recorded_base(tmp_path):
    adapter = read_adapter(fake_adapter(tmp_path / "a"))
    assert adapter.recipe is None and prompt_format(adapter.recipe, tokenizer=None) is None
    assert adapter.quantization.bits == 4 and adapter.quantization.quant_type == "nf4"
    assert adapter.base_model().name_or_path == "org/base"
    assert adapter.base_model(ModelConfig(name_or_path="other/base")).name_or_path == "other/base"


def test_no_recorded_base_asks_for_one(tmp_path):
    adapter = read_adapter(fake_adapter(tmp_path / "a", config={"peft_type": "LORA"}))
    with pytest.raises(QloraError, match="records no base model"):
        adapter.base_model()


def test_recipe_beside_adapter_gives_base_format_and_tokenizer(tmp_path):
    adapter = read_adapter(fake_adapter(tmp_path / "a", recipe=True, tokenizer=True))
    base = adapter.base_model()
    assert base.name_or_path == "builtin:tiny-llama"  # the recipe's, not peft's resolved path
    assert base.tokenizer == str(tmp_path / "a")  # the tokenizer training saved
    assert prompt_format(adapter.recipe, tokenizer=None).name == "alpaca"


def test_checkpoint_folder_uses_the_runs_recipe(tmp_path):
    run = tmp_path / "run"
    fake_adapter(run, recipe=True)
    checkpoint = read_adapter(fake_adapter(run / "checkpoint-2"))
    assert checkpoint.recipe is not None and checkpoint.base_model().name_or_path == "builtin:tiny-llama"
    # an unrelated subfolder does not borrow its parent's recipe
    assert read_adapter(fake_adapter(run / "other")).recipe is None


def test_prompt_format_follows_recipe_dataset():
    recipe = load_recipe(REPO / "configs/demo.yaml", ["data.dataset=oasst1"])
    assert prompt_format(recipe, tokenizer=None).prompt("Hi") == "### Human: Hi ### Assistant:"
    assert prompt_format(None, tokenizer=None) is None
