"""Shared by scripts/bench_*.py (not part of the installed package): peak memory, speed and storage of real
training steps, to measure what the planner predicts.

scripts/bench_*.py and tests/test_plan.py run `qlora train`'s own pieces (load_model, add_lora,
build_trainer) on random-init LLaMA checkpoints. Each measurement runs in a fresh process (`isolated`),
so memory that one run freed cannot hide the next run's peak.
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import torch

from qlora_cli.config import Recipe, validate_recipe
from qlora_cli.errors import QloraError
from qlora_cli.memory import MemoryMeter
from qlora_cli.plan import ARCHITECTURES, Architecture

# Random-init LLaMA shapes between the builtin tiny model and LLaMA-7B, with LLaMA's 32000-token vocabulary,
# and the real architectures (llama-7b ...) for a GPU.
SIZES: dict[str, Architecture] = {
    "30m": Architecture("random-30m", 384, 6, 1024, 6, 6, 32000),
    "60m": Architecture("random-60m", 512, 8, 1408, 8, 8, 32000),
    "135m": Architecture("random-135m", 768, 12, 2048, 12, 12, 32000),
    "270m": Architecture("random-270m", 1024, 16, 2816, 16, 16, 32000),
    "1b": Architecture("random-1b", 2048, 16, 5632, 16, 16, 32000),
    **ARCHITECTURES,
}
TOKENIZER = "builtin:tiny-llama"  # benchmark batches are random token ids: only the pad id is used

# name -> recipe overrides; the setups the issue compares, all with the same LoRA, data and optimizer
SETUPS: dict[str, dict[str, Any]] = {
    "qlora": {"quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True}},
    "qlora-fp4": {"quantization": {"bits": 4, "quant_type": "fp4", "double_quant": True}},
    "lora16": {"quantization": {"bits": 16}},
    "full": {"quantization": {"bits": 16}, "lora": {"enabled": False}},
}


def random_checkpoint(arch: Architecture, *, shard_size: str = "200MB") -> Path:
    """A random-init LLaMA of `arch`'s shape saved as a sharded bf16 hub checkpoint, built once and cached.

    Small shards let the loading measurement tell shard-by-shard quantization from a full 16-bit copy.
    """
    from qlora_cli.builtin import materialize

    def build(folder: Path) -> None:
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(
            hidden_size=arch.hidden,
            intermediate_size=arch.intermediate,
            num_hidden_layers=arch.layers,
            num_attention_heads=arch.heads,
            num_key_value_heads=arch.kv_heads,
            head_dim=arch.head_dim or arch.hidden // arch.heads,
            vocab_size=arch.vocab,
            tie_word_embeddings=arch.tied_embeddings,
            max_position_embeddings=4096,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder, max_shard_size=shard_size)

    key = f"bench-{arch.name}-h{arch.hidden}-l{arch.layers}-i{arch.intermediate}-kv{arch.kv_heads}-v{arch.vocab}"
    key += f"-{shard_size}"
    return materialize(key, build)


@dataclass(frozen=True)
class RunShape:
    """What every row of a benchmark trains: micro batch, tokens per example, steps, LoRA rank, checkpointing."""

    batch_size: int
    seq_len: int
    steps: int
    lora_r: int = 64
    gradient_checkpointing: bool = True

    @staticmethod
    def add_arguments(parser: Any, *, batch_size: int, seq_len: int, steps: int, steps_help: str = "") -> None:
        parser.add_argument("--batch-size", type=int, default=batch_size)
        parser.add_argument("--seq-len", type=int, default=seq_len)
        parser.add_argument("--steps", type=int, default=steps, help=steps_help)
        parser.add_argument("--lora-r", type=int, default=64)
        parser.add_argument("--no-gradient-checkpointing", action="store_true")

    @classmethod
    def from_args(cls, args: Any) -> RunShape:
        return cls(args.batch_size, args.seq_len, args.steps, args.lora_r, not args.no_gradient_checkpointing)


def bench_recipe(
    checkpoint: Path, setup: str, shape: RunShape, output_dir: Path, optim: str = "paged_adamw_32bit"
) -> Recipe:
    """The recipe `qlora train` would get for one benchmark row (defaults are the paper's)."""
    from qlora_cli.config import deep_merge

    raw = {
        "output_dir": str(output_dir),
        "model": {"name_or_path": str(checkpoint), "tokenizer": TOKENIZER},
        "lora": {"r": shape.lora_r},
        "data": {"source_max_len": shape.seq_len - shape.seq_len // 4, "target_max_len": shape.seq_len // 4},
        "training": {
            "batch_size": shape.batch_size,
            "gradient_accumulation_steps": 1,
            "max_steps": shape.steps,
            "gradient_checkpointing": shape.gradient_checkpointing,
            "optim": optim,
            "group_by_length": False,
            "logging_steps": shape.steps,
            "save_steps": shape.steps,
        },
    }
    if setup not in SETUPS:
        raise QloraError(f"unknown setup {setup!r}; setups: {', '.join(SETUPS)}")
    return validate_recipe(deep_merge(raw, SETUPS[setup]), source=f"benchmark setup {setup}")


def measure_setup(
    checkpoint: Path, setup: str, shape: RunShape, lengths: list[int], profile: bool = False
) -> tuple[Recipe, dict[str, Any]]:
    """Train one setup in a fresh process with a throwaway output_dir: the recipe it ran, and what was measured."""
    with tempfile.TemporaryDirectory() as out:
        recipe = bench_recipe(checkpoint, setup, shape, Path(out))
        return recipe, isolated(measure_training, recipe, lengths, profile)


def random_batches(vocab: int, lengths: list[int], seed: int = 0) -> Any:
    """Token ids the model trains on (loss on every token): `qlora train`'s tokenized columns."""
    from datasets import Dataset

    rng = random.Random(seed)
    ids = [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "length": lengths})


def measure_training(recipe: Recipe, lengths: list[int], profile: bool = False) -> dict[str, Any]:
    """Load as `qlora train` does and train len(lengths) / batch_size steps: peak memory, speed, storage.

    A one-step run of builtin:tiny-llama first brings every library's code and import-time memory into
    the baseline, so the peaks count the model's tensors and little else. On the CPU, glibc is told to
    hand freed tensor memory straight back (M_MMAP_THRESHOLD 64 KiB); otherwise peak RSS also counts
    heap it keeps after frees.
    """
    if not torch.cuda.is_available():
        _return_freed_memory()
    meter = MemoryMeter()
    warm_up = recipe.model_copy(update={"model": recipe.model.model_copy(update={"name_or_path": TOKENIZER})})
    _train(warm_up, [16] * recipe.training.batch_size, meter)
    return _train(recipe, lengths, meter, profile)


def _return_freed_memory() -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "mallopt"):
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD


