"""Malformed recipes, data files, model paths and hostile files: each one clean line, exit code 2, the culprit named."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from qlora_cli.config import ModelConfig, QuantizationConfig
from qlora_cli.errors import ConfigError, QloraError
from tests.tiny import TINY_RECIPE

BASE = yaml.safe_dump(TINY_RECIPE, sort_keys=False)
RECORD = {"instruction": "Repeat the words.", "input": "apple river", "output": "apple river"}
GOOD_LINE = json.dumps(RECORD)
DATA_RUN = ("quantization.bits=16",)  # data errors surface after the model loads: keep that load cheap


@dataclass
class Case:
    id: str
    culprit: str  # must appear in the error line; {tmp} is the test's folder
    recipe: str = BASE
    files: dict[str, str | bytes] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    in_tmp: bool = True  # output_dir under the test's folder


def _text(id: str, culprit: str, recipe: str, **kwargs) -> Case:
    return Case(id, culprit, recipe=recipe, **kwargs)


def _set(id: str, culprit: str, *overrides: str, files: dict | None = None) -> Case:
    return Case(id, culprit, files=files or {}, overrides=overrides)


def _data(name: str, content: str | bytes, culprit: str) -> Case:
    return Case(f"data-{name}", culprit, files={name: content}, overrides=(*DATA_RUN, f"data.path={{tmp}}/{name}"))


def _edit(old: str, new: str) -> str:
    assert old in BASE
    return BASE.replace(old, new)


NO_SPACE = json.dumps({**RECORD, "output": " "})
CASES = [
    # recipe keys and values
    _text("unknown-section", "unknown key modle (did you mean 'model'?)", BASE + "modle: {}\n"),
    _text("mistyped-key", "unknown key training.learnig_rate", _edit("learning_rate", "learnig_rate")),
    _text("wrong-type", "training.max_steps", _edit("max_steps: 10", "max_steps: ten")),
    _text("negative-rank", "lora.r", _edit("r: 8", "r: -1")),
    _text("dropout-above-one", "lora.dropout", _edit("dropout: 0.1", "dropout: 1.5")),
    _text("quant-type", "quantization.quant_type", _edit("bits: 4", "bits: 4\n  quant_type: nf5")),
    _text("compute-dtype", "quantization.compute_dtype", _edit("bits: 4", "bits: 4\n  compute_dtype: bf17")),
    _text("bits", "quantization.bits", _edit("bits: 4", "bits: 3")),
    _text("missing-model", "missing required key model", _edit("model:\n  name_or_path: builtin:tiny-llama\n", "")),
    _text("missing-output-dir", "missing required key output_dir", _edit("output_dir: runs/tiny\n", ""), in_tmp=False),
    _text("unknown-dataset", "unknown dataset 'alpacca'", _edit("dataset: alpaca", "dataset: alpacca")),
    _set("unknown-optimizer", "training.optim: unknown value 'adamw_fancy'", "training.optim=adamw_fancy"),
    _set("unknown-scheduler", "unknown value 'cosinus' (did you mean 'cosine'?)", "training.lr_scheduler=cosinus"),
    # YAML itself
    _text("yaml-indentation", "recipe.yaml:4:7: YAML syntax", "output_dir: x\nmodel:\n  name_or_path: a\n   bad: 1\n"),
    _text("yaml-unclosed-quote", "a quoted scalar at line 2", 'output_dir: x\nmodel: {name_or_path: "a}\n'),
    _text("yaml-tab", "recipe.yaml:3:", "output_dir: x\nmodel:\n\tname_or_path: a\n"),
    _text("yaml-python-object", "recipe.yaml", "output_dir: !!python/object/apply:os.system ['touch {tmp}/ran']"),
    _text("yaml-not-a-mapping", "a recipe must be a YAML mapping", "- output_dir\n- model\n"),
    _text("extends-missing", "recipe not found: {tmp}/base.yaml", "extends: base.yaml\n" + BASE),
    _text("extends-circular", "circular extends", "extends: recipe.yaml\n" + BASE),
    # conflicting options
    _set("path-and-files", "set data.path or data.data_files, not both", "data.data_files=[a.json]"),
    _set("4bit-full-finetune", "full finetuning (lora.enabled=false) cannot train a 4-bit base", "lora.enabled=false"),
    _set("fsdp-8bit", "FSDP cannot shard 8-bit", "quantization.bits=8", "training.fsdp=true"),
    _set("zero3-4bit", "DeepSpeed ZeRO-3 cannot shard 4-bit bitsandbytes weights",
         "training.deepspeed={tmp}/z3.json", files={"z3.json": '{"zero_optimization": {"stage": 3}}'}),
    _set("deepspeed-missing", "training.deepspeed: config file not found: {tmp}/ds.json", "training.deepspeed={tmp}/ds.json"),
    _set("deepspeed-broken", "training.deepspeed: {tmp}/ds.json:1:23: invalid JSON",
         "training.deepspeed={tmp}/ds.json", files={"ds.json": '{"zero_optimization": '}),
    _set("fsdp-and-deepspeed", "training.fsdp and training.deepspeed are two sharding engines",
         "training.fsdp=true", "training.deepspeed={tmp}/ds.json", files={"ds.json": "{}"}),
    _set("chunked-loss-fsdp", "training.loss=chunked needs the whole output head on every process, and training.fsdp",
         "training.loss=chunked", "training.fsdp=true"),
    _set("fused-loss-on-cpu", "training.loss=fused: Liger's fused kernel needs a CUDA GPU", "training.loss=fused"),
    _set("chunked-loss-seq2seq", "training.loss=chunked: builtin:tiny-t5 is an encoder-decoder model",
         "training.loss=chunked", "model.name_or_path=builtin:tiny-t5"),
    # overrides
    _set("override-without-value", "not of the form key.path=value", "training.max_steps"),
    _set("override-unknown-key", "unknown key trainng (did you mean 'training'?)", "trainng.max_steps=1"),
    _set("override-wrong-type", "training.batch_size", "training.batch_size=zero"),
    # models
    _set("model-folder-missing", "model folder not found: {tmp}/no-model", "model.name_or_path={tmp}/no-model"),
    _set("model-hub-offline", "If you are offline, download it once and pass its local folder",
         "model.name_or_path=qlora-tests/no-such-model"),
    _set("model-folder-without-config", "cannot load model from {tmp}/empty-model",
         "model.name_or_path={tmp}/empty-model", files={"empty-model/README.md": "nothing here"}),
    _set("model-is-a-file", "cannot load model from {tmp}/weights.bin: a file",
         "model.name_or_path={tmp}/weights.bin", files={"weights.bin": b"\0"}),
    _set("model-unknown-builtin", "unknown builtin model 'builtin:huge'", "model.name_or_path=builtin:huge"),
    # data files
    _set("data-missing", "data file not found: {tmp}/nope.jsonl", *DATA_RUN, "data.path={tmp}/nope.jsonl"),
    _data("broken-line.jsonl", f"{GOOD_LINE}\n\n{GOOD_LINE[:30]}\n", "broken-line.jsonl:3:17: invalid JSON Lines record"),
    _data("broken-doc.json", f"[\n{GOOD_LINE},\n{GOOD_LINE[:-1]} oops}}\n]", "broken-doc.json:3:86: invalid JSON"),
    _data("empty.jsonl", "", "empty.jsonl is empty"),
    _data("not-objects.jsonl", f"{GOOD_LINE}\n42\n", "not-objects.jsonl:2: a JSON Lines record must be an object"),
    _data("not-utf8.jsonl", b"\xff\xfe\xfa garbage", "not-utf8.jsonl: cannot read as UTF-8"),
    _data("broken.jsonl.gz", gzip.compress(f"{GOOD_LINE}\n{{oops\n".encode()), "broken.jsonl.gz:2:2: invalid JSON Lines record"),
    _data("wrong-fields.jsonl", '{"question": "a", "answer": "b"}\n' * 3, "missing field 'instruction'"),
    _data("empty-targets.jsonl", NO_SPACE + "\n", "no usable examples (1 skipped: empty target)"),
    _data("notes.txt", GOOD_LINE, "notes.txt: unsupported file type"),
    _set("data-folder-without-data", "holds no json", *DATA_RUN, "data.path={tmp}/data", files={"data/readme.md": "x"}),
    _set("data-too-small-for-eval", "data.eval_size=50 but the dataset has only 1 usable examples",
         *DATA_RUN, "data.path={tmp}/one.jsonl", "data.eval_size=50", files={"one.jsonl": GOOD_LINE}),
    _set("data-unknown-builtin", "unknown builtin dataset 'builtin:nope'", *DATA_RUN, "data.path=builtin:nope"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input_is_one_clear_line_and_exit_code_2(case: Case, cli, tmp_path: Path):
    for name, content in case.files.items():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(case.recipe.replace("{tmp}", str(tmp_path)))
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in case.overrides]
    if case.in_tmp:
        overrides.append(f"output_dir={tmp_path / 'run'}")
    code, _, err = cli("train", "--config", str(recipe), *overrides)
    last_line = err.strip().splitlines()[-1] if err.strip() else ""
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert last_line.startswith("error: ") and case.culprit.replace("{tmp}", str(tmp_path)) in last_line
    assert not (tmp_path / "ran").exists()


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


def test_missing_recipe_file(cli, tmp_path):
    code, _, err = cli("train", "--config", str(tmp_path / "none.yaml"))
    assert code == 2 and f"recipe not found: {tmp_path / 'none.yaml'}" in err


def test_debug_shows_the_full_traceback(cli, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE + "modle: {}\n")
    with pytest.raises(ConfigError, match="modle"):
        cli("--debug", "train", "--config", str(recipe))


def test_bf16_on_a_gpu_without_bf16_suggests_fp16_or_fp32(monkeypatch):
    from qlora_cli.model import resolve_compute_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(QloraError, match="compute_dtype=bf16 but this GPU has no bf16: use fp16 .* or fp32"):
        resolve_compute_dtype("bf16", "cuda:0")
    assert resolve_compute_dtype("auto", "cuda:0") == torch.float16


# --------------------------------------------------------------------------- hostile files


class _RunsCode:
    """Unpickling this would create `marker`: loaders must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_remote_code_in_a_model_folder_is_not_run_unless_the_recipe_allows_it(cli, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps({"model_type": "evilnet", "auto_map": auto_map}))
    (model / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('ran')\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE)
    code, _, err = cli("train", "--config", str(recipe), f"output_dir={tmp_path}/run", f"model.name_or_path={model}")
    assert code == 2 and "custom code" in err and "model.trust_remote_code=true" in err
    assert not (tmp_path / "ran").exists()


