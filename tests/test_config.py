from pathlib import Path

import pytest
import yaml

from qlora_cli.config import Recipe, deep_merge, load_recipe, training_drift, validate_recipe
from qlora_cli.errors import ConfigError
from tests.conftest import REPO
from tests.tiny import tiny_recipe

DEMO = REPO / "configs" / "demo.yaml"


def write(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def minimal(tmp_path: Path, **extra) -> Path:
    return write(tmp_path / "r.yaml", {"output_dir": "runs/x", "model": {"name_or_path": "m"}, **extra})


def test_defaults_are_the_papers(tmp_path):
    recipe = load_recipe(minimal(tmp_path))
    assert (recipe.quantization.bits, recipe.quantization.quant_type, recipe.quantization.double_quant) == (4, "nf4", True)
    assert recipe.quantization.compute_dtype == "auto"
    assert (recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout) == (64, 16, 0.1)
    assert recipe.lora.target_modules == "all-linear"
    t = recipe.training
    assert (t.optim, t.lr_scheduler, t.max_grad_norm, t.adam_beta2, t.weight_decay) == (
        "paged_adamw_32bit",
        "constant",
        0.3,
        0.999,
        0.0,
    )
    assert t.gradient_checkpointing == "auto" and t.group_by_length
    assert not recipe.data.train_on_source
    assert not recipe.model.trust_remote_code


def test_overrides_are_parsed_as_yaml_scalars():
    recipe = load_recipe(
        DEMO, ["training.max_steps=20", "output_dir=runs/x", "lora.r=16", "lora.dropout=0.2", "training.report_to=[tensorboard]"]
    )
    assert recipe.training.max_steps == 20
    assert recipe.output_dir == "runs/x"
    assert recipe.lora.r == 16 and recipe.lora.dropout == 0.2
    assert recipe.training.report_to == ["tensorboard"]



@pytest.mark.parametrize("value, parsed", [("auto", "auto"), ("true", True), ("false", False)])
def test_gradient_checkpointing_is_auto_true_or_false(value, parsed):
    assert load_recipe(DEMO, [f"training.gradient_checkpointing={value}"]).training.gradient_checkpointing == parsed


@pytest.mark.parametrize("value", ["sometimes", "Auto", "1", "null"])
def test_gradient_checkpointing_rejects_anything_else_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"training\.gradient_checkpointing: must be true, false or auto"):
        load_recipe(DEMO, [f"training.gradient_checkpointing={value}"])


def test_override_can_null_an_optional_field():
    assert load_recipe(DEMO, ["training.save_total_limit=null"]).training.save_total_limit is None


def test_demo_accepts_a_users_alpaca_file():
    recipe = load_recipe(DEMO, ["data.dataset=alpaca", "data.path=some.json"])
    assert (recipe.data.dataset, recipe.data.path) == ("alpaca", "some.json")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("lora.rr=8", "unknown key lora.rr (did you mean 'r'?)"),
        ("trainig.max_steps=3", "unknown key trainig (did you mean 'training'?)"),
        ("training.max_step=3", "did you mean 'max_steps'?"),
        ("training.max_steps=abc", "training.max_steps"),
        ("lora.r=0", "lora.r"),
        ("lora.dropout=1.5", "lora.dropout"),
        ("quantization.bits=3", "quantization.bits"),
        ("quantization.quant_type=int3", "quantization.quant_type"),
        ("data.dataset=alpacca", "did you mean 'alpaca'?"),
        ("lora.r.x=1", "lora.r is not a section"),
        ("justtext", "key.path=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_recipe(DEMO, [override])
    assert fragment in str(err.value)


def test_unknown_key_in_file_names_path_and_suggestion(tmp_path):
    path = minimal(tmp_path, lora={"alpah": 32})
    with pytest.raises(ConfigError, match=r"unknown key lora.alpah \(did you mean 'alpha'\?\)"):
        load_recipe(path)


def test_missing_required_key(tmp_path):
    path = write(tmp_path / "r.yaml", {"model": {"name_or_path": "m"}})
    with pytest.raises(ConfigError, match="missing required key output_dir"):
        load_recipe(path)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "output_dir: x\nmodel:\n  name_or_path: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert f"{path}:" in str(err.value) and "YAML syntax error" in str(err.value)


def test_full_finetuning_of_a_quantized_base_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="quantization.bits=16"):
        load_recipe(minimal(tmp_path, lora={"enabled": False}))
    assert load_recipe(minimal(tmp_path, lora={"enabled": False}, quantization={"bits": 16})).lora.enabled is False


def test_knowledge_probes_are_questions_with_answers(tmp_path):
    probes = [{"question": " What is the capital of France? ", "answer": "Paris"}]
    recipe = load_recipe(minimal(tmp_path, eval={"knowledge_probes": probes}))
    probe = recipe.eval.knowledge_probes[0]
    assert (probe.question, probe.answer) == ("What is the capital of France?", "Paris")
    assert load_recipe(minimal(tmp_path)).eval.knowledge_probes == []
    with pytest.raises(ConfigError, match="missing required key eval.knowledge_probes.0.answer"):
        load_recipe(minimal(tmp_path, eval={"knowledge_probes": [{"question": "Why?"}]}))
    with pytest.raises(ConfigError, match=r"knowledge_probes\.0\.answer: String should have at least 1 character"):
        load_recipe(minimal(tmp_path, eval={"knowledge_probes": [{"question": "Why?", "answer": " "}]}))