def _train(recipe: Recipe, lengths: list[int], meter: MemoryMeter, profile: bool = False) -> dict[str, Any]:
    import gc

    from transformers import TrainerCallback

    from qlora_cli.data import PreparedData
    from qlora_cli.model import add_lora, load_model
    from qlora_cli.trainer import build_trainer

    class StepMeter(TrainerCallback):
        """Wall and CPU time and tokens at each step's end; keeps the Trainer from writing a checkpoint."""

        def __init__(self) -> None:
            self.marks: list[tuple[float, float, int]] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if meter.cuda:
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), time.process_time(), state.num_input_tokens_seen))
            control.should_save = False

    gc.collect()
    if meter.cuda:
        torch.cuda.empty_cache()
    baseline = meter.current()
    meter.reset_peak()
    t = recipe.training
    with meter.held_peak() as loading:
        loaded = load_model(recipe.model, recipe.quantization, gradient_checkpointing=t.gradient_checkpointing)
        if recipe.lora.enabled:
            loaded.model = add_lora(loaded.model, recipe.lora, kind=loaded.kind)
    model = loaded.model
    load_peak, loaded_size = meter.peak() - baseline, meter.current() - baseline
    data = PreparedData(train=random_batches(loaded.model.config.vocab_size, lengths), eval=None)
    trainer = build_trainer(recipe, loaded, data)
    steps = StepMeter()
    trainer.add_callback(steps)
    meter.reset_peak()
    with _profiler(profile) as prof:
        trainer.train()
    # The first step warms up and is left out. Medians resist a busy machine; CPU time (all threads of
    # this process) resists it better still, as long as threads do not spin waiting for each other.
    pairs = list(zip(steps.marks, steps.marks[1:]))
    per_wall = [(n1 - n0) / (t1 - t0) for (t0, _, n0), (t1, _, n1) in pairs]
    per_cpu = [(n1 - n0) / (c1 - c0) for (_, c0, n0), (_, c1, n1) in pairs]
    return {
        **({"profile": top_ops(prof)} if profile else {}),
        "peak": meter.peak() - baseline,
        "memory_kind": meter.kind,
        "load_peak": load_peak,
        "load_allocated_peak": loading.peak - loading.start,
        "loaded_size": loaded_size,
        "largest_shard": largest_shard(Path(recipe.model.name_or_path)),
        "tokens_per_s": statistics.median(per_wall) if pairs else None,
        "tokens_per_cpu_s": statistics.median(per_cpu) if pairs else None,
        "threads": torch.get_num_threads(),
        **stored_bits(model),
    }


