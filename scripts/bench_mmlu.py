"""MMLU scoring speed: the batched scorer of `qlora eval mmlu` against one question at a time.

"One at a time" is what the original MMLU code does: every prompt goes through the model whole, alone.
Both score the same prompts on the same model; the table says how many questions per second each
manages and whether their predictions agree. Runs on CUDA unchanged when a GPU is present.

    python scripts/bench_mmlu.py --data ../shared/data/mmlu/hendrycks
    python scripts/bench_mmlu.py --data ../shared/data/mmlu/hendrycks --shots 0 --size 135m
    python scripts/bench_mmlu.py --model huggyllama/llama-7b --data mmlu/ --limit 20
    python scripts/bench_mmlu.py --model ../shared/data/models/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data ../shared/data/mmlu/hendrycks --shots 0 --baseline-compute-dtype fp32

The default model is a random-init LLaMA shape (`--size`: hidden 512 and up, LLaMA's 32000-token
vocabulary) whose time, like a real model's, goes to its linear layers and head. The builtin tiny model
(`--model builtin:tiny-llama`, hidden 128) spends most of a 1,300-token prompt in attention, unlike any
real LLM.

The table also counts the multiply-adds each scorer did in the linear layers (the head included): time
that batching cannot save unless it does less of that work. Without a shared prefix to reuse (0-shot),
the only work saved is the vocabulary head at every position but the last, so on a CPU that already runs
one prompt at its peak rate, the speed-up stays near the ratio of that work.

Each scorer's row names the dtype its 4-bit layers compute in and the CPU kernel they use
(`quantization.compute_dtype: auto` gives bf16 on a CPU with bf16 units). `qlora eval mmlu` scores with
dequantize + matmul; where bitsandbytes has its fused CPU kernel (AVX512-BF16), which a plain
transformers + bitsandbytes script gets at eval() in bf16, a third row scores one at a time through it.
`--baseline-compute-dtype fp32` loads the model a second time for the one-at-a-time scorer, as a user of
the original code in fp32 gets it.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchlib import SIZES, TOKENIZER, random_checkpoint
from qlora_cli.config import MmluEvalConfig, ModelConfig, QuantizationConfig
from qlora_cli.eval.mmlu import evaluate, letter_token_ids, load_items, summarize
from qlora_cli.kernels import DEQUANTIZE, bf16_matrix_units, packed_kernel_available
from qlora_cli.model import DTYPES, load_for_inference

SUBJECTS = "abstract_algebra,high_school_biology,moral_scenarios,virology"


@torch.no_grad()
def one_at_a_time(loaded, prompts: list[str]) -> torch.Tensor:
    letters = letter_token_ids(loaded.tokenizer)
    rows = []
    for ids in loaded.prompt_ids(prompts):
        logits = loaded.model(input_ids=torch.tensor([ids], device=loaded.device)).logits
        rows.append(logits[0, -1, letters].float().cpu())
    return torch.stack(rows)


class LinearWork:
    """Multiply-adds in the model's linear layers, counted by forward hooks on every `nn.Linear`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.macs = 0
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):  # bitsandbytes' 4- and 8-bit layers included
                module.register_forward_hook(self._count)

    def _count(self, module: torch.nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        self.macs += inputs[0].shape[:-1].numel() * module.in_features * module.out_features

    def take(self) -> int:
        """The count since the last take."""
        macs, self.macs = self.macs, 0
        return macs


def timed(fn):
    """Wall seconds and this process's CPU seconds (steadier than wall time on a shared machine)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint folder, hub id or .gguf file, instead of a random-init --size")
    parser.add_argument("--size", default="60m", choices=list(SIZES), help="the random-init LLaMA shape to score")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "fp4", "int8", "none"])
    compute_dtypes = ["auto", *DTYPES]
    parser.add_argument("--compute-dtype", default="auto", choices=compute_dtypes, help="quantization.compute_dtype")
    parser.add_argument(
        "--baseline-compute-dtype", choices=compute_dtypes, help="another one for the one-at-a-time scorer"
    )
    parser.add_argument("--data", required=True, help="Hendrycks MMLU folder (dev/, test/)")
    parser.add_argument("--split", default="test", choices=["test", "val"])
    parser.add_argument("--shots", type=int, default=5, choices=[0, 5])
    parser.add_argument("--subjects", default=SUBJECTS)
    parser.add_argument("--limit", type=int, default=40, help="questions per subject")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=2048)
    args = parser.parse_args()

    model_cfg = (
        ModelConfig(name_or_path=args.model)
        if args.model
        else ModelConfig(name_or_path=str(random_checkpoint(SIZES[args.size])), tokenizer=TOKENIZER)
    )
    quant = QuantizationConfig.named(args.quantization)
    loaded = load_for_inference(model_cfg, quant.model_copy(update={"compute_dtype": args.compute_dtype}))
    baseline = loaded
    if args.baseline_compute_dtype not in (None, args.compute_dtype):
        baseline = load_for_inference(model_cfg, quant.model_copy(update={"compute_dtype": args.baseline_compute_dtype}))
    if not loaded.kind.shares_prompt_prefixes:
        parser.error("the one-at-a-time reference scores decoder-only models")
    cfg = MmluEvalConfig(
        data=args.data,
        split=args.split,
        shots=args.shots,
        limit=args.limit,
        subjects=args.subjects.split(","),
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    items = load_items(cfg, loaded.tokenizer)
    tokenizer = loaded.tokenizer
    prompts = [i.prompt for i in items]
    scorers = [("one question at a time", baseline, lambda: summarize(items, one_at_a_time(baseline, prompts)))]
    if baseline.cpu_kernel == DEQUANTIZE and baseline.compute.name == "bf16" and packed_kernel_available():
        quant_of_baseline = quant.model_copy(update={"compute_dtype": baseline.compute.name})
        fused = load_for_inference(model_cfg, quant_of_baseline, generation=True)
        scorers.append(("one at a time, fused kernel", fused, lambda: summarize(items, one_at_a_time(fused, prompts))))
    scorers.append(
        (f"batched (batch {args.batch_size})", loaded, lambda: evaluate(loaded, items, batch_size=args.batch_size))
    )
    for _, scorer, _ in scorers:
        one_at_a_time(scorer, [items[0].prompt])  # warm up kernels and allocator (the fused kernel repacks here)
    work = {id(scorer.model): LinearWork(scorer.model) for _, scorer, _ in scorers}
    rows = []
    for name, scorer, score in scorers:
        for counter in work.values():
            counter.take()
        result, wall, cpu = timed(score)
        rows.append((name, scorer, result, wall, cpu, work[id(scorer.model)].take()))

    n = len(items)
    tokens = sum(len(tokenizer(i.prompt, add_special_tokens=False)["input_ids"]) for i in items) / n
    single, batched = rows[0][2], rows[-1][2]
    same = [a["prediction"] == b["prediction"] for a, b in zip(single.predictions, batched.predictions)]
    gap = max(
        abs(a["logits"][k] - b["logits"][k])
        for a, b in zip(single.predictions, batched.predictions)
        for k in a["logits"]
    )
    if torch.cuda.is_available():
        device = "cuda " + torch.cuda.get_device_name()
    else:
        device = f"cpu x{torch.get_num_threads()}, bf16 units: {bf16_matrix_units() or 'none (AVX2)'}"
    print(
        f"{args.model or args.size} ({args.quantization}), {args.shots}-shot, {n} questions from "
        f"{len(cfg.subjects)} subjects, {tokens:.0f} prompt tokens on average, {device}"
    )
    print(
        f"{'scorer':<28} {'compute':>7} {'CPU kernel':>17} {'wall s':>7} {'questions/s':>12} {'speedup':>8}"
        f" {'CPU s':>7} {'speedup':>8} {'linear GMAC':>12} {'less work':>10}"
    )
    _, _, _, single_s, single_cpu, single_macs = rows[0]
    for name, scorer, _, wall, cpu, macs in rows:
        print(
            f"{name:<28} {scorer.compute.name:>7} {scorer.cpu_kernel or '-':>17} {wall:>7.1f} {n / wall:>12.2f}"
            f" {single_s / wall:>7.1f}x {cpu:>7.1f} {single_cpu / cpu:>7.1f}x"
            f" {macs / 1e9:>12.1f} {single_macs / macs:>9.1f}x"
        )
    if len(rows) == 3:
        print(f"batched over one at a time through the fused kernel: {rows[1][3] / rows[-1][3]:.1f}x (wall)")
    print(f"identical predictions: {sum(same)}/{n}; largest letter-logit difference {gap:.2e}")


if __name__ == "__main__":
    main()
