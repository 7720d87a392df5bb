"""`qlora train`: recipe -> quantized model + LoRA + data -> Hugging Face Trainer -> PEFT artifacts."""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import (
    ProgressCallback,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from qlora_cli.checkpoint import (
    RECIPE_FILE,
    AtomicCheckpoints,
    SeededLengthGrouping,
    check_recipe_drift,
    clear_staging,
    final_artifacts,
    find_resume_checkpoint,
    latest_checkpoint,
    restore_without_training,
    trained_steps,
)
from qlora_cli.config import Recipe, check_trainer_choices
from qlora_cli.data import PaddingCollator, PreparedData, prepare_data
from qlora_cli.demo import resolve_builtin_model
from qlora_cli.distributed import announce_processes, check_launch, fsdp_config, join_processes, quiet_replica
from qlora_cli.errors import QloraError, refusing_pickled_code
from qlora_cli.guards import GracefulStop, NonFiniteLossGuard, check_adapter, fingerprint
from qlora_cli.model import LoadedModel, add_lora, count_parameters, load_model

COMPLETED = "completed"
METRICS_FILE = "metrics.json"


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any]
    losses: list[tuple[int, float]] = field(default_factory=list)


def train(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: bool = False,
    resume_from: Path | None = None,
    force: bool = False,
) -> TrainResult:
    """`resume` continues from the newest complete checkpoint in output_dir, `resume_from` from a given one."""
    check_trainer_choices(recipe.training)
    out = Path(recipe.output_dir)
    check_trackers(recipe.training.report_to)
    check_launch(recipe)
    resume = resume or resume_from is not None
    if overwrite and resume:
        raise QloraError("--overwrite and --resume contradict each other: pick one")
    processes = join_processes()
    if processes.is_main_process:
        prepare_output_dir(out, overwrite=overwrite, resume=resume)
    else:
        quiet_replica()
    processes.wait_for_everyone()
    checkpoint = find_resume_checkpoint(resume_from or out) if resume else None
    if checkpoint is not None:
        check_recipe_drift(checkpoint, recipe, force=force)
    # Built before seeding (so LoRA's init never depends on whether the cache was cold) and by rank 0 first
    # (under a process group only rank 0 writes a model's weights).
    with processes.main_process_first():
        for name in filter(None, (recipe.model.name_or_path, recipe.model.tokenizer)):
            resolve_builtin_model(name)
    set_seed(recipe.training.seed)
    t = recipe.training  # under FSDP, FSDP checkpoints activations itself (distributed.fsdp_config)
    loaded = load_model(
        recipe.model, recipe.quantization, gradient_checkpointing=t.gradient_checkpointing and not t.fsdp, fsdp=t.fsdp
    )
    model = add_lora(loaded.model, recipe.lora, seq2seq=loaded.seq2seq) if recipe.lora.enabled else loaded.model
    data = prepare_data(recipe.data, loaded.tokenizer, seq2seq=loaded.seq2seq, seed=recipe.training.seed)
    trainer = build_trainer(recipe, loaded, model, data)
    stop, nan_guard = GracefulStop(), NonFiniteLossGuard(recipe.training.max_bad_steps)
    saver = AtomicCheckpoints(out, recipe, keep=recipe.training.save_total_limit)
    for callback in (SeededLengthGrouping(recipe.training.seed), stop, nan_guard, saver):  # saver acts last
        trainer.add_callback(callback)
    is_main = trainer.is_world_process_zero()
    if is_main:
        _announce(recipe, model, data)
        announce_processes(recipe.training, trainer.args.world_size)
        (out / RECIPE_FILE).write_text(recipe.to_yaml())

    held_out = _held_out(recipe, data)
    before = _exact_match(recipe, loaded, model, held_out) if held_out else None

    initial = fingerprint(model)
    started = time.perf_counter()
    with stop.handling_signals(), saver.reporting_failures(), refusing_pickled_code(checkpoint or out):
        if checkpoint is not None and trained_steps(checkpoint) >= recipe.training.max_steps:
            restore_without_training(trainer, checkpoint)  # e.g. the final save had failed
        else:
            with _ending_callbacks_on_failure(trainer):
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    runtime = time.perf_counter() - started
    if nan_guard.stopped_at is not None:
        raise nan_guard.failure(latest_checkpoint(out))
    if stop.signum is not None and trainer.state.global_step < trainer.state.max_steps:
        raise stop.interrupted(trainer.state, out)

    metrics = _metrics(trainer, model, runtime)
    if held_out:
        metrics["exact_match_before"] = before
        metrics["exact_match_after"] = _exact_match(recipe, loaded, model, held_out)
        metrics["exact_match_samples"] = len(held_out[0])
    # Under FSDP every rank takes part in gathering the sharded adapter; rank 0 alone writes it.
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if t.fsdp else None
    if is_main:
        for warning in check_adapter(model, initial):
            print(f"warning: {warning}", file=sys.stderr)
        with final_artifacts(out) as staged:
            model.save_pretrained(staged, state_dict=state_dict)
            loaded.tokenizer.save_pretrained(staged)
            (staged / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        write_report_and_card(out, recipe, metrics, trainer.state)
        (out / COMPLETED).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    return TrainResult(out, metrics, losses)


@contextmanager
def _ending_callbacks_on_failure(trainer: Any) -> Iterator[None]:
    """Trainer skips on_train_end when it raises: close the progress bar and trackers before the error line."""
    try:
        yield
    except Exception:
        trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
        raise


def prepare_output_dir(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Never clobber a finished run or a folder that is not ours."""
    if out.exists() and any(out.iterdir()):
        is_run = (out / RECIPE_FILE).exists()
        if not is_run:
            raise QloraError(f"output_dir {out} exists and is not a qlora run folder: choose another output_dir")
        if overwrite:
            shutil.rmtree(out)
        elif (out / COMPLETED).exists():
            raise QloraError(f"output_dir {out} holds a completed run: pass --overwrite to replace it")
        elif not resume and any(out.glob("checkpoint-*")):
            raise QloraError(
                f"output_dir {out} holds checkpoints of an unfinished run: pass --resume to continue it "
                "or --overwrite to start over"
            )
    out.mkdir(parents=True, exist_ok=True)
    clear_staging(out)


def training_arguments(recipe: Recipe, compute_dtype: torch.dtype, *, seq2seq: bool, has_eval: bool) -> Any:
    t = recipe.training
    on_gpu = torch.cuda.is_available()
    evaluate = has_eval and t.eval_steps is not None
    args_class = Seq2SeqTrainingArguments if seq2seq else TrainingArguments
    return args_class(
        output_dir=recipe.output_dir,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a ratio of max_steps
        max_steps=t.max_steps,
        optim=t.optim,
        max_grad_norm=t.max_grad_norm,
        adam_beta2=t.adam_beta2,
        weight_decay=t.weight_decay,
        activation_checkpointing=False,  # enabled (non-reentrant) when the model was loaded
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # checkpoint.prune applies it once a checkpoint is published
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_steps if evaluate else None,
        seed=t.seed,
        data_seed=t.seed,
        report_to=t.report_to,
        bf16=on_gpu and compute_dtype == torch.bfloat16,
        fp16=on_gpu and compute_dtype == torch.float16,
        use_cpu=not on_gpu,
        remove_unused_columns=False,
        label_names=["labels"],
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=on_gpu,
        deepspeed=t.deepspeed,
        fsdp=t.fsdp,
        fsdp_config=fsdp_config(t) if t.fsdp else None,
        log_level_replica="error",
    )


class QloraTrainer(Trainer):
    """The Trainer, with evaluation that leaves training exactly as it would have been without it.

    Starting the eval DataLoader draws its base seed from torch's global generator, which LoRA dropout reads
    next: without this, a run with `eval_steps` trained a different adapter from the same run without.
    """

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return super().evaluate(*args, **kwargs)


class QloraSeq2SeqTrainer(QloraTrainer, Seq2SeqTrainer):
    pass


def build_trainer(recipe: Recipe, loaded: LoadedModel, model: Any, data: PreparedData) -> Any:
    args = training_arguments(recipe, loaded.compute_dtype, seq2seq=loaded.seq2seq, has_eval=data.eval is not None)
    trainer_class = QloraSeq2SeqTrainer if loaded.seq2seq else QloraTrainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval if args.eval_strategy != "no" else None,
        data_collator=PaddingCollator(loaded.tokenizer.pad_token_id),
        processing_class=loaded.tokenizer,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(StepStats())
    trainer.add_callback(TrainingProgress())
    if recipe.eval.mmlu:
        from qlora_cli.eval.mmlu import MmluCallback

        trainer.add_callback(MmluCallback(trainer, recipe.eval.mmlu, seq2seq=loaded.seq2seq))
    return trainer


def check_trackers(report_to: list[str]) -> None:
    """Fail before loading the model when a tracker is not installed (transformers fails only after)."""
    from transformers.integrations import is_mlflow_available, is_tensorboard_available, is_wandb_available

    installed = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    for name in report_to:
        if name in installed and not installed[name]():
            raise QloraError(f"training.report_to: {name} is not installed: pip install 'qlora-cli[{name}]'")


def write_report_and_card(out: Path, recipe: Recipe, metrics: dict[str, Any], state: Any) -> None:
    """Keep the log history (the Trainer saves it only inside checkpoints), then report.md and README.md."""
    from qlora_cli.model_card import write_model_card
    from qlora_cli.report import TRAINER_STATE, write_report

    state.save_to_json(str(out / TRAINER_STATE))
    write_report(out)
    write_model_card(out, recipe, metrics, log_history=state.log_history)


class TrainingProgress(TrainerCallback):
    """One progress bar with loss, learning rate and non-padding tokens/s, instead of printed log dicts."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="Training", dynamic_ncols=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.bar is not None and logs and "mmlu_accuracy" in logs:
            self.bar.write(f"step {state.global_step}: MMLU {100 * logs['mmlu_accuracy']:.1f}% (mean over subjects)")
        if self.bar is None or not logs or "loss" not in logs:
            return
        rate = state.log_history[-1].get("tokens_per_s", 0)  # StepStats, which runs first, measured it
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}", tok_s=f"{rate:.0f}")

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any) -> None:
        if self.bar is not None and metrics and "eval_loss" in metrics:
            self.bar.write(f"step {state.global_step}: eval_loss {metrics['eval_loss']:.4f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StepStats(TrainerCallback):
    """Adds tokens/s and memory to each logged training entry of the log history, for `qlora report`.

    Tokens/s counts only time spent inside optimizer steps, so evaluation and checkpointing do not
    show up as slow training.
    """

    def __init__(self) -> None:
        self._step_started = 0.0
        self._seconds = 0.0
        self._tokens = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._seconds, self._tokens = 0.0, state.num_input_tokens_seen

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step_started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._seconds += time.perf_counter() - self._step_started

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs:
            return
        current = memory_bytes()
        state.log_history[-1].update(  # the entry the Trainer appended for these logs
            tokens_per_s=round((state.num_input_tokens_seen - self._tokens) / max(self._seconds, 1e-9), 1),
            memory_bytes=current,
            peak_memory_bytes=max(current, peak_memory_bytes()),  # the kernel's peak RSS can lag a little
        )
        self._seconds, self._tokens = 0.0, state.num_input_tokens_seen


def memory_bytes() -> int:
    """In use now: allocated CUDA memory, or the process's resident set on the CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.memory_allocated())
    import psutil

    return psutil.Process().memory_info().rss


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def _metrics(trainer: Any, model: Any, runtime: float) -> dict[str, Any]:
    state = trainer.state
    losses = [e["loss"] for e in state.log_history if "loss" in e]
    train_loss = next((e["train_loss"] for e in reversed(state.log_history) if "train_loss" in e), None)
    trainable, total = count_parameters(model)
    return {
        "train_loss": train_loss,
        "final_logged_loss": losses[-1] if losses else None,
        "steps": state.global_step,
        "runtime_s": round(runtime, 2),
        "tokens": state.num_input_tokens_seen,
        "tokens_per_s": round(state.num_input_tokens_seen / max(runtime, 1e-9), 1),
        "peak_memory_bytes": peak_memory_bytes(),
        "peak_memory_kind": "cuda_max_allocated" if torch.cuda.is_available() else "process_peak_rss",
        "processes": trainer.args.world_size,
        "trainable_params": trainable,
        "total_params": total,
    }


def _held_out(recipe: Recipe, data: PreparedData) -> tuple[list[str], list[str]] | None:
    n = recipe.eval.exact_match_samples
    if not n or data.eval is None:
        return None
    subset = data.eval.select(range(min(n, len(data.eval))))
    return subset["source"], subset["target"]


def _exact_match(recipe: Recipe, loaded: LoadedModel, model: Any, held_out: tuple[list[str], list[str]]) -> float:
    from qlora_cli.eval.exact_match import exact_match

    sources, targets = held_out
    return exact_match(
        model, loaded.tokenizer, sources, targets, seq2seq=loaded.seq2seq, max_new_tokens=recipe.eval.max_new_tokens
    )


def _announce(recipe: Recipe, model: Any, data: PreparedData) -> None:
    trainable, total = count_parameters(model)
    q = recipe.quantization
    base = f"{q.bits}-bit" + (f" {q.quant_type}{' + double quant' if q.double_quant else ''}" if q.bits == 4 else "")
    print(
        f"Model {recipe.model.name_or_path} ({base}); trainable {trainable:,} of {total:,} parameters "
        f"({100 * trainable / max(total, 1):.2f}%)",
        file=sys.stderr,
    )
    eval_n = len(data.eval) if data.eval is not None else 0
    skipped = sum(data.skipped.values())
    note = f"; skipped {skipped} ({', '.join(f'{n} {r}' for r, n in data.skipped.most_common())})" if skipped else ""
    print(f"Data {recipe.data.dataset}: {len(data.train):,} train, {eval_n:,} eval examples{note}", file=sys.stderr)
