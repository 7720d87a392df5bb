"""Training side by side on one model and batch: tokens/s, peak memory, storage and utilisation.

    python scripts/bench_train.py                       # CPU: random-init 60M LLaMA, batch 4 x 256
    python scripts/bench_train.py --size llama-7b --batch-size 1 --seq-len 512   # a GPU
    python scripts/bench_train.py --batch-size 4 --steps 16 \
        --model ../shared/data/models/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.Q4_1.gguf
    python scripts/bench_train.py --profile             # also: where each setup's time goes
    python scripts/bench_train.py --model builtin:smollm2-135m-instruct --loss-paths --steps 3   # issue 31
    python scripts/bench_train.py --model builtin:smollm2-135m-instruct --packing --batch-size 1 --steps 4
    python scripts/bench_train.py --model builtin:smollm2-135m-instruct --recipe smollm2-135m-guanaco \
        --setups qlora,dora,rslora,pissa,olora,loftq,tokens --set data.eval_size=32   # issue 32

Random-init mode (no --model): QLoRA (NF4 + DQ), QLoRA with FP4, 16-bit LoRA and full finetuning on a
random-init LLaMA shape, on random token rows (lengths between half and all of --seq-len).

Real-model mode (--model: a folder, hub id or .gguf file): the recipe (--recipe, default the paper's
alpaca-7b) as `qlora train` resolves it on this machine, with --model, --data (default the shared Alpaca
2000) and --batch-size, no gradient accumulation, no evaluation, for --steps steps. Setups:
- `default`: the recipe as it is (compute dtype and checkpointing as `auto` decides them here)
- `qlora`: NF4 + DQ set explicitly, the rest as the recipe
- `qlora-paper`: `qlora train` with the plain script's settings (fp32 on the CPU, checkpointing on)
- `lora16`: a 16-bit base, the rest as the recipe
- `plain`: scripts/plain_qlora.py, the paper's qlora.py as a user writes it with transformers + peft +
  bitsandbytes, on the same model (for a .gguf file, the folder it is dequantized to), data, lengths, LoRA
  and batch size.
- `dora`, `rslora`, `pissa`, `olora`, `loftq`, `tokens` (two new special tokens whose rows train): the LoRA
  family, each the recipe with one `lora.*` option set, in a table beside `qlora` with the time to load and
  start (PiSSA/OLoRA/LoftQ take their start from a 16-bit copy) and, with `--set data.eval_size=N`, the
  held-out loss after the same steps.
Each draws its batches with its own length-grouped sampler: the `qlora train` setups the same batches,
the plain script others from the same data (grouped on characters, as qlora.py does); the padding column
shows how full they were.

Loss paths (--loss-paths, real-model mode): the recipe with `training.loss` plain, then chunked, each training
rows of exactly --row-lengths random tokens (loss on every token), batch 1, gradient checkpointing on (a long row
needs it; `--set training.gradient_checkpointing=false` to compare without), in a fresh process per row length
and path. Beside each: the head and loss of one such row alone (fp32, as QLoRA keeps the head), forward and
backward: torch's allocated peak and its time, and what `qlora plan` counts for it.

Packing (--packing, real-model mode): the alpaca-7b and guanaco-7b recipes (the --data file in the Guanaco text
layout for the second) at their own lengths and --batch-size, unpacked and then packed into rows of up to
--packed-len tokens: real (non-pad) tokens/s, per CPU-second, and the step's peak.

Every setup trains in a fresh process after a one-step warm-up run. The first timed step warms up and
is left out; tokens/s is the median over the rest of (tokens the step trained on) / (its seconds).

Utilisation = model FLOPs per second / the matmul rate measured here. Model FLOPs of a step are counted
by benchlib.training_flops from the rows it trained on (padding not counted): forward 2 N + 2 h V +
LoRA 2 r (in + out) per token plus attention 4 heads head_dim per causal query-key pair; with gradient
checkpointing the decoder layers' forward again; backward through the frozen base as much as the forward
(activation gradients, no weight gradients), attention twice its forward, LoRA twice its forward. The
matmul rate: a linear layer's training matmuls (y = x Wᵀ and the input gradient dy W) at (tokens of a
median batch) x hidden x intermediate, in each setup's compute dtype, median of repeats, measured after
the setups, in this process. Markdown on stdout; --json writes everything.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchlib import (
    BUCKETS,
    LORA_FAMILY,
    SETUPS,
    SIZES,
    RunShape,
    isolated,
    markdown_table,
    matmul_rate,
    measure_plain,
    measure_setup,
    measure_training,
    random_checkpoint,
    write_json,
)
from qlora_cli.config import Recipe, deep_merge, load_recipe, validate_recipe
from qlora_cli.model import DTYPES
from qlora_cli.plan import GIB, Activations, Architecture, Setup

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_DATA = SHARED / "alpaca" / "antelofski_alpaca_small_2000.json"
REAL_TOKENIZER = SHARED / "tokenizers" / "llama2_hf"
REAL_SETUPS = ("default", "qlora", "qlora-paper", "lora16", "plain")
# `qlora train` with the plain script's settings: what is left of the gap is the code, not the settings
PAPER_SETTINGS = {
    "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True,
                     "compute_dtype": "bf16" if torch.cuda.is_available() else "fp32"},
    "training": {"gradient_checkpointing": True},
}  # fmt: skip
LOSS_PATHS = ("plain", "chunked")
MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="real-model mode: a folder, hub id or .gguf file")
    parser.add_argument("--recipe", default="alpaca-7b", help="real-model mode: a recipe file or bundled name")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="real-model mode: a recipe override for every setup (repeatable)")  # fmt: skip
    parser.add_argument("--size", default="60m", help=f"random-init mode: one of {', '.join(SIZES)}")
    parser.add_argument("--setups", help=f"comma-separated; default {','.join(SETUPS)}, with --model "
                        f"{','.join(REAL_SETUPS)}")  # fmt: skip
    RunShape.add_arguments(
        parser, batch_size=4, seq_len=256, steps=6, steps_help="the first warms up; tokens/s: median of the rest"
    )
    parser.add_argument("--profile", action="store_true", help="profile each setup with torch.profiler")
    parser.add_argument("--data", default=str(REAL_DATA) if REAL_DATA.exists() else "builtin:demo-instructions",
                        help="alpaca-format file: the training data with --model, and the padding measurement")  # fmt: skip
    parser.add_argument("--tokenizer", help="for the padding measurement; default the model's, else Llama-2's")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--loss-paths", action="store_true",
                        help="real-model mode: plain vs chunked loss on single rows of --row-lengths tokens")  # fmt: skip
    parser.add_argument("--row-lengths", default="512,2048,4096", help="with --loss-paths: tokens per row")
    parser.add_argument("--packing", action="store_true",
                        help="real-model mode: unpacked vs packed, at the alpaca and oasst1 recipes' batch shapes")  # fmt: skip
    parser.add_argument("--packed-len", type=int, default=2048, help="with --packing: data.max_packed_len")
    args = parser.parse_args()
    if args.packing:
        if not args.model:
            parser.error("--packing trains a real model: pass --model (e.g. builtin:smollm2-135m-instruct)")
        compare_packing(args)
        return
    if args.loss_paths:
        if not args.model:
            parser.error("--loss-paths trains a real model: pass --model (e.g. builtin:smollm2-135m-instruct)")
        compare_loss_paths(args, [int(n) for n in args.row_lengths.split(",")])
        return
    if args.model and (args.lora_r != 64 or args.no_gradient_checkpointing or args.seq_len != 256):
        parser.error("with --model the recipe sets LoRA, checkpointing and lengths: use --set lora.r=16 etc.")
    setups = (args.setups or ",".join(REAL_SETUPS if args.model else SETUPS)).split(",")
    known = [*REAL_SETUPS, *(s for s in SETUPS if s not in REAL_SETUPS)] if args.model else list(SETUPS)
    known += list(LORA_FAMILY) if args.model else []
    if unknown := [s for s in setups if s not in known]:
        mode = "" if args.model else " without --model"
        parser.error(f"unknown setup {unknown[0]!r}{mode}; setups: {', '.join(known)}")
    shape = RunShape.from_args(args)

    if args.model:
        results = {setup: measure_real(args, setup) for setup in setups}
        about = (f"{args.model}, recipe {args.recipe}{''.join(f' {s}' for s in args.set)}, batch {args.batch_size}, "
                 f"{args.steps} steps on {args.data}")  # fmt: skip
    else:
        arch = SIZES[args.size]
        checkpoint = random_checkpoint(arch)
        rng = random.Random(0)
        lengths = [rng.randint(args.seq_len // 2, args.seq_len) for _ in range(args.steps * args.batch_size)]
        results = {}
        for setup in setups:
            results[setup] = measure_setup(checkpoint, setup, shape, lengths, args.profile, for_memory=False)[1]
            _progress(setup, results[setup])
        gc = "off" if args.no_gradient_checkpointing else "on"
        about = (f"{args.size}: {arch.params / 1e6:.0f}M parameters, batch {args.batch_size} x up to "
                 f"{args.seq_len} tokens, LoRA r={args.lora_r}, checkpointing {gc}")  # fmt: skip

    rates = matmul_rates(results)
    for r in results.values():
        rate = rates.get(r.get("compute_dtype"), {}).get("flops_per_s")
        r["utilisation"] = r["flops_per_s"] / rate if rate and r.get("flops_per_s") else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\n## Training side by side ({device}, {about})\n")
    print(speed_memory_table(results))
    if any(setup in LORA_FAMILY for setup in results):
        print(f"\n## The LoRA family against plain LoRA ({device}, {about})\n")
        print(lora_family_table(results))
    if args.model:
        print(f"\n## Utilisation and the plain transformers + peft + bitsandbytes script ({device}, {about})\n")
        print(utilisation_table(results))
        print(targets(results, device))
    first = next(iter(results.values()))
    print(f"\npeak memory: {first.get('memory_kind', '?')}, counted from before loading (on the CPU including heap "
          f"glibc keeps after frees; bench_memory.py measures memory); {first.get('threads')} threads; "
          "tokens/s and tokens per CPU-second: medians over the timed steps")  # fmt: skip
    for dtype, rate in rates.items():
        m, k, n = rate["shape"]
        print(f"matmul rate ({dtype}): {rate['flops_per_s'] / 1e9:.1f} GFLOP/s, x ({m} x {k}) by W ({n} x {k}), "
              "y = x Wᵀ then dy W")  # fmt: skip
    for setup, r in results.items():
        if "profile_buckets" in r:
            print_profile(setup, r)

    llama2 = str(REAL_TOKENIZER) if REAL_TOKENIZER.exists() else "builtin:tiny-llama"
    tokenizer = args.tokenizer or args.model or llama2
    padding = padding_efficiency(args.data, tokenizer)
    print(f"\n## Padding efficiency on real instruction lengths ({padding['examples']} examples of {args.data}, "
          f"tokenizer {tokenizer})\n")  # fmt: skip
    print(markdown_table(
        ["batch size", "random batches", "group_by_length"],
        [[b, f"{v['random']:.3f}", f"{v['group_by_length']:.3f}"] for b, v in padding["by_batch_size"].items()],
    ))  # fmt: skip
    write_json(args.json, {"device": device, "args": vars(args) | {"json": str(args.json)}, "results": results,
                           "matmul_rates": rates, "padding": padding})  # fmt: skip


def measure_real(args: argparse.Namespace, setup: str) -> dict[str, Any]:
    """One setup of the real-model mode, trained in a fresh process with a throwaway output_dir."""
    with tempfile.TemporaryDirectory() as out:
        recipe = real_recipe(args, setup, Path(out))
        if setup == "plain":
            result = isolated(measure_plain, plain_arguments(recipe), args.profile)
        else:
            result = isolated(measure_training, recipe, None, args.profile)
    _progress(setup, result)
    return result


def real_recipe(args: argparse.Namespace, setup: str, output_dir: Path) -> Recipe:
    """The recipe as `qlora train --config RECIPE` resolves it here, with the benchmark's model, data and batch."""
    overrides = [
        f"output_dir={output_dir}",
        f"model.name_or_path={args.model}",
        f"data.path={args.data}",
        "data.eval_size=0",
        f"training.batch_size={args.batch_size}",
        "training.gradient_accumulation_steps=1",
        f"training.max_steps={args.steps}",
        f"training.logging_steps={args.steps}",
        f"training.save_steps={args.steps}",
        "eval.mmlu=null",
        *args.set,
    ]
    recipe = load_recipe(args.recipe, overrides)
    if setup in ("default", "plain"):
        return recipe
    update = PAPER_SETTINGS if setup == "qlora-paper" else {**SETUPS, **LORA_FAMILY}[setup]
    return validate_recipe(deep_merge(recipe.model_dump(mode="json"), update), source=f"setup {setup}")


