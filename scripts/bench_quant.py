"""The paper's NF4 claim measured: quantization error of NF4 vs FP4 (with and without double quant),
stored bits per parameter, and the perplexity a 16-bit-trained model loses when quantized to each.

    python scripts/bench_quant.py                       # 4096x4096 Gaussian; builtin:tiny-llama trained 300 steps
    python scripts/bench_quant.py --data ../shared/data/alpaca/antelofski_alpaca_small_2000.json --steps 1000

1. Gaussian weights (std 0.02, like LLaMA's init): mean squared error and stored bits per parameter.
2. Every linear layer of the trained model: NF4 vs FP4 error, layer by layer.
3. The model is trained in 16 bits (full finetuning with `qlora train`), then loaded in 16 bits and in
   4 bits as `qlora train` loads a base, and its held-out perplexity compared.
Markdown on stdout; --json writes everything.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

from benchlib import markdown_table, write_json
from qlora_cli.plan import BLOCK_SIZE

VARIANTS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x4096", help="Gaussian weight matrix, ROWSxCOLS")
    parser.add_argument("--model", default="builtin:tiny-llama", help="model to train in 16 bits, then quantize")
    parser.add_argument("--data", default="builtin:demo-instructions", help="alpaca-format training file")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output-dir", type=Path, help="keep the trained model here (default: a temp dir)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    rows, cols = (int(n) for n in args.shape.split("x"))
    torch.manual_seed(0)
    weight = torch.randn(rows, cols) * 0.02
    gaussian = {f"{q}{' + DQ' if dq else ''}": quantization_error(weight, q, dq) for q, dq in VARIANTS}
    print(f"## Gaussian {rows}x{cols} weights, std 0.02, block size {BLOCK_SIZE}\n")
    reference = gaussian["nf4 + DQ"]["mse"]
    print(markdown_table(["format", "MSE", "vs NF4 + DQ", "stored bits / param"],
                         [[name, f"{r['mse']:.4g}", f"{r['mse'] / reference:.2f}x", f"{r['bits']:.4f}"]
                          for name, r in gaussian.items()]))  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        trained = args.output_dir or Path(tmp) / "trained"
        recipe = train_16bit(args.model, args.data, args.steps, trained)
        layers = layer_errors(trained)
        quality = perplexities(recipe, trained)

    nf4_better = sum(r["nf4"] < r["fp4"] for r in layers)
    print(f"\n## Linear layers of {args.model} after {args.steps} steps of 16-bit training "
          f"(NF4 error below FP4 in {nf4_better} of {len(layers)} layers; every layer in --json)\n")  # fmt: skip
    kinds = sorted({r["name"].rsplit(".", 1)[-1] for r in layers})
    summary = []
    for kind in kinds:
        group = [r for r in layers if r["name"].endswith(kind)]
        nf4, fp4 = (sum(r[q] for r in group) / len(group) for q in ("nf4", "fp4"))
        summary.append([kind, len(group), f"{nf4:.4g}", f"{fp4:.4g}", f"{fp4 / nf4:.2f}"])
    print(markdown_table(["layer", "count", "mean NF4 + DQ MSE", "mean FP4 + DQ MSE", "FP4 / NF4"], summary))
    base = quality["16-bit"]
    print(f"\n## Held-out perplexity of the 16-bit-trained model loaded in 4 bits ({quality['eval_examples']} "
          "examples)\n")  # fmt: skip
    print(markdown_table(["weights", "perplexity", "gap to 16-bit"],
                         [[name, f"{ppl:.4f}", f"{ppl - base:+.4f}"]
                          for name, ppl in quality["perplexity"].items()]))  # fmt: skip
    write_json(args.json, {"args": vars(args) | {"json": str(args.json), "output_dir": str(args.output_dir)},
                           "gaussian": gaussian, "layers": layers, "perplexity": quality})  # fmt: skip


def quantization_error(weight: torch.Tensor, quant_type: str, double_quant: bool) -> dict[str, float]:
    """Round trip through bitsandbytes' 4-bit blockwise quantization; bits include every stored constant."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(
        weight, blocksize=BLOCK_SIZE, compress_statistics=double_quant, quant_type=quant_type
    )
    restored = F.dequantize_4bit(packed, state)
    stored = [packed, state.absmax, state.code]
    if state.nested:
        stored += [state.offset, state.state2.absmax, state.state2.code]
    bits = 8 * sum(t.numel() * t.element_size() for t in stored) / weight.numel()
    return {"mse": float(((restored - weight) ** 2).mean()), "bits": bits}


def train_16bit(model: str, data: str, steps: int, output_dir: Path):
    """Full finetuning in 16 bits (fp32 compute on the CPU) through `qlora train` itself."""
    from qlora_cli.config import default_recipe
    from qlora_cli.train import train

    recipe = default_recipe(model, [
        f"output_dir={output_dir}", "quantization.bits=16", "lora.enabled=false", f"data.path={data}",
        "data.train_on_source=true", "data.source_max_len=128", "data.target_max_len=64", "data.eval_size=200",
        "training.batch_size=16", "training.gradient_accumulation_steps=1", "training.learning_rate=1e-3",
        f"training.max_steps={steps}", f"training.save_steps={steps}", "training.logging_steps=50",
    ])  # fmt: skip
    train(recipe, overwrite=True)
    return recipe


def layer_errors(folder: Path) -> list[dict]:
    from safetensors.torch import load_file

    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights |= load_file(shard)
    rows = []
    for name, w in weights.items():
        if w.ndim != 2 or "embed" in name or "lm_head" in name:
            continue
        nf4, fp4 = (quantization_error(w.float(), q, True)["mse"] for q in ("nf4", "fp4"))
        shape = "x".join(map(str, w.shape))
        rows.append({"name": name.removesuffix(".weight"), "shape": shape, "nf4": nf4, "fp4": fp4})
    return rows


def perplexities(recipe, trained: Path) -> dict:
    """The held-out split `qlora train` made, scored with the model loaded as 16-bit and as each 4-bit format."""
    from qlora_cli.config import ModelConfig, QuantizationConfig
    from qlora_cli.data import PreparedData, prepare_data
    from qlora_cli.model import load_model

    model_cfg = ModelConfig(name_or_path=str(trained))
    out: dict[str, float] = {}
    held_out: PreparedData | None = None
    for name, quant in [("16-bit", QuantizationConfig(bits=16))] + [
        (f"{q}{' + DQ' if dq else ''}", QuantizationConfig(bits=4, quant_type=q, double_quant=dq)) for q, dq in VARIANTS
    ]:
        loaded = load_model(model_cfg, quant, for_training=False)
        if held_out is None:
            held_out = prepare_data(recipe.data, loaded.tokenizer, kind=loaded.kind, seed=recipe.training.seed)
        out[name] = perplexity(loaded.model, held_out.eval, loaded.tokenizer.pad_token_id)
    return {"16-bit": out["16-bit"], "perplexity": out, "eval_examples": len(held_out.eval)}


@torch.no_grad()
def perplexity(model, dataset, pad_token_id: int, batch_size: int = 16) -> float:
    from qlora_cli.data import PaddingCollator
    from qlora_cli.data.tokenize import IGNORE_INDEX

    collate = PaddingCollator(pad_token_id)
    nll = tokens = 0.0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        nll += torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        tokens += (labels != IGNORE_INDEX).sum().item()
    return math.exp(nll / tokens)


if __name__ == "__main__":
    main()
