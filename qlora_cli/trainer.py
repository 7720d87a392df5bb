"""The Hugging Face Trainer with what a QLoRA run needs inside it, each through one overridable method.

As TRL's SFTTrainer does, the additions live in one class instead of callbacks that must run in a given order:
`QloraOverrides`, put before any Trainer class (the Trainer itself for sft, TRL's DPOTrainer, ORPOTrainer and
KTOTrainer for the preference methods, qlora_cli/preference.py), each override calling the class's own:

- `_get_output_dir`, `_save_checkpoint`: the Trainer writes every checkpoint into `.staging/`; it is
  published (renamed into place, with its recipe) only once complete, then old ones are pruned.
- `get_batch_samples`, `log`: each logged training entry gets tokens/s (time in training steps only:
  evaluation, MMLU and saving pause the clock) and memory in use and at peak.
- `_get_train_sampler`: the group-by-length order is a function of (seed, epoch), so a resume replays it.
- `evaluate`: runs on a forked RNG, so evaluating never changes what is trained.
- `compute_loss`: on the chunked and fused loss paths (qlora_cli/loss.py) the model computes one position's
  logits and the Trainer's `compute_loss_func` the loss from the final hidden state; the Trainer still pops
  the labels, counts num_items_in_batch and scales for accumulation and processes, in training and evaluation.
- `train`: a run already at max_steps is only restored (Trainer would run one step past it), and a failure
  still closes the progress bar and trackers.

tests/test_trainer.py pins the Trainer behaviour each of these relies on.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from qlora_cli.config import Recipe
from qlora_cli.data import PaddingCollator, PreparedData
from qlora_cli.data.packing import FLASH_ATTENTION, real_tokens
from qlora_cli.distributed import fsdp_config
from qlora_cli.errors import QloraError
from qlora_cli.guards import GracefulStop, NonFiniteLossGuard
from qlora_cli.loss import HeadLoss, loss_for_model
from qlora_cli.memory import MemoryMeter
from qlora_cli.model import LoadedModel, computes_logits_where_asked
from qlora_cli.run_folder import TRAINER_STATE_FILE, RunFolder, checkpoint_name, trained_steps


class QloraOverrides:
    """The one place each Trainer override lives, whichever Trainer class follows it in the bases."""

    def __init__(self, *args: Any, recipe: Recipe, head_loss: HeadLoss | None = None, **kwargs: Any) -> None:
        """`head_loss`: the chunked or fused loss path; None: the Trainer class's own loss."""
        if head_loss is not None:
            kwargs["compute_loss_func"] = head_loss
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.recipe = recipe
        self.head_loss = head_loss
        self.run = RunFolder(Path(recipe.output_dir))
        self.stop = GracefulStop()
        self.nan_guard = NonFiniteLossGuard(recipe.training.max_bad_steps)
        # TrainingProgress replaces the Trainer's own bar, and the log dicts it prints instead where its log level
        # is above warning: in a quiet replica, which PrinterCallback prints from if it is its node's first process.
        for trainer_printer in (ProgressCallback, PrinterCallback):
            self.remove_callback(trainer_printer)
        for callback in (self.stop, self.nan_guard, TrainingProgress()):
            self.add_callback(callback)
        self._recipe_yaml = recipe.to_yaml()
        self._clock = StepClock()
        self._tokens_at_last_log = 0
        self._memory = MemoryMeter(str(self.args.device))

    # ------------------------------------------------------------------ atomic checkpoints

    def _get_output_dir(self, trial: Any) -> str:
        """Where the Trainer writes `checkpoint-N` (and looks for old ones to rotate: none, it rotates nothing)."""
        return str(self.run.staging)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.nan_guard.stopped_at is not None:
            return  # the step that stopped the run is not one to resume from
        step = self.state.global_step
        with self.paused_clock():
            try:
                super()._save_checkpoint(model, trial)
                _barrier()  # every rank has written its RNG state / optimizer shard into the staged folder
                if self.args.should_save:
                    self.run.publish_checkpoint(step, self._recipe_yaml, keep=self.recipe.training.save_total_limit)
            except Exception as exc:
                staged = self.run.staged_checkpoint(step)
                raise QloraError(self.run.save_failure(exc, staged, checkpoint_name(step))) from exc

    # ------------------------------------------------------------------ tokens/s and memory per logged step

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: Any) -> tuple[list, Any]:
        """Called at the start of every optimizer step: the clock starts with the first."""
        if not self._clock.running:
            self._clock.start()
            self._tokens_at_last_log = self.state.num_input_tokens_seen
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        """Packed rows carry no attention mask, and the Trainer would then count every token that is not the pad
        token: where EOS is the pad token (SmolLM2) it missed each document's EOS. ORPO's batches have no
        `input_ids` (the Trainer would count nothing): their chosen and rejected rows, prompt included, count."""
        if "input_ids" not in inputs and "chosen_attention_mask" in inputs:
            real = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
        elif "position_ids" in inputs and "attention_mask" not in inputs:
            real = torch.as_tensor(real_tokens(inputs, self.processing_class.pad_token_id), device=self.args.device)
        else:
            return super()._track_num_input_tokens(inputs)  # type: ignore[misc]
        self.state.num_input_tokens_seen += self.accelerator.gather(real).sum().item()

    def training_seconds(self) -> float:
        """Seconds spent training in this process: not evaluation, MMLU or checkpoints (see `paused_clock`)."""
        return self._clock.elapsed()

    @contextmanager
    def paused_clock(self) -> Iterator[None]:
        """Time spent in here does not count as training time (evaluation, MMLU, checkpoints)."""
        with self._clock.paused():
            yield

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._clock.running:
            tokens = self.state.num_input_tokens_seen
            logs["tokens_per_s"] = round((tokens - self._tokens_at_last_log) / max(self._clock.lap(), 1e-9), 1)
            logs["memory_bytes"] = self._memory.current()
            logs["peak_memory_bytes"] = self._memory.peak()
            self._tokens_at_last_log = tokens
        super().log(logs, start_time)

    # ------------------------------------------------------------------ seeded length grouping

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            return SeededLengthGroupedSampler(sampler, self.args.seed)
        return sampler

    # ------------------------------------------------------------------ the loss over the vocabulary

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """On the chunked and fused paths the model (through its DDP wrapper) computes logits at one position
        only, and `head_loss` reads the final hidden state it keeps while the model runs. Every training loss
        goes to the non-finite guard, whichever path computed it."""
        if self.head_loss is None:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        else:
            with self.head_loss.capturing():
                result = super().compute_loss(
                    model, {**inputs, "logits_to_keep": 1}, return_outputs, num_items_in_batch
                )
        if model.training:  # evaluation losses do not count
            self.nan_guard.watch(result[0] if return_outputs else result)
        return result

    # ------------------------------------------------------------------ evaluation and the run itself

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """Starting the eval DataLoader draws its base seed from torch's global generator, which LoRA dropout
        reads next: without the fork, a run with `eval_steps` trained a different adapter than one without."""
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), self.paused_clock():
            return super().evaluate(*args, **kwargs)

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any) -> Any:
        if resume_from_checkpoint is not None:
            steps = trained_steps(Path(resume_from_checkpoint)) or 0
            if steps >= self.args.max_steps:  # e.g. the final save had failed
                return self._restore(resume_from_checkpoint)
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except Exception:  # the Trainer skips on_train_end when it raises: close the bar and trackers first
            self.callback_handler.on_train_end(self.args, self.state, self.control)
            raise

    def _restore(self, checkpoint: str) -> Any:
        from transformers import TrainerState
        from transformers.trainer_utils import TrainOutput

        self._load_from_checkpoint(checkpoint)  # the weights, however they were saved (adapter, sharded)
        self.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_FILE))
        return TrainOutput(self.state.global_step, None, {})


