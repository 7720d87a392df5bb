"""`qlora train`: recipe -> quantized model + LoRA + data -> QloraTrainer -> the run folder."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import set_seed

from qlora_cli.adapter import prompt_format, read_adapter
from qlora_cli.builtin import resolve_builtin_model
from qlora_cli.config import Recipe, training_drift
from qlora_cli.data import PreparedData, prepare_data
from qlora_cli.data.packing import PackedRows, packing_problem
from qlora_cli.data.preference import PreferenceData, prepare_preference_data
from qlora_cli.distributed import announce_processes, join_processes
from qlora_cli.errors import QloraError, refusing_pickled_code
from qlora_cli.eval.exact_match import Questions
from qlora_cli.guards import check_adapter, fingerprint
from qlora_cli.loss import loss_for_model
from qlora_cli.memory import MemoryMeter
from qlora_cli.plan import checkpointing_for_run
from qlora_cli.preference import build_preference_trainer
from qlora_cli.model import (
    TRAINED_ADAPTER,
    LoadedModel,
    add_lora,
    attach_adapter,
    count_parameters,
    device_for_process,
    load_model,
    model_config,
    model_kind,
    model_source,
    save_as_plain_lora,
    start_from_16bit,
)
from qlora_cli.run_folder import (
    BASE_INIT_DIR,
    LOG_HISTORY_FILE,
    METRICS_FILE,
    PLAIN_LORA_DIR,
    RECIPE_FILE,
    RunFolder,
    find_recipe_file,
    resume_checkpoint,
    resume_problems,
)
from qlora_cli.trainer import HeldOutLossBeforeTraining, QloraTrainer, build_trainer


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
    """`resume` continues from the newest complete checkpoint in output_dir, `resume_from` from a given one.

    The recipe has passed `preflight` (the CLI runs it once per process before calling this).
    """
    run = RunFolder(Path(recipe.output_dir))
    resume = resume or resume_from is not None
    if overwrite and resume:
        raise QloraError("--overwrite and --resume contradict each other: pick one")
    processes = join_processes()
    if not processes.is_main_process:
        return _train(recipe, run, processes, resume=resume, resume_from=resume_from, force=force)
    with run.lock():
        replacing = prepare_output_dir(run, overwrite=overwrite, resume=resume)
        try:
            result = _train(recipe, run, processes, resume=resume, resume_from=resume_from, force=force)
        except BaseException as exc:
            if not replacing:
                raise
            run.restore()
            kept = f"the previous run in {run.path} is intact (--overwrite replaces it only once the new run completes)"
            if isinstance(exc, (QloraError, KeyboardInterrupt)):
                raise QloraError(f"{exc if isinstance(exc, QloraError) else 'interrupted'}; {kept}") from exc
            print(f"error: the new run failed; {kept}", file=sys.stderr)
            raise
        if replacing:
            run.discard_previous()
        return result


def _train(
    recipe: Recipe, run: RunFolder, processes: Any, *, resume: bool, resume_from: Path | None, force: bool
) -> TrainResult:
    processes.wait_for_everyone()
    checkpoint = resume_checkpoint(resume_from or run.path) if resume else None
    if checkpoint is not None:
        check_recipe_drift(checkpoint, recipe, force=force)
        check_exact_resume(checkpoint, force=force, rank=processes.process_index if processes.num_processes > 1 else None)
    # Built before seeding (so LoRA's init never depends on whether the cache was cold) and by rank 0 first
    # (under a process group only rank 0 writes a model's weights).
    with processes.main_process_first():
        model_source(recipe.model)  # builds a builtin model, or dequantizes a GGUF file, once
        if recipe.model.tokenizer:
            resolve_builtin_model(recipe.model.tokenizer)
    if recipe.data.packing and (problem := packing_problem(model_config(recipe.model), recipe.model.attn_implementation)):
        raise QloraError(problem)
    method = recipe.training.method
    if method != "sft" and model_kind(recipe.model).name != "causal":
        raise QloraError(f"training.method={method}: TRL's {method.upper()} trains decoder-only models; "
                         f"{recipe.model.name_or_path} is an encoder-decoder")
    if recipe.model.adapter:
        check_continued_adapter(recipe)
    set_seed(recipe.training.seed)
    checkpointing = checkpointing_for_run(recipe, num_processes=processes.num_processes)  # auto: the plan decides
    loss = loss_for_model(recipe, model_config(recipe.model), device=device_for_process())  # before any weight loads
    resolved = recipe.training.model_copy(update={"gradient_checkpointing": checkpointing.on, "loss": loss.name})
    recipe = recipe.model_copy(update={"training": resolved})  # the run folder records what ran
    t = recipe.training  # under FSDP, FSDP checkpoints activations itself (distributed.fsdp_config)
    loaded = load_model(
        recipe.model, recipe.quantization, gradient_checkpointing=t.gradient_checkpointing and not t.fsdp, fsdp=t.fsdp
    )
    if recipe.model.adapter:
        attach_adapter(loaded, recipe.model.adapter, base=recipe.model, trainable=True)
    elif recipe.lora.enabled:
        loaded.model = add_lora(loaded.model, recipe.lora, kind=loaded.kind, tokenizer=loaded.tokenizer)
        if recipe.lora.changes_base:  # every process starts the same; the main one records it
            record = run.path / BASE_INIT_DIR if processes.is_main_process else None
            start_from_16bit(loaded, recipe.model, recipe.lora, record)
    if method == "sft":
        data = prepare_data(recipe.data, loaded.tokenizer, kind=loaded.kind, seed=recipe.training.seed)
        if data.packed is not None and len(data.packed.rows) < t.batch_size:
            raise QloraError(
                f"data.packing: the {data.packed.examples:,} training examples ({data.packed.tokens:,} tokens) fill "
                f"{len(data.packed.rows)} row{'s' if len(data.packed.rows) > 1 else ''} of data.max_packed_len={recipe.data.max_packed_len}, fewer than the "
                f"training.batch_size={t.batch_size} rows of one step: lower either, or set data.packing=false"
            )
        trainer = build_trainer(recipe, loaded, data)
    else:
        data = prepare_preference_data(recipe.data, method, loaded.tokenizer, seed=recipe.training.seed)
        trainer = build_preference_trainer(recipe, loaded, data)
    is_main = trainer.is_world_process_zero()
    if is_main:
        _announce(recipe, loaded, data)
        if data.packed is not None:
            _announce_packing(recipe, data.packed, trainer.args.world_size)
        if method != "sft":
            _announce_preference(recipe)
        print(f"Gradient checkpointing {checkpointing}", file=sys.stderr)
        print(f"Loss over the vocabulary {loss}", file=sys.stderr)
        announce_processes(recipe.training, trainer.args.world_size)
        run.write_recipe(recipe.to_yaml())

    questions = _questions(recipe, data, loaded)
    before = questions.ask(loaded) if questions else None
    loss_before = None
    held_out = None if trainer.eval_dataset is not None else data.eval  # None: the trainer's own (TRL's: prepared)
    if recipe.eval.loss_before_after and data.eval is not None:
        loss_before = HeldOutLossBeforeTraining(trainer, held_out)
        trainer.add_callback(loss_before)

    initial = fingerprint(loaded.model)
    started = time.perf_counter()
    with trainer.stop.handling_signals(), refusing_pickled_code(checkpoint or run.path):
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    runtime = time.perf_counter() - started
    if trainer.nan_guard.stopped_at is not None:
        raise trainer.nan_guard.failure(run.latest_checkpoint())
    if trainer.stop.signum is not None and trainer.state.global_step < trainer.state.max_steps:
        raise trainer.stop.interrupted(trainer.state, run.path)

    metrics = _metrics(trainer, runtime)
    metrics |= {"compute_dtype": loaded.compute.name, "compute_dtype_reason": loaded.compute.reason}
    metrics |= {"gradient_checkpointing": checkpointing.on, "gradient_checkpointing_reason": checkpointing.reason}
    metrics |= {"loss_path": loss.name, "loss_path_reason": loss.reason}
    if data.packed is not None:
        p = data.packed
        metrics["packing"] = {"examples": p.examples, "rows": len(p.rows), "tokens": p.tokens, "max_len": p.max_len}
    if loss_before is not None and loss_before.metrics is not None:
        metrics |= held_out_before_after(loss_before.metrics, trainer.evaluate(eval_dataset=held_out))
    if questions:
        metrics |= questions.metrics(before, questions.ask(loaded))
    # Under FSDP every rank takes part in gathering the sharded adapter; rank 0 alone writes it.
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if t.fsdp else None
    if is_main:
        for warning in check_adapter(loaded.model, initial):
            print(f"warning: {warning}", file=sys.stderr)
        history = trainer.state.log_history
        with run.final_files() as staged:
            loaded.model.save_pretrained(staged, state_dict=state_dict, selected_adapters=[TRAINED_ADAPTER])
            loaded.tokenizer.save_pretrained(staged)
            (staged / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
            (staged / LOG_HISTORY_FILE).write_text(json.dumps(history, indent=2) + "\n")
        if recipe.lora.changes_base:
            save_as_plain_lora(loaded.model, run.path / BASE_INIT_DIR, run.path / PLAIN_LORA_DIR)
        write_report_and_card(run, recipe, loaded, metrics, history)
        run.mark_completed()
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    return TrainResult(run.path, metrics, losses)


# What `eval.loss_before_after` reports: the held-out loss, and for dpo/kto TRL's reward accuracy and margin.
HELD_OUT_METRICS = {
    "eval_loss": "eval_loss",
    "eval_rewards/accuracies": "eval_preference_accuracy",
    "eval_rewards/margins": "eval_reward_margin",
}


def held_out_before_after(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {
        f"{name}_{when}": values[key]
        for key, name in HELD_OUT_METRICS.items()
        for when, values in (("before", before), ("after", after))
        if key in before and key in after
    }


def check_continued_adapter(recipe: Recipe) -> None:
    """`model.adapter` continues an adapter: it must have been trained on this base, in this recipe's LoRA shape."""
    trained = read_adapter(recipe.model.adapter)
    where = f"model.adapter={recipe.model.adapter}"
    base = trained.base_model()
    if (base.name_or_path, base.gguf_file) != (recipe.model.name_or_path, recipe.model.gguf_file):
        raise QloraError(
            f"{where} was trained on {base.name_or_path}, not model.name_or_path={recipe.model.name_or_path}"
        )
    if needs_rebuilt_base := [n for n in trained.needs() if n.startswith("the base")]:
        plain = f"{recipe.model.adapter}/{PLAIN_LORA_DIR}"
        raise QloraError(
            f"{where} was trained against {needs_rebuilt_base[0]}; continuing it is not supported: continue its "
            f"conversion to plain LoRA against the untouched base instead (model.adapter={plain})"
        )
    c, lora = trained.config, recipe.lora
    for name, ours, theirs in (
        ("r", lora.r, c.get("r")),
        ("alpha", lora.alpha, c.get("lora_alpha")),
        ("dora", lora.dora, bool(c.get("use_dora"))),
        ("rslora", lora.rslora, bool(c.get("use_rslora"))),
    ):
        if ours != theirs:
            raise QloraError(
                f"lora.{name}={ours}, but {where} has {name}={theirs}: the adapter keeps its own shape; "
                f"set lora.{name}={theirs} (or extend the recipe it was trained with)"
            )


