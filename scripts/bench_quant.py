"""The paper's NF4 claim measured: quantization error of NF4 vs FP4 (with and without double quant),
stored bits per parameter, and the perplexity a 16-bit model loses when quantized to each.

    python scripts/bench_quant.py                       # 4096x4096 Gaussian; builtin:tiny-llama trained 300 steps
    python scripts/bench_quant.py --data ../shared/data/alpaca/antelofski_alpaca_small_2000.json --steps 1000
    python scripts/bench_quant.py --steps 0 --dataset hh-rlhf --data ../shared/data/hh_rlhf \
        --model ../shared/data/models/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.Q4_1.gguf

1. Gaussian weights (std 0.02, like LLaMA's init): mean squared error and stored bits per parameter.
2. Every linear layer of the 16-bit model: NF4 vs FP4 error, layer by layer.
3. The model is loaded in 16 bits and in 4 bits as `qlora train` loads a base, and its held-out
   perplexity compared. With --steps N it is first trained in 16 bits (full finetuning with `qlora train`)
   and scored on the split that run held out; with --steps 0 it is measured as it is (a folder, hub id or
   .gguf file), on --examples texts of exactly --seq-len tokens from --data.
Markdown on stdout; --json writes everything.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from itertools import islice
from pathlib import Path

import torch

from benchlib import markdown_table, write_json
from qlora_cli.config import DataConfig, ModelConfig, QuantizationConfig
from qlora_cli.errors import QloraError
from qlora_cli.plan import BLOCK_SIZE

VARIANTS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x4096", help="Gaussian weight matrix, ROWSxCOLS")
    parser.add_argument("--model", default="builtin:tiny-llama", help="folder, hub id or .gguf file to measure")
    parser.add_argument("--dataset", default="alpaca", help="the registered format of --data (qlora data formats)")
    parser.add_argument("--data", default="builtin:demo-instructions", help="training file, or with --steps 0 the text")
    parser.add_argument("--steps", type=int, default=300, help="16-bit training steps first; 0: the model as it is")
    parser.add_argument("--examples", type=int, default=48, help="with --steps 0: how many texts are scored")
    parser.add_argument("--seq-len", type=int, default=256, help="with --steps 0: tokens of each scored text")
    parser.add_argument("--compute-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="what training and every row compute in (auto: as `qlora train` picks on this machine)")
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
        if args.steps:
            trained = args.output_dir or Path(tmp) / "trained"
            recipe = train_16bit(args.model, args.dataset, args.data, args.steps, trained, args.compute_dtype)
            model_cfg = ModelConfig(name_or_path=str(trained))
            held_out = prepare_held_out(model_cfg, recipe.data, recipe.training.seed).eval
            about = f"the 16-bit-trained model loaded in 4 bits ({len(held_out)} examples)"
            state = f"after {args.steps} steps of 16-bit training"
        else:
            model_cfg = ModelConfig(name_or_path=args.model)
            held_out = pretrained_texts(model_cfg, args.dataset, args.data, args.examples, args.seq_len)
            about = (f"{args.model} as it is, loaded in 4 bits ({args.examples} texts of {args.seq_len} tokens "
                     f"from {args.data})")  # fmt: skip
            state = "as it is"
        layers, quality = measure(model_cfg, held_out, args.compute_dtype)

    nf4_better = sum(r["nf4"] < r["fp4"] for r in layers)
    print(f"\n## Linear layers of {args.model} {state} "
          f"(NF4 error below FP4 in {nf4_better} of {len(layers)} layers; every layer in --json)\n")  # fmt: skip
    kinds = sorted({r["name"].rsplit(".", 1)[-1] for r in layers})
    summary = []
    for kind in kinds:
        group = [r for r in layers if r["name"].endswith(kind)]
        nf4, fp4 = (sum(r[q] for r in group) / len(group) for q in ("nf4", "fp4"))
        summary.append([kind, len(group), f"{nf4:.4g}", f"{fp4:.4g}", f"{fp4 / nf4:.2f}"])
    print(markdown_table(["layer", "count", "mean NF4 + DQ MSE", "mean FP4 + DQ MSE", "FP4 / NF4"], summary))
    base = quality["16-bit"]
    print(f"\n## Held-out perplexity of {about}, computed in {quality['compute_dtype']}\n")
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


def train_16bit(model: str, dataset: str, data: str, steps: int, output_dir: Path, compute_dtype: str):
    """Full finetuning in 16 bits (computed in `compute_dtype`) through `qlora train` itself."""
    from qlora_cli.config import default_recipe
    from qlora_cli.train import train

    recipe = default_recipe(model, [
        f"output_dir={output_dir}", "quantization.bits=16", f"quantization.compute_dtype={compute_dtype}",
        "lora.enabled=false", f"data.dataset={dataset}", f"data.path={data}", "data.train_on_source=true",
        "data.source_max_len=128", "data.target_max_len=64", "data.eval_size=200", "training.batch_size=16",
        "training.gradient_accumulation_steps=1", "training.learning_rate=1e-3", f"training.max_steps={steps}",
        f"training.save_steps={steps}", "training.logging_steps=50",
    ])  # fmt: skip
    train(recipe, overwrite=True)
    return recipe


def prepare_held_out(model_cfg: ModelConfig, data: DataConfig, seed: int):
    """`qlora train`'s tokenized data for `model_cfg`'s tokenizer, without loading its weights."""
    from qlora_cli.data import prepare_data
    from qlora_cli.model import load_tokenizer, model_kind

    return prepare_data(data, load_tokenizer(model_cfg), kind=model_kind(model_cfg), seed=seed)


def pretrained_texts(model_cfg: ModelConfig, dataset: str, data: str, count: int, seq_len: int) -> list[dict]:
    """`count` texts of `data` (its eval split if it has one), shuffled with a fixed seed, of `seq_len` tokens.

    Every token is scored (source and target alike), and every text is the same length, so the perplexity
    does not depend on how the dataset splits prompt from reply.
    """
    cfg = DataConfig(dataset=dataset, path=data, train_on_source=True, source_max_len=seq_len,
                     target_max_len=seq_len, eval_size=0)  # fmt: skip
    prepared = prepare_held_out(model_cfg, cfg, seed=0)
    texts = prepared.eval if prepared.eval is not None else prepared.train
    return fixed_length(texts.shuffle(seed=0), count, seq_len, source=data)


def fixed_length(rows, count: int, seq_len: int, *, source: str) -> list[dict]:
    """The first `count` rows with at least `seq_len` tokens, cut to exactly `seq_len`."""
    long_enough = (row for row in rows if len(row["input_ids"]) >= seq_len)
    picked = [{key: row[key][:seq_len] for key in ("input_ids", "labels")} for row in islice(long_enough, count)]
    if len(picked) < count:
        raise QloraError(
            f"{source}: only {len(picked)} texts have {seq_len} tokens or more, --examples asks for {count}: "
            "lower --examples or --seq-len"
        )
    return picked


def measure(model_cfg: ModelConfig, held_out, compute_dtype: str) -> tuple[list[dict], dict]:
    """Layer errors of the 16-bit model, and the held-out perplexity of it and of each 4-bit format.

    Every model is loaded by `load_model`, as `qlora train` loads a base: what users get.
    """
    from qlora_cli.model import dtype_name, load_model

    out: dict[str, float] = {}
    layers: list[dict] = []
    formats = {"16-bit": QuantizationConfig(bits=16, compute_dtype=compute_dtype)} | {
        f"{q}{' + DQ' if dq else ''}": QuantizationConfig(
            bits=4, quant_type=q, double_quant=dq, compute_dtype=compute_dtype
        )
        for q, dq in VARIANTS
    }
    for name, quant in formats.items():
        loaded = load_model(model_cfg, quant, for_training=False)
        computed_in = dtype_name(loaded.compute_dtype)
        if quant.bits == 16:
            layers = layer_errors(loaded.model)
        out[name] = perplexity(loaded.model, held_out, loaded.tokenizer.pad_token_id)
        del loaded  # before the next one loads
    quality = {"16-bit": out["16-bit"], "perplexity": out, "eval_examples": len(held_out)}
    return layers, quality | {"compute_dtype": computed_in}


def layer_errors(model) -> list[dict]:
    rows = []
    for name, w in model.named_parameters():
        if w.ndim != 2 or "embed" in name or "lm_head" in name:
            continue
        nf4, fp4 = (quantization_error(w.detach().float(), q, True)["mse"] for q in ("nf4", "fp4"))
        shape = "x".join(map(str, w.shape))
        rows.append({"name": name.removesuffix(".weight"), "shape": shape, "nf4": nf4, "fp4": fp4})
    return rows


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
