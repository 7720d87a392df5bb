"""`qlora merge-adapter`: fold a trained LoRA adapter into a 16-bit copy of its base, and prove the result.

Merging into 4-bit weights re-quantizes them and loses most of the adapter, so the base is always loaded in
16 bits. The adapter was trained against the NF4 reconstruction of the base, not the base itself;
`nf4-roundtrip` merges into that reconstruction (quantize + dequantize each weight exactly as training's
loader did), so the merged model reproduces base-NF4 + adapter. `original` merges into the untouched
weights, which the adapter never saw.

The merged model is checked against the model it stands for, computed the way training computed it (never
through bitsandbytes' fused CPU inference kernel), and the merge fails, writing nothing, when the largest
logit difference exceeds the tolerance for its dtype (`DEFAULT_TOLERANCE`, or `--tolerance`).

Memory: the 4-bit reference is freed before the 16-bit copy is loaded, and both the round trip and peft's
merge work in place, one layer at a time, so the peak stays near one copy of the 16-bit model.
"""

from __future__ import annotations

import ctypes
import gc
import json
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch

from qlora_cli.adapter import TrainedAdapter, prompt_format, read_adapter
from qlora_cli.adapter_init import round_trip
from qlora_cli.config import DataConfig, ModelConfig, QuantizationConfig
from qlora_cli.data.tokenize import tokenize_example
from qlora_cli.errors import QloraError
from qlora_cli.generate import apply_format
from qlora_cli.memory import MemoryMeter
from qlora_cli.model import LoadedModel, device_for_process, dtype_name, load_for_inference, resolve_compute_dtype
from qlora_cli.run_folder import MERGE_REPORT_FILE, RECIPE_FILE

BaseWeights = Literal["original", "nf4-roundtrip"]
MergeDtype = Literal["bf16", "fp16", "fp32"]
# Largest logit difference from the reference that a merge in this dtype may show. Measured on SmolLM2-135M
# (2 QLoRA steps trained in fp32, adapter effect 11.6): fp32 8.5e-5, fp16 0.79, bf16 4.2, all of it the
# rounding of weights and activations to the merge dtype; the defaults leave about 2x headroom over that.
DEFAULT_TOLERANCE: dict[str, float] = {"fp32": 1e-3, "fp16": 2.0, "bf16": 8.0}
# (instruction, answer): the check compares logits over both, so the answer tokens are scored too.
CHECK_EXAMPLES = [
    ("Write the digits as words.", "three one four"),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Give three tips for staying healthy.", "Eat well, sleep enough and exercise every day."),
]


@dataclass(frozen=True)
class MergeRequest:
    adapter: Path
    output: Path
    base: ModelConfig | None = None  # default: the base recorded with the adapter
    dtype: MergeDtype | Literal["auto"] = "auto"  # auto: the dtype training computed in, on this device
    base_weights: BaseWeights | None = None  # default: nf4-roundtrip when training quantized the base to 4 bits
    device: str | None = None
    overwrite: bool = False
    tolerance: float | None = None  # default: DEFAULT_TOLERANCE[dtype]


@dataclass
class MergeReport:
    adapter: str
    base_model: str
    output: str
    base_weights: BaseWeights
    dtype: MergeDtype
    device: str
    reference: str  # what the merged model was compared with
    check_prompts: int
    max_abs_logit_diff: float
    tolerance: float  # the merge fails when max_abs_logit_diff exceeds it
    adapter_effect: float  # largest logit change the adapter makes: what a lossy merge would lose
    peak_memory_bytes: int
    peak_memory_kind: str
    memory_at_start_bytes: int
    process_peak_rss_bytes: int  # includes the memory-mapped checkpoint's file pages
    model_bytes: int
    seconds: float

    def summary(self) -> str:
        gib = 2**30
        return (
            f"Merged {self.adapter} into {self.base_model} ({self.base_weights} base weights, {self.dtype}) "
            f"-> {self.output}\n"
            f"Check on {self.check_prompts} prompts: largest logit difference from {self.reference}: "
            f"{self.max_abs_logit_diff:.2e}, within the tolerance {self.tolerance:g} (the adapter itself moves logits "
            f"by up to {self.adapter_effect:.2e})\n"
            f"Peak memory {self.peak_memory_bytes / gib:.2f} GiB ({self.peak_memory_kind.replace('_', ' ')}; "
            f"{self.memory_at_start_bytes / gib:.2f} GiB before loading) for a {self.model_bytes / gib:.2f} GiB "
            f"model, {self.seconds:.0f} s. Report: {Path(self.output) / MERGE_REPORT_FILE}"
        )