def prepare_output_dir(run: RunFolder, *, overwrite: bool, resume: bool) -> bool:
    """Never clobber a finished run or a folder that is not ours; True when `--overwrite` set a run aside."""
    if run.previous.exists():  # a process died during an --overwrite run: settle it first
        if run.is_completed():
            run.discard_previous()
        else:
            run.restore()
            print(f"Restored the run an interrupted --overwrite had set aside into {run.path}", file=sys.stderr)
    replacing = False
    if not run.is_empty():
        if not run.is_run():
            raise QloraError(f"output_dir {run.path} exists and is not a qlora run folder: choose another output_dir")
        if overwrite:
            run.set_aside()
            replacing = True
        elif run.is_completed():
            raise QloraError(f"output_dir {run.path} holds a completed run: pass --overwrite to replace it")
        elif not resume and run.checkpoints(complete=False):
            raise QloraError(
                f"output_dir {run.path} holds checkpoints of an unfinished run: pass --resume to continue it "
                "or --overwrite to start over"
            )
    run.path.mkdir(parents=True, exist_ok=True)
    run.clear_staging()
    return replacing


def check_exact_resume(checkpoint: Path, *, force: bool, rank: int | None = None) -> None:
    """The Trainer resumes from whatever a checkpoint holds and says nothing about what it lacks."""
    problems = resume_problems(checkpoint, rank=rank)
    if not problems:
        return
    listed = "; ".join(problems)
    if not force:
        raise QloraError(
            f"cannot resume exactly from {checkpoint}: {listed}. Resume from another checkpoint, or pass --force to "
            "continue from what is there (the result will differ from an uninterrupted run)"
        )
    print(f"warning: resuming inexactly (--force) from {checkpoint}: {listed}", file=sys.stderr)


