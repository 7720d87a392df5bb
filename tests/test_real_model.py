"""On a real pretrained model, SmolLM2-135M-Instruct (from ../shared/data as GGUF): QLoRA training helps."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO

SHARED = REPO.parent / "shared" / "data"
GGUF = SHARED / "models" / "smollm2-135m-instruct-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
OASST1 = SHARED / "oasst1" / "qlora_oa_questions.jsonl"
pytestmark = pytest.mark.skipif(not GGUF.is_file() or not OASST1.is_file(), reason="../shared/data is absent")


def test_the_bundled_smollm2_recipe_lowers_held_out_loss_on_real_oasst1(tmp_path: Path):
    """The shipped recipe, pointed at the shared GGUF and OASST1, shortened to 10 steps of 2 examples."""
    from qlora_cli.config import load_recipe
    from qlora_cli.data import prepare_data
    from qlora_cli.model import add_lora, load_model
    from qlora_cli.trainer import build_trainer

    recipe = load_recipe("smollm2-135m-guanaco", [
        f"output_dir={tmp_path / 'run'}", f"model.name_or_path={GGUF}", f"data.path={OASST1}",
        "data.target_max_len=96", "data.eval_size=16", "data.max_eval_samples=16", "eval.mmlu=null",
        "training.batch_size=2", "training.gradient_accumulation_steps=1", "training.max_steps=10",
        "training.learning_rate=1e-3", "training.eval_steps=10", "training.eval_batch_size=4",
        "training.save_steps=100", "training.gradient_checkpointing=false",
    ])  # fmt: skip
    (tmp_path / "run").mkdir()
    loaded = load_model(recipe.model, recipe.quantization)
    loaded.model = add_lora(loaded.model, recipe.lora, kind=loaded.kind)
    trainer = build_trainer(recipe, loaded, prepare_data(recipe.data, loaded.tokenizer, kind=loaded.kind, seed=0))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = next(e["eval_loss"] for e in reversed(trainer.state.log_history) if "eval_loss" in e)
    print(f"held-out loss {before:.4f} -> {after:.4f}")
    assert after < before - 0.1