def compare_loss_paths(args: argparse.Namespace, lengths: list[int]) -> None:
    """Issue 31: tokens/s and peak memory of the plain and the chunked loss at each row length, and the loss alone."""
    from qlora_cli.plan import plan_memory, recipe_architecture

    results: dict[tuple[int, str], dict[str, Any]] = {}
    for length in lengths:
        for path in LOSS_PATHS:
            one_row = argparse.Namespace(**{**vars(args), "batch_size": 1, "set": [
                "training.gradient_checkpointing=true", *args.set, f"training.loss={path}",
                f"data.source_max_len={length - length // 4}", f"data.target_max_len={length // 4}"]})  # fmt: skip
            with tempfile.TemporaryDirectory() as out:
                recipe = real_recipe(one_row, "default", Path(out))
                result = isolated(measure_training, recipe, [length] * args.steps, args.profile)
                if "error" not in result:
                    result |= isolated(allocated_step, recipe, length)
            if "error" not in result:
                result |= loss_alone(recipe, path, length, result["vocab"], result["hidden"])
                plan = plan_memory(recipe, recipe_architecture(recipe.model), device=_device())
                result["planned"] = plan.estimates[0].allocated()
            results[length, path] = result
            _progress(f"{path} loss, {length} tokens", result)
    print(f"\n## The loss over the vocabulary: plain vs chunked ({_device()}, {args.model}, recipe {args.recipe}"
          f"{''.join(f' {s}' for s in args.set)}, batch 1, {args.steps} steps of random tokens per row)\n")  # fmt: skip
    print(loss_paths_table(results))
    print(loss_paths_targets(results, max(lengths)))
    first = next(iter(results.values()))
    print(f"\nallocated peak: what torch's allocator held at most in a step (one more run of a step under "
          "torch.profiler(profile_memory=True) on the CPU, max_memory_allocated on a GPU), counted from before "
          f"loading (weights included); planned: `qlora plan`'s allocated figure for it; peak RSS: "
          f"{first.get('memory_kind', '?')} of the timed run (on the CPU it keeps heap glibc holds after frees); "
          "loss alone: torch's allocated peak of one row's head + loss, forward and backward, median time of 3, "
          "and what `qlora plan` counts for it. tokens / CPU-s holds up on a shared machine")  # fmt: skip
    for (length, path), r in results.items():
        if "profile_buckets" in r:
            print_profile(f"{path} at {length} tokens", r)
    write_json(args.json, {"device": _device(), "args": vars(args) | {"json": str(args.json)},
                           "results": {f"{path}@{length}": r for (length, path), r in results.items()}})  # fmt: skip