def check_recipe_drift(checkpoint: Path, recipe: Recipe, *, force: bool) -> None:
    """Refuse to resume with a recipe that would train differently from the one the checkpoint came from."""
    saved_file = find_recipe_file(checkpoint)
    if saved_file is None:
        print(f"warning: {checkpoint} has no {RECIPE_FILE}; cannot check that the recipe is unchanged", file=sys.stderr)
        return
    differences = training_drift(yaml.safe_load(saved_file.read_text()) or {}, recipe)
    if not differences:
        return
    listed = "; ".join(differences)
    if not force:
        raise QloraError(
            f"the recipe differs from the one {checkpoint} was trained with ({saved_file}) in fields that change "
            f"training: {listed}. Resume with the same recipe, or pass --force to continue anyway"
        )
    print(f"warning: resuming with a changed recipe (--force): {listed}", file=sys.stderr)


def write_report_and_card(
    run: RunFolder, recipe: Recipe, loaded: LoadedModel, metrics: dict[str, Any], history: list[dict[str, Any]]
) -> None:
    from qlora_cli.model_card import write_model_card
    from qlora_cli.report import write_report

    write_report(run.path)
    write_model_card(run.path, recipe, loaded.kind, metrics, log_history=history)


def _metrics(trainer: QloraTrainer, runtime: float) -> dict[str, Any]:
    """`tokens_per_s` is over training time: evaluation, MMLU and checkpoints are in `runtime_s` only."""
    state = trainer.state
    training = trainer.training_seconds()
    losses = [e["loss"] for e in state.log_history if "loss" in e]
    train_loss = next((e["train_loss"] for e in reversed(state.log_history) if "train_loss" in e), None)
    trainable, total = count_parameters(trainer.model)
    memory = MemoryMeter(str(trainer.args.device))
    return {
        "train_loss": train_loss,
        "final_logged_loss": losses[-1] if losses else None,
        "steps": state.global_step,
        "runtime_s": round(runtime, 2),
        "training_s": round(training, 2),
        "tokens": state.num_input_tokens_seen,
        "tokens_per_s": round(state.num_input_tokens_seen / max(training, 1e-9), 1),
        "peak_memory_bytes": memory.peak(),
        "peak_memory_kind": memory.kind,
        "processes": trainer.args.world_size,
        "trainable_params": trainable,
        "total_params": total,
    }