def _profiler(enabled: bool) -> Any:
    from contextlib import nullcontext

    from torch.profiler import ProfilerActivity, profile

    if not enabled:
        return nullcontext()
    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []))


def top_ops(prof: Any, n: int = 12) -> list[tuple[str, float]]:
    """The operators that took the most time, by their own (self) time: (name, share of the total)."""
    field = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, field) > 0]
    total = sum(getattr(e, field) for e in events)
    events.sort(key=lambda e: getattr(e, field), reverse=True)
    return [(e.key, getattr(e, field) / total) for e in events[:n]]


def stored_bits(model: Any) -> dict[str, float]:
    """Bits the base model stores per parameter, quantization constants included, and the model's bytes."""
    linear_bits = linear_params = other_bits = other_params = 0
    seen: set[int] = set()

    def nbytes(tensor: torch.Tensor | None) -> int:
        if tensor is None or tensor.untyped_storage().data_ptr() in seen:
            return 0
        seen.add(tensor.untyped_storage().data_ptr())
        return tensor.numel() * tensor.element_size()

    adapters = sum(nbytes(p) for name, p in model.named_parameters() if "lora_" in name)
    for name, param in model.named_parameters():
        state = getattr(param, "quant_state", None)
        if "lora_" in name:
            continue
        if state is not None:  # packed 4-bit: two weights per byte, plus block constants
            constants = [state.absmax, state.code, state.offset]
            if state.state2 is not None:
                constants += [state.state2.absmax, state.state2.code]
            linear_bits += 8 * (nbytes(param) + sum(nbytes(c) for c in constants))
            linear_params += 2 * param.numel() * param.element_size()
        elif param.dtype == torch.int8:  # LLM.int8: one fp32 scale per row
            linear_bits += 8 * (nbytes(param) + nbytes(getattr(param, "SCB", None)))
            linear_params += param.numel()
        elif param.ndim == 2 and "embed" not in name and "lm_head" not in name:
            linear_bits += 8 * nbytes(param)
            linear_params += param.numel()
        else:
            other_bits += 8 * nbytes(param)
            other_params += param.numel()
    buffers = sum(nbytes(b) for b in model.buffers())
    return {
        "bits_per_linear_param": linear_bits / max(linear_params, 1),
        "bits_per_base_param": (linear_bits + other_bits) / max(linear_params + other_params, 1),
        "model_bytes": (linear_bits + other_bits) // 8 + adapters + buffers,
    }


def largest_shard(folder: Path) -> int:
    return max((f.stat().st_size for f in folder.glob("*.safetensors")), default=0)


def isolated(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run fn in a fresh interpreter; a child killed for memory comes back as {'error': ...}."""
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            return {"error": "the process died (out of memory?)"}


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path | None, payload: Any) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
