import json
import shutil
import subprocess
import sys

import pytest
import torch

from qlora_cli.adapter import prompt_format, read_adapter
from qlora_cli.data.tokenize import tokenize_example
from qlora_cli.errors import QloraError
from qlora_cli.merge import DEFAULT_TOLERANCE, _staged
from qlora_cli.model import dtype_name, load_for_inference, resolve_compute_dtype
from qlora_cli.run_folder import MERGE_REPORT_FILE as MERGE_REPORT
from tests.trained import llama_adapter, merged_model, t5_adapter  # noqa: F401 (fixtures)

PROMPTS = [("Reverse the order of the words.", "stone river apple"), ("Write the digits as words.", "nine two")]

# Loads the merged folders with peft made unimportable, and saves their logits on the given token ids.
NO_PEFT = """
import json, sys, torch
sys.modules["peft"] = None
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
jobs = json.load(open(sys.argv[1]))
out = {}
for job in jobs:
    auto = AutoModelForSeq2SeqLM if job["seq2seq"] else AutoModelForCausalLM
    model = auto.from_pretrained(job["folder"]).eval()
    logits = []
    for e in job["examples"]:
        decoder = {"labels": torch.tensor([e["labels"]])} if job["seq2seq"] else {}
        with torch.no_grad():
            logits.append(model(input_ids=torch.tensor([e["input_ids"]]), **decoder).logits)
    out[job["folder"]] = logits
torch.save(out, sys.argv[2])
"""


def trained_model_logits(adapter_dir):
    """base-NF4 + adapter computed in fp32 (as the fp32 merges here); returns logits, the examples and seq2seq."""
    adapter = read_adapter(adapter_dir)
    fp32 = adapter.quantization.model_copy(update={"compute_dtype": "fp32"})
    loaded = load_for_inference(adapter.base_model(), fp32, adapter.path, device="cpu")
    fmt = prompt_format(adapter.recipe, loaded.tokenizer)
    seq2seq = loaded.kind.name == "seq2seq"
    data = adapter.recipe.data
    examples = [tokenize_example(loaded.tokenizer, fmt.prompt(p), a, data, kind=loaded.kind) for p, a in PROMPTS]
    with torch.no_grad():
        logits = [
            loaded.model(
                input_ids=torch.tensor([e["input_ids"]]),
                **({"labels": torch.tensor([e["labels"]])} if seq2seq else {}),
            ).logits
            for e in examples
        ]
    return logits, examples, seq2seq


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_merged_folders_load_without_peft_and_match_base_nf4_plus_adapter(tmp_path, llama_adapter, t5_adapter):
    jobs, references = [], {}
    for model, adapter in (("llama", llama_adapter), ("t5", t5_adapter)):
        folder = merged_model(model)
        report = json.loads((folder / MERGE_REPORT).read_text())
        assert report["base_weights"] == "nf4-roundtrip" and report["dtype"] == "fp32"
        assert report["max_abs_logit_diff"] < 1e-3
        assert report["adapter_effect"] > 1e-2  # a merge that lost the adapter would be caught
        assert report["peak_memory_bytes"] > 0 and report["model_bytes"] > 0
        assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
        assert (folder / "generation_config.json").is_file() and (folder / "tokenizer_config.json").is_file()
        assert not (folder / "adapter_config.json").exists()
        logits, examples, seq2seq = trained_model_logits(adapter)
        references[str(folder)] = logits
        jobs.append({"folder": str(folder), "seq2seq": seq2seq, "examples": examples})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "no_peft.py").write_text(NO_PEFT)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "no_peft.py"), str(tmp_path / "jobs.json"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    merged = torch.load(tmp_path / "out.pt")
    for folder, reference in references.items():
        assert max_diff(merged[folder], reference) < 1e-3, folder


def test_original_base_weights_merge_into_the_untouched_weights(cli, tmp_path, t5_adapter):
    out = tmp_path / "merged"
    code, stdout, err = cli(
        "merge-adapter", "--adapter", str(t5_adapter), "--output", str(out), "--dtype", "fp32",
        "--base-weights", "original",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / MERGE_REPORT).read_text())
    assert report["reference"] == "fp32 base + adapter, unmerged"
    assert report["max_abs_logit_diff"] < 1e-4 and report["adapter_effect"] > 1e-2
    assert f"largest logit difference from fp32 base + adapter, unmerged: {report['max_abs_logit_diff']:.2e}" in stdout
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no hidden staging folder left