def _questions(recipe: Recipe, data: PreparedData, loaded: LoadedModel) -> Questions | None:
    """The first `eval.exact_match_samples` held-out examples and the knowledge probes; None when neither is asked."""
    e = recipe.eval
    held_out = data.eval.select(range(min(e.exact_match_samples, len(data.eval)))) if data.eval is not None else []
    if not held_out and not e.knowledge_probes:
        return None
    return Questions(
        sources=[row["source"] for row in held_out],
        targets=[row["target"] for row in held_out],
        probes=e.knowledge_probes,
        prompt=prompt_format(recipe, loaded.tokenizer).prompt,
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
    )


def _announce_packing(recipe: Recipe, packed: PackedRows, processes: int) -> None:
    t = recipe.training
    rows = t.batch_size * t.gradient_accumulation_steps * processes
    ignored = "; training.group_by_length is off: packed rows have nothing to group" if t.group_by_length else ""
    print(
        f"Packing: {packed.describe()}; a step of {rows:,} rows holds {rows * packed.examples_per_row:,.0f} "
        f"examples and {rows * packed.tokens_per_row:,.0f} tokens on average{ignored}",
        file=sys.stderr,
    )


def _announce_preference(recipe: Recipe) -> None:
    t, p = recipe.training, recipe.preference
    start = f"the adapter of {recipe.model.adapter}" if recipe.model.adapter else "a fresh adapter"
    reference = (
        f"; reference: the model at the start ({start}), log-probs {p.reference}" if t.method != "orpo" else ""
    )
    grouped = "; training.group_by_length is off: a pair has no single length" if t.group_by_length else ""
    print(
        f"Preference training: {t.method.upper()} through TRL, beta {p.beta}{reference}; LoRA dropout off "
        f"(TRL's disable_dropout){grouped}",
        file=sys.stderr,
    )


def _announce(recipe: Recipe, loaded: LoadedModel, data: PreparedData | PreferenceData) -> None:
    trainable, total = count_parameters(loaded.model)
    q = recipe.quantization
    base = f"{q.bits}-bit" + (f" {q.quant_type}{' + double quant' if q.double_quant else ''}" if q.bits == 4 else "")
    print(
        f"Model {recipe.model.name_or_path} ({base}); trainable {trainable:,} of {total:,} parameters "
        f"({100 * trainable / max(total, 1):.2f}%)",
        file=sys.stderr,
    )
    print(f"Compute dtype {loaded.compute.name} ({loaded.compute.reason})", file=sys.stderr)
    eval_n = len(data.eval) if data.eval is not None else 0
    skipped = sum(data.skipped.values())
    note = f"; skipped {skipped} ({', '.join(f'{n} {r}' for r, n in data.skipped.most_common())})" if skipped else ""
    cut = f"; {data.truncated:,} truncated to source/target max length" if data.truncated else ""
    rows = {"sft": "examples", "kto": "replies"}.get(recipe.training.method, "pairs")
    print(f"Data {recipe.data.dataset}: {len(data.train):,} train, {eval_n:,} eval {rows}{cut}{note}", file=sys.stderr)
