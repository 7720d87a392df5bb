"""Shared by scripts/bench_*.py (not part of the installed package): peak memory, speed and storage of real
training steps, to measure what the planner predicts.

scripts/bench_*.py and tests/test_plan.py run `qlora train`'s own pieces (load_model, add_lora,
build_trainer) on random-init LLaMA checkpoints or a real model; `measure_plain` runs scripts/plain_qlora.py
(the baseline without this project) the same way. Each measurement runs in a fresh process (`isolated`),
so memory that one run freed cannot hide the next run's peak. `training_flops` counts a step's model
FLOPs and `matmul_rate` measures what this machine's matmuls reach: bench_train's utilisation.
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

import qlora_cli  # noqa: F401  (before transformers: it drops bitsandbytes' import-time `kernels` message)
import torch
from transformers import TrainerCallback

from qlora_cli.config import Recipe, validate_recipe
from qlora_cli.dropout import PROFILER_LABEL as CPU_DROPOUT_LABEL
from qlora_cli.errors import QloraError
from qlora_cli.memory import MemoryMeter
from qlora_cli.model import dtype_name
from qlora_cli.model_kind import IGNORE_INDEX
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
# The LoRA family (issue 32), each on the recipe's own base: compared with `qlora` (plain LoRA on NF4 + DQ).
LORA_FAMILY: dict[str, dict[str, Any]] = {
    "dora": {"lora": {"dora": True}},
    "rslora": {"lora": {"rslora": True}},
    "pissa": {"lora": {"init": "pissa"}},
    "olora": {"lora": {"init": "olora"}},
    "loftq": {"lora": {"init": "loftq"}},
    "tokens": {"lora": {"trainable_tokens": ["<|tool|>", "<|tool_result|>"]}},
}

# Preference methods (issue 33) on the same setups: a row is a pair of replies to one prompt (`--method`).
METHODS: dict[str, dict[str, Any]] = {
    "sft": {},
    "dpo": {"training": {"method": "dpo"}, "data": {"dataset": "preference"}},
    "dpo-precomputed": {"training": {"method": "dpo"}, "data": {"dataset": "preference"},
                        "preference": {"reference": "precomputed"}},
    "orpo": {"training": {"method": "orpo"}, "data": {"dataset": "preference"}},
}  # fmt: skip


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
    checkpoint: Path, setup: str, shape: RunShape, output_dir: Path, optim: str = "paged_adamw_32bit",
    method: str = "sft",
) -> Recipe:  # fmt: skip
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
    if method not in METHODS:
        raise QloraError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    raw = deep_merge(deep_merge(raw, SETUPS[setup]), METHODS[method])
    return validate_recipe(raw, source=f"benchmark setup {setup}, method {method}")


def measure_setup(
    checkpoint: Path, setup: str, shape: RunShape, lengths: list[int], profile: bool = False, *, for_memory: bool,
    method: str = "sft",
) -> tuple[Recipe, dict[str, Any]]:  # fmt: skip
    """Train one setup in a fresh process with a throwaway output_dir: the recipe it ran, and what was measured."""
    with tempfile.TemporaryDirectory() as out:
        recipe = bench_recipe(checkpoint, setup, shape, Path(out), method=method)
        return recipe, isolated(measure_training, recipe, lengths, profile, for_memory)


def random_batches(vocab: int, lengths: list[int], seed: int = 0) -> Any:
    """Token ids the model trains on (loss on every token): `qlora train`'s tokenized columns."""
    from datasets import Dataset

    rng = random.Random(seed)
    ids = [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "length": lengths})


def random_pairs(tokenizer: Any, rows: int, prompt_tokens: int, reply_tokens: int) -> Any:
    """Preference rows of about these lengths in tokens, as text (TRL tokenizes; a word of one token, repeated)."""
    from datasets import Dataset

    def text(n: int, word: str) -> str:
        return " ".join([word] * n)

    return Dataset.from_dict({
        "prompt": [text(prompt_tokens, "the")] * rows,
        "chosen": [text(reply_tokens, "yes")] * rows,
        "rejected": [text(reply_tokens, "no")] * rows,
    })  # fmt: skip


