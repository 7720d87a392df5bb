"""QLoRA (NF4 + DQ), QLoRA with FP4, 16-bit LoRA and full finetuning side by side on one model and batch.

    python scripts/bench_train.py                       # CPU: random-init 60M LLaMA, batch 4 x 256
    python scripts/bench_train.py --size llama-7b --batch-size 1 --seq-len 512   # a GPU
    python scripts/bench_train.py --profile             # also: the operators each setup spends its time in

For each setup: non-padding tokens/s, peak memory and stored bits per base parameter, with ratios to
16-bit LoRA (all with gradient checkpointing unless told otherwise). Each setup trains in a fresh process
on the same batches (random lengths between half and all of --seq-len). Then the padding efficiency
(non-pad tokens / all tokens) of group_by_length vs random batches on real instruction lengths.
Markdown on stdout; --json writes everything.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from benchlib import SETUPS, SIZES, RunShape, markdown_table, measure_setup, random_checkpoint, write_json
from qlora_cli.plan import GIB

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_DATA = SHARED / "alpaca" / "antelofski_alpaca_small_2000.json"
REAL_TOKENIZER = SHARED / "tokenizers" / "llama2_hf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="60m", help=f"one of: {', '.join(SIZES)}")
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated")
    RunShape.add_arguments(
        parser, batch_size=4, seq_len=256, steps=6, steps_help="the first warms up; tokens/s: median of the rest"
    )
    parser.add_argument("--profile", action="store_true", help="profile each setup with torch.profiler")
    parser.add_argument("--data", default=str(REAL_DATA) if REAL_DATA.exists() else "builtin:demo-instructions",
                        help="alpaca-format file for the padding measurement")  # fmt: skip
    parser.add_argument("--tokenizer", default=str(REAL_TOKENIZER) if REAL_TOKENIZER.exists() else "builtin:tiny-llama")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shape = RunShape.from_args(args)

    arch = SIZES[args.size]
    checkpoint = random_checkpoint(arch)
    rng = random.Random(0)
    lengths = [rng.randint(args.seq_len // 2, args.seq_len) for _ in range(args.steps * args.batch_size)]
    results = {}
    for setup in args.setups.split(","):
        results[setup] = measure_setup(checkpoint, setup, shape, lengths, args.profile)[1]
        print(f"{setup}: {results[setup].get('tokens_per_s') or results[setup].get('error')} tokens/s", flush=True)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = results.get("lora16", {})
    gc = "off" if args.no_gradient_checkpointing else "on"
    print(f"\n## Training side by side ({device}, {args.size}: {arch.params / 1e6:.0f}M parameters, batch "
          f"{args.batch_size} x up to {args.seq_len} tokens, LoRA r={args.lora_r}, checkpointing {gc})\n")  # fmt: skip
    rows = []
    for setup, r in results.items():
        if "error" in r:
            rows.append([setup, r["error"], "", "", "", "", "", "", ""])
            continue
        rows.append([
            setup, f"{r['tokens_per_s']:.1f}", _ratio(r["tokens_per_s"], ref.get("tokens_per_s")),
            f"{r['tokens_per_cpu_s']:.1f}", _ratio(r["tokens_per_cpu_s"], ref.get("tokens_per_cpu_s")),
            f"{r['peak'] / GIB:.3f}", _ratio(r["peak"], ref.get("peak")),
            f"{r['bits_per_linear_param']:.3f}", f"{r['bits_per_base_param']:.2f}",
        ])  # fmt: skip
    print(markdown_table(
        ["setup", "non-pad tokens/s", "vs 16-bit LoRA", "tokens / CPU-s", "vs 16-bit LoRA", "peak GiB",
         "vs 16-bit LoRA", "bits / linear param", "bits / base param"], rows))  # fmt: skip
    first = next(iter(results.values()))
    print(f"\npeak memory: {first.get('memory_kind', '?')}, counted from before loading; {first.get('threads')} "
          "threads; tokens/s and tokens per CPU-second: medians over the timed steps")  # fmt: skip
    for setup, r in results.items():
        if "profile" in r:
            print(f"\n### Where {setup}'s time goes (self time, whole run)\n")
            shares = [[name, f"{100 * share:.1f}%"] for name, share in r["profile"]]
            print(markdown_table(["operator", "share"], shares))

    padding = padding_efficiency(args.data, args.tokenizer)
    print(f"\n## Padding efficiency on real instruction lengths ({padding['examples']} examples of {args.data}, "
          f"tokenizer {args.tokenizer})\n")  # fmt: skip
    print(markdown_table(
        ["batch size", "random batches", "group_by_length"],
        [[b, f"{v['random']:.3f}", f"{v['group_by_length']:.3f}"] for b, v in padding["by_batch_size"].items()],
    ))  # fmt: skip
    write_json(args.json, {"device": device, "args": vars(args) | {"json": str(args.json)}, "results": results,
                           "padding": padding})  # fmt: skip


def _ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if value and reference else "-"


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