def test_pickled_code_in_model_weights_is_refused(cli, tmp_path):
    from qlora_cli.builtin import resolve_builtin_model

    model = tmp_path / "model"
    shutil.copytree(resolve_builtin_model("builtin:tiny-llama"), model)
    (model / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _RunsCode(tmp_path / "ran")}, model / "pytorch_model.bin")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE)
    code, _, err = cli("train", "--config", str(recipe), f"output_dir={tmp_path}/run", f"model.name_or_path={model}")
    assert code == 2 and f"refusing to load {model}" in err and "weights_only" in err
    assert not (tmp_path / "ran").exists()


def test_pickled_code_in_an_adapter_is_refused(tmp_path):
    from peft import LoraConfig

    from qlora_cli.model import load_for_inference

    adapter = tmp_path / "adapter"
    LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM").save_pretrained(adapter)
    torch.save({"base_model.model.lm_head.weight": _RunsCode(tmp_path / "ran")}, adapter / "adapter_model.bin")
    with pytest.raises(QloraError, match=f"refusing to load {adapter}"):
        load_for_inference(ModelConfig(name_or_path="builtin:tiny-llama"), QuantizationConfig(bits=16), adapter)
    assert not (tmp_path / "ran").exists()


def test_config_validate_catches_what_only_transformers_knows(cli, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE.replace("max_steps: 10", "max_steps: 10\n  optim: adamw_fancy"))
    code, _, err = cli("config", "validate", str(recipe))
    assert code == 2 and "training.optim: unknown value 'adamw_fancy'" in err