def measure_training(
    recipe: Recipe, lengths: list[int] | None, profile: bool = False, for_memory: bool = False
) -> dict[str, Any]:
    """Load as `qlora train` does and train: peak memory, speed, model FLOP/s, storage.

    `lengths`: random token rows of these lengths (len(lengths) / batch_size steps); None: the recipe's own
    data, prepared as `qlora train` prepares it. A one-step run of builtin:tiny-llama first brings every
    library's code and import-time memory into the baseline, so the peaks count the model's tensors and
    little else. `for_memory`: on the CPU, glibc is told to hand freed tensor memory straight back
    (M_MMAP_THRESHOLD 64 KiB), or peak RSS also counts heap it keeps after frees. Not for speed: every
    tensor then maps fresh pages, which halved training speed on SmolLM2-135M.
    """
    if for_memory and not torch.cuda.is_available():
        _return_freed_memory()
    meter = MemoryMeter()
    warm_up = recipe.model_copy(update={"model": recipe.model.model_copy(update={"name_or_path": TOKENIZER})})
    _train(warm_up, [16] * recipe.training.batch_size, meter)
    return _train(recipe, lengths, meter, profile)


def measure_plain(argv: list[str], profile: bool = False) -> dict[str, Any]:
    """scripts/plain_qlora.py with `argv`, measured for speed as `measure_training` measures `qlora train`.

    Its own one-step run on builtin:tiny-llama warms up first (see `measure_training`).
    """
    import gc

    import plain_qlora

    from qlora_cli.builtin import resolve_builtin_model

    meter = MemoryMeter()
    with tempfile.TemporaryDirectory() as out:
        tiny = ["--model", resolve_builtin_model(TOKENIZER), "--max-steps", "1", "--output-dir", out]
        _measured_run(plain_qlora.build_trainer([*argv, *tiny]), meter)
    gc.collect()
    baseline = meter.current()
    meter.reset_peak()
    with meter.held_peak() as loading:
        trainer = plain_qlora.build_trainer(argv)
    load_peak, loaded_size = meter.peak() - baseline, meter.current() - baseline
    measured = _measured_run(trainer, meter, profile)
    return {
        **measured,
        "peak": meter.peak() - baseline,
        "load_peak": load_peak,
        "load_allocated_peak": loading.peak - loading.start,
        "loaded_size": loaded_size,
        "compute_dtype": dtype_name(torch.bfloat16 if trainer.args.bf16 else torch.float32),
        **stored_bits(trainer.model),
    }


def _return_freed_memory() -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "mallopt"):
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD


def _train(recipe: Recipe, lengths: list[int] | None, meter: MemoryMeter, profile: bool = False) -> dict[str, Any]:
    import gc

    from qlora_cli.data import PreparedData, prepare_data
    from qlora_cli.model import add_lora, load_model, start_from_16bit
    from qlora_cli.data.preference import PreferenceData
    from qlora_cli.plan import checkpointing_for_run
    from qlora_cli.preference import build_preference_trainer
    from qlora_cli.trainer import build_trainer

    gc.collect()
    if meter.cuda:
        torch.cuda.empty_cache()
    checkpointing = checkpointing_for_run(recipe)  # as `qlora train` decides `auto`, on this machine
    recipe = recipe.model_copy(update={"training": recipe.training.model_copy(
        update={"gradient_checkpointing": checkpointing.on})})  # fmt: skip
    baseline = meter.current()
    meter.reset_peak()
    t = recipe.training
    started = time.perf_counter()
    with meter.held_peak() as loading:
        loaded = load_model(recipe.model, recipe.quantization, gradient_checkpointing=t.gradient_checkpointing)
        if recipe.lora.enabled:
            loaded.model = add_lora(loaded.model, recipe.lora, kind=loaded.kind, tokenizer=loaded.tokenizer)
            if recipe.lora.changes_base:
                start_from_16bit(loaded, recipe.model, recipe.lora, None)
    load_seconds = time.perf_counter() - started
    load_peak, loaded_size = meter.peak() - baseline, meter.current() - baseline
    if t.method != "sft":  # generated pairs, every sequence full length: the prompt, then each reply to the limit
        if lengths is None:
            raise QloraError(f"training.method={t.method}: the benchmarks train on generated pairs, not the recipe's")
        d = recipe.data
        rows = random_pairs(loaded.tokenizer, len(lengths), d.source_max_len, d.target_max_len)
        trainer = build_preference_trainer(recipe, loaded, PreferenceData(rows, None, t.method))
        data = PreparedData(train=rows, eval=None)
    else:
        if lengths is None:
            data = prepare_data(recipe.data, loaded.tokenizer, kind=loaded.kind, seed=t.seed)
        else:
            data = PreparedData(train=random_batches(loaded.model.config.vocab_size, lengths), eval=None)
        trainer = build_trainer(recipe, loaded, data)
    measured = _measured_run(trainer, meter, profile)
    peak = meter.peak() - baseline
    return {
        **measured,
        "peak": peak,
        "eval_loss": trainer.evaluate(eval_dataset=data.eval)["eval_loss"] if data.eval is not None else None,
        "load_peak": load_peak,
        "load_seconds": load_seconds,
        "load_allocated_peak": loading.peak - loading.start,
        "loaded_size": loaded_size,
        "largest_shard": largest_shard(Path(loaded.source)),
        "compute_dtype": dtype_name(loaded.compute_dtype),
        "checkpointing_reason": checkpointing.reason,
        **stored_bits(loaded.model),
    }


