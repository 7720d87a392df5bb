import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from qlora_cli.builtin import resolve_builtin_model
from qlora_cli.config import LoraConfig, ModelConfig, QuantizationConfig
from qlora_cli.errors import QloraError
from qlora_cli.model import (
    add_lora,
    bnb_config,
    ensure_pad_token,
    linear_module_names,
    load_for_inference,
    load_model,
    load_tokenizer,
    model_source,
    resolve_compute_dtype,
)
from tests.conftest import run_cli
from tests.data_fixtures import hendrycks  # noqa: F401 (fixture)
from tests.trained import llama_adapter  # noqa: F401 (fixture)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "dtype", "reason"),
    [
        (False, False, torch.float32, "no bf16 matrix units"),
        (False, True, torch.bfloat16, "AVX512-BF16 bf16 matrix units"),
        (True, True, torch.bfloat16, "AMX bf16 matrix units"),
    ],
)
def test_auto_compute_dtype_on_the_cpu_follows_its_bf16_units(monkeypatch, no_isa_cap, amx, avx512_bf16, dtype, reason):
    from qlora_cli.model import choose_compute_dtype

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    chosen = choose_compute_dtype("auto", "cpu")
    assert chosen.dtype == dtype and reason in chosen.reason and chosen.reason.startswith("auto: ")
    assert resolve_compute_dtype("bf16", "cpu") == torch.bfloat16  # an explicit choice is kept on any CPU
    assert choose_compute_dtype("fp32", "cpu").reason == "quantization.compute_dtype=fp32"


# --------------------------------------------------------------------------- --compute-dtype of inference commands


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compute_dtype_of_an_inference_command_wins_and_is_recorded(cli, hendrycks, tmp_path, no_isa_cap, dtype):
    """Whatever auto would pick on this CPU: MMLU settings and the load line say what computed, and why."""
    output = tmp_path / "mmlu.json"
    code, _, err = cli("eval", "mmlu", "--model", "builtin:tiny-llama", "--quantization", "none", "--data",
                       str(hendrycks), "--shots", "0", "--compute-dtype", dtype, "--output", str(output))  # fmt: skip
    assert code == 0, err
    settings = json.loads(output.read_text())["settings"]
    assert (settings["compute_dtype"], settings["compute_dtype_reason"]) == (dtype, f"--compute-dtype={dtype}")
    assert f"computing in {dtype} (--compute-dtype={dtype})" in err