def allocated_step(recipe: Recipe, length: int) -> dict[str, int]:
    """One step of the recipe on one row, the most torch's allocator holds (the CPU has no allocator statistics:
    profiler memory events there, with glibc handing freed memory back), from before the warm-up run."""
    from qlora_cli.memory import MemoryMeter

    one_step = recipe.training.model_copy(update={"max_steps": 1, "logging_steps": 1, "save_steps": 1})
    with MemoryMeter(_device()).allocated_peak() as held:
        measure_training(recipe.model_copy(update={"training": one_step}), [length], for_memory=True)
    return {"allocated_peak": held.peak}


def compare_packing(args: argparse.Namespace) -> None:
    """Issue 31: real (non-pad) tokens/s and peak memory, unpacked and packed, each recipe at its own lengths and
    --batch-size (the paper's is 1: one example, or one packed row, a micro-batch), no accumulation."""
    with tempfile.TemporaryDirectory() as folder:
        cases = {"alpaca-7b": args.data, "guanaco-7b": str(guanaco_text(Path(args.data), Path(folder)))}
        results: dict[tuple[str, bool], dict[str, Any]] = {}
        for recipe_name, data in cases.items():
            for packed in (False, True):
                packing = [f"data.packing={str(packed).lower()}", f"data.max_packed_len={args.packed_len}"]
                run = argparse.Namespace(**{**vars(args), "recipe": recipe_name, "data": data,
                                            "set": [*args.set, *packing]})  # fmt: skip
                with tempfile.TemporaryDirectory() as out:
                    result = isolated(measure_training, real_recipe(run, "default", Path(out)), None, args.profile)
                results[recipe_name, packed] = result
                _progress(f"{recipe_name}, {'packed' if packed else 'unpacked'}", result)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\n## Packing ({device}, {args.model}, batch {args.batch_size}, rows of up to {args.packed_len} tokens, "
          f"{args.steps} steps{''.join(f' {s}' for s in args.set)})\n")  # fmt: skip
    print(packing_table(results))
    for (name, packed), r in results.items():
        if "profile_buckets" in r:
            print_profile(f"{name} {'packed' if packed else 'unpacked'}", r)
    write_json(args.json, {"device": device, "args": vars(args) | {"json": str(args.json)},
                           "results": {f"{name} {'packed' if packed else 'unpacked'}": r
                                       for (name, packed), r in results.items()}})  # fmt: skip


