"""The LoRA family on the tiny 4-bit model: DoRA, rsLoRA, PiSSA/OLoRA/LoftQ, trainable tokens (lora.* fields).

What each option promises at initialisation, that training with it lowers the held-out loss, that the base a
PiSSA/OLoRA/LoftQ start changed is rebuilt (or refused) wherever the adapter is loaded, and that every option
merges into a folder plain transformers loads, giving the trained model's logits.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer

from qlora_cli.adapter import read_adapter
from qlora_cli.adapter_init import lora_scale, read_base_change
from qlora_cli.adapter import prompt_format
from qlora_cli.config import LoraConfig, ModelConfig, QuantizationConfig, validate_recipe
from qlora_cli.errors import ConfigError, QloraError
from qlora_cli.model import add_lora, attach_adapter, load_for_inference, load_model, start_from_16bit
from qlora_cli.run_folder import BASE_INIT_DIR, BASE_INIT_FILE, MERGE_REPORT_FILE, PLAIN_LORA_DIR
from qlora_cli.serve.models import resolve_target, vllm_command
from tests.test_merge import NO_PEFT
from tests.tiny import TINY_RECIPE, write_recipe
from tests.trained import run_cli_in_process, artifacts

TINY = ModelConfig(name_or_path="builtin:tiny-llama")
FP32_NF4 = QuantizationConfig(bits=4, compute_dtype="fp32")
IDS = torch.tensor([[1, 74, 286, 78, 81, 273, 269, 78, 70, 5, 9]])
NEW_TOKEN = "<|tool|>"
OPTIONS = {
    "dora": {"dora": True},
    "rslora": {"rslora": True},
    "pissa": {"init": "pissa"},
    "olora": {"init": "olora"},
    "loftq": {"init": "loftq", "loftq_iter": 2},
    "tokens": {"trainable_tokens": [NEW_TOKEN]},
}


def recipe_with(lora: dict, **sections) -> dict:
    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["lora"].update(lora)
    for key, value in sections.items():
        raw[key].update(value)
    return raw


# --------------------------------------------------------------------------- the recipe


@pytest.mark.parametrize(
    ("lora", "sections", "message"),
    [
        ({"dora": True, "init": "pissa"}, {}, "lora.dora with init=pissa"),
        ({"init": "loftq"}, {"quantization": {"bits": 16}}, "lora.init=loftq fits the adapter to 4-bit"),
        ({"init": "olora"}, {"quantization": {"bits": 8}}, "8-bit (LLM.int8) loading cannot"),
        ({"init": "olora", "pissa_niter": 4}, {}, "lora.pissa_niter applies to init=pissa"),
        ({"loftq_iter": 3}, {}, "lora.loftq_iter applies to init=loftq"),
        ({"trainable_tokens": ["<a>"], "train_embeddings": True}, {}, "already trains every row"),
        ({"trainable_tokens": ["<a>", "<a>"]}, {}, "distinct"),
        ({"init": "pissa", "trainable_tokens": ["<a>"]}, {}, "plain LoRA conversion keeps only A and B"),
        ({"init": "pissa"}, {"training": {"deepspeed": "ds.json"}}, "sharding engines"),
        ({"init": "svd"}, {}, "lora.init"),
    ],
)
def test_combinations_that_cannot_work_are_refused_before_loading(lora, sections, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_recipe(recipe_with(lora, **sections))


def test_the_written_recipe_validates_again():
    recipe = validate_recipe(recipe_with({"init": "pissa", "pissa_niter": 4, "rslora": True}))
    assert validate_recipe(json.loads(json.dumps(recipe.model_dump(mode="json")))) == recipe


# --------------------------------------------------------------------------- at initialisation


@pytest.fixture(scope="module")
def nf4_logits():
    loaded = load_model(TINY, FP32_NF4, for_training=False)
    with torch.no_grad():
        return loaded.model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def fp32_logits():
    loaded = load_model(TINY, QuantizationConfig(bits=16, compute_dtype="fp32"), for_training=False)
    with torch.no_grad():
        return loaded.model(input_ids=IDS).logits


@pytest.mark.parametrize(
    "lora",
    [{}, {"init": "gaussian"}, {"dora": True}, {"rslora": True}, {"trainable_tokens": ["<s>", NEW_TOKEN]},
     {"train_embeddings": True}],
)  # fmt: skip
def test_options_that_keep_the_base_start_as_the_base(lora, nf4_logits):
    loaded = load_model(TINY, FP32_NF4)
    loaded.model = add_lora(loaded.model, LoraConfig(r=8, **lora), kind=loaded.kind, tokenizer=loaded.tokenizer)
    loaded.model.eval()
    with torch.no_grad():
        logits = loaded.model(input_ids=IDS).logits
    grown = logits.shape[-1] > nf4_logits.shape[-1]  # a new token's row: the head multiplies in other blocks
    assert (logits[..., : nf4_logits.shape[-1]] - nf4_logits).abs().max() <= (1e-5 if grown else 0)
    trained = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in trained) == bool(lora.get("dora"))
    assert any("trainable_tokens_delta" in n for n in trained) == bool(lora.get("trainable_tokens"))
    assert any("modules_to_save" in n for n in trained) == bool(lora.get("train_embeddings"))


@pytest.mark.parametrize("rslora", [False, True])
def test_rslora_scales_by_alpha_over_the_root_of_r(rslora):
    loaded = load_model(TINY, FP32_NF4)
    cfg = LoraConfig(r=16, alpha=8, rslora=rslora)
    model = add_lora(loaded.model, cfg, kind=loaded.kind)
    scales = {layer.scaling["default"] for layer in model.modules() if isinstance(layer, LoraLayer)}
    assert scales == {8 / math.sqrt(16) if rslora else 8 / 16} == {lora_scale(cfg)}


def weight_error(model, base16) -> float:
    """Relative Frobenius distance of (4-bit base + s·B A), dequantized, from the 16-bit base, over adapted layers."""
    import bitsandbytes.functional as bnbf

    originals = dict(base16.named_modules())
    error = total = 0.0
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, LoraLayer):
            weight = layer.get_base_layer().weight
            delta = layer.get_delta_weight("default").detach()
            w = bnbf.dequantize_4bit(weight.data, weight.quant_state).float() + delta
            reference = originals[name].weight.float()
            error += float((w - reference).pow(2).sum())
            total += float(reference.pow(2).sum())
    return math.sqrt(error / total)


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
def test_a_start_from_the_16bit_base_leaves_base_plus_adapter_near_it(init, tmp_path, nf4_logits, fp32_logits):
    plain, changed = load_model(TINY, FP32_NF4), load_model(TINY, FP32_NF4)
    plain.model = add_lora(plain.model, LoraConfig(r=8), kind=plain.kind)
    cfg = LoraConfig(r=8, init=init, **({"loftq_iter": 3} if init == "loftq" else {}))
    changed.model = add_lora(changed.model, cfg, kind=changed.kind)
    start_from_16bit(changed, TINY, cfg, tmp_path / BASE_INIT_DIR)
    base16 = load_model(TINY, QuantizationConfig(bits=16, compute_dtype="fp32"), for_training=False).model
    nf4_error, start_error = weight_error(plain.model, base16), weight_error(changed.model, base16)
    print(f"{init}: relative weight error from the 16-bit base {start_error:.4f}, NF4 alone {nf4_error:.4f}")
    if init != "olora":  # OLoRA takes the first r columns' directions, not the largest: no promise on the error
        assert start_error < 0.95 * nf4_error
    changed.model.eval()
    with torch.no_grad():
        logits = changed.model(input_ids=IDS).logits
    if init != "olora":
        assert (logits - fp32_logits).abs().max() < (nf4_logits - fp32_logits).abs().max()
    record = json.loads((tmp_path / BASE_INIT_DIR / BASE_INIT_FILE).read_text())
    assert record["init"] == init and len(record["residual_norms"]) == 7 * 4  # every linear layer of 4 blocks


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_on_a_16bit_base_the_start_leaves_the_model_as_it_was(init, tmp_path, fp32_logits):
    """Without quantization the residual is exact: base + adapter is the base, to fp32 rounding."""
    loaded = load_model(TINY, QuantizationConfig(bits=16, compute_dtype="fp32"))
    cfg = LoraConfig(r=8, init=init)
    loaded.model = add_lora(loaded.model, cfg, kind=loaded.kind)
    start_from_16bit(loaded, TINY, cfg, tmp_path / BASE_INIT_DIR)
    loaded.model.eval()
    with torch.no_grad():
        assert (loaded.model(input_ids=IDS).logits - fp32_logits).abs().max() < 1e-4
        with loaded.model.disable_adapter():  # "adapter disabled" is the residual, not the base any more
            assert (loaded.model(input_ids=IDS).logits - fp32_logits).abs().max() > 1e-2
    rebuilt = load_for_inference(TINY, QuantizationConfig(bits=16, compute_dtype="fp32"), None, device="cpu")
    loaded.model.save_pretrained(tmp_path)  # the start itself, as the adapter: rebuilt base + start = the base
    attach_adapter(rebuilt, tmp_path)
    with torch.no_grad():
        assert (rebuilt.model(input_ids=IDS).logits - fp32_logits).abs().max() < 1e-4


def test_loftq_needs_no_cuda(tmp_path, monkeypatch):
    """peft's LoftQ moves every weight to CUDA; ours runs where the model is."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded = load_model(TINY, FP32_NF4)
    cfg = LoraConfig(r=4, init="loftq")
    loaded.model = add_lora(loaded.model, cfg, kind=loaded.kind)
    start_from_16bit(loaded, TINY, cfg, None)
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())