class QloraTrainer(QloraOverrides, Trainer):
    """Supervised finetuning (training.method sft): the Trainer with qlora's overrides."""


class HeldOutLossBeforeTraining(TrainerCallback):
    """`eval.loss_before_after`: the held-out loss once the Trainer has prepared the model, before the first step.

    Evaluating before `train()` prepares the model for evaluation first; under DDP that run's gradient norms then
    differed from a single process's with the same global batch (1.73 against 1.65 at step 1).
    """

    def __init__(self, trainer: Trainer, dataset: Any) -> None:
        self.trainer, self.dataset = trainer, dataset
        self.metrics: dict[str, float] | None = None  # None when training resumed: "before" was another run's

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 0:
            self.metrics = self.trainer.evaluate(eval_dataset=self.dataset)


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """The Trainer's length-grouped order drawn from (seed, epoch) instead of the global RNG.

    The Trainer draws the order when an epoch starts; after a resume that lands in a later epoch the
    global RNG is not where the uninterrupted run had it. The Trainer calls `set_epoch` before each epoch.
    """

    def __init__(self, sampler: LengthGroupedSampler, seed: int) -> None:
        super().__init__(sampler.batch_size, lengths=sampler.lengths)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + int(epoch))


class StepClock:
    """Seconds of training between two laps and in all, leaving out what ran inside `paused()`."""

    def __init__(self) -> None:
        self.running = False
        self._lap_started = 0.0
        self._paused = 0.0
        self._depth = 0
        self._laps_total = 0.0

    def start(self) -> None:
        self.running, self._lap_started, self._paused = True, time.perf_counter(), 0.0

    @contextmanager
    def paused(self) -> Iterator[None]:
        started = time.perf_counter()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self.running:
                self._paused += time.perf_counter() - started

    def lap(self) -> float:
        now = time.perf_counter()
        seconds = now - self._lap_started - self._paused
        self._lap_started, self._paused = now, 0.0
        self._laps_total += seconds
        return seconds

    def elapsed(self) -> float:
        """Training seconds since `start`, the lap under way included."""
        if not self.running:
            return 0.0
        return self._laps_total + time.perf_counter() - self._lap_started - self._paused


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
        rate = logs.get("tokens_per_s", 0)
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}", tok_s=f"{rate:.0f}")

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any) -> None:
        if self.bar is not None and metrics and "eval_loss" in metrics:
            self.bar.write(f"step {state.global_step}: eval_loss {metrics['eval_loss']:.4f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def training_arguments(
    recipe: Recipe,
    compute_dtype: torch.dtype,
    *,
    has_eval: bool,
    arguments: type[TrainingArguments] = TrainingArguments,
    **method: Any,
) -> TrainingArguments:
    """The recipe's `TrainingArguments`; `arguments` a TRL config class (a subclass) and `method` its fields."""
    t = recipe.training
    on_gpu = torch.cuda.is_available()
    evaluate = has_eval and t.eval_steps is not None
    common: dict[str, Any] = dict(
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
        # packed rows are all about max_packed_len long: nothing to group (said when the run starts)
        train_sampling_strategy="group_by_length" if t.group_by_length and not recipe.data.packing else "random",
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # applied when a checkpoint is published (RunFolder.publish_checkpoint)
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
        log_on_each_node=False,  # the first process of a second node is a replica too
    )
    return arguments(**(common | method))


