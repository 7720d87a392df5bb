"""`qlora train` with `compute_dtype: fp32` and with `auto` on the same recipe, steps and data, side by side.

    python scripts/bench_compute_dtype.py \
        --model ../shared/data/models/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data ../shared/data/alpaca/antelofski_alpaca_small_2000.json

On a CPU with bf16 matrix units `auto` is bf16 and this shows what it gains and whether training stays
equivalent (the loss at every logged step); elsewhere `auto` is fp32 and both rows are the same setting.
Each run is the real command in its own process, without the recipe's held-out split (training time is what is
compared; metrics.json's training_s leaves evaluation out anyway). Markdown on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import markdown_table
from qlora_cli.kernels import bf16_matrix_units
from qlora_cli.run_folder import LOG_HISTORY_FILE, METRICS_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="alpaca-7b", help="bundled recipe name or file")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="the recipe's dataset format, as a local file")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("overrides", nargs="*", help="more recipe overrides for both runs")
    args = parser.parse_args()

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("fp32", "auto"):
            out = Path(tmp) / dtype
            overrides = [
                f"output_dir={out}", f"model.name_or_path={args.model}", f"data.path={args.data}",
                f"quantization.compute_dtype={dtype}", f"training.batch_size={args.batch_size}",
                "training.gradient_accumulation_steps=1", f"training.max_steps={args.steps}",
                "training.logging_steps=1", "training.save_steps=100000", "eval.mmlu=null",
                "eval.exact_match_samples=0", "data.eval_size=0", *args.overrides,
            ]  # fmt: skip
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "qlora_cli", "train", "--config", args.config, *overrides],
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode != 0:
                sys.exit(f"{dtype}: qlora train failed:\n{done.stderr[-3000:]}")
            metrics = json.loads((out / METRICS_FILE).read_text())
            history = json.loads((out / LOG_HISTORY_FILE).read_text())
            losses = {e["step"]: e["loss"] for e in history if "loss" in e}
            runs[dtype] = (metrics, losses, time.perf_counter() - started)
            print(f"{dtype}: {metrics['compute_dtype']}, {metrics['training_s']} s training", file=sys.stderr, flush=True)

    print(f"\n## `qlora train --config {args.config}`, {args.steps} steps of batch {args.batch_size}, fp32 vs auto "
          f"(this CPU's bf16 matrix units: {bf16_matrix_units() or 'none'})\n")  # fmt: skip
    rows = []
    for name, (m, losses, wall) in runs.items():
        rows.append([
            f"compute_dtype: {name}", f"{m['compute_dtype']} ({m['compute_dtype_reason']})", f"{m['training_s']:.1f} s",
            f"{m['tokens_per_s']:.1f}", f"{wall:.0f} s", f"{m['train_loss']:.4f}",
        ])  # fmt: skip
    print(markdown_table(["setting", "computed in", "training time", "tokens/s", "whole command", "train loss"], rows))
    fp32, auto = runs["fp32"][1], runs["auto"][1]
    steps = sorted(fp32)
    print("\nLoss at each logged step:\n")
    print(markdown_table(
        ["step", "fp32", "auto", "difference"],
        [[s, f"{fp32[s]:.4f}", f"{auto[s]:.4f}", f"{auto[s] - fp32[s]:+.4f}"] for s in steps if s in auto],
    ))  # fmt: skip


if __name__ == "__main__":
    main()