# --------------------------------------------------------------------------- trained


def trained_option(name: str) -> Path:
    out = artifacts() / f"lora-{name}"
    if not (out / "completed").exists():
        folder = out.parent / f"recipe-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        lora = {**TINY_RECIPE["lora"], **OPTIONS[name]}
        data = {"eval_size": 8}
        if name == "tokens":  # every answer starts with the new token
            rows = [{"instruction": f"Call the tool on {w}.", "output": f"{NEW_TOKEN} {w}"} for w in "abcdefghijkl"]
            (folder / "tool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            data = {"path": str(folder / "tool.jsonl"), "eval_size": 4}
        recipe = write_recipe(
            folder, output_dir=str(out), lora=lora, data=data, eval={"loss_before_after": True},
            training={"max_steps": 8, "save_steps": 100, "learning_rate": 1e-2 if name == "tokens" else 3e-3},
        )  # fmt: skip
        run_cli_in_process("train", "--config", str(recipe), "--overwrite")
    return out


@pytest.mark.parametrize("name", list(OPTIONS))
def test_training_with_each_option_lowers_the_held_out_loss(name):
    metrics = json.loads((trained_option(name) / "metrics.json").read_text())
    print(f"{name}: held-out loss {metrics['eval_loss_before']:.3f} -> {metrics['eval_loss_after']:.3f}")
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.1


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_merges_exactly_into_a_folder_plain_transformers_loads(name, cli, tmp_path):
    adapter = trained_option(name)
    out = tmp_path / "merged"
    code, _, err = cli("merge-adapter", "--adapter", str(adapter), "--output", str(out), "--dtype", "fp32")
    assert code == 0, err
    report = json.loads((out / MERGE_REPORT_FILE).read_text())
    assert report["max_abs_logit_diff"] < 1e-3 and report["adapter_effect"] > 1e-2

    trained = load_for_inference(read_adapter(adapter).base_model(), FP32_NF4, adapter, device="cpu")
    with torch.no_grad():
        reference = trained.model(input_ids=IDS).logits
    job = [{"folder": str(out), "seq2seq": False, "examples": [{"input_ids": IDS[0].tolist()}]}]
    (tmp_path / "jobs.json").write_text(json.dumps(job))
    (tmp_path / "no_peft.py").write_text(NO_PEFT)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "no_peft.py"), str(tmp_path / "jobs.json"), str(tmp_path / "out.pt")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    merged = torch.load(tmp_path / "out.pt")[str(out)][0]
    assert merged.shape == reference.shape  # the new token's row is in the merged vocabulary
    assert (merged - reference).abs().max() < 1e-3


