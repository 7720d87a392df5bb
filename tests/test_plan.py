"""The memory planner: exact storage arithmetic, monotonic in every input, the paper's headline figures,
activation coefficients counted from autograd, and one prediction checked against a measured peak."""

from __future__ import annotations

import dataclasses
import json
import weakref

import pytest
import torch

from qlora_cli.config import QuantizationConfig, default_recipe
from qlora_cli.plan import (
    ARCHITECTURES,
    GIB,
    Setup,
    activations_for,
    bits_per_parameter,
    parse_size,
    plan_memory,
    render_plan,
)
from tests.conftest import REPO, run_script

LLAMA_7B = ARCHITECTURES["llama-7b"]


def test_bits_per_parameter_is_the_papers():
    assert bits_per_parameter(QuantizationConfig(double_quant=True)) == 4 + 8 / 64 + 32 / (64 * 256) == 4.126953125
    assert bits_per_parameter(QuantizationConfig(double_quant=False)) == 4.5
    assert bits_per_parameter(QuantizationConfig(bits=8), in_features=4096) == 8 + 32 / 4096


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_bits_per_parameter_is_what_bitsandbytes_stores(quant_type, double_quant):
    import bitsandbytes.functional as F

    weight = torch.randn(256, 1024) * 0.02
    packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    stored = [packed, state.absmax] + ([state.state2.absmax] if double_quant else [])
    bits = 8 * sum(t.numel() * t.element_size() for t in stored) / weight.numel()
    assert bits == bits_per_parameter(QuantizationConfig(quant_type=quant_type, double_quant=double_quant))


def peaks(recipe, arch=LLAMA_7B, **kwargs) -> list[int]:
    return [e.peak() for e in plan_memory(recipe, arch, **kwargs).estimates]


def _bigger(smaller: list[int], bigger: list[int]) -> None:
    assert all(b >= s for s, b in zip(smaller, bigger)), (smaller, bigger)
    assert bigger[0] > smaller[0], "the recipe's own setup must grow"


@pytest.mark.parametrize(
    "field, small, big",
    [
        ("hidden", 4096, 5120),
        ("layers", 32, 40),
        ("intermediate", 11008, 14336),
        ("kv_heads", 8, 32),
        ("vocab", 32000, 128256),
        ("heads", 32, 40),  # with a fixed head_dim: wider attention
    ],
)
def test_peak_grows_with_every_architecture_dimension(field, small, big):
    base = dataclasses.replace(LLAMA_7B, head_dim=128, kv_heads=8)
    recipe = default_recipe("llama-7b")
    smaller, bigger = (dataclasses.replace(base, **{field: value}) for value in (small, big))
    _bigger(peaks(recipe, smaller), peaks(recipe, bigger))


@pytest.mark.parametrize(
    "small, big",
    [
        ("training.batch_size=1", "training.batch_size=4"),
        ("data.source_max_len=384", "data.source_max_len=1024"),
        ("data.target_max_len=128", "data.target_max_len=512"),
        ("lora.r=16", "lora.r=64"),
        ("lora.target_modules=[q_proj,v_proj]", "lora.target_modules=all-linear"),
        # checkpointing on, the loss over the vocabulary outweighs one layer and its dropout masks at 7B
        ("lora.dropout=0 training.gradient_checkpointing=false",
         "lora.dropout=0.1 training.gradient_checkpointing=false"),  # fmt: skip
        ("quantization.double_quant=true", "quantization.double_quant=false"),
        ("quantization.bits=4", "quantization.bits=8"),
        ("quantization.bits=8", "quantization.bits=16"),
        ("quantization.compute_dtype=bf16", "quantization.compute_dtype=fp32"),
        ("training.optim=paged_adamw_8bit", "training.optim=paged_adamw_32bit"),
        ("training.gradient_checkpointing=true", "training.gradient_checkpointing=false"),
    ],
)
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_peak_grows_with_every_recipe_input(small, big, device):
    smaller, bigger = (default_recipe("llama-7b", overrides.split()) for overrides in (small, big))
    _bigger(peaks(smaller, device=device), peaks(bigger, device=device))


def test_fsdp_shards_per_gpu_memory_and_ddp_does_not():
    recipe, fsdp = default_recipe("llama-65b"), default_recipe("llama-65b", ["training.fsdp=true"])
    arch = ARCHITECTURES["llama-65b"]
    one, two, four = (peaks(fsdp, arch, num_processes=n) for n in (1, 2, 4))
    assert all(a > b > c for a, b, c in zip(one, two, four))
    assert peaks(recipe, arch, num_processes=4) >= one  # DDP: every GPU holds the whole model