def merge_adapter(request: MergeRequest) -> MergeReport:
    started = time.perf_counter()
    adapter, base_weights, device = _validate(request)
    quant = adapter.quantization
    model_cfg = adapter.base_model(request.base)
    dtype = _merge_dtype(request.dtype, quant, device)
    sixteen_bit = QuantizationConfig(bits=16, compute_dtype=dtype)
    tolerance = DEFAULT_TOLERANCE[dtype] if request.tolerance is None else request.tolerance
    meter = MemoryMeter(device)
    with meter.held_peak() as held:
        if base_weights == "nf4-roundtrip":
            # The trained model (NF4 base + adapter) computed in the merge's dtype: an fp32 merge of an adapter
            # trained with bf16 compute is checked against the model itself, not against bf16 rounding noise.
            as_merged = quant.model_copy(update={"compute_dtype": dtype})
            trained = load_for_inference(model_cfg, as_merged, adapter.path, device=device)
            reference, base_only = _logits_with_and_without_adapter(trained, adapter)
            quantized = _quantized_weights(trained.model)
            del trained
            _release_memory()
            loaded = load_for_inference(model_cfg, sixteen_bit, adapter.path, device=device)
            _round_trip_in_place(loaded.model, quantized)
            reference_name = f"4-bit {quant.quant_type} base + adapter, as trained (computed in {dtype})"
        else:
            loaded = load_for_inference(model_cfg, sixteen_bit, adapter.path, device=device)
            reference, base_only = _logits_with_and_without_adapter(loaded, adapter)
            reference_name = f"{dtype} base + adapter, unmerged"
        # In place (no safe_merge, which clones every weight and so keeps a second copy alive);
        # non-finite adapter weights show up in the check's logits instead.
        loaded.model = loaded.model.merge_and_unload()
        merged_logits = _check_logits(loaded, adapter)
        if not all(torch.isfinite(logits).all() for logits in merged_logits):
            raise QloraError(f"merging {adapter.path} gave non-finite logits: the adapter holds NaN or inf weights")
        difference, effect = _max_abs_diff(merged_logits, reference), _max_abs_diff(reference, base_only)
        if not difference <= tolerance:
            fix = "accept it with --tolerance"
            if dtype != "fp32":
                fix = f"merge with --dtype fp32, or {fix}"
            raise QloraError(
                f"the merged model is {difference:.2e} logits away from {reference_name}, over the tolerance "
                f"{tolerance:g} for {dtype} (the adapter moves logits by {effect:.2e}); nothing written: {fix}"
            )

        with _staged(request.output) as staging:
            _save_model(loaded, adapter, staging)
            report = MergeReport(
                adapter=str(adapter.path),
                base_model=model_cfg.name_or_path,
                output=str(request.output),
                base_weights=base_weights,
                dtype=dtype,
                device=device,
                reference=reference_name,
                check_prompts=len(CHECK_EXAMPLES),
                max_abs_logit_diff=difference,
                tolerance=tolerance,
                adapter_effect=effect,
                peak_memory_bytes=held.peak,
                peak_memory_kind=held.kind,
                memory_at_start_bytes=held.start,
                process_peak_rss_bytes=MemoryMeter("cpu").peak(),
                model_bytes=_model_bytes(loaded.model),
                seconds=round(time.perf_counter() - started, 2),
            )
            (staging / MERGE_REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def _merge_dtype(requested: str, quant: QuantizationConfig, device: str) -> MergeDtype:
    """`auto`: what training computed in (fp32 on the CPU, bf16 on most GPUs), so the merge can reproduce it."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    return dtype_name(resolve_compute_dtype(quant.compute_dtype, device))  # type: ignore[return-value]


def _validate(request: MergeRequest) -> tuple[TrainedAdapter, BaseWeights, str]:
    """Everything that can be refused before loading a model: the adapter, the base weights, output, device."""
    adapter = read_adapter(request.adapter)
    if adapter.config.get("peft_type") != "LORA":
        raise QloraError(f"{adapter.path} is a {adapter.config.get('peft_type')} adapter: only LoRA can be merged")
    bits = adapter.quantization.bits
    base_weights = request.base_weights or ("nf4-roundtrip" if bits == 4 else "original")
    if base_weights == "original" and (plain := adapter.plain_lora()):
        adapter = plain  # PiSSA/OLoRA/LoftQ written as plain LoRA: the untouched base, not the one their start changed
    if base_weights == "nf4-roundtrip" and bits != 4:
        raise QloraError(
            f"{adapter.path} was trained on a {bits}-bit base, so there is no 4-bit base to reproduce: "
            "use --base-weights original"
        )
    _check_output(request.output, request.overwrite)
    device = request.device or device_for_process()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QloraError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    return adapter, base_weights, device


def _check_output(output: Path, overwrite: bool) -> None:
    """Refuse to replace anything but an earlier merge, and that only with --overwrite."""
    if not output.exists():
        return
    if not overwrite:
        raise QloraError(f"output folder {output} exists: pass --overwrite to replace it, or choose another --output")
    if not (output / MERGE_REPORT_FILE).is_file():
        raise QloraError(f"{output} exists and is not a merged model (no {MERGE_REPORT_FILE}): choose another --output")


@contextmanager
def _staged(output: Path) -> Iterator[Path]:
    """A hidden sibling folder, renamed to `output` at the end: a failure leaves no half-written output."""
    output.parent.mkdir(parents=True, exist_ok=True)
    hidden = f".{output.name}.{uuid.uuid4().hex[:8]}"
    staging, previous = output.parent / f"{hidden}.partial", output.parent / f"{hidden}.previous"
    staging.mkdir()
    try:
        yield staging
        if output.exists():  # an earlier merge, replaced with --overwrite: moved aside until the new one is in place
            output.rename(previous)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def _save_model(loaded: LoadedModel, adapter: TrainedAdapter, folder: Path) -> None:
    loaded.model.generation_config.pad_token_id = loaded.tokenizer.pad_token_id
    loaded.model.save_pretrained(folder, max_shard_size="5GB")
    loaded.tokenizer.save_pretrained(folder)
    if adapter.recipe is not None:  # lets `qlora generate --model OUTPUT` find the prompt format
        (folder / RECIPE_FILE).write_text(adapter.recipe.to_yaml())


# --------------------------------------------------------------------------- NF4 round trip


@dataclass(frozen=True)
class _QuantSpec:
    blocksize: int
    quant_type: str
    double_quant: bool
    dtype: torch.dtype  # what the loader quantized from: the compute dtype


def _quantized_weights(model: Any) -> dict[str, _QuantSpec]:
    """Every 4-bit layer of the trained model and how its weight was quantized, read from its quant state."""
    import bitsandbytes as bnb

    return {
        name: _QuantSpec(state.blocksize, state.quant_type, state.nested, state.dtype)
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit) and (state := module.weight.quant_state) is not None
    }


@torch.no_grad()
def _round_trip_in_place(model: Any, quantized: dict[str, _QuantSpec]) -> None:
    """Replace each weight that training saw in 4 bits by its NF4 reconstruction, one layer at a time."""
    modules = dict(model.named_modules())
    for name, spec in quantized.items():
        weight = modules[name].weight
        spec_args = {"blocksize": spec.blocksize, "quant_type": spec.quant_type, "double_quant": spec.double_quant}
        weight.data.copy_(round_trip(weight.data.to(spec.dtype), **spec_args))


# --------------------------------------------------------------------------- the check


def check_examples(loaded: LoadedModel, adapter: TrainedAdapter) -> list[dict[str, Any]]:
    """The check examples tokenized as training tokenized its data: prompt (in the run's format) + answer."""
    data_cfg = adapter.recipe.data if adapter.recipe else DataConfig()
    fmt = prompt_format(adapter.recipe, loaded.tokenizer)
    return [
        tokenize_example(loaded.tokenizer, apply_format(fmt, instruction), answer, data_cfg, kind=loaded.kind)
        for instruction, answer in CHECK_EXAMPLES
    ]


def _check_logits(loaded: LoadedModel, adapter: TrainedAdapter) -> list[torch.Tensor]:
    """Logits over prompt + answer for each check example, one at a time (no padding), in fp32 on the CPU."""
    with torch.no_grad():
        return [
            loaded.model(**loaded.kind.forward_inputs(example, loaded.device)).logits.float().cpu()
            for example in check_examples(loaded, adapter)
        ]


def check_logits(loaded: LoadedModel, adapter: TrainedAdapter) -> list[torch.Tensor]:
    """The logits the merge check compares, for checks of the same model in another form (`qlora export gguf`)."""
    return _check_logits(loaded, adapter)


def _logits_with_and_without_adapter(
    loaded: LoadedModel, adapter: TrainedAdapter
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    with_adapter = _check_logits(loaded, adapter)
    with loaded.model.disable_adapter():
        without = _check_logits(loaded, adapter)
    return with_adapter, without


def _max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _model_bytes(model: Any) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _release_memory() -> None:
    """Hand the 4-bit stage's memory back before the 16-bit copy loads; glibc keeps freed blocks otherwise."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
