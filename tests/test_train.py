"""End to end: the real `qlora train` CLI on tiny LLaMA and T5 models, then the artifacts it leaves."""

import json
import math

import pytest
import torch

from qlora_cli.errors import QloraError
from qlora_cli.run_folder import LOG_HISTORY_FILE, RECIPE_FILE
from qlora_cli.train import check_recipe_drift

from tests.conftest import REPO, run_cli
from tests.data_fixtures import hendrycks  # noqa: F401 (fixture)
from tests.tiny import fake_checkpoint, tiny_recipe

DEMO = str(REPO / "configs" / "demo.yaml")
QUICK = [
    "training.max_steps=4",
    "training.batch_size=4",
    "training.save_steps=2",
    "training.logging_steps=1",
    "data.eval_size=8",
    "data.max_train_samples=64",
    "eval.exact_match_samples=0",
]


def train(output_dir, *extra):
    result = run_cli("train", "--config", DEMO, f"output_dir={output_dir}", *QUICK, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module", params=["builtin:tiny-llama", "builtin:tiny-t5"])
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    result = train(out, f"model.name_or_path={request.param}")
    return request.param, out, result


def test_output_layout(run):
    _, out, result = run
    for name in ["adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "metrics.json", "completed"]:
        assert (out / name).is_file(), name
    assert (out / "tokenizer_config.json").is_file()
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    assert (out / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert not list((out / "checkpoint-4").glob("model*.safetensors")), "checkpoints must hold the adapter only"
    assert "Adapter saved to" in result.stdout


def test_metrics_are_finite_and_complete(run):
    metrics = json.loads((run[1] / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    assert metrics["tokens_per_s"] > 0 and metrics["peak_memory_bytes"] > 0
    assert 0 < metrics["training_s"] <= metrics["runtime_s"]
    rounding = 0.005  # training_s is rounded to 10 ms, tokens_per_s was computed before
    slowest, fastest = (metrics["tokens"] / (metrics["training_s"] + d) for d in (rounding, -rounding))
    assert slowest * 0.999 <= metrics["tokens_per_s"] <= fastest * 1.001
    assert 0 < metrics["trainable_params"] < metrics["total_params"]


def test_the_compute_dtype_auto_picked_is_stated_and_recorded(run):
    """In the run's first lines, metrics.json, the report and the model card: it depends on the machine."""
    from qlora_cli.model import choose_compute_dtype

    chosen = choose_compute_dtype("auto", "cpu")
    metrics = json.loads((run[1] / "metrics.json").read_text())
    assert (metrics["compute_dtype"], metrics["compute_dtype_reason"]) == (chosen.name, chosen.reason)
    lines = run[2].stderr.splitlines()
    first_data_line = next(n for n, line in enumerate(lines) if line.startswith("Data "))
    assert f"Compute dtype {chosen.name} ({chosen.reason})" in lines[:first_data_line]
    for name in ("report.md", "README.md"):
        assert f"compute dtype {chosen.name}: {chosen.reason}" in (run[1] / name).read_text(), name


def test_the_checkpointing_decision_is_stated_and_recorded(run):
    """configs/demo.yaml forces it off; `auto` is decided per machine (tests/test_plan.py), so every run says which."""
    metrics = json.loads((run[1] / "metrics.json").read_text())
    reason = "training.gradient_checkpointing=false"
    assert (metrics["gradient_checkpointing"], metrics["gradient_checkpointing_reason"]) == (False, reason)
    assert f"Gradient checkpointing off ({reason})" in run[2].stderr.split("Training:")[0].splitlines()
    assert f"| Gradient checkpointing | off ({reason}) |" in (run[1] / "report.md").read_text()


def test_recipe_written_is_the_resolved_one(run):
    from qlora_cli.config import load_recipe

    recipe = load_recipe(run[1] / "recipe.yaml")
    assert recipe.training.max_steps == 4 and recipe.model.name_or_path == run[0]


def test_adapter_loads_on_the_nf4_base_and_changes_the_output(run):
    import bitsandbytes as bnb
    from peft import PeftModel

    from qlora_cli.config import ModelConfig, QuantizationConfig
    from qlora_cli.model import load_model

    name, out, _ = run
    loaded = load_model(ModelConfig(name_or_path=name), QuantizationConfig(), for_training=False)
    model = PeftModel.from_pretrained(loaded.model, str(out))
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized
    for layer_name, layer in quantized.items():
        assert layer.weight.quant_type == "nf4"
        assert layer.weight.quant_state.nested, f"{layer_name} lacks double quantization"
        assert hasattr(model.get_submodule(layer_name.removesuffix(".base_layer")), "lora_A")
    assert not hasattr(model.get_output_embeddings(), "lora_A")

    batch = loaded.batch(loaded.prompt_ids(["Repeat the words. apple river"]))
    with torch.no_grad():
        adapted = loaded.kind.next_token_logits(model, batch)
        with model.disable_adapter():
            base = loaded.kind.next_token_logits(model, batch)
    assert torch.isfinite(adapted).all()
    assert (adapted - base).abs().max() > 1e-4


def test_a_completed_run_is_not_overwritten_without_the_flag(run):
    out = run[1]
    refused = run_cli("train", "--config", DEMO, f"output_dir={out}", *QUICK)
    assert refused.returncode == 2
    assert "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    assert (out / "completed").is_file()


def test_evaluation_during_training_does_not_change_what_is_trained(cli, tmp_path, hendrycks, avx512_bf16_defaults):
    """Eval loss, exact match and the MMLU callback run no-grad forwards between steps; with bitsandbytes'
    AVX512-BF16 defaults those repacked the 4-bit weights in place and training went on through them."""
    from safetensors.torch import load_file

    common = ["--config", DEMO, *QUICK, "training.max_steps=6", "training.save_steps=100"]
    evaluated, plain = tmp_path / "evaluated", tmp_path / "plain"
    code, _, err = cli(
        "train", *common, f"output_dir={evaluated}", "training.eval_steps=2", "eval.exact_match_samples=4",
        "eval.max_new_tokens=4", f"eval.mmlu={{every_n_steps: 2, split: test, shots: 0, data: {hendrycks}}}",
    )  # fmt: skip
    assert code == 0, err
    assert "autograd kernel was not registered" not in err
    history = json.loads((evaluated / LOG_HISTORY_FILE).read_text())
    assert sum("eval_loss" in e for e in history) == 3 and sum("mmlu_accuracy" in e for e in history) == 3
    code, _, err = cli("train", *common, f"output_dir={plain}")
    assert code == 0, err
    with_eval, without = (load_file(run / "adapter_model.safetensors") for run in (evaluated, plain))
    assert with_eval.keys() == without.keys()
    for name, tensor in with_eval.items():
        torch.testing.assert_close(tensor, without[name], atol=1e-6, rtol=0, msg=name)


# --------------------------------------------------------------------------- resuming with another recipe




def test_changed_recipe_refuses_unless_forced(tmp_path, capsys):
    checkpoint = fake_checkpoint(tmp_path, 4)
    (checkpoint / RECIPE_FILE).write_text(tiny_recipe().to_yaml())
    check_recipe_drift(checkpoint, tiny_recipe(logging_steps=3), force=False)  # not a training change
    with pytest.raises(QloraError, match=r"training.max_steps: 10 -> 20.*--force"):
        check_recipe_drift(checkpoint, tiny_recipe(max_steps=20), force=False)
    check_recipe_drift(checkpoint, tiny_recipe(max_steps=20), force=True)
    assert "training.max_steps: 10 -> 20" in capsys.readouterr().err


def test_drift_falls_back_to_the_run_folders_recipe(tmp_path):
    checkpoint = fake_checkpoint(tmp_path, 4)
    (tmp_path / RECIPE_FILE).write_text(tiny_recipe(seed=1).to_yaml())
    with pytest.raises(QloraError, match="training.seed: 1 -> 42"):
        check_recipe_drift(checkpoint, tiny_recipe(), force=False)