def test_extends_deep_merges_and_resolves_relative_to_the_file(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path / "base" / "common.yaml", {"model": {"name_or_path": "base-model"}, "lora": {"r": 8, "alpha": 4}})
    child = write(tmp_path / "child.yaml", {"extends": "base/common.yaml", "output_dir": "o", "lora": {"r": 32}})
    recipe = load_recipe(child)
    assert recipe.model.name_or_path == "base-model"
    assert (recipe.lora.r, recipe.lora.alpha) == (32, 4)


def test_extends_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ConfigError, match="circular extends"):
        load_recipe(tmp_path / "a.yaml")


def test_deep_merge_replaces_lists_and_scalars():
    merged = deep_merge({"a": {"b": 1, "c": [1, 2]}, "d": 1}, {"a": {"c": [3]}, "d": {"e": 2}})
    assert merged == {"a": {"b": 1, "c": [3]}, "d": {"e": 2}}


def test_resolved_recipe_round_trips_through_yaml():
    recipe = load_recipe(DEMO, ["lora.r=8"])
    assert Recipe.model_validate(yaml.safe_load(recipe.to_yaml())) == recipe


def test_config_show_prints_the_resolved_recipe(cli):
    code, out, _ = cli("config", "show", "--config", str(DEMO), "lora.r=16")
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["lora"]["r"] == 16 and shown["training"]["optim"] == "paged_adamw_32bit"


def test_config_validate_reports_each_file(cli, tmp_path):
    bad = minimal(tmp_path, training={"max_stepz": 1})
    code, out, err = cli("config", "validate", str(DEMO), str(bad))
    assert code == 2
    assert f"ok      {DEMO}" in out
    assert "max_stepz" in err and "max_steps" in err


def test_cli_error_is_one_line_without_traceback(tmp_path):
    from tests.conftest import run_cli

    bad = minimal(tmp_path, lora={"r": "many"})
    result = run_cli("train", "--config", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "lora.r" in result.stderr



def test_drift_lists_fields_that_change_training_and_ignores_the_rest():
    saved = tiny_recipe().model_dump(mode="json")
    current = tiny_recipe(learning_rate=1e-3, logging_steps=7, save_steps=9, report_to=["tensorboard"]).model_dump(
        mode="json"
    )
    current["output_dir"] = "elsewhere"
    current["eval"]["exact_match_samples"] = 5
    current["lora"]["target_modules"] = ["q_proj"]
    assert training_drift(saved, validate_recipe(current)) == [
        "lora.target_modules: 'all-linear' -> ['q_proj']",
        "training.learning_rate: 0.003 -> 0.001",
    ]


@pytest.mark.parametrize("name", ["guanaco-65b.yaml", "guanaco-65b"])
def test_a_bundled_recipe_resolves_by_name_from_any_folder(cli, tmp_path, monkeypatch, name):
    for folder in (REPO, tmp_path):
        monkeypatch.chdir(folder)
        code, out, err = cli("config", "show", "--config", name)
        assert code == 0, err
        shown = yaml.safe_load(out)
        assert shown["model"]["name_or_path"] == "huggyllama/llama-65b"
        assert shown["lora"]["dropout"] == 0.05  # from the recipe, not the defaults


def test_a_local_file_of_that_name_wins_over_the_bundled_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "guanaco-65b.yaml", {"output_dir": "mine", "model": {"name_or_path": "my/model"}})
    assert load_recipe("guanaco-65b.yaml").model.name_or_path == "my/model"
    assert load_recipe("guanaco-65b").model.name_or_path == "huggyllama/llama-65b"  # no file of that name here


def test_an_unknown_name_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"recipe not found: guanaco-65x is no file here and no bundled recipe"):
        load_recipe("guanaco-65x")
    with pytest.raises(ConfigError, match=r"^recipe not found: sub/guanaco-65b.yaml$"):
        load_recipe("sub/guanaco-65b.yaml")  # a path: never a bundled recipe


def test_config_show_and_validate_check_the_names_only_transformers_knows(cli, tmp_path):
    """One validation: `config show` refuses what `config validate` and `train` refuse."""
    code, _, err = cli("config", "show", "--config", str(DEMO), "training.optim=adamw_fancy")
    assert code == 2 and "training.optim: unknown value 'adamw_fancy'" in err
    mistyped = write(tmp_path / "r.yaml", {**yaml.safe_load(DEMO.read_text()), "training": {"lr_scheduler": "cosinus"}})
    code, _, err = cli("config", "validate", str(mistyped))
    assert code == 2 and "unknown value 'cosinus' (did you mean 'cosine'?)" in err
