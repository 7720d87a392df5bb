"""The LoRA family on the real SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`, no ../shared needed).

A start from the 16-bit base (PiSSA, LoftQ) against NF4 alone on real weights; each option trained a few steps
of the demo recipe through `qlora train`, lowering the held-out loss, and merged at the fp32 tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_cli.config import LoraConfig, ModelConfig, QuantizationConfig
from qlora_cli.model import add_lora, load_model, start_from_16bit
from qlora_cli.run_folder import MERGE_REPORT_FILE
from tests.conftest import REPO
from tests.test_lora_family import weight_error
from tests.trained import run_cli_in_process

MODEL = ModelConfig(name_or_path="builtin:smollm2-135m-instruct")
FP32 = {"bits": 4, "compute_dtype": "fp32"}
OPTIONS = {
    "dora": ["lora.dora=true"],
    "rslora": ["lora.rslora=true", "lora.alpha=2"],  # the demo's alpha 16 over sqrt(64): twice plain LoRA's scale
    "pissa": ["lora.init=pissa", "lora.pissa_niter=4"],  # PEFT's fast SVD: the full one costs 13 s here
    "olora": ["lora.init=olora"],
    "loftq": ["lora.init=loftq"],
    "tokens": ["lora.trainable_tokens=[<|im_start|>,<|im_end|>]"],
}


def test_pissa_and_loftq_start_closer_to_the_16bit_base_than_nf4_alone():
    quant = QuantizationConfig(**FP32)
    base16 = load_model(MODEL, QuantizationConfig(bits=16, compute_dtype="fp32"), for_training=False).model
    errors = {}
    for init in ("default", "pissa", "loftq"):
        loaded = load_model(MODEL, quant)
        cfg = LoraConfig(r=64, alpha=16, init=init, pissa_niter=4 if init == "pissa" else None)
        loaded.model = add_lora(loaded.model, cfg, kind=loaded.kind)
        if cfg.changes_base:
            start_from_16bit(loaded, MODEL, cfg, None)
        errors[init] = weight_error(loaded.model, base16)
    print("relative weight error from the 16-bit base, r=64: " + ", ".join(f"{k} {v:.4f}" for k, v in errors.items()))
    assert errors["pissa"] < 0.9 * errors["default"] and errors["loftq"] < 0.9 * errors["default"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo recipe, 2 steps of 4 at a higher rate, once per option (fp32, so merges check at 1e-3)."""
    root = tmp_path_factory.mktemp("lora-family-real")
    out = {}
    for name, overrides in OPTIONS.items():
        out[name] = root / name
        run_cli_in_process(
            "train", "--config", str(REPO / "configs/demo.yaml"), f"output_dir={out[name]}",
            "quantization.compute_dtype=fp32", "training.max_steps=2", "training.batch_size=4",
            "training.learning_rate=1e-3", "data.eval_size=16", "training.eval_batch_size=16",
            "eval.exact_match_samples=0", "eval.knowledge_probes=[]", *overrides,
        )  # fmt: skip
    return out


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_lowers_the_held_out_loss_on_the_real_model(runs, name):
    metrics = json.loads((runs[name] / "metrics.json").read_text())
    print(f"{name}: held-out loss {metrics['eval_loss_before']:.3f} -> {metrics['eval_loss_after']:.3f}")
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.1


@pytest.mark.parametrize("name", ["dora", "pissa", "tokens"])
def test_dora_pissa_and_token_rows_merge_exactly_on_the_real_model(runs, name, cli, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    code, _, err = cli("merge-adapter", "--adapter", str(runs[name]), "--output", str(out))
    assert code == 0, err
    report = json.loads((out / MERGE_REPORT_FILE).read_text())
    difference, effect = report["max_abs_logit_diff"], report["adapter_effect"]
    print(f"{name}: merged vs trained {difference:.2e}, adapter effect {effect:.2f}")
    assert report["dtype"] == "fp32" and report["max_abs_logit_diff"] <= 1e-3 and report["adapter_effect"] > 0.1
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.config.tie_word_embeddings  # trained token rows went into the one tied matrix
    assert merged.get_input_embeddings().weight.data_ptr() == merged.get_output_embeddings().weight.data_ptr()
