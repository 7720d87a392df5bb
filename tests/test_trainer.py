"""QloraTrainer: each overridden Trainer method, and the Trainer behaviour it relies on.

If a transformers release renames one of these methods, changes its arguments, or stops calling it where
these tests expect, they fail here rather than letting checkpoints, tokens/s or the data order go quietly wrong.
"""

from __future__ import annotations

import errno
import inspect
import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import get_length_grouped_indices

from qlora_cli.config import Recipe, validate_recipe
from qlora_cli.data import PaddingCollator, prepare_data
from qlora_cli.errors import QloraError
from qlora_cli.model import add_lora, load_model, model_source
from qlora_cli.run_folder import RECIPE_FILE, RunFolder
from qlora_cli.trainer import QloraOverrides, QloraTrainer, SeededLengthGroupedSampler, StepClock, build_trainer
from tests.tiny import TINY_RECIPE

OVERRIDDEN = [
    "_get_output_dir", "_save_checkpoint", "get_batch_samples", "_track_num_input_tokens", "log", "_get_train_sampler",
    "compute_loss", "evaluate", "train",
]  # fmt: skip


@pytest.mark.parametrize("method", ["sft", "dpo", "orpo", "kto"])
def test_every_overridden_method_exists_on_the_trainer_with_the_arguments_we_pass_on(method):
    """The overrides live in QloraOverrides, in front of the Trainer (sft) or TRL's trainer for the method."""
    from qlora_cli.preference import trainer_classes

    trainer_class = Trainer if method == "sft" else trainer_classes(method)[0]
    ours = {name for name, value in vars(QloraOverrides).items() if callable(value) and not name.startswith("__")}
    assert ours - {"paused_clock", "training_seconds", "_restore"} == set(OVERRIDDEN)
    assert not {name for name, value in vars(QloraTrainer).items() if callable(value) and not name.startswith("__")}
    for name in OVERRIDDEN:
        base = inspect.signature(getattr(trainer_class, name)).parameters
        mine = inspect.signature(getattr(QloraOverrides, name)).parameters
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        named = [p for p in mine if mine[p].kind not in variadic]
        assert named == list(base)[: len(named)], f"{trainer_class.__name__}.{name}{inspect.signature(getattr(trainer_class, name))}"
    assert "resume_from_checkpoint" in inspect.signature(trainer_class._load_from_checkpoint).parameters  # _restore


def _recipe(tmp_path: Path, **training) -> Recipe:
    raw = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    raw["output_dir"] = str(tmp_path / "run")
    raw["training"].update({"max_steps": 4, "save_steps": 2, "save_total_limit": 1, **training})
    return validate_recipe(raw)


def _trainer(recipe: Recipe) -> QloraTrainer:
    """`qlora train`'s own pieces, without the command around them."""
    Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)
    loaded = load_model(recipe.model, recipe.quantization, gradient_checkpointing=True)
    loaded.model = add_lora(loaded.model, recipe.lora, kind=loaded.kind)
    return build_trainer(recipe, loaded, prepare_data(recipe.data, loaded.tokenizer, kind=loaded.kind, seed=0))