def test_reproduces_the_papers_memory_headline():
    qlora_65b, _, full_65b = plan_memory(default_recipe("llama-65b"), ARCHITECTURES["llama-65b"]).estimates
    assert qlora_65b.verdict(parse_size("48GB")) == "fits"  # 65B QLoRA on one 48 GB GPU
    assert full_65b.peak() > 780e9  # regular 16-bit finetuning of 65B: more than 780 GB
    qlora_33b = plan_memory(default_recipe("llama-33b"), ARCHITECTURES["llama-33b"]).estimates[0]
    assert qlora_33b.resident() < 24 * GIB  # 33B on a 24 GB consumer GPU, optimizer state paged
    qlora_7b = plan_memory(default_recipe("llama-7b"), LLAMA_7B).estimates[0]
    assert 5 * GIB < qlora_7b.resident() < 7 * GIB


def test_parse_size_reads_gpu_sizes_in_binary_units():
    assert parse_size("48GB") == parse_size("48GiB") == parse_size("48g") == 48 * GIB
    assert parse_size("512MB") == 512 * 2**20
    from qlora_cli.errors import QloraError

    with pytest.raises(QloraError, match="--gpu-memory"):
        parse_size("48")


@pytest.mark.parametrize(
    "bits, dtype, lora_overrides",
    [
        (4, "fp32", ["lora.dropout=0"]),
        (4, "fp32", ["lora.dropout=0.1"]),
        (4, "bf16", ["lora.dropout=0.1"]),  # the CPU trains without autocast: fp32 residual, fp32 adapters
        (4, "bf16", ["lora.dropout=0", "lora.dora=true"]),
        (16, "fp32", ["lora.dropout=0.1", "lora.target_modules=[q_proj,v_proj]"]),
        (16, "bf16", ["lora.dropout=0.1"]),  # a bf16 base keeps bf16, its fp32 adapters fp32
        (16, "fp32", ["lora.enabled=false"]),
        (16, "bf16", ["lora.enabled=false"]),
    ],
)
def test_layer_activations_are_what_autograd_saves(bits, dtype, lora_overrides):
    """Count the bytes autograd keeps inside one decoder layer of a real (tiny) model, on the CPU."""
    from qlora_cli.model import add_lora, load_model
    from qlora_cli.plan import architecture_for, lora_modules

    overrides = [f"quantization.bits={bits}", f"quantization.compute_dtype={dtype}", "lora.r=8", *lora_overrides]
    recipe = default_recipe("builtin:tiny-llama", overrides)  # bf16 on a 64-token batch is quick on any CPU
    loaded = load_model(recipe.model, recipe.quantization)
    model = add_lora(loaded.model, recipe.lora, kind=loaded.kind) if recipe.lora.enabled else loaded.model
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    packed: list[tuple[weakref.ref, int, int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            packed.append((weakref.ref(t), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    layer = loaded.model.model.layers[1]
    layer.register_forward_pre_hook(lambda *_: hooks.__enter__())
    layer.register_forward_hook(lambda *_: hooks.__exit__(None, None, None))
    ids = torch.randint(3, 400, (2, 32))
    out = model(input_ids=ids, labels=ids)  # held: what its graph keeps is alive until the backward
    saved = {ptr: nbytes for ref, ptr, nbytes in packed if ref() is not None}  # DoRA's transients are gone
    assert out.loss.requires_grad

    arch = architecture_for("builtin:tiny-llama")
    setup = Setup("x", recipe.quantization, recipe.lora.enabled)
    predicted = activations_for(setup, recipe, arch, lora_modules(recipe), device="cpu", tokens=64, loss="plain")
    assert sum(saved.values()) == pytest.approx(predicted.per_layer(), rel=0.02)


def test_plan_command_gives_a_verdict_for_each_setup(cli):
    code, out, _ = cli("plan", "--model", "llama-65b", "--gpu-memory", "48GB")
    assert code == 0
    verdict = next(line for line in out.splitlines() if line.startswith("verdict"))
    assert verdict.split("GiB", 1)[1].split() == ["fits", "does", "not", "fit", "does", "not", "fit"]


def test_plan_command_reads_a_recipe_and_its_model_config(cli):
    demo = str(REPO / "configs/demo.yaml")
    code, out, _ = cli("plan", "--config", demo, "model.name_or_path=builtin:tiny-llama", "training.batch_size=2", "--json")
    assert code == 0
    plan = json.loads(out)
    assert (plan["arch"]["hidden"], plan["arch"]["layers"], plan["batch_size"]) == (128, 4, 2)
    assert [e["label"] for e in plan["estimates"]] == ["QLoRA nf4 + DQ", "16-bit LoRA", "full finetuning"]


def test_plan_with_data_sizes_the_recipe_s_longest_row_and_shows_its_packing(cli):
    demo = str(REPO / "configs/demo.yaml")
    recipe = ("-c", demo, "model.name_or_path=builtin:tiny-llama", "data.max_train_samples=16", "data.eval_size=8")
    packed = (*recipe, "data.packing=true", "data.max_packed_len=4096", "training.batch_size=1")
    code, out, _ = cli("data", "preview", *packed, "-n", "16", "--json")
    assert code == 0
    tokens = sum(row["source_tokens"] + row["target_tokens"] for row in map(json.loads, out.splitlines()))
    code, out, _ = cli("plan", *packed, "--device", "cpu", "--data", "--json")
    assert code == 0
    with_data = json.loads(out)
    code, out, _ = cli("plan", *packed, "--device", "cpu", "--json")
    limits = json.loads(out)
    # the 16 examples fit one row: the row the plan sizes holds every token of them, not the 4096 allowed
    assert (with_data["seq_len"], limits["seq_len"]) == (tokens, 4096)
    assert "16 examples packed into 1 rows of up to 4,096 tokens" in with_data["data"]["summary"]
    assert with_data["estimates"][0]["peak"] < limits["estimates"][0]["peak"]
    code, out, _ = cli("plan", *packed, "--device", "cpu", "--data")
    assert f"batch 1 packed rows x {tokens} tokens (the longest training row of the recipe's data)" in out
    assert "data: packing: 16 examples packed into 1 rows" in out


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--model"),
        (["--model", "llama-7b", "--gpu-memory", "lots"], "--gpu-memory"),
        (["--model", "builtin:tiny-t5"], "t5"),
        (["--model", "llama-7b", "lora.rr=8"], "lora.rr"),
    ],
)
def test_plan_command_errors_are_one_line(cli, args, message):
    code, _, err = cli("plan", *args)
    assert code == 2
    last = err.strip().splitlines()[-1]  # building a builtin model first draws a progress bar
    assert last.startswith("error: ") and message in last


def test_predicted_peak_matches_a_measured_training_run(tmp_path):
    """scripts/bench_memory.py at its smallest size: one real QLoRA run, predicted vs peak RSS."""
    out = tmp_path / "rows.json"
    args = ["--sizes", "30m", "--setups", "qlora", "--steps", "2", "--batch-size", "2", "--seq-len", "64"]
    result = run_script("bench_memory.py", *args, "--json", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["peak"] == pytest.approx(row["predicted"], rel=0.15)
    assert 0 < row["load_allocated_peak"] <= row["load_peak"] <= 1.3 * row["model_bytes"] + row["largest_shard"]
    assert row["bits_per_linear_param"] == pytest.approx(4.127, abs=0.05)


def test_auto_checkpointing_is_on_where_the_plan_without_it_does_not_fit():
    from qlora_cli.plan import AUTO_MARGIN, choose_checkpointing

    recipe = default_recipe("llama-7b")  # gradient_checkpointing: auto
    need = plan_memory(recipe, LLAMA_7B).estimates[0].peak(checkpointing=False)
    tight = choose_checkpointing(recipe, LLAMA_7B, device="cuda", available=need)
    ample = choose_checkpointing(recipe, LLAMA_7B, device="cuda", available=int(need / (1 - AUTO_MARGIN)) + 1)
    assert tight.on and not ample.on
    assert tight.reason.startswith("auto: ") and f"{need / GIB:.2f} GiB" in tight.reason


@pytest.mark.parametrize("setting", [True, False])
def test_checkpointing_true_or_false_is_forced_whatever_the_memory(setting):
    from qlora_cli.plan import choose_checkpointing

    recipe = default_recipe("llama-7b", [f"training.gradient_checkpointing={str(setting).lower()}"])
    for available in (0, 1000 * GIB):
        choice = choose_checkpointing(recipe, LLAMA_7B, device="cuda", available=available)
        assert choice.on is setting and choice.reason == f"training.gradient_checkpointing={str(setting).lower()}"


def test_auto_checkpointing_stays_on_for_a_model_the_planner_cannot_size():
    from qlora_cli.plan import checkpointing_for_run

    choice = checkpointing_for_run(default_recipe("builtin:tiny-t5"))
    assert choice.on and "cannot size" in choice.reason


@pytest.mark.parametrize("checkpointing", [True, False])
def test_activation_peak_is_the_loss_or_a_layer_as_the_allocator_sees_it(tmp_path, checkpointing):
    """One step on a LLaMA whose loss over the vocabulary (3 fp32 tokens x vocab tensors) and whose layer
    activations are about the same size, measured with torch's allocator. They are never live together:
    the planner once added them, which predicted 1.7x this peak with checkpointing on."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_cli.memory import MemoryMeter
    from qlora_cli.model import add_lora, load_model
    from qlora_cli.plan import architecture_for, lora_modules

    config = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=1024, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    overrides = ["model.tokenizer=builtin:tiny-llama", "quantization.compute_dtype=fp32", "lora.r=8"]
    recipe = default_recipe(str(tmp_path), overrides)
    loaded = load_model(recipe.model, recipe.quantization, gradient_checkpointing=checkpointing)
    model = add_lora(loaded.model, recipe.lora, kind=loaded.kind)
    model.train()
    ids = torch.randint(3, config.vocab_size, (4, 256))
    with MemoryMeter("cpu").allocated_peak() as held:
        model(input_ids=ids, labels=ids).loss.backward()

    setup = Setup("QLoRA", recipe.quantization, lora=True)
    activations = activations_for(setup, recipe, architecture_for(str(tmp_path)), lora_modules(recipe), device="cpu",
                                  tokens=ids.numel(), loss="plain")  # fmt: skip
    assert held.peak == pytest.approx(activations.total(checkpointing=checkpointing), rel=0.1)


def test_a_gguf_file_is_planned_from_its_header():
    """SmolLM2-135M: a vocabulary of 85 x hidden, like Llama-3's and Gemma's, and tied embeddings."""
    from qlora_cli.plan import architecture_for

    arch = architecture_for("builtin:smollm2-135m-instruct")
    assert (arch.hidden, arch.layers, arch.heads, arch.kv_heads, arch.vocab) == (576, 30, 9, 3, 49152)
    assert arch.tied_embeddings and arch.head_dim == 64


SMOLLM2 = dataclasses.replace(LLAMA_7B, name="smollm2-135m", hidden=576, layers=30, intermediate=1536, heads=9,
                              kv_heads=3, vocab=49152, head_dim=64, tied_embeddings=True)  # fmt: skip


@pytest.mark.parametrize(
    "loss, held",
    [
        ("plain", 3 * 4 * 4096 * 49152),  # log-softmax output, its gradient, the logits' gradient: fp32
        ("chunked", 341 * 49152 * 8 + 2 * 4096 * 576 * 4),  # a chunk's fp32 logits, logsumexp's temporary; the
        # hidden states' gradient and the labelled positions' states: 146 MiB, as scripts/bench_train.py measured
        ("fused", 64 * 49152 * 4 + 2 * 4096 * 576 * 4),  # Liger: 4096 / ceil(49152 / 576) = 48 -> 64 positions
    ],
)
def test_the_plan_counts_what_each_loss_path_holds(loss, held):
    """SmolLM2-135M's shape in fp32 at one row of 4096 tokens, the QLoRA setup (the head is not trained)."""
    recipe = default_recipe("llama-7b", [f"training.loss={loss}", "quantization.compute_dtype=fp32",
                                         "data.source_max_len=3072", "data.target_max_len=1024"])  # fmt: skip
    plan = plan_memory(recipe, SMOLLM2, device="cpu")
    assert (plan.loss, plan.loss_reason, plan.seq_len) == (loss, f"training.loss={loss}", 4096)
    setup = Setup("QLoRA", recipe.quantization, lora=True)
    activations = activations_for(setup, recipe, SMOLLM2, plan.lora_modules, device="cpu", tokens=4096, loss=loss)
    assert activations.loss_held() == held
    assert f"loss over the vocabulary: {loss} (training.loss={loss})" in render_plan(plan).splitlines()


def test_auto_plans_the_chunked_loss_on_the_cpu_and_it_lowers_the_peak_of_long_rows():
    long_rows = ["data.source_max_len=3072", "data.target_max_len=1024", "training.gradient_checkpointing=true"]
    auto = plan_memory(default_recipe("llama-7b", long_rows), SMOLLM2, device="cpu")
    plain = plan_memory(default_recipe("llama-7b", [*long_rows, "training.loss=plain"]), SMOLLM2, device="cpu")
    assert auto.loss == "chunked" and auto.loss_reason.startswith("auto: the llama head is a plain linear layer")
    assert auto.estimates[0].peak() < plain.estimates[0].peak() - GIB  # 2.25 GiB of fp32 tensors against 0.14