@pytest.mark.parametrize("name", ["pissa", "olora", "loftq"])
def test_the_plain_lora_conversion_against_the_untouched_base_is_what_original_merges(name, cli, tmp_path):
    adapter = trained_option(name)
    plain = json.loads((adapter / PLAIN_LORA_DIR / "adapter_config.json").read_text())
    assert plain["r"] == 2 * TINY_RECIPE["lora"]["r"] and plain["init_lora_weights"] is True
    assert read_base_change(adapter / PLAIN_LORA_DIR) is None  # it loads on the untouched base
    out = tmp_path / "merged"
    code, _, err = cli("merge-adapter", "--adapter", str(adapter), "--output", str(out), "--dtype", "fp32",
                       "--base-weights", "original")  # fmt: skip
    assert code == 0, err
    report = json.loads((out / MERGE_REPORT_FILE).read_text())
    assert report["adapter"].endswith(PLAIN_LORA_DIR) and report["max_abs_logit_diff"] < 1e-4
    # W + (B A - B0 A0) is the residual base + B A: the rebuilt 16-bit residual with the trained adapter
    sixteen = QuantizationConfig(bits=16, compute_dtype="fp32")
    residual_plus_adapter = load_for_inference(TINY, sixteen, adapter, device="cpu")
    converted = load_for_inference(TINY, sixteen, adapter / PLAIN_LORA_DIR, device="cpu")
    with torch.no_grad():
        a, b = residual_plus_adapter.model(input_ids=IDS).logits, converted.model(input_ids=IDS).logits
    assert (a - b).abs().max() < 1e-4


