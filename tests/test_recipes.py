"""Every bundled recipe validates and carries the paper's numbers; `qlora recipes` lists and copies them."""

from __future__ import annotations

import pytest

from qlora_cli.config import load_recipe
from qlora_cli.errors import QloraError
from qlora_cli.recipes import RECIPES_DIR, bundled_recipes, copy_recipe
from tests.conftest import REPO

SIZES = {  # the paper's training table: model, effective batch, lr, steps, LoRA dropout
    "7b": ("huggyllama/llama-7b", 16, 2e-4, 10000, 0.1),
    "13b": ("huggyllama/llama-13b", 16, 2e-4, 10000, 0.1),
    "33b": ("huggyllama/llama-30b", 32, 1e-4, 5000, 0.05),
    "65b": ("huggyllama/llama-65b", 64, 1e-4, 2500, 0.05),
}
DATASETS = {  # recipe prefix -> dataset, source/target length
    "guanaco": ("oasst1", 16, 512),
    "alpaca": ("alpaca", 384, 128),
    "hh-rlhf": ("hh-rlhf", 16, 768),
    "self-instruct": ("self-instruct", 384, 128),
    "unnatural-instructions": ("unnatural-instructions", 384, 128),
    "flan-v2": ("flan-v2", 384, 128),
    "chip2": ("chip2", 384, 128),
    "longform": ("longform", 512, 1024),
}
EXCEPTIONS = {  # (batch, steps) where the table departs from the general rule
    **{f"guanaco-{s}": (16, 1875) for s in SIZES},
    "longform-7b": (16, 4000),
    "longform-13b": (16, 4000),
    "longform-33b": (32, 2343),
    "longform-65b": (32, 2343),
}
PAPER = [(prefix, size) for prefix in DATASETS for size in SIZES]


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_in_configs_validates(path):
    load_recipe(path)


def test_recipes_dir_is_the_checkout_configs():
    assert RECIPES_DIR == REPO / "configs"


@pytest.mark.parametrize(("prefix", "size"), PAPER, ids=[f"{p}-{s}" for p, s in PAPER])
def test_recipe_has_the_paper_numbers(prefix, size):
    recipe = load_recipe(RECIPES_DIR / f"{prefix}-{size}.yaml")
    model, batch, lr, steps, dropout = SIZES[size]
    dataset, source_len, target_len = DATASETS[prefix]
    batch, steps = EXCEPTIONS.get(f"{prefix}-{size}", (batch, steps))
    t = recipe.training
    assert recipe.model.name_or_path == model
    data = recipe.data
    assert (data.dataset, data.source_max_len, data.target_max_len) == (dataset, source_len, target_len)
    assert (t.effective_batch_size, t.learning_rate, t.max_steps) == (batch, lr, steps)
    lora, quant = recipe.lora, recipe.quantization
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (64, 16, dropout, "all-linear")
    assert (quant.bits, quant.quant_type, quant.double_quant) == (4, "nf4", True)
    assert (t.optim, t.lr_scheduler, t.max_grad_norm, t.warmup_ratio) == ("paged_adamw_32bit", "constant", 0.3, 0.03)
    assert recipe.output_dir == f"runs/{prefix}-{size}"


def test_model_id_is_overridable():
    recipe = load_recipe(RECIPES_DIR / "guanaco-7b.yaml", ["model.name_or_path=/models/my-llama"])
    assert recipe.model.name_or_path == "/models/my-llama"


def test_recipes_command_lists_every_recipe_with_its_numbers(cli):
    code, out, _ = cli("recipes")
    assert code == 0
    table = [line.split() for line in out.splitlines()[1:] if line.strip() and not line.startswith("BATCH")]
    rows = {cells[0]: cells for cells in table}
    assert set(rows) == {p.stem for p in RECIPES_DIR.glob("*.yaml")}
    assert rows["guanaco-33b"][:7] == ["guanaco-33b", "oasst1", "33B", "16", "0.0001", "1875", "16/512"]
    assert rows["longform-65b"][:7] == ["longform-65b", "longform", "65B", "32", "0.0001", "2343", "512/1024"]
    assert [name for name in rows if name.startswith("alpaca-")] == [f"alpaca-{size}" for size in SIZES]


def test_copy_writes_a_standalone_recipe_equal_to_the_bundled_one(cli, tmp_path):
    code, out, _ = cli("recipes", "copy", "longform-33b", str(tmp_path))
    assert code == 0 and str(tmp_path / "longform-33b.yaml") in out
    copied = (tmp_path / "longform-33b.yaml").read_text()
    assert "\nextends:" not in copied
    assert load_recipe(tmp_path / "longform-33b.yaml") == load_recipe(RECIPES_DIR / "longform-33b.yaml")


def test_copy_refuses_to_overwrite_and_suggests_names(tmp_path):
    dest = tmp_path / "mine.yaml"
    dest.write_text("keep me")
    with pytest.raises(QloraError, match="exists: pass --force"):
        copy_recipe("guanaco-7b", dest)
    assert dest.read_text() == "keep me"
    copy_recipe("guanaco-7b.yaml", dest, force=True)
    assert load_recipe(dest).data.dataset == "oasst1"
    with pytest.raises(QloraError, match="did you mean 'guanaco-13b'"):
        copy_recipe("guanaco-13", tmp_path)


def test_bundled_recipes_include_the_demo():
    assert "demo" in {r.name for r in bundled_recipes()}