class Spy(TrainerCallback):
    def __init__(self, trainer: QloraTrainer) -> None:
        self.trainer, self.steps, self.train_ends = trainer, 0, 0
        self.saved_into: list[str] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1

    def on_train_end(self, args, state, control, **kwargs):
        self.train_ends += 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Four steps of two micro-batches each, saving every two steps, keeping one checkpoint."""
    recipe = _recipe(tmp_path_factory.mktemp("trainer"), gradient_accumulation_steps=2)
    trainer = _trainer(recipe)
    calls = {"get_batch_samples": 0, "written_into": set()}
    original_batches, original_rng = Trainer.get_batch_samples, Trainer._save_rng_state

    def counting(self, *args, **kwargs):
        calls["get_batch_samples"] += 1
        return original_batches(self, *args, **kwargs)

    def recording(self, output_dir):
        calls["written_into"].add(str(Path(output_dir).parent))
        return original_rng(self, output_dir)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "get_batch_samples", counting)
        patch.setattr(Trainer, "_save_rng_state", recording)
        trainer.train()
    return recipe, trainer, calls


def test_the_trainer_writes_checkpoints_into_staging_and_they_are_published_whole(trained):
    """`_get_output_dir` decides where `_save_checkpoint` writes; the folder appears only once complete."""
    recipe, trainer, calls = trained
    run = RunFolder(Path(recipe.output_dir))
    assert calls["written_into"] == {str(run.staging)}
    assert [p.name for p in run.checkpoints(complete=False)] == ["checkpoint-4"]  # save_total_limit 1
    checkpoint = run.checkpoint(4)
    assert (checkpoint / RECIPE_FILE).read_text() == recipe.to_yaml()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 4
    assert not list(run.staging.glob("checkpoint-*"))


def test_get_batch_samples_starts_every_optimizer_step_and_log_adds_throughput_and_memory(trained):
    _, trainer, calls = trained
    assert calls["get_batch_samples"] == 4  # once per optimizer step, not per micro-batch
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4]
    for entry in logged:
        assert entry["tokens_per_s"] > 0
        assert 0 < entry["memory_bytes"] <= entry["peak_memory_bytes"]
    assert "tokens_per_s" not in trainer.state.log_history[-1]  # the final train_loss summary


def test_evaluation_and_mmlu_run_with_the_training_clock_paused(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, max_steps=2, eval_steps=1)
    recipe = validate_recipe({**recipe.model_dump(mode="json"), "data": {**recipe.data.model_dump(), "eval_size": 2}})
    trainer = _trainer(recipe)
    seen = []
    original = Trainer.evaluate

    def evaluate(self, *args, **kwargs):
        seen.append(self._clock._depth)
        time.sleep(1)  # a slow evaluation: not training time
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    assert seen == [1, 1]  # eval_steps=1: called by the Trainer after each step, inside paused_clock
    assert 0 < trainer.training_seconds() < wall - 2  # what metrics.json's tokens_per_s divides by


def test_step_clock_leaves_out_paused_time(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("qlora_cli.trainer.time.perf_counter", lambda: now[0])
    clock = StepClock()
    with clock.paused():  # before the first step: nothing to leave out
        now[0] += 5
    clock.start()
    now[0] += 2
    with clock.paused():
        now[0] += 30
        with clock.paused():
            now[0] += 1
    now[0] += 1
    assert clock.lap() == 3
    now[0] += 4
    assert clock.lap() == 4
    now[0] += 2
    with clock.paused():
        now[0] += 10
    assert clock.elapsed() == 3 + 4 + 2  # every lap and the one under way, without paused time


def test_a_failed_save_is_one_line_keeps_the_earlier_checkpoint_and_closes_the_callbacks(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, save_total_limit=3)
    trainer = _trainer(recipe)
    spy = Spy(trainer)
    trainer.add_callback(spy)
    original = Trainer._save_rng_state

    def full_disk_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", output_dir)
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", full_disk_at_step_4)
    with pytest.raises(QloraError) as caught:
        trainer.train()
    message = str(caught.value)
    assert message.startswith(f"could not write checkpoint-4 in {recipe.output_dir}: disk full")
    assert "earlier checkpoints are intact (checkpoint-2)" in message
    run = RunFolder(Path(recipe.output_dir))
    assert [p.name for p in run.checkpoints(complete=False)] == ["checkpoint-2"]
    assert not run.staged_checkpoint(4).exists()
    assert spy.train_ends == 1  # `train` closed the progress bar and trackers before the error


def test_a_stop_for_bad_losses_saves_no_checkpoint_of_that_step(tmp_path):
    trainer = _trainer(_recipe(tmp_path, save_steps=1))
    trainer.nan_guard.stopped_at = 1  # as NonFiniteLossGuard sets it
    trainer._save_checkpoint(trainer.model, None)
    assert not RunFolder(Path(trainer.recipe.output_dir)).checkpoints(complete=False)


def test_train_at_max_steps_only_restores_the_checkpoint(trained, monkeypatch):
    recipe, _, _ = trained
    checkpoint = RunFolder(Path(recipe.output_dir)).checkpoint(4)
    again = _trainer(recipe)
    monkeypatch.setattr(Trainer, "get_batch_samples", lambda *a, **k: pytest.fail("trained a step past max_steps"))
    again.train(resume_from_checkpoint=str(checkpoint))
    assert again.state.global_step == 4
    from peft import get_peft_model_state_dict

    saved = load_file(checkpoint / "adapter_model.safetensors")
    restored = get_peft_model_state_dict(again.model)
    assert saved and saved.keys() == restored.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(restored[name], tensor)


# --------------------------------------------------------------------------- data order


def test_the_trainer_samples_through_the_seeded_sampler_and_sets_its_epoch(tmp_path, monkeypatch):
    """8 examples in batches of 2: 4 steps an epoch, so 6 steps start a second epoch."""
    trainer = _trainer(_recipe(tmp_path, max_steps=6, save_steps=100))
    assert isinstance(trainer._get_train_sampler(), SeededLengthGroupedSampler)
    epochs = []
    original = SeededLengthGroupedSampler.set_epoch
    monkeypatch.setattr(
        SeededLengthGroupedSampler, "set_epoch", lambda self, epoch: (epochs.append(epoch), original(self, epoch))
    )
    trainer.train()
    assert epochs[0] == 0  # our own, when the sampler is made
    assert [e for i, e in enumerate(epochs) if i == 0 or e != epochs[i - 1]] == [0, 1]  # then before each epoch


def test_group_by_length_order_depends_on_seed_and_epoch_only():
    from accelerate.data_loader import skip_first_batches
    from torch.utils.data import DataLoader
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = [(i * 7) % 23 + 1 for i in range(64)]
    sampler = SeededLengthGroupedSampler(LengthGroupedSampler(4, lengths=lengths), seed=42)
    loader = DataLoader(list(range(64)), batch_size=4, sampler=sampler)

    def order(epoch: int, rng_seed: int) -> list[int]:
        sampler.set_epoch(epoch)
        torch.manual_seed(rng_seed)  # the global RNG, wherever dropout left it
        return [int(i) for batch in loader for i in batch]

    assert order(1, rng_seed=0) == order(1, rng_seed=123)
    assert order(0, rng_seed=0) != order(1, rng_seed=0)
    expected = get_length_grouped_indices(lengths, 4, generator=torch.Generator().manual_seed(43))
    assert order(1, rng_seed=7) == expected
    resumed = skip_first_batches(loader, 3)  # how the Trainer fast-forwards on resume
    sampler.set_epoch(1)
    assert [int(i) for b in resumed for i in b] == expected[12:]


def test_logits_only_where_labels_are_give_the_loss_and_gradients_of_all_logits(tmp_path):
    """What `qlora train` collates for a causal LM on the plain loss path (head and loss on fewer positions) trains
    the same adapter."""
    recipe = _recipe(tmp_path, loss="plain")
    trainer = _trainer(recipe)
    assert trainer.data_collator.logits_for_labels_only
    features = [trainer.train_dataset[i] for i in range(4)]
    full = PaddingCollator(trainer.data_collator.pad_token_id)(features)
    fewer = trainer.data_collator(features)
    assert 0 < len(fewer["logits_to_keep"]) < full["input_ids"].shape[1]  # the prompts' positions are left out
    model = trainer.model
    model.eval()  # no dropout: the two forwards see the same network
    results = []
    for batch in (full, fewer):
        model.zero_grad()
        loss = model(**batch, num_items_in_batch=int((full["labels"][:, 1:] != -100).sum())).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, msg=name)


def test_an_encoder_decoder_model_gets_logits_at_every_position(tmp_path):
    raw = _recipe(tmp_path).model_dump(mode="json")
    raw["model"]["name_or_path"] = "builtin:tiny-t5"
    assert not _trainer(validate_recipe(raw)).data_collator.logits_for_labels_only


def test_one_step_of_two_micro_batches_trains_the_same_adapter_with_the_chunked_loss_as_with_the_plain_one(
    tmp_path, monkeypatch
):
    """The chunked loss is the Trainer's `compute_loss_func`: the Trainer counts num_items_in_batch over both
    micro-batches and scales it as it scales the model's own loss; evaluation takes the same path. Under it the
    model computes the logits of one position a row, never the vocabulary-wide logits of every position.

    SGD, so that the step is the (clipped) gradient itself: Adam's first step is the learning rate times the
    gradient's sign, which would hide a wrong scale. LoRA B starts at zero, so after one step it is that step."""
    from transformers import set_seed

    from qlora_cli import loss as loss_module

    recipe = _recipe(tmp_path, max_steps=1, gradient_accumulation_steps=2, eval_steps=1, optim="sgd")
    raw = recipe.model_dump(mode="json")
    raw["quantization"]["compute_dtype"] = "fp32"
    raw["lora"]["dropout"] = 0.0
    raw["data"]["eval_size"] = 2
    model_source(validate_recipe(raw).model)  # built before seeding, as `qlora train` does: a cold cache draws numbers
    runs = {}
    for path in ("plain", "chunked"):
        raw["output_dir"], raw["training"]["loss"] = str(tmp_path / path), path
        set_seed(0)  # the same LoRA initialisation
        trainer = _trainer(validate_recipe(raw))
        assert (trainer.head_loss is None) == (path == "plain")
        monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 8 * trainer.model.config.vocab_size)  # chunks of 8
        head_positions = set()
        head = trainer.model.get_base_model().get_output_embeddings()
        head.register_forward_hook(lambda module, args, output: head_positions.add(args[0].shape[1]))
        trainer.train()
        adapter = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
        logged = {key: e[key] for e in trainer.state.log_history for key in ("loss", "eval_loss") if key in e}
        runs[path] = adapter, logged, head_positions
    (plain, plain_logged, plain_positions), (chunked, chunked_logged, chunked_positions) = runs.values()
    assert chunked_positions == {1} and max(plain_positions) > 1
    assert plain_logged.keys() == {"loss", "eval_loss"}
    for key, value in plain_logged.items():
        assert chunked_logged[key] == pytest.approx(value, rel=1e-6), key
    assert plain.keys() == chunked.keys()
    for name, step in plain.items():
        assert step.abs().max() > 0, name
        torch.testing.assert_close(chunked[name], step, rtol=0, atol=1e-5 * step.abs().max().item(), msg=name)
