"""Preference tuning side by side with SFT on the same pairs: pairs/s, tokens/s and peak memory per method.

    python scripts/bench_preference.py                   # SmolLM2-135M-Instruct, HH-RLHF helpful-base pairs
    python scripts/bench_preference.py --methods sft,dpo --steps 6 --batch-size 4

Each setup is a real `qlora train` run in its own process, on the same pairs written once in the `preference`
format ({prompt, chosen, rejected}, HH-RLHF's shared conversation as the prompt): `sft` trains prompt -> chosen
(the paper's way, loss on the reply), `dpo` and `dpo-precomputed` (the reference's log-probs computed in a
pass before training), `orpo` and `kto` (each pair read as a desirable and an undesirable reply) train on the
pairs. No evaluation, no gradient accumulation; the numbers are the run's own metrics.json: training seconds
(the first step included: a run this short is what a user times), tokens the policy's forward read (a pair
is two sequences for dpo/orpo, one per row for kto and sft), the process's peak memory. `before training` is
what ran between the start and the first step (loading, tokenizing, and for dpo-precomputed the reference pass).
Markdown on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH_RLHF = REPO.parent / "shared" / "data" / "hh_rlhf" / "helpful-base" / "test.jsonl.gz"
SETUPS = {
    "sft": ["training.method=sft"],
    "dpo": ["training.method=dpo"],
    "dpo-precomputed": ["training.method=dpo", "preference.reference=precomputed"],
    "orpo": ["training.method=orpo"],
    "kto": ["training.method=kto"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=HH_RLHF, help="HH-RLHF {chosen, rejected} JSON Lines")
    parser.add_argument("--pairs", type=int, default=64, help="pairs read from --data")
    parser.add_argument("--methods", default=",".join(SETUPS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step (kto: rows, twice as many)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pairs = write_pairs(args.data, args.pairs, Path(tmp) / "pairs.jsonl")
        results = {name: run(name, args, pairs, Path(tmp) / name) for name in args.methods.split(",")}
    print(table(results, args))


def write_pairs(source: Path, count: int, out: Path) -> Path:
    """The first `count` usable HH-RLHF pairs as {prompt, chosen, rejected}, split the way training splits them."""
    import gzip

    from qlora_cli.data.formats import FORMATS, SkipRecord

    opener = gzip.open if source.suffix == ".gz" else open
    rows = []
    with opener(source, "rt") as handle:
        for line in handle:
            try:
                rows.append(FORMATS["hh-rlhf"].to_pair(json.loads(line))._asdict())
            except SkipRecord:
                continue
            if len(rows) == count:
                break
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def run(name: str, args: argparse.Namespace, pairs: Path, out: Path) -> dict:
    rows = args.batch_size * (2 if name == "kto" else 1)
    command = [
        sys.executable, "-m", "qlora_cli", "train", "--config", str(REPO / "configs/smollm2-135m-hh-rlhf-dpo.yaml"), f"output_dir={out}",
        f"model.name_or_path={args.model}", "data.dataset=preference", f"data.path={pairs}", "data.eval_size=0",
        "eval.loss_before_after=false", f"training.max_steps={args.steps}", f"training.batch_size={rows}",
        "training.gradient_accumulation_steps=1", "training.save_steps=100000", "training.logging_steps=1",
        *SETUPS[name], *args.set,
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_s"] = wall
    print(f"{name}: {metrics['training_s']:.1f} s training, {wall:.1f} s in all", file=sys.stderr)
    return metrics


def table(results: dict[str, dict], args: argparse.Namespace) -> str:
    sft = results.get("sft")
    lines = [
        f"{args.model}, {args.steps} steps of {args.batch_size} pairs, no accumulation; "
        f"{results[next(iter(results))]['compute_dtype']} compute",
        "",
        "| method | pairs/s | vs sft | tokens/s (policy forward) | peak memory GiB | vs sft | s before training |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in results.items():
        pairs_per_s = args.steps * args.batch_size / m["training_s"]
        before = m["wall_s"] - m["training_s"]
        ratio = f"{pairs_per_s / (args.steps * args.batch_size / sft['training_s']):.2f}x" if sft else "-"
        memory = f"{m['peak_memory_bytes'] / sft['peak_memory_bytes']:.2f}x" if sft else "-"
        lines.append(
            f"| {name} | {pairs_per_s:.2f} | {ratio} | {m['tokens_per_s']:.0f} | {m['peak_memory_bytes'] / 2**30:.2f} "
            f"| {memory} | {before:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