class _StepMeter(TrainerCallback):
    """Wall and CPU time at each step's end; keeps the Trainer from writing a checkpoint."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list[tuple[float, float]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), time.process_time()))
        control.should_save = False


class _ProfilerStep(TrainerCallback):
    """Tells torch.profiler's schedule where each step ends."""

    def __init__(self, prof: Any) -> None:
        self.prof = prof

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.prof.step()


class _BatchRecorder:
    """Wraps a Trainer's collator: the rows of every batch it builds, in order (batch i is step i's)."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, torch.Tensor]]) -> None:
        self.collate = collate
        self.batches: list[tuple[list[int], int]] = []  # (tokens of each row, padded width)

    def __call__(self, features: list[Any]) -> dict[str, torch.Tensor]:
        batch = self.collate(features)
        self.batches.append((row_lengths(batch), batch["input_ids"].shape[1]))
        return batch


def row_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """Tokens each right-padded row trains on: up to its last label (its EOS), else its attention mask.

    Not the attention mask alone: qlora.py's collator masks every pad-token id, so where EOS is the pad
    token (SmolLM2) it would miss each row's EOS.
    """
    if "labels" not in batch:  # a preference batch (TRL's collator): its replies run to the attention mask's end
        return batch["attention_mask"].sum(dim=1).tolist()
    labelled = batch["labels"] != IGNORE_INDEX
    width = labelled.shape[1]
    last = width - torch.flip(labelled, dims=[1]).int().argmax(dim=1)
    by_mask = batch["attention_mask"].sum(dim=1) if "attention_mask" in batch else torch.full_like(last, width)
    return torch.where(labelled.any(dim=1), last, by_mask).tolist()


def _measured_run(trainer: Any, meter: MemoryMeter, profile: bool = False) -> dict[str, Any]:
    """Train, timing every step; the first warms up and is left out of every rate.

    Medians resist a busy machine; CPU time (all threads of this process) resists it better still, as
    long as threads do not spin waiting for each other.
    """
    steps = _StepMeter(meter.cuda)
    trainer.add_callback(steps)
    recorder = _BatchRecorder(trainer.data_collator)
    trainer.data_collator = recorder
    n_steps = trainer.args.max_steps
    meter.reset_peak()
    with _profiler(profile and n_steps > 1, n_steps) as prof:
        if prof is not None:
            trainer.add_callback(_ProfilerStep(prof))
        trainer.train()
    work = training_work(trainer.model)
    timed = list(zip(steps.marks, steps.marks[1:], recorder.batches[1:]))
    seconds = [t1 - t0 for (t0, _), (t1, _), _ in timed]
    cpu_seconds = [c1 - c0 for (_, c0), (_, c1), _ in timed]
    tokens = [sum(rows) for _, _, (rows, _) in timed]
    flops = [training_flops(work.arch, rows, **work.counting())["total"] for _, _, (rows, _) in timed]
    real = sum(sum(rows) for rows, _ in recorder.batches[: len(steps.marks)])
    padded = sum(len(rows) * width for rows, width in recorder.batches[: len(steps.marks)])
    losses = [e["train_loss"] for e in trainer.state.log_history if "train_loss" in e]
    out = {
        "tokens_per_s": statistics.median(n / s for n, s in zip(tokens, seconds)) if timed else None,
        "tokens_per_cpu_s": statistics.median(n / s for n, s in zip(tokens, cpu_seconds)) if timed else None,
        "flops_per_s": statistics.median(f / s for f, s in zip(flops, seconds)) if timed else None,
        "step_seconds": seconds,
        "step_tokens": tokens,
        "step_flops": flops,
        "batch_tokens": statistics.median(len(rows) * width for _, _, (rows, width) in timed) if timed else None,
        "padding_efficiency": real / max(padded, 1),
        "train_loss": losses[-1] if losses else None,
        "threads": torch.get_num_threads(),
        "memory_kind": meter.kind,
        **work.describe(),
    }
    if prof is not None:
        out["profile"] = top_ops(prof)
        out["profile_buckets"] = profile_buckets(prof.events(), work.arch.vocab, sum(seconds))
    return out


# --------------------------------------------------------------------------- model FLOPs and the matmul rate


@dataclass(frozen=True)
class TrainingWork:
    """What one training step computes, read off the model that trained (not the recipe that asked for it)."""

    arch: Architecture
    lora_r: int | None  # None: full finetuning, the base's weight gradients too
    lora_modules: tuple[str, ...]
    checkpointing: bool

    def counting(self) -> dict[str, Any]:
        return {"lora_r": self.lora_r, "lora_modules": self.lora_modules, "checkpointing": self.checkpointing}

    def describe(self) -> dict[str, Any]:
        return {"hidden": self.arch.hidden, "intermediate": self.arch.intermediate, "vocab": self.arch.vocab,
                **self.counting(), "lora_modules": list(self.lora_modules)}  # fmt: skip


def training_work(model: Any) -> TrainingWork:
    from qlora_cli.plan import architecture_from_config

    arch = architecture_from_config(model.config, getattr(model.config, "name_or_path", "model"))
    checkpointing = bool(model.is_activation_checkpointing)
    peft_config = getattr(model, "peft_config", {}).get("default")
    if peft_config is None:
        return TrainingWork(arch, None, (), checkpointing)
    targets = peft_config.target_modules
    modules = tuple(arch.linears()) if isinstance(targets, str) else tuple(n for n in arch.linears() if n in targets)
    return TrainingWork(arch, peft_config.r, modules, checkpointing)


def training_flops(
    arch: Architecture,
    lengths: list[int],
    *,
    lora_r: int | None,
    lora_modules: tuple[str, ...] = (),
    checkpointing: bool,
) -> dict[str, float]:
    """Model FLOPs of one training step on rows of `lengths` tokens (a multiply-add counts 2).

    Per token, with N the decoder's linear weights (q, k, v, o, gate, up, down of every layer), h the
    hidden size, V the vocabulary, and r (in + out) per LoRA-adapted layer; per row of L tokens, the
    P = L (L + 1) / 2 query-key pairs a causal mask keeps:
    - forward: 2 N (linear layers) + 2 h V (head) + 2 r (in + out) (LoRA) per token, and
      4 heads head_dim per pair (scores and the weighted sum of values)
    - recompute, with gradient checkpointing: the decoder layers' forward again (the head is not recomputed)
    - backward through the frozen base: activation gradients only, as much as the forward: 2 N + 2 h V
      per token, attention 8 heads head_dim per pair (gradients of queries, keys and values); LoRA twice its
      forward (the gradients of its input and of its two matrices); full finetuning (`lora_r` None) adds
      the weight gradients of every linear layer and of the head (2 N + 2 h V)
    Not counted: embeddings (a lookup), norms, activations, rotary embeddings, softmax, loss, optimizer.
    """
    tokens = sum(lengths)
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    per_pair = 4 * arch.heads * (arch.head_dim or arch.hidden // arch.heads) * arch.layers
    linear, head = 2 * arch.linear_params * tokens, 2 * arch.hidden * arch.vocab * tokens
    lora = 0 if lora_r is None else 2 * lora_r * arch.layers * tokens * sum(
        n_in + n_out for name, (n_in, n_out) in arch.linears().items() if name in lora_modules)  # fmt: skip
    layers_forward = linear + per_pair * pairs + lora
    forward = layers_forward + head
    backward = linear + head + 2 * per_pair * pairs + 2 * lora + (linear + head if lora_r is None else 0)
    recompute = layers_forward if checkpointing else 0
    return {"forward": forward, "recompute": recompute, "backward": backward, "total": forward + recompute + backward}


def matmul_rate(dtype: torch.dtype, m: int, k: int, n: int, seconds: float = 2.0) -> float:
    """FLOP/s of a linear layer's training matmuls here: y = x Wᵀ, then the input's gradient dy W.

    x is (m, k), W (n, k): pick m the tokens of a batch, k and n a linear layer's sides. Median of
    repeats for at least `seconds` (and at least 5), after one to warm up.
    """
    x, weight, dy = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(m, n, dtype=dtype)

    def once() -> float:
        started = time.perf_counter()
        torch.nn.functional.linear(x, weight)
        dy @ weight
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - started

    if torch.cuda.is_available():
        x, weight, dy = x.cuda(), weight.cuda(), dy.cuda()
    once()
    times: list[float] = []
    while len(times) < 5 or sum(times) < seconds:
        times.append(once())
    return 4 * m * k * n / statistics.median(times)


# --------------------------------------------------------------------------- profiles


def _profiler(enabled: bool, steps: int = 0) -> Any:
    """torch.profiler over every step but the first (which it traces to warm up, then drops); None: off."""
    from contextlib import nullcontext

    from torch.profiler import ProfilerActivity, profile, schedule

    if not enabled:
        return nullcontext()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    steps_traced = schedule(wait=0, warmup=1, active=steps - 1, repeat=1)
    return profile(activities=activities, record_shapes=True, schedule=steps_traced)


def top_ops(prof: Any, n: int = 12) -> list[tuple[str, float]]:
    """The operators that took the most time, by their own (self) time: (name, share of the total)."""
    field = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, field) > 0]
    total = sum(getattr(e, field) for e in events)
    events.sort(key=lambda e: getattr(e, field), reverse=True)
    return [(e.key, getattr(e, field) / total) for e in events[:n]]


OUTSIDE = "outside operators (Python, Trainer)"
BUCKETS = ("dequantization", "attention", "head + loss", "optimizer + clipping", "data collation", "dtype casts",
           "LoRA dropout", "linear layers (base + LoRA)", "other operators (norms, activations, residuals, copies)",
           OUTSIDE)  # fmt: skip
_MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}
_MATMUL_NODES = ("mmbackward", "addmmbackward", "bmmbackward", "matmul4bit", "gemm_4bit")
# CpuDropout's forward is a labelled range; its backward is the only MaskedFillBackward0 (SDPA does the masking)
_DROPOUT = {"aten::dropout", "aten::native_dropout", "aten::bernoulli_", "aten::feature_dropout",
            CPU_DROPOUT_LABEL, "MaskedFillBackward0"}  # fmt: skip
_LOSS = ("log_softmax", "logsoftmax", "nll_loss", "nllloss", "cross_entropy")


def profile_buckets(events: list[Any], vocab: int, wall_s: float) -> dict[str, float]:
    """Seconds of CPU self time in each of BUCKETS over the profiled steps.

    An operator belongs to the first bucket that it or an operator it runs inside matches: the optimizer's
    and the DataLoader's own profiler ranges; bitsandbytes' dequantize ops; scaled-dot-product attention
    (forward and backward); anything with a vocabulary-wide tensor (the head's matmuls and the logits) or
    a loss op; dtype conversions (`.to`, forward and backward); dropout; then the remaining matmuls and
    their autograd nodes. Outside operators: the
    profiler's per-step range less the operators inside it (Python, the Trainer's loop), and what fell
    between steps.
    """
    seconds = dict.fromkeys(BUCKETS, 0.0)
    for event in events:
        seconds[_bucket(event, vocab)] += event.self_cpu_time_total / 1e6
    seconds[OUTSIDE] += max(wall_s - sum(seconds.values()), 0.0)
    return seconds


def _bucket(event: Any, vocab: int) -> str:
    chain = []
    while event is not None:
        chain.append(event)
        event = event.cpu_parent
    names = [e.name for e in chain]
    lowered = [name.lower() for name in names]
    if names[0].startswith("ProfilerStep"):
        return OUTSIDE
    if any(name.startswith("Optimizer.") for name in names) or names[0].startswith("aten::_foreach_"):
        return "optimizer + clipping"
    if any("dataloader" in name for name in lowered):
        return "data collation"
    if any("dequantize" in name for name in lowered):
        return "dequantization"
    if any("scaled_dot_product" in name or "scaleddotproduct" in name for name in lowered):
        return "attention"
    if "embedding" not in lowered[0] and any(
        any(marker in name for marker in _LOSS) or any(vocab in shape for shape in (e.input_shapes or []))
        for name, e in zip(lowered, chain)
    ):
        return "head + loss"
    if any(name in ("aten::to", "aten::_to_copy") or name.startswith("ToCopyBackward") for name in names):
        return "dtype casts"
    if any(name in _DROPOUT for name in names):
        return "LoRA dropout"
    if names[0] in _MATMULS or any(node in lowered[0] for node in _MATMUL_NODES):
        return "linear layers (base + LoRA)"
    return BUCKETS[-2]


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