def guanaco_text(alpaca: Path, folder: Path) -> Path:
    """The Alpaca file in the oasst1 recipe's Guanaco layout (`### Human: … ### Assistant: …` text records):
    oasst1's own training data is not here, its format and lengths are what the recipe trains."""
    import json

    from qlora_cli.builtin import resolve_builtin_data

    records = json.loads(resolve_builtin_data(str(alpaca)).read_text())
    texts = [
        {"text": f"### Human: {' '.join(filter(None, [r['instruction'], r.get('input', '')]))} "
                 f"### Assistant: {r['output']}"}
        for r in records
    ]  # fmt: skip
    path = folder / "guanaco.jsonl"
    path.write_text("\n".join(json.dumps(t) for t in texts))
    return path


def packing_table(results: dict[tuple[str, bool], dict[str, Any]]) -> str:
    rows = []
    for (name, packed), r in results.items():
        if "error" in r:
            rows.append([name, "packed" if packed else "unpacked", r["error"], *[""] * 7])
            continue
        ref = results.get((name, False), {})
        rows.append([
            name, "packed" if packed else "unpacked", r["compute_dtype"],
            f"{statistics.median(r['step_tokens']):.0f}", _percent(r["padding_efficiency"]),
            f"{r['tokens_per_s']:.1f}", _ratio(r["tokens_per_s"], ref.get("tokens_per_s")),
            f"{r['tokens_per_cpu_s']:.1f}", f"{r['peak'] / GIB:.3f}", _ratio(r["peak"], ref.get("peak")),
        ])  # fmt: skip
    speedups = [r["tokens_per_s"] / results[name, False]["tokens_per_s"] for (name, packed), r in results.items()
                if packed and r.get("tokens_per_s") and results[name, False].get("tokens_per_s")]  # fmt: skip
    target = (f"\nTarget: packed at least 1.5x the unpacked real tokens/s: "
              f"{', '.join(f'{x:.2f}x' for x in speedups)}, {'met' if speedups and min(speedups) >= 1.5 else 'NOT met'}")
    return markdown_table(
        ["recipe", "rows", "compute", "real tokens a step", "real / padded", "real tokens/s", "vs unpacked",
         "tokens / CPU-s", "step peak GiB", "vs unpacked"], rows) + target  # fmt: skip


