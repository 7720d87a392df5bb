"""scripts/benchlib.py's model FLOP count (the numerator of bench_train's utilisation), against a hand count."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from benchlib import training_flops  # noqa: E402

from qlora_cli.plan import Architecture  # noqa: E402

# hidden 4, one layer, MLP 8, 2 query heads of 2 dims sharing 1 KV head, vocabulary 10
TINY = Architecture("tiny", hidden=4, layers=1, intermediate=8, heads=2, kv_heads=1, vocab=10)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_a_lora_step_on_a_tiny_architecture_matches_the_hand_count():
    # one row of 3 tokens, LoRA r=1 on all seven linear layers
    # linear weights: q 16 + k 8 + v 8 + o 16 + gate 32 + up 32 + down 32 = 144 -> 2*144*3 = 864
    # head 2*4*10*3 = 240; causal pairs 3*4/2 = 6 -> attention 4*2 heads*2 dims*6 = 96
    # LoRA in+out: 8+6+6+8+12+12+12 = 64 -> 2*1*64*3 = 384
    flops = training_flops(TINY, [3], lora_r=1, lora_modules=ALL, checkpointing=False)
    assert flops == {"forward": 864 + 240 + 96 + 384, "recompute": 0,
                     "backward": 864 + 240 + 2 * 96 + 2 * 384, "total": 1584 + 2064}  # fmt: skip


def test_checkpointing_recomputes_one_forward_of_the_decoder_layers_only():
    off = training_flops(TINY, [3, 5], lora_r=2, lora_modules=ALL, checkpointing=False)
    on = training_flops(TINY, [3, 5], lora_r=2, lora_modules=ALL, checkpointing=True)
    head = 2 * 4 * 10 * 8
    assert on["recompute"] == on["total"] - off["total"] == off["forward"] - head


def test_full_finetuning_adds_weight_gradients_and_lora_only_its_own():
    lora = training_flops(TINY, [3], lora_r=1, lora_modules=("q_proj",), checkpointing=False)
    base = training_flops(TINY, [3], lora_r=1, lora_modules=(), checkpointing=False)
    full = training_flops(TINY, [3], lora_r=None, checkpointing=False)
    assert lora["forward"] - base["forward"] == 2 * 1 * (4 + 4) * 3
    assert full["backward"] - base["backward"] == pytest.approx(864 + 240)