def test_a_changed_base_is_rebuilt_for_checkpoints_and_refused_on_another_base(tmp_path):
    adapter = trained_option("pissa")
    change = read_base_change(adapter)
    assert change is not None and change.init == "pissa" and change.folder == adapter / BASE_INIT_DIR
    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (tmp_path / "run" / BASE_INIT_DIR).symlink_to(adapter / BASE_INIT_DIR)
    assert read_base_change(checkpoint).folder == tmp_path / "run" / BASE_INIT_DIR  # a checkpoint: its run's record

    loaded = load_model(TINY, FP32_NF4, for_training=False)
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for file in adapter.iterdir():
        if file.is_file():
            (tampered / file.name).write_bytes(file.read_bytes())
    (tampered / BASE_INIT_DIR).mkdir()
    for file in (adapter / BASE_INIT_DIR).iterdir():
        (tampered / BASE_INIT_DIR / file.name).write_bytes(file.read_bytes())
    record = json.loads((tampered / BASE_INIT_DIR / BASE_INIT_FILE).read_text())
    record["residual_norms"] = {name: 1.01 * norm for name, norm in record["residual_norms"].items()}
    (tampered / BASE_INIT_DIR / BASE_INIT_FILE).write_text(json.dumps(record))
    with pytest.raises(QloraError, match="trained on pissa's residual of another base"):
        attach_adapter(loaded, tampered, base=TINY)

    (tampered / BASE_INIT_DIR / BASE_INIT_FILE).unlink()  # peft's config still says pissa: no way to rebuild
    with pytest.raises(QloraError, match="without the record of its base"):
        attach_adapter(loaded, tampered, base=TINY)


def test_an_adapter_that_changed_its_base_cannot_share_it(tmp_path):
    loaded = load_for_inference(TINY, FP32_NF4, trained_option("pissa"), device="cpu")
    with pytest.raises(QloraError, match="cannot share a base with another adapter"):
        attach_adapter(loaded, trained_option("rslora"), name="second", base=TINY)


def test_the_new_chat_token_is_generated_before_and_after_merging(cli, tmp_path):
    adapter = trained_option("tokens")
    loaded = load_for_inference(read_adapter(adapter).base_model(), FP32_NF4, adapter, device="cpu")
    token = loaded.tokenizer.convert_tokens_to_ids(NEW_TOKEN)
    assert token >= 455  # added to the tiny model's 455 tokens
    text = prompt_format(read_adapter(adapter).recipe, loaded.tokenizer).prompt("Call the tool on q.")
    prompt = loaded.batch(loaded.prompt_ids([text]))
    with torch.no_grad():
        ids = loaded.model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert ids[0, prompt["input_ids"].shape[1]].item() == token


# --------------------------------------------------------------------------- engines