def loss_alone(recipe: Recipe, path: str, tokens: int, vocab: int, hidden: int) -> dict[str, Any]:
    """One row's head + loss, forward and backward, by itself: its allocated peak, median time of 3, and the plan's
    count. fp32 hidden states and head, as QLoRA trains them (prepare_model_for_kbit_training upcasts the head)."""
    import statistics
    import time

    from transformers.loss.loss_utils import ForCausalLMLoss

    from qlora_cli.loss import linear_cross_entropy
    from qlora_cli.memory import MemoryMeter
    from qlora_cli.plan import lora_modules

    device = _device()
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(1, tokens, hidden, generator=generator).to(device).requires_grad_()
    head = (0.02 * torch.randn(vocab, hidden, generator=generator)).to(device)
    labels = torch.randint(0, vocab, (1, tokens), generator=generator).to(device)

    def step() -> float:
        started = time.perf_counter()
        if path == "plain":
            loss = ForCausalLMLoss(torch.nn.functional.linear(states, head), labels, vocab)
        else:
            loss = linear_cross_entropy(states, head, labels)
        loss.backward()
        states.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    with MemoryMeter(device).allocated_peak() as held:
        step()
    seconds = statistics.median(step() for _ in range(3))
    arch = Architecture("head", hidden, layers=1, intermediate=hidden, heads=1, kv_heads=1, vocab=vocab)  # the head's
    setup = Setup(path, recipe.quantization, lora=True)
    planned = Activations(arch, setup, recipe, lora_modules(recipe), c=4, residual=4, saved=4, adapter_saved=4,
                          tokens=tokens, loss=path)  # an fp32 head and fp32 states, as above
    return {"loss_peak": held.peak, "loss_seconds": seconds, "loss_planned": planned.loss_held()}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def loss_paths_table(results: dict[tuple[int, str], dict[str, Any]]) -> str:
    rows = []
    for (length, path), r in results.items():
        if "error" in r:
            rows.append([length, path, r["error"], *[""] * 11])
            continue
        ref = results.get((length, "plain"), {})
        rows.append([
            length, path, r["compute_dtype"], f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_cpu_s']:.1f}",
            _ratio(r["tokens_per_cpu_s"], ref.get("tokens_per_cpu_s")),
            f"{r['allocated_peak'] / GIB:.3f}", _ratio(r["allocated_peak"], ref.get("allocated_peak")),
            f"{r['planned'] / GIB:.3f}", f"{r['peak'] / GIB:.3f}",
            f"{r['loss_peak'] / MIB:.0f}", _ratio(r["loss_peak"], ref.get("loss_peak")),
            f"{r['loss_planned'] / MIB:.0f}", f"{r['loss_seconds']:.3f}",
        ])  # fmt: skip
    return markdown_table(
        ["row tokens", "loss", "compute", "tokens/s", "tokens / CPU-s", "vs plain", "allocated peak GiB", "vs plain",
         "planned GiB", "peak RSS GiB", "loss alone: peak MiB", "vs plain", "planned MiB", "loss alone: s"],
        rows)  # fmt: skip