def test_failed_write_leaves_no_output_and_keeps_the_previous_merge(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / MERGE_REPORT).write_text("{}")
    with pytest.raises(RuntimeError):
        with _staged(out) as staging:
            (staging / "model.safetensors").write_text("half")
            raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    assert [p.name for p in out.iterdir()] == [MERGE_REPORT]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapter", "{tmp}/missing"], "adapter folder not found"),
        (["--adapter", "{tmp}"], "is not a PEFT adapter folder"),
        (["--adapter", "{llama}", "--base", "{tmp}/no-such-model"], "no-such-model"),
        (["--adapter", "{t5}", "--base", "builtin:tiny-llama"], "does not fit base model"),
    ],
)
def test_bad_inputs_fail_with_one_line_and_leave_nothing(cli, tmp_path, args, message, llama_adapter, t5_adapter):
    names = {"tmp": tmp_path, "llama": llama_adapter, "t5": t5_adapter}
    out = tmp_path / "out"
    code, _, err = cli("merge-adapter", *[a.format(**names) for a in args], "--output", str(out))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_non_finite_adapter_fails_and_leaves_nothing(cli, tmp_path, t5_adapter):
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(t5_adapter, adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    weights = load_file(adapter / "adapter_model.safetensors")
    name = next(n for n in weights if "lora_B" in n)
    weights[name][0, 0] = float("nan")
    save_file(weights, adapter / "adapter_model.safetensors")
    code, _, err = cli(
        "merge-adapter", "--adapter", str(adapter), "--output", str(tmp_path / "out"), "--base-weights", "original"
    )
    assert code == 2 and "non-finite logits" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_adapter_with_layers_the_base_lacks_does_not_fit(cli, tmp_path, llama_adapter):
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_cli.builtin import resolve_builtin_model

    tiny = resolve_builtin_model("builtin:tiny-llama")
    config = AutoConfig.from_pretrained(tiny)
    config.num_hidden_layers = 2  # same shapes, half the layers: peft alone would silently drop weights
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "two-layers")
    code, _, err = cli(
        "merge-adapter", "--adapter", str(llama_adapter), "--base", str(tmp_path / "two-layers"),
        "--output", str(tmp_path / "out"), "--base-weights", "original",
    )  # fmt: skip
    assert code == 2 and "adapter weights match no module of the base" in err


def test_adapter_shapes_that_do_not_fit(cli, tmp_path, shared_data, llama_adapter):
    code, _, err = cli(
        "merge-adapter", "--adapter", str(llama_adapter),
        "--base", str(shared_data / "models/basaran-tiny-random-llama"), "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 2 and "does not fit base model" in err and "size mismatch" in err


def test_existing_output_needs_overwrite_and_only_replaces_a_merge(cli, tmp_path, llama_adapter):
    adapter = str(llama_adapter)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = cli("merge-adapter", "--adapter", adapter, "--output", str(out))
    assert code == 2 and "pass --overwrite" in err
    code, _, err = cli("merge-adapter", "--adapter", adapter, "--output", str(out), "--overwrite")
    assert code == 2 and "not a merged model" in err
    assert (out / "notes.txt").read_text() == "mine"


def test_nf4_roundtrip_needs_a_4bit_run(tmp_path, llama_adapter):
    from qlora_cli.merge import MergeRequest, merge_adapter

    adapter = tmp_path / "adapter"
    shutil.copytree(llama_adapter, adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    recipe = adapter / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("bits: 4", "bits: 16"))
    with pytest.raises(QloraError, match="trained on a 16-bit base"):
        merge_adapter(MergeRequest(adapter, tmp_path / "out", base_weights="nf4-roundtrip"))



def test_merge_reproduces_the_trained_model_with_avx512_bf16_defaults(tmp_path, llama_adapter, avx512_bf16_defaults):
    """There, the reference forward used to repack the 4-bit weights, and the round trip then ran in bf16."""
    from transformers import AutoModelForCausalLM

    from qlora_cli.merge import MergeRequest, merge_adapter

    report = merge_adapter(MergeRequest(llama_adapter, tmp_path / "merged", dtype="fp32"))
    assert report.max_abs_logit_diff < 1e-3 and report.adapter_effect > 1e-2
    reference, examples, _ = trained_model_logits(llama_adapter)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        logits = [merged(input_ids=torch.tensor([e["input_ids"]])).logits for e in examples]
    assert max_diff(logits, reference) < 1e-3


def test_merge_over_the_tolerance_fails_writes_nothing_and_keeps_the_earlier_merge(cli, tmp_path, llama_adapter):
    out = tmp_path / "merged"
    code, _, err = cli("merge-adapter", "--adapter", str(llama_adapter), "--output", str(out))
    assert code == 0, err
    earlier = json.loads((out / MERGE_REPORT).read_text())
    auto = dtype_name(resolve_compute_dtype("auto", "cpu"))  # what training computed in on this CPU
    assert earlier["dtype"] == auto and earlier["tolerance"] == DEFAULT_TOLERANCE[auto]
    assert earlier["max_abs_logit_diff"] <= earlier["tolerance"]
    code, stdout, err = cli(
        "merge-adapter", "--adapter", str(llama_adapter), "--output", str(out), "--overwrite", "--dtype", "bf16",
        "--tolerance", "1e-9",
    )  # fmt: skip
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "over the tolerance 1e-09 for bf16" in errors[0], err
    assert "the adapter moves logits by" in errors[0] and "Merged" not in stdout
    assert json.loads((out / MERGE_REPORT).read_text()) == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no hidden staging folder left


def test_merge_help_states_the_default_tolerances():
    import typer

    from qlora_cli.cli import app
    from qlora_cli.merge import DEFAULT_TOLERANCE

    command = typer.main.get_command(app).commands["merge-adapter"]
    shown = next(p for p in command.params if p.name == "tolerance").show_default
    assert shown == ", ".join(f"{tolerance:g} for {dtype}" for dtype, tolerance in DEFAULT_TOLERANCE.items())
