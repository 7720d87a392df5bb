"""Predicted (qlora plan) vs measured peak memory of real training steps, and peak memory while loading.

    python scripts/bench_memory.py                      # CPU: random-init LLaMAs of 60M-270M parameters
    python scripts/bench_memory.py --sizes 1b,llama-7b,llama-13b --batch-size 1 --seq-len 512   # a GPU

Every row trains a random-init LLaMA checkpoint (bf16, sharded, built once under $QLORA_CACHE) for a
few steps in a fresh process, through `qlora train`'s own loading and Trainer, and compares the peak
(`torch.cuda.max_memory_allocated` on a GPU, peak RSS on the CPU, counted from before the model is
loaded) with what the planner predicts for the same recipe. Prints markdown tables; --json saves rows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchlib import SETUPS, SIZES, RunShape, markdown_table, measure_setup, random_checkpoint, write_json
from qlora_cli.plan import GIB, plan_memory

TOLERANCE = 0.15  # the target: every row within 15% of the prediction
LOAD_FACTOR = 1.3  # loading may peak at 1.3x the quantized model plus one shard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="60m,135m,270m", help=f"comma-separated, from: {', '.join(SIZES)}")
    parser.add_argument("--setups", default="qlora,lora16,full", help=f"comma-separated, from: {', '.join(SETUPS)}")
    RunShape.add_arguments(parser, batch_size=2, seq_len=256, steps=3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    shape = RunShape.from_args(args)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for size in args.sizes.split(","):
        arch = SIZES[size]
        checkpoint = random_checkpoint(arch)
        for setup in args.setups.split(","):
            started = time.perf_counter()
            full_length = [shape.seq_len] * (shape.steps * shape.batch_size)
            recipe, measured = measure_setup(checkpoint, setup, shape, full_length)
            predicted = plan_memory(recipe, arch, device=device).estimates[0].allocated()
            row = {"size": size, "params": arch.params, "setup": setup, "predicted": predicted, **measured}
            row["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            print(f"{size} {setup}: {_summary(row)}", flush=True)

    gc = "off" if args.no_gradient_checkpointing else "on"
    print(f"\n## Peak memory while training ({device}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"LoRA r={args.lora_r}, gradient checkpointing {gc}, paged_adamw_32bit)\n")  # fmt: skip
    print(markdown_table(
        ["model", "params", "setup", "predicted GiB", "measured GiB", "measured / predicted", "within 15%"],
        [[r["size"], f"{r['params'] / 1e6:.0f}M", r["setup"], _gib(r["predicted"]), _gib(r.get("peak")),
          _ratio(r.get("peak"), r["predicted"]), _within(r.get("peak"), r["predicted"])] for r in rows],
    ))  # fmt: skip
    print("\n## Peak memory while loading (4-bit rows: allocated peak within 1.3 x model + largest shard)\n")
    print(markdown_table(
        ["model", "setup", "model in memory GiB", "largest shard GiB", "peak RSS GiB", "allocated peak GiB",
         "limit GiB", "ok"],
        [[r["size"], r["setup"], _gib(r.get("model_bytes")), _gib(r.get("largest_shard")), _gib(r.get("load_peak")),
          _gib(r.get("load_allocated_peak")), _gib(_load_limit(r)), _load_ok(r)] for r in rows],
    ))  # fmt: skip
    print("\nallocated peak: anonymous memory on the CPU (peak RSS adds the memory-mapped checkpoint's page cache), "
          "max_memory_allocated on a GPU")
    kind = rows[0].get("memory_kind", "?") if rows else "?"
    print(f"\nmeasured: {kind}, counted from before the model is loaded; predicted: `qlora plan` without overhead")
    write_json(args.json, {"device": device, "args": vars(args) | {"json": str(args.json)}, "rows": rows})


def _summary(row: dict) -> str:
    if "error" in row:
        return row["error"]
    return f"predicted {_gib(row['predicted'])} GiB, measured {_gib(row['peak'])} GiB in {row['seconds']} s"


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.3f}"


def _ratio(measured: int | None, predicted: int) -> str:
    return "-" if measured is None else f"{measured / predicted:.2f}"


def _within(measured: int | None, predicted: int) -> str:
    if measured is None:
        return "failed"
    return "yes" if abs(measured / predicted - 1) <= TOLERANCE else "NO"


def _load_limit(row: dict) -> int | None:
    if "model_bytes" not in row:
        return None
    return int(LOAD_FACTOR * row["model_bytes"] + row["largest_shard"])


def _load_ok(row: dict) -> str:
    limit = _load_limit(row)
    if limit is None:
        return "failed"
    ok = "yes" if row["load_allocated_peak"] <= limit else "NO"
    return ok if row["setup"].startswith("qlora") else f"({ok})"


if __name__ == "__main__":
    main()
