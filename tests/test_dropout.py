"""CpuDropout must be nn.Dropout in distribution and gradient, and replace exactly PEFT's LoRA dropouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora_cli.config import LoraConfig, ModelConfig, QuantizationConfig
from qlora_cli.dropout import CpuDropout, use_cpu_dropout
from qlora_cli.model import add_lora, load_model


@pytest.mark.parametrize("p", [0.1, 0.05, 0.5])
def test_drops_p_of_the_elements_and_scales_the_rest(p):
    torch.manual_seed(0)
    x = torch.rand(256, 1031) + 1  # odd size: the last int64 of random bits is used in part
    y = CpuDropout(p).train()(x)
    dropped = y == 0
    assert abs(dropped.float().mean().item() - p) < 0.005
    torch.testing.assert_close(y[~dropped], x[~dropped] / (1 - p))
    rows, cols = dropped.float().mean(dim=1), dropped.float().mean(dim=0)
    assert rows.std() < 3 * (p * (1 - p) / 1031) ** 0.5 and cols.std() < 3 * (p * (1 - p) / 256) ** 0.5  # no pattern


def test_the_gradient_is_the_mask_times_the_scale():
    x = torch.randn(4, 33, 64, dtype=torch.bfloat16, requires_grad=True)
    y = CpuDropout(0.1).train()(x)
    y.sum().backward()
    expected = torch.where(y == 0, 0.0, 1 / 0.9).to(torch.bfloat16)
    torch.testing.assert_close(x.grad, expected)


def test_masks_follow_the_seed_and_eval_mode_is_the_identity():
    dropout, x = CpuDropout(0.1).train(), torch.ones(1000)
    torch.manual_seed(3)
    first = dropout(x)
    torch.manual_seed(3)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(dropout(x), first)
    assert dropout.eval()(x) is x


def test_probabilities_outside_zero_to_one_are_refused():
    for p in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="dropout probability"):
            CpuDropout(p)


def test_add_lora_swaps_every_lora_dropout_and_nothing_else_on_the_cpu():
    from peft.tuners.lora import LoraLayer

    loaded = load_model(ModelConfig(name_or_path="builtin:tiny-llama"), QuantizationConfig(compute_dtype="fp32"))
    model = add_lora(loaded.model, LoraConfig(dropout=0.1), kind=loaded.kind)
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    dropouts = [m.lora_dropout["default"] for m in lora_layers]
    assert lora_layers and all(type(d) is CpuDropout and d.p == 0.1 for d in dropouts)
    assert not [m for m in model.modules() if type(m) is nn.Dropout and m.p > 0]  # none left behind
    assert use_cpu_dropout(model) == 0  # already swapped
    assert not [name for name in model.state_dict() if "dropout" in name]  # no state: the adapter saves as before
