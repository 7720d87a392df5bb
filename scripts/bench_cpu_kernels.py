"""One NF4 layer on the CPU: bitsandbytes' fused kernel against dequantize + matmul, by rows per call.

    python scripts/bench_cpu_kernels.py
    python scripts/bench_cpu_kernels.py --shape 576x1536 --rows 1,8,92,736,2048

The fused kernel (`packed-bf16`, AVX512-BF16 CPUs only) is what bitsandbytes runs at eval() in bf16;
`qlora_cli.kernels` keeps it for generation (one row per sequence per step) and scores prompts through
dequantize + matmul. This table is why. Markdown on stdout.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchlib import markdown_table
from qlora_cli.kernels import DEQUANTIZE, PACKED, bf16_matrix_units, packed_kernel_available, use_packed_kernel


def nf4_layer(in_features: int, out_features: int):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True
    )
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) / in_features**0.5
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
    return layer.to("cpu").eval()  # moving to the device is what quantizes


@torch.no_grad()
def seconds_per_call(layer, x: torch.Tensor, repeats: int) -> float:
    layer(x)  # the fused kernel repacks the weight in place here
    started = time.perf_counter()
    for _ in range(repeats):
        layer(x)
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="576x1536", help="in x out features (SmolLM2-135M's MLP up projection)")
    parser.add_argument("--rows", default="1,8,92,736,2048", help="rows per call: 92 is one MMLU 0-shot prompt")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    in_features, out_features = (int(n) for n in args.shape.split("x"))
    kernels = [DEQUANTIZE] + ([PACKED] if packed_kernel_available() else [])
    torch.manual_seed(0)
    rows = []
    for m in (int(n) for n in args.rows.split(",")):
        x = torch.randn(m, in_features, dtype=torch.bfloat16)
        row = [str(m)]
        for kernel in kernels:
            layer = nf4_layer(in_features, out_features)
            use_packed_kernel(layer, kernel == PACKED)
            seconds = seconds_per_call(layer, x, args.repeats)
            row += [f"{seconds * 1e3:.3f}", f"{2 * m * in_features * out_features / seconds / 1e9:.0f}"]
        rows.append(row)
    header = ["rows"] + [f"{kernel} {unit}" for kernel in kernels for unit in ("ms", "GFLOP/s")]
    units = bf16_matrix_units() or "none (AVX2)"
    print(f"## NF4 {in_features} -> {out_features}, bf16 compute, {torch.get_num_threads()} threads, bf16 units: {units}\n")
    print(markdown_table(header, rows))
    if len(kernels) == 1:
        print("\nbitsandbytes has no fused CPU kernel on this CPU (it needs AVX512-BF16)")


if __name__ == "__main__":
    main()
