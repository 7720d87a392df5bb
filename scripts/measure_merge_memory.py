"""Peak memory and accuracy of `qlora merge-adapter` on a mid-sized random LLaMA; prints a table.

Builds (once, in --work) a random LLaMA and a LoRA adapter on every linear layer with non-zero B, then runs
each merge in a fresh process. "peak" is the merge's reported peak (anonymous RSS on the CPU, CUDA peak
allocation on a GPU); "extra/model" is that peak minus what the process held before loading anything, in
units of the merged model: 1 means one copy. "peak RSS" also counts the memory-mapped checkpoint's pages.

    python scripts/measure_merge_memory.py                      # CPU
    python scripts/measure_merge_memory.py --device cuda        # unchanged on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(work: Path, hidden: int, layers: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_cli.builtin import resolve_builtin_model

    base, adapter = work / "base", work / "adapter"
    if (adapter / "adapter_config.json").exists():
        return adapter
    torch.manual_seed(0)
    tokenizer_dir = resolve_builtin_model("builtin:tiny-llama")
    config = LlamaConfig(
        vocab_size=498, hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).write_bytes((Path(tokenizer_dir) / name).read_bytes())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=64, lora_alpha=16, target_modules=targets)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base), lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)  # a trained adapter has non-zero B
    model.save_pretrained(adapter)
    return adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlora-merge-memory"))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    adapter = build(args.work, args.hidden, args.layers)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rows = []
    for base_weights, dtype in [("nf4-roundtrip", "fp32"), ("original", "fp32"), ("nf4-roundtrip", "bf16")]:
        out = args.work / f"merged-{base_weights}-{dtype}"
        command = [
            sys.executable, "-m", "qlora_cli", "merge-adapter", "--adapter", str(adapter), "--output", str(out),
            "--dtype", dtype, "--base-weights", base_weights, "--device", args.device, "--overwrite",
        ]  # fmt: skip
        subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        rows.append(json.loads((out / "merge_report.json").read_text()))
    gib = 2**30
    header = ["base weights", "dtype", "model GiB", "start GiB", "peak GiB", "extra/model", "peak RSS GiB",
              "max |dlogit|", "adapter effect", "seconds"]  # fmt: skip
    print(" | ".join(header))
    for r in rows:
        extra = (r["peak_memory_bytes"] - r["memory_at_start_bytes"]) / r["model_bytes"]
        cells = [
            r["base_weights"], r["dtype"], f"{r['model_bytes'] / gib:.3f}", f"{r['memory_at_start_bytes'] / gib:.3f}",
            f"{r['peak_memory_bytes'] / gib:.3f}", f"{extra:.2f}", f"{r['process_peak_rss_bytes'] / gib:.3f}",
            f"{r['max_abs_logit_diff']:.2e}", f"{r['adapter_effect']:.3f}", f"{r['seconds']:.1f}",
        ]  # fmt: skip
        print(" | ".join(cells))
    print(f"({rows[0]['peak_memory_kind']}; device {rows[0]['device']})")

if __name__ == "__main__":
    main()
