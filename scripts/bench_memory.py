"""Predicted (qlora plan) vs measured peak memory of real training steps, and peak memory while loading.

    python scripts/bench_memory.py                      # CPU: random-init LLaMAs of 60M-270M parameters
    python scripts/bench_memory.py --sizes 1b,llama-7b,llama-13b --batch-size 1 --seq-len 512   # a GPU
    python scripts/bench_memory.py --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf --setups qlora \
        --batch-size 4 --seq-len 512 --allocated                   # a real model (a .gguf file or a folder)

Every row trains a random-init LLaMA checkpoint (bf16, sharded, built once under $QLORA_CACHE), or the
--model given, for a few steps in a fresh process, through `qlora train`'s own loading and Trainer, and
compares the peak (`torch.cuda.max_memory_allocated` on a GPU, peak RSS on the CPU, counted from before
the model is loaded) with what the planner predicts for the same recipe. The CPU has no allocator
statistics: --allocated trains each row a second time under torch.profiler(profile_memory=True) and
takes the peak of the bytes torch's CPU allocator holds, the figure a GPU's max_memory_allocated gives
(RSS adds the interpreter's heap, glibc's retained memory and file pages of the mapped checkpoint).
Prints markdown tables; --json saves rows.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchlib import (
    METHODS,
    SETUPS,
    SIZES,
    RunShape,
    bench_recipe,
    isolated,
    markdown_table,
    measure_setup,
    measure_training,
    random_checkpoint,
    write_json,
)
from qlora_cli.config import ModelConfig, Recipe
from qlora_cli.memory import MemoryMeter
from qlora_cli.plan import GIB, plan_memory, recipe_architecture

TOLERANCE = 0.15  # the target: every row within 15% of the prediction
LOAD_FACTOR = 1.3  # loading may peak at 1.3x the quantized model plus one shard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="60m,135m,270m", help=f"comma-separated, from: {', '.join(SIZES)}")
    parser.add_argument("--model", help="a real model instead of --sizes: a .gguf file or a Hugging Face folder")
    parser.add_argument("--allocated", action="store_true", help="CPU: also measure torch's allocated peak")
    parser.add_argument("--setups", default="qlora,lora16,full", help=f"comma-separated, from: {', '.join(SETUPS)}")
    parser.add_argument("--methods", default="sft", help=f"comma-separated, from: {', '.join(METHODS)} (a row of "
                        "dpo/orpo is a pair: prompt of 3/4 of --seq-len, each reply the rest)")  # fmt: skip
    RunShape.add_arguments(parser, batch_size=2, seq_len=256, steps=3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    shape = RunShape.from_args(args)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    allocated = args.allocated and device == "cpu"
    models = [(Path(args.model).stem, Path(args.model))] if args.model else [
        (size, random_checkpoint(SIZES[size])) for size in args.sizes.split(",")]  # fmt: skip
    rows = []
    for name, checkpoint in models:
        arch = recipe_architecture(ModelConfig(name_or_path=str(checkpoint))) if args.model else SIZES[name]
        for setup, method in [(s, m) for s in args.setups.split(",") for m in args.methods.split(",")]:
            started = time.perf_counter()
            full_length = [shape.seq_len] * (shape.steps * shape.batch_size)
            recipe, measured = measure_setup(checkpoint, setup, shape, full_length, for_memory=True, method=method)
            predicted = plan_memory(recipe, arch, device=device).estimates[0].allocated()
            label = setup if method == "sft" else f"{setup} {method}"
            row = {"size": name, "params": arch.params, "vocab": arch.vocab, "setup": label, "predicted": predicted,
                   **measured}  # fmt: skip
            if allocated and "error" not in row:
                row["allocated_peak"] = allocated_peak(checkpoint, setup, shape, full_length, method)
            row["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            print(f"{name} {label}: {_summary(row)}", flush=True)

    gc = "off" if args.no_gradient_checkpointing else "on"
    dtypes = ", ".join(sorted({r["compute_dtype"] for r in rows if "compute_dtype" in r})) or "?"
    print(f"\n## Peak memory while training ({device}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"LoRA r={args.lora_r}, gradient checkpointing {gc}, paged_adamw_32bit, {dtypes} compute)\n")  # fmt: skip
    headers = ["model", "params", "vocab", "setup", "predicted GiB", "measured GiB", "measured / predicted"]
    if allocated:
        headers += ["torch allocated GiB", "torch allocated / predicted"]
    print(markdown_table(
        [*headers, "within 15%"],
        [[r["size"], f"{r['params'] / 1e6:.0f}M", r["vocab"], r["setup"], _gib(r["predicted"]), _gib(r.get("peak")),
          _ratio(r.get("peak"), r["predicted"]),
          *([_gib(r.get("allocated_peak")), _ratio(r.get("allocated_peak"), r["predicted"])] if allocated else []),
          _within(r.get("allocated_peak", r.get("peak")), r["predicted"])] for r in rows],
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
    if allocated:
        print("torch allocated: peak bytes held by torch's CPU allocator (torch.profiler memory events), counted from "
              "before the warm-up; within 15% compares it, not the RSS")  # fmt: skip
    write_json(args.json, {"device": device, "args": vars(args) | {"json": str(args.json)}, "rows": rows})


def allocated_peak(checkpoint: Path, setup: str, shape: RunShape, lengths: list[int], method: str) -> int | None:
    """The same training in another fresh process, under the profiler: the most torch's CPU allocator held."""
    with tempfile.TemporaryDirectory() as out:
        recipe = bench_recipe(checkpoint, setup, shape, Path(out), method=method)
        result = isolated(_profiled_training, recipe, lengths)
    return result.get("allocated_peak")


def _profiled_training(recipe: Recipe, lengths: list[int]) -> dict[str, int]:
    """Counted from before `measure_training`'s warm-up on builtin:tiny-llama, whose few leftover MB count too."""
    with MemoryMeter("cpu").allocated_peak() as held:
        measure_training(recipe, lengths, for_memory=True)
    return {"allocated_peak": held.peak}


def _summary(row: dict) -> str:
    if "error" in row:
        return row["error"]
    allocated = f", allocated {_gib(row['allocated_peak'])} GiB" if "allocated_peak" in row else ""
    return f"predicted {_gib(row['predicted'])} GiB, measured {_gib(row['peak'])} GiB{allocated} in {row['seconds']} s"


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
