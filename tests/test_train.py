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
from tests.trained import run_cli_in_process

DEMO = str(REPO / "configs" / "demo.yaml")
QUICK = [
    "training.max_steps=4",
    "training.batch_size=4",
    "training.save_steps=2",
    "training.logging_steps=1",
    "data.eval_size=8",
    "data.max_train_samples=64",
    "model.name_or_path=builtin:tiny-llama",
    "eval.exact_match_samples=0",
    "eval.loss_before_after=false",
    "eval.knowledge_probes=[]",
]


def train(output_dir, *extra):
    return run_cli_in_process("train", "--config", DEMO, f"output_dir={output_dir}", *QUICK, *extra)


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
    rounding = 0.005  # training_s is rounded to 10 ms, tokens_per_s (before) to 0.1
    slowest, fastest = (metrics["tokens"] / (metrics["training_s"] + d) for d in (rounding, -rounding))
    assert slowest - 0.05 <= metrics["tokens_per_s"] <= fastest + 0.05
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


def test_the_loss_path_is_stated_and_recorded(run):
    """auto: the LLaMA's loss over the vocabulary in chunks (Liger's kernel where CUDA and liger-kernel are), T5's
    the model's own; every run says which and why, and its recipe.yaml records it."""
    from qlora_cli.loss import fused_problem
    from qlora_cli.model import device_for_process

    model, out, result = run
    metrics = json.loads((out / "metrics.json").read_text())
    expected = "plain" if model == "builtin:tiny-t5" else "chunked" if fused_problem(device_for_process()) else "fused"
    said = f"{expected} ({metrics['loss_path_reason']})"
    assert metrics["loss_path"] == expected and metrics["loss_path_reason"].startswith("auto: ")
    assert f"Loss over the vocabulary {said}" in result.stderr.split("Training:")[0].splitlines()
    assert f"| Loss over the vocabulary | {said} |" in (out / "report.md").read_text()
    assert f"loss: {expected}" in (out / RECIPE_FILE).read_text()


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
        "eval.loss_before_after=true", "eval.knowledge_probes=[{question: Repeat the words., answer: the}]",
    )  # fmt: skip
    assert code == 0, err
    assert "autograd kernel was not registered" not in err
    history = json.loads((evaluated / LOG_HISTORY_FILE).read_text())
    assert [e["step"] for e in history if "eval_loss" in e] == [0, 2, 4, 6, 6]  # before, every 2 steps, after
    assert sum("mmlu_accuracy" in e for e in history) == 3
    code, _, err = cli("train", *common, f"output_dir={plain}")
    assert code == 0, err
    with_eval, without = (load_file(run / "adapter_model.safetensors") for run in (evaluated, plain))
    assert with_eval.keys() == without.keys()
    for name, tensor in with_eval.items():
        torch.testing.assert_close(tensor, without[name], atol=1e-6, rtol=0, msg=name)


def test_before_and_after_training_the_summary_shows_loss_knowledge_and_answers(tmp_path):
    """The held-out loss, knowledge probes and three held-out answers: in metrics.json, printed, in the report."""
    out = tmp_path / "out"
    probes = '[{question: "What is the capital of France?", answer: Paris}, {question: Repeat the words., answer: e}]'
    result = train(
        out, "training.learning_rate=2e-3", "eval.exact_match_samples=4", "eval.max_new_tokens=4",
        "eval.loss_before_after=true", f"eval.knowledge_probes={probes}",
    )  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["eval_loss_before"], metrics["eval_loss_after"]
    assert after < before, metrics
    assert metrics["knowledge_probes"] == 2 and {metrics["knowledge_before"], metrics["knowledge_after"]} <= {0, 1, 2}
    known = f"{metrics['knowledge_before']}/2 before -> {metrics['knowledge_after']}/2 after"
    lines = result.stdout.splitlines()
    assert f"Held-out loss: {before:.3f} before -> {after:.3f} after finetuning" in lines
    assert f"General questions answered right: {known}" in lines
    answers = metrics["held_out_answers"]
    assert len(answers) == 3 and all(answer.keys() == {"prompt", "expected", "before", "after"} for answer in answers)
    first = lines.index("Held-out prompts, answered before and after finetuning:") + 1
    one_line = " ".join
    for n, answer in enumerate(answers):
        prompt, *replies = lines[first + 4 * n : first + 4 * n + 4]
        assert prompt.startswith("  … ") and prompt.endswith(one_line(answer["prompt"].split())[-20:])
        assert replies == [
            f"    {label:<10} {one_line(answer[key].split())}"
            for label, key in [("expected", "expected"), ("base", "before"), ("finetuned", "after")]
        ]
    report = (out / "report.md").read_text()
    assert f"| Held-out loss | {before:.4f} before -> {after:.4f} after |" in report
    assert f"| General questions answered right (knowledge probes) | {known} |" in report


def test_a_knowledge_probe_is_right_when_the_reply_contains_its_answer_in_any_case():
    from qlora_cli.config import KnowledgeProbe
    from qlora_cli.eval.exact_match import Questions, Replies

    asked = [("France?", "Paris"), ("Ocean?", "Pacific"), ("Red?", "Mars")]
    probes = [KnowledgeProbe(question=question, answer=answer) for question, answer in asked]
    questions = Questions(["2+2="], ["4"], probes, lambda text: text, max_new_tokens=8, batch_size=8)
    before = Replies(["5"], ["The capital is paris.", "The Atlantic.", "Mars."])
    after = Replies(["4"], ["Paris!", "the PACIFIC ocean", "Venus."])
    metrics = questions.metrics(before, after)
    assert (metrics["knowledge_before"], metrics["knowledge_after"], metrics["knowledge_probes"]) == (2, 2, 3)
    assert metrics["knowledge_lost"] == [{"question": "Red?", "answer": "Mars", "before": "Mars.", "after": "Venus."}]
    assert (metrics["exact_match_before"], metrics["exact_match_after"]) == (0.0, 1.0)
    assert metrics["held_out_answers"] == [{"prompt": "2+2=", "expected": "4", "before": "5", "after": "4"}]


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