@pytest.mark.parametrize(
    ("name", "refusal"),
    [("dora", "(DoRA)"), ("tokens", "(trainable token rows)"), ("pissa", "(the base its pissa start changed)"),
     ("loftq", "(the base its loftq start changed)")],
)  # fmt: skip
def test_vllm_hand_off_refuses_what_vllm_cannot_load_in_one_line(name, refusal):
    target = resolve_target(None, [str(trained_option(name))], None)
    with pytest.raises(QloraError, match=re.escape(f"vLLM cannot serve adapter lora-{name} as trained {refusal}")):
        vllm_command(target, host="127.0.0.1", port=8000, api_key=None)


def test_vllm_hand_off_passes_rslora_adapters_which_vllm_scales():
    command = vllm_command(resolve_target(None, [str(trained_option("rslora"))], None), host="h", port=1, api_key=None)
    assert "--enable-lora" in command and "lora-rslora=" in command


# --------------------------------------------------------------------------- llama.cpp LoRA export


def test_a_pissa_run_exports_its_plain_lora_conversion_as_a_llama_cpp_adapter(cli, tmp_path):
    run = trained_option("pissa")
    code, out, err = cli("export", "gguf", str(run), "--adapter-only", "--outtype", "f32", "--output", str(tmp_path / "x"))
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "x/export_report.json").read_text())
    assert report["exported"] == str(run / PLAIN_LORA_DIR)  # against the untouched base, which llama.cpp holds
    assert report["rank"] == 2 * 8 and report["max_relative_diff"] <= 1e-5


@pytest.mark.parametrize(
    ("name", "reason"), [("dora", "DoRA"), ("rslora", "rsLoRA scaling"), ("tokens", "trainable token rows")]
)
def test_an_adapter_llama_cpp_would_load_differently_is_refused_for_adapter_only(name, reason, cli, tmp_path):
    code, _, err = cli("export", "gguf", str(trained_option(name)), "--adapter-only", "--output", str(tmp_path / "x"))
    assert code == 2 and f"llama.cpp cannot load this adapter as trained ({reason}" in err
    assert "drop --adapter-only" in err and not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- qlora plan


def test_plan_counts_doras_magnitudes_and_trained_token_rows():
    from qlora_cli.plan import plan_for

    def own(*overrides: str):
        return plan_for(None, list(overrides), "llama-7b", device="cuda").estimates[0]

    plain, dora = own(), own("lora.dora=true")
    tokens, embeddings = own("lora.trainable_tokens=[<a>,<b>]"), own("lora.train_embeddings=true")
    magnitudes = 32 * (5 * 4096 + 2 * 11008)  # one per output of q, k, v, o, down (4096) and gate, up (11008)
    assert dora.lora_weights - plain.lora_weights == 4 * magnitudes == dora.gradients - plain.gradients
    assert dora.optimizer_state > plain.optimizer_state
    assert dora.activations_full > plain.activations_full  # the base output kept, and one layer's W + s·B A
    assert tokens.lora_weights - plain.lora_weights == 4 * 2 * 2 * 4096  # two rows each of embedding and head
    assert embeddings.lora_weights - plain.lora_weights == 4 * 2 * 32000 * 4096  # untied: both matrices


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_plan_counts_the_16bit_start_as_the_start_holds_it(init):
    """lora.init pissa/loftq load the base again in 16 bits and keep every residual until the last is set."""
    from qlora_cli.memory import MemoryMeter
    from qlora_cli.plan import architecture_for, plan_memory

    cfg = LoraConfig(r=8, init=init)
    loaded = load_model(TINY, FP32_NF4)
    loaded.model = add_lora(loaded.model, cfg, kind=loaded.kind)
    with MemoryMeter("cpu").allocated_peak() as held:
        start_from_16bit(loaded, TINY, cfg, None)
    recipe = validate_recipe(recipe_with({"init": init}, quantization={"compute_dtype": "fp32"}))
    arch = architecture_for("builtin:tiny-llama")
    planned = plan_memory(recipe, arch, device="cpu").estimates[0]
    assert held.peak == pytest.approx(planned.start_copy, rel=0.1)
    assert planned.start_copy > 4 * arch.params  # the fp32 copy, and the residuals beside it
    assert planned.allocated() >= planned.base_weights + planned.lora_weights + planned.start_copy
    on_a_gpu = plan_memory(recipe, arch, device="cuda").estimates[0]
    assert (on_a_gpu.start_copy, on_a_gpu.start_copy_on_device) == (planned.start_copy, False)