def loss_paths_targets(results: dict[tuple[int, str], dict[str, Any]], length: int) -> str:
    """Issue 31's targets at the longest row: chunked peak at most half the plain one, tokens/s within 10% (per
    CPU-second too, which a shared machine disturbs less)."""
    plain, chunked = results.get((length, "plain"), {}), results.get((length, "chunked"), {})
    if not plain.get("allocated_peak") or not chunked.get("allocated_peak"):
        return ""
    peak = chunked["allocated_peak"] / plain["allocated_peak"]
    speed = chunked["tokens_per_s"] / plain["tokens_per_s"]
    per_cpu = chunked["tokens_per_cpu_s"] / plain["tokens_per_cpu_s"]
    alone = chunked["loss_peak"] / plain["loss_peak"]
    return (f"\nTargets at {length} tokens: chunked allocated peak at most 0.5x the plain one: {peak:.2f}x, "
            f"{'met' if peak <= 0.5 else 'NOT met'} (the loss alone: {alone:.2f}x); tokens/s within 10% of plain: "
            f"{speed:.2f}x (per CPU-second {per_cpu:.2f}x), {'met' if min(speed, per_cpu) >= 0.9 else 'NOT met'}")


def plain_arguments(recipe: Recipe) -> list[str]:
    """scripts/plain_qlora.py's command line for the recipe's model, data, lengths, LoRA and batch."""
    from qlora_cli.builtin import resolve_builtin_data
    from qlora_cli.model import model_source

    d, t, lora = recipe.data, recipe.training, recipe.lora
    data = str(resolve_builtin_data(d.path or ""))
    return [
        *("--model", model_source(recipe.model), "--data", data, "--output-dir", recipe.output_dir),
        *("--batch-size", str(t.batch_size), "--gradient-accumulation-steps", str(t.gradient_accumulation_steps)),
        *("--max-steps", str(t.max_steps)),
        *(("--max-train-samples", str(d.max_train_samples)) if d.max_train_samples else ()),
        *("--source-max-len", str(d.source_max_len), "--target-max-len", str(d.target_max_len)),
        *("--lora-r", str(lora.r), "--lora-alpha", str(lora.alpha), "--lora-dropout", str(lora.dropout)),
        *("--learning-rate", str(t.learning_rate), "--seed", str(t.seed)),
        *("--logging-steps", str(t.logging_steps), "--save-steps", str(t.save_steps)),
    ]


