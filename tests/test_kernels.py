"""The 4-bit CPU kernel is chosen on purpose (qlora_cli.kernels), never by bitsandbytes repacking weights at eval().

Most tests run with the defaults bitsandbytes gives layers on an AVX512-BF16 CPU (`avx512_bf16_defaults`), so
that they check on any CPU what a user of such a CPU gets; the fused kernel itself runs only where it exists.
"""

from __future__ import annotations

import logging

import pytest
import torch

from qlora_cli.config import ModelConfig, QuantizationConfig
from qlora_cli.kernels import (
    DEQUANTIZE,
    PACKED,
    choose_cpu_kernel,
    packed_kernel_available,
    quiet_missing_kernels_package,
)
from qlora_cli.model import load_for_inference, load_model

TINY = ModelConfig(name_or_path="builtin:tiny-llama")
NF4 = QuantizationConfig(compute_dtype="fp32")  # the paper's NF4 + double quant; bf16 compute tested on its own


def _linear_4bit_layers(model):
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def packed_weights(model) -> list:
    """4-bit layers whose weight bitsandbytes has rewritten in place into its packed CPU layout."""
    layers = _linear_4bit_layers(model)
    return [layer for layer in layers if getattr(layer.weight.quant_state, "packing_format_for_cpu", False)]


def _no_grad_eval_forward(model) -> None:
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 9, 14, 3]]))


def _assert_forward_is_the_dequantized_weight(layer) -> None:
    """What training computes, and what a merge reads back: x @ dequantize_4bit(weight)^T."""
    import bitsandbytes.functional as bnbf

    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        out = layer(x)
    weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight.float(), layer.bias), atol=1e-5, rtol=1e-5)


def test_a_model_loaded_for_training_keeps_its_weights_through_an_eval_forward(avx512_bf16_defaults):
    loaded = load_model(TINY, NF4, for_training=True)
    assert loaded.cpu_kernel == DEQUANTIZE
    _no_grad_eval_forward(loaded.model)  # the demo's "before" exact match, eval_steps, the MMLU callback
    assert packed_weights(loaded.model) == []
    layer = _linear_4bit_layers(loaded.model)[0]
    assert layer.weight.quant_state.dtype == torch.float32 and layer.weight.quant_state.nested
    _assert_forward_is_the_dequantized_weight(layer)


@pytest.mark.parametrize("generation", [False, True])
def test_fp32_inference_keeps_the_weights_as_trained(avx512_bf16_defaults, generation):
    loaded = load_for_inference(TINY, NF4, generation=generation)
    assert loaded.cpu_kernel == DEQUANTIZE  # the fused kernel would compute in bf16
    _no_grad_eval_forward(loaded.model)
    assert packed_weights(loaded.model) == []
    _assert_forward_is_the_dequantized_weight(_linear_4bit_layers(loaded.model)[-1])


@pytest.mark.parametrize(
    ("dtype", "device", "inference", "expected"),
    [
        (torch.bfloat16, "cpu", True, PACKED),
        (torch.float32, "cpu", True, DEQUANTIZE),
        (torch.bfloat16, "cpu", False, DEQUANTIZE),
        (torch.bfloat16, "cuda:0", True, DEQUANTIZE),
    ],
)
def test_fused_kernel_only_for_bf16_inference_on_a_cpu_that_has_it(monkeypatch, dtype, device, inference, expected):
    import qlora_cli.kernels

    model = load_model(TINY, NF4, for_training=True).model
    monkeypatch.setattr(qlora_cli.kernels, "packed_kernel_available", lambda: True)
    assert choose_cpu_kernel(model, dtype, device, inference=inference) == expected
    assert {layer.support_avx512bf16_for_cpu for layer in _linear_4bit_layers(model)} == {expected == PACKED}
    monkeypatch.setattr(qlora_cli.kernels, "packed_kernel_available", lambda: False)
    assert choose_cpu_kernel(model, dtype, device, inference=inference) == DEQUANTIZE


def test_scoring_prompts_never_takes_the_fused_kernel(monkeypatch, avx512_bf16_defaults):
    """MMLU scores whole prompts: there dequantize + bf16 matmul is ~8x the fused kernel (docs/benchmarks.md)."""
    import qlora_cli.kernels

    monkeypatch.setattr(qlora_cli.kernels, "packed_kernel_available", lambda: True)
    bf16 = QuantizationConfig(bits=4, compute_dtype="bf16")
    assert load_for_inference(TINY, bf16).cpu_kernel == DEQUANTIZE
    assert load_for_inference(TINY, bf16, generation=True).cpu_kernel == PACKED


def test_a_16_bit_model_has_no_4bit_kernel():
    loaded = load_for_inference(TINY, QuantizationConfig(bits=16))
    assert loaded.cpu_kernel is None


@pytest.mark.skipif(not packed_kernel_available(), reason="bitsandbytes has no fused CPU kernel on this CPU")
def test_fused_kernel_gives_the_predictions_of_bf16_compute():
    """Where the fused kernel runs (AVX512-BF16), it must answer as dequantize + bf16 matmul does."""
    bf16 = QuantizationConfig(bits=4, compute_dtype="bf16")
    fused, exact = load_for_inference(TINY, bf16, generation=True), load_for_inference(TINY, bf16)
    assert (fused.cpu_kernel, exact.cpu_kernel) == (PACKED, DEQUANTIZE)
    tokenizer = exact.tokenizer
    prompts = [f"Repeat the words. {' '.join(['green', 'stone', 'river'][: 1 + i % 3])} number {i}" for i in range(24)]
    ids = [torch.tensor([tokenizer(p)["input_ids"]]) for p in prompts]
    with torch.no_grad():
        fast = torch.stack([fused.model(input_ids=x).logits[0, -1].float() for x in ids])
        slow = torch.stack([exact.model(input_ids=x).logits[0, -1].float() for x in ids])
    assert packed_weights(fused.model) and not packed_weights(exact.model)  # both paths really ran
    top2 = slow.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05  # beyond bf16 rounding of the logits
    assert clear.sum() >= len(prompts) // 2
    assert fast[clear].argmax(-1).tolist() == slow[clear].argmax(-1).tolist()


def test_missing_kernels_package_warning_is_dropped_and_other_warnings_kept(caplog):
    quiet_missing_kernels_package()
    quiet_missing_kernels_package()  # every command calls it; one filter is enough
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(  # bitsandbytes 0.50's text on an AVX512-BF16 CPU without the `kernels` package
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1",
            ModuleNotFoundError("No module named 'kernels'"),
        )
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", ConnectionError("offline"))
    assert [r.getMessage() for r in caplog.records] == [
        "Failed to load CPU gemm_4bit_forward from kernels-community: offline."
    ]


def test_the_filter_is_in_place_before_transformers_imports_bitsandbytes():
    """`from transformers import set_seed` already imports peft and bitsandbytes, which logs at import."""
    import subprocess
    import sys

    code = (
        "import logging, sys, qlora_cli; from transformers import set_seed\n"
        "print('bitsandbytes' in sys.modules, len(logging.getLogger('bitsandbytes.backends.cpu.ops').filters))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["True", "1"], result.stderr
    assert "kernels-community" not in result.stderr