def test_generate_records_the_compute_dtype_of_an_adapters_base(cli, llama_adapter):
    code, out, err = cli("generate", "--adapter", str(llama_adapter), "--prompt", "Repeat the words. apple",
                         "--max-new-tokens", "2", "--compute-dtype", "fp32")  # fmt: skip
    assert code == 0, err
    assert "computing in fp32 (--compute-dtype=fp32)" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--compute-dtype", "fp8"], "'fp8' is not one of 'auto', 'bf16', 'fp16', 'fp32'"),
        (["--compute-dtype", "fp16"], "error: --compute-dtype=fp16 on the CPU: use fp32, or bf16 on a CPU with bf16"),
    ],
)
def test_a_compute_dtype_that_cannot_run_here_is_one_line_and_exit_2(cli, args, message):
    code, out, err = cli("generate", "--model", "builtin:tiny-llama", "--prompt", "hi", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out


def test_bf16_on_a_cpu_without_bf16_units_runs_and_warns_with_the_cost_measured_here():
    """An AVX2 CPU (here, or any CPU with oneDNN capped at AVX2): bf16 matmuls run ~60x slower than fp32."""
    result = run_cli("generate", "--model", "builtin:tiny-llama", "--prompt", "hi", "--max-new-tokens", "1",
                     "--compute-dtype", "bf16", env={"ONEDNN_MAX_CPU_ISA": "AVX2"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    warning = re.search(r"warning: --compute-dtype=bf16 on a CPU without bf16 matrix units: a bf16 matmul ran "
                        r"(\d+)x slower than fp32 here", result.stderr)  # fmt: skip
    assert warning, result.stderr[-2000:]
    assert "computing in bf16 (--compute-dtype=bf16)" in result.stderr


def test_serve_and_plan_take_the_compute_dtype(cli, llama_adapter):
    code, out, err = cli("serve", "--adapter", str(llama_adapter), "--compute-dtype", "fp32", "--print-vllm-command")
    assert code == 0 and "--dtype float32" in out, err
    code, out, err = cli("plan", "--model", "llama-7b", "--device", "cpu", "--compute-dtype", "fp32", "--json")
    assert code == 0 and json.loads(out)["compute_dtype"] == "fp32", err


@pytest.mark.parametrize(
    ("cap", "units", "dtype"),
    [
        ("AVX2", None, torch.float32),
        ("avx512_core", None, torch.float32),
        ("AVX512_CORE_BF16", "AVX512-BF16", torch.bfloat16),
        ("AVX512_CORE_AMX", "AMX", torch.bfloat16),
        ("ALL", "AMX", torch.bfloat16),
    ],
)
def test_a_cap_on_onednns_instructions_hides_the_bf16_units_it_leaves_out(monkeypatch, amx_cpu, cap, units, dtype):
    """ONEDNN_MAX_CPU_ISA=AVX2 on a Xeon with AMX makes bf16 matmuls ~7x slower than fp32: auto must see no units."""
    from qlora_cli.kernels import bf16_matrix_units
    from qlora_cli.model import choose_compute_dtype

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert bf16_matrix_units() == units
    assert bf16_matrix_units(within_isa_cap=False) == "AMX"
    chosen = choose_compute_dtype("auto", "cpu")
    assert chosen.dtype == dtype
    if units is None:
        assert chosen.reason == f"auto: ONEDNN_MAX_CPU_ISA={cap.upper()} keeps matmuls off this CPU's AMX units, so fp32"


def test_this_cpus_bf16_units_are_what_its_flags_say(no_isa_cap):
    """torch's check agrees with the kernel's own flags (/proc/cpuinfo), on either kind of machine."""
    from pathlib import Path

    from qlora_cli.kernels import bf16_matrix_units

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    expected = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None
    assert bf16_matrix_units() == expected


def test_bnb_config_is_the_papers_by_default():
    cfg = bnb_config(QuantizationConfig(), torch.bfloat16)
    assert cfg.load_in_4bit and not cfg.load_in_8bit
    assert cfg.bnb_4bit_quant_type == "nf4"
    assert cfg.bnb_4bit_use_double_quant is True
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert cfg.bnb_4bit_quant_storage == torch.uint8


def test_bnb_config_variants():
    fp4 = bnb_config(QuantizationConfig(quant_type="fp4", double_quant=False), torch.float32)
    assert fp4.bnb_4bit_quant_type == "fp4" and fp4.bnb_4bit_use_double_quant is False
    assert bnb_config(QuantizationConfig(bits=8), torch.float32).load_in_8bit
    assert bnb_config(QuantizationConfig(bits=16), torch.float32) is None
    fsdp = bnb_config(QuantizationConfig(), torch.bfloat16, fsdp=True)
    assert fsdp.bnb_4bit_quant_storage == torch.bfloat16


@pytest.fixture(scope="module")
def tiny_llama_4bit():
    return load_model(ModelConfig(name_or_path="builtin:tiny-llama"), QuantizationConfig(), gradient_checkpointing=True)


def test_linear_layers_found_by_inspection_exclude_the_head(tiny_llama_4bit):
    names = linear_module_names(tiny_llama_4bit.model)
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert "lm_head" not in names


def test_lora_wraps_every_linear_layer_but_the_head(tiny_llama_4bit):
    import bitsandbytes as bnb

    model = add_lora(tiny_llama_4bit.model, LoraConfig(r=8), kind=tiny_llama_4bit.kind)
    quantized = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert len(quantized) == 4 * 7
    assert all(name.endswith(".base_layer") for name in quantized)
    assert all(hasattr(model.get_submodule(name.removesuffix(".base_layer")), "lora_A") for name in quantized)
    assert not hasattr(model.get_output_embeddings(), "lora_A")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("bits", [4, 16])
def test_checkpointing_is_non_reentrant_and_asked_for_by_its_current_name(bits):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model(
            ModelConfig(name_or_path="builtin:tiny-llama"), QuantizationConfig(bits=bits), gradient_checkpointing=True
        )
    assert not [w for w in caught if "gradient_checkpointing" in str(w.message)]
    layer = loaded.model.model.layers[0]
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    embedded = loaded.model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert embedded.requires_grad  # what lets gradients reach LoRA layers inside a checkpointed frozen layer


def test_tokenizer_without_pad_reuses_unk_without_resizing(tiny_llama_4bit):
    tokenizer = tiny_llama_4bit.tokenizer
    assert tokenizer.pad_token == tokenizer.unk_token
    assert tiny_llama_4bit.model.get_input_embeddings().num_embeddings == len(tokenizer)


def test_tokenizer_without_pad_or_unk_gets_a_new_token_and_resized_embeddings():
    tokenizer = load_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama"))
    tokenizer.pad_token = None
    tokenizer.unk_token = None
    model = load_model(
        ModelConfig(name_or_path="builtin:tiny-llama"), QuantizationConfig(bits=16), for_training=False
    ).model
    before = model.get_input_embeddings().num_embeddings
    ensure_pad_token(tokenizer, model)
    assert tokenizer.pad_token == "<pad>"
    assert model.get_input_embeddings().num_embeddings == before + 1 == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_sixteen_bit_loads_plain_linear_layers():
    loaded = load_model(ModelConfig(name_or_path="builtin:tiny-llama"), QuantizationConfig(bits=16), for_training=False)
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear and q_proj.weight.dtype == resolve_compute_dtype("auto", "cpu")


def test_hub_id_offline_says_so_and_suggests_a_local_path():
    with pytest.raises(QloraError, match="local folder"):
        load_model(ModelConfig(name_or_path="no-such-org/no-such-model"), QuantizationConfig())


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(QloraError, match="not found|cannot load"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "absent")), QuantizationConfig())


SMOLLM2 = "builtin:smollm2-135m-instruct"


def test_a_gguf_checkpoint_is_dequantized_once_then_quantized_to_nf4():
    """SmolLM2-135M-Instruct (Q4_1, tied embeddings): by its builtin name, as a file path or as gguf_file in its
    folder."""
    import bitsandbytes as bnb

    from qlora_cli.generate import Generator, Sampling

    gguf = Path(resolve_builtin_model(SMOLLM2))
    as_file = load_for_inference(ModelConfig(name_or_path=str(gguf)), QuantizationConfig())
    in_folder = ModelConfig(name_or_path=str(gguf.parent), gguf_file=gguf.name)
    assert model_source(in_folder) == model_source(ModelConfig(name_or_path=SMOLLM2)) == as_file.source  # one copy
    model = as_file.model
    assert any(isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_type == "nf4" for m in model.modules())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    generator = Generator(as_file, None)  # no recipe: the GGUF's ChatML template
    prompt = generator.render([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.endswith("<|im_start|>assistant\n")
    [reply] = generator.generate([prompt], Sampling(max_new_tokens=12, temperature=0))
    assert "Paris" in reply


def test_inference_commands_take_a_gguf_file_in_a_model_folder(cli):
    gguf = Path(resolve_builtin_model(SMOLLM2))
    folder, name = str(gguf.parent), gguf.name
    code, out, err = cli("generate", "--model", folder, "--gguf-file", name, "--max-new-tokens", "12",
                         "--prompt", "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert code == 0 and "Paris" in out, err
    code, out, err = cli("serve", "--model", folder, "--gguf-file", name, "--print-vllm-command")
    assert code == 0 and out.startswith(f"vllm serve {gguf} --served-model-name {folder} "), err


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["generate", "--prompt", "hi"], "--model"),
        (["chat"], "--model"),
        (["serve", "--print-vllm-command"], "--model"),
        (["eval", "mmlu"], "--model"),
        (["merge-adapter", "--adapter", "run", "--output", "out"], "--base"),
    ],
)
def test_a_gguf_file_without_its_folder_is_refused_in_one_line(cli, args, option):
    code, _, err = cli(*args, "--gguf-file", "model.gguf")
    assert code == 2 and f"error: --gguf-file names a file in {option} (a folder or hub repo): pass {option} too" in err


def test_a_gguf_base_without_the_gguf_package_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    from qlora_cli.errors import QloraError

    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(QloraError, match=r"reading m.gguf needs the gguf package: pip install 'qlora-cli\[gguf\]'"):
        model_source(ModelConfig(name_or_path=str(file)))