def build_trainer(recipe: Recipe, loaded: LoadedModel, data: PreparedData) -> QloraTrainer:
    """`loaded.model` is the model to train (with its LoRA adapters)."""
    args = training_arguments(recipe, loaded.compute_dtype, has_eval=data.eval is not None)
    loss = loss_for_model(recipe, loaded.model.config, device=str(loaded.device))  # `qlora train` said which and why
    autocast = loaded.compute_dtype if args.bf16 or args.fp16 else None  # the head computes under it on a GPU
    head_loss = None if loss.name == "plain" else HeadLoss(loaded.model, loss, autocast_dtype=autocast)
    trainer = QloraTrainer(
        model=loaded.model,
        args=args,
        train_dataset=data.train_rows,
        eval_dataset=data.eval if args.eval_strategy != "no" else None,
        data_collator=PaddingCollator(
            loaded.tokenizer.pad_token_id,
            logits_for_labels_only=head_loss is None and computes_logits_where_asked(loaded.model),
            flash_attention=loaded.model.config._attn_implementation in FLASH_ATTENTION,
        ),
        processing_class=loaded.tokenizer,
        recipe=recipe,
        head_loss=head_loss,
    )
    if recipe.eval.mmlu:
        from qlora_cli.eval.mmlu import MmluCallback

        trainer.add_callback(MmluCallback(trainer, loaded, recipe.eval.mmlu))
    return trainer


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