def matmul_rates(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The matmul rate of each compute dtype a setup ran in, at the first setup's median batch."""
    measured = [r for r in results.values() if r.get("batch_tokens")]
    if not measured:
        return {}
    shape = (int(measured[0]["batch_tokens"]), measured[0]["hidden"], measured[0]["intermediate"])
    dtypes = sorted({r["compute_dtype"] for r in measured})
    return {name: {"shape": shape, "flops_per_s": matmul_rate(DTYPES[name], *shape)} for name in dtypes}


def speed_memory_table(results: dict[str, dict[str, Any]]) -> str:
    ref = results.get("lora16", {})
    rows = []
    for setup, r in results.items():
        if "error" in r:
            rows.append([setup, r["error"], *[""] * 10])
            continue
        rows.append([
            setup, r["compute_dtype"], f"{r['tokens_per_s']:.1f}", _ratio(r["tokens_per_s"], ref.get("tokens_per_s")),
            f"{r['tokens_per_cpu_s']:.1f}", _ratio(r["tokens_per_cpu_s"], ref.get("tokens_per_cpu_s")),
            f"{r['peak'] / GIB:.3f}", _ratio(r["peak"], ref.get("peak")),
            f"{r['bits_per_linear_param']:.3f}", f"{r['bits_per_base_param']:.2f}",
            _gflops(r["flops_per_s"]), _percent(r["utilisation"]),
        ])  # fmt: skip
    return markdown_table(
        ["setup", "compute", "non-pad tokens/s", "vs 16-bit LoRA", "tokens / CPU-s", "vs 16-bit LoRA", "peak GiB",
         "vs 16-bit LoRA", "bits / linear param", "bits / base param", "model GFLOP/s", "utilisation"], rows)  # fmt: skip


def lora_family_table(results: dict[str, dict[str, Any]]) -> str:
    """Each option of the LoRA family beside `qlora` (plain LoRA on the same base): speed, memory, the time to load
    (PiSSA/OLoRA/LoftQ start from a 16-bit copy there) and the held-out loss after the same steps."""
    ref = results.get("qlora", {})
    rows = []
    for setup, r in results.items():
        if (setup != "qlora" and setup not in LORA_FAMILY) or "error" in r:
            continue
        held_out = "" if r.get("eval_loss") is None else f"{r['eval_loss']:.3f}"
        rows.append([
            setup, f"{r['tokens_per_s']:.1f}", _ratio(r["tokens_per_s"], ref.get("tokens_per_s")),
            f"{r['peak'] / GIB:.3f}", _ratio(r["peak"], ref.get("peak")), f"{r['load_seconds']:.1f}", held_out,
        ])  # fmt: skip
    return markdown_table(["setup", "non-pad tokens/s", "vs qlora", "peak GiB", "vs qlora", "load + start s",
                           "held-out loss after"], rows)  # fmt: skip


def utilisation_table(results: dict[str, dict[str, Any]]) -> str:
    ref = results.get("plain", {})
    rows = []
    for setup, r in results.items():
        if "error" in r:
            rows.append([setup, r["error"], *[""] * 9])
            continue
        rows.append([
            setup, r["compute_dtype"], "on" if r["checkpointing"] else "off", f"{r['tokens_per_s']:.1f}",
            _ratio(r["tokens_per_s"], ref.get("tokens_per_s")), _gflops(r["flops_per_s"]), _percent(r["utilisation"]),
            f"{r['padding_efficiency']:.3f}", f"{r['peak'] / GIB:.3f}", f"{r['train_loss']:.4f}",
        ])  # fmt: skip
    return markdown_table(
        ["setup", "compute", "checkpointing", "non-pad tokens/s", "vs plain", "model GFLOP/s", "utilisation",
         "padding efficiency", "peak GiB", "train loss"], rows)  # fmt: skip


def targets(results: dict[str, dict[str, Any]], device: str) -> str:
    """Issue 19's targets for this kind of CPU: default vs plain tokens/s, and the default's utilisation."""
    from qlora_cli.kernels import bf16_matrix_units, onednn_isa_cap

    default, plain = results.get("default", {}), results.get("plain", {})
    if device != "cpu" or not default.get("tokens_per_s") or not plain.get("tokens_per_s"):
        return ""
    units = bf16_matrix_units()
    cap = onednn_isa_cap()
    kind = units or (f"no bf16 units within {cap[0]}={cap[1]}" if cap else "AVX2, no bf16 units")
    wanted = 1.5 if units else 1.1
    speedup = default["tokens_per_s"] / plain["tokens_per_s"]
    utilisation = default.get("utilisation") or 0.0
    return (f"\nTargets on this CPU ({kind}): default at least {wanted}x the plain "
            f"script's tokens/s: {speedup:.2f}x, {'met' if speedup >= wanted else 'NOT met'}; utilisation of the "
            f"default at least 50%: {100 * utilisation:.0f}%, {'met' if utilisation >= 0.5 else 'NOT met'}")  # fmt: skip


def print_profile(setup: str, r: dict[str, Any]) -> None:
    total = sum(r["step_seconds"])
    print(f"\n### Where {setup}'s time goes ({len(r['step_seconds'])} profiled steps, {total:.1f} s; CPU self time "
          "of the operators in each bucket)\n")  # fmt: skip
    buckets = r["profile_buckets"]
    print(markdown_table(["bucket", "seconds / step", "share"],
                         [[b, f"{buckets[b] / len(r['step_seconds']):.3f}", _percent(buckets[b] / total)]
                          for b in BUCKETS]))  # fmt: skip
    print(f"\nTop operators of {setup} by self time:\n")
    print(markdown_table(["operator", "share"], [[name, _percent(share)] for name, share in r["profile"]]))


def _progress(setup: str, r: dict[str, Any]) -> None:
    print(f"{setup}: {r.get('tokens_per_s') or r.get('error')} tokens/s", flush=True)


def _ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if value and reference else "-"


def _gflops(value: float | None) -> str:
    return f"{value / 1e9:.1f}" if value else "-"


def _percent(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "-"


def padding_efficiency(data: str, tokenizer_name: str, batch_sizes: tuple[int, ...] = (4, 16)) -> dict:
    """Non-pad / all tokens when batches are drawn at random vs by the Trainer's LengthGroupedSampler."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from qlora_cli.config import DataConfig, ModelConfig
    from qlora_cli.data import prepare_data
    from qlora_cli.model import load_tokenizer
    from qlora_cli.model_kind import CausalLM

    tokenizer = load_tokenizer(ModelConfig(name_or_path=tokenizer_name))
    data_cfg = DataConfig(dataset="alpaca", path=data, eval_size=0)
    prepared = prepare_data(data_cfg, tokenizer, kind=CausalLM(), seed=0)
    lengths = prepared.train["length"]

    def efficiency(order: list[int], batch: int) -> float:
        batches = [order[i : i + batch] for i in range(0, len(order), batch)]
        return sum(lengths) / sum(max(lengths[j] for j in b) * len(b) for b in batches)

    out = {}
    for batch in batch_sizes:
        shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
        grouped = list(LengthGroupedSampler(batch, lengths=lengths, generator=torch.Generator().manual_seed(0)))
        out[batch] = {"random": efficiency(shuffled, batch), "group_by_length": efficiency(grouped, batch)}
    return {"examples": len(lengths), "by_batch_size": out}


if __name__ == "__main__":
    main()
