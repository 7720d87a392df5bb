"""Preference tuning (training.method dpo, orpo, kto) through TRL on the 4-bit base: recipes, data, the reference,
and a run that is everything `qlora train` already is (run folder, resume, report, merge)."""

from __future__ import annotations

import hashlib
import json
import math
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qlora_cli.config import validate_recipe
from qlora_cli.data.formats import FORMATS, SkipRecord
from qlora_cli.data.preference import prepare_preference_data
from qlora_cli.errors import ConfigError, QloraError
from tests.data_fixtures import hendrycks  # noqa: F401 (fixture)
from tests.tiny import TINY_RECIPE, write_recipe
from tests.trained import run_cli_in_process

LN2 = math.log(2)
WORDS = ["apple", "river", "stone", "cloud", "green", "quick", "piano", "tiger", "lemon", "ocean", "pencil", "silver"]


def _pairs(count: int = 24) -> list[dict]:
    """Prompts to reverse three words; chosen reverses them, rejected repeats them: a preference a model can learn."""
    rows = []
    for i in range(count):
        a, b, c = WORDS[i % 12], WORDS[(5 * i + 1) % 12], WORDS[(i + 6) % 12]  # a != c: the reversal differs
        rows.append({"prompt": f"Reverse: {a} {b} {c}\nAnswer:", "chosen": f" {c} {b} {a}", "rejected": f" {a} {b} {c}"})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _preference_recipe(folder: Path, method: str = "dpo", name: str = "pref.yaml", rows: list[dict] | None = None,
                       **sections: dict) -> Path:
    data = _write_jsonl(folder / f"{name}.jsonl", rows if rows is not None else _pairs())
    merged = {
        "data": {"dataset": "kto" if method == "kto" and rows and "label" in rows[0] else "preference",
                 "path": str(data), "eval_size": 4, "max_train_samples": None},
        "training": {"method": method, "max_steps": 4, "learning_rate": 1e-3, "save_steps": 2},
        "quantization": {"compute_dtype": "fp32"},  # exact comparisons: bf16 rounds differently per batch shape
        "lora": {"dropout": 0.0},
        "eval": {"loss_before_after": True},
    }
    for key, value in sections.items():
        merged[key] = {**merged.get(key, {}), **value}
    return write_recipe(folder, name, **merged)


def _validate(**sections: dict):
    raw = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return validate_recipe(raw)


def _train(*args: str) -> str:
    """`qlora train ARGS` in this process; returns what it printed on stderr."""
    return run_cli_in_process("train", *args).stderr


def _losses(run: Path) -> list[float]:
    return [e["loss"] for e in json.loads((run / "log_history.json").read_text()) if "loss" in e]


# --------------------------------------------------------------------------- the recipe, validated once


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"training": {"method": "kto", "batch_size": 2}, "data": {"dataset": "preference"},
          "preference": {"loss_type": "ipo"}}, "preference.loss_type applies to training.method=dpo, not kto"),
        ({"preference": {"beta": 0.5}}, "preference.beta applies to training.method=dpo|orpo|kto, not sft"),
        ({"training": {"method": "orpo"}, "data": {"dataset": "preference"}, "preference": {"reference": "precomputed"}},
         "preference.reference applies to training.method=dpo|kto, not orpo"),
        ({"training": {"method": "dpo"}}, "data.dataset=alpaca has no data for training.method=dpo"),
        ({"training": {"method": "sft"}, "data": {"dataset": "kto"}}, "data.dataset=kto has no data for training.method=sft"),
        ({"training": {"method": "kto", "batch_size": 1}, "data": {"dataset": "kto"}}, "at least 2"),
        ({"training": {"method": "dpo"}, "data": {"dataset": "preference", "packing": True}}, "data.packing"),
        ({"training": {"method": "dpo", "loss": "chunked"}, "data": {"dataset": "preference"}}, "training.loss=chunked"),
        ({"training": {"method": "dpo"}, "data": {"dataset": "preference"}, "eval": {"exact_match_samples": 4}},
         "eval.exact_match_samples"),
        ({"training": {"method": "dpo"}, "data": {"dataset": "preference"}, "lora": {"enabled": False},
          "quantization": {"bits": 16}}, "set lora.enabled=true"),
        ({"model": {"name_or_path": "builtin:tiny-llama", "adapter": "runs/sft"}, "lora": {"init": "pissa"}},
         "model.adapter continues a trained one"),
    ],
)
def test_a_recipe_that_cannot_train_as_written_is_refused_naming_the_field(sections, message):
    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace(".", r"\.")):
        _validate(**sections)


def test_the_default_of_another_method_is_not_a_misplaced_field():
    """A saved recipe holds every default: an SFT run's recipe.yaml, read back, must validate."""
    recipe = _validate()
    again = validate_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again.training.method == "sft" and again.preference.beta == 0.1


def test_formats_say_which_methods_they_have_data_for(cli):
    code, out, _ = cli("data", "formats")
    assert code == 0
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert rows["alpaca"] == "sft"
    assert rows["hh-rlhf"] == rows["preference"] == rows["chat-pairs"] == "sft,dpo,orpo,kto"
    assert rows["kto"] == "kto"


# --------------------------------------------------------------------------- formats


def test_hh_rlhf_pairs_share_the_conversation_up_to_the_last_assistant_turn():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant: Blue."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant: No."
    pair = FORMATS["hh-rlhf"].to_pair({"chosen": chosen, "rejected": rejected})
    assert pair.prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == (" Blue.", " No.")
    assert pair.prompt + pair.chosen == chosen


def test_hh_rlhf_replies_that_share_their_start_keep_it_in_both():
    """The shared text of two replies ("Sure, ...") is part of each reply, not of the prompt."""
    pair = FORMATS["hh-rlhf"].to_pair({"chosen": "\n\nHuman: Q\n\nAssistant: Sure, blue.",
                                       "rejected": "\n\nHuman: Q\n\nAssistant: Sure, no."})
    assert (pair.prompt, pair.chosen, pair.rejected) == ("\n\nHuman: Q\n\nAssistant:", " Sure, blue.", " Sure, no.")


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"prompt": "Q", "chosen": " A", "rejected": " A "}, "chosen and rejected replies are identical"),
        ({"prompt": "Q", "chosen": "  ", "rejected": " B"}, "empty chosen reply"),
        ({"prompt": "Q", "chosen": " A", "rejected": ""}, "empty rejected reply"),
        ({"prompt": "Q", "chosen": " A"}, "missing field 'rejected'"),
    ],
)
def test_a_pair_with_nothing_to_prefer_is_skipped_with_its_reason(record, reason):
    with pytest.raises(SkipRecord, match=reason):
        FORMATS["preference"].to_pair(record)


def test_hh_rlhf_on_the_real_test_split_splits_every_pair_at_an_assistant_turn(shared_data):
    import gzip

    lines = gzip.open(shared_data / "hh_rlhf/helpful-base/test.jsonl.gz", "rt").read().splitlines()[:200]
    pairs, skipped = [], []
    for line in lines:
        try:
            pairs.append(FORMATS["hh-rlhf"].to_pair(json.loads(line)))
        except SkipRecord as reason:
            skipped.append(str(reason))
    assert len(pairs) > 180, skipped
    record = json.loads(lines[0])
    for pair in pairs[:50]:
        assert pair.prompt.endswith("\n\nAssistant:") and pair.prompt.startswith("\n\nHuman:")
        assert "\n\nHuman:" not in pair.chosen + pair.rejected
    assert pairs[0].prompt + pairs[0].chosen == record["chosen"]


def test_chat_pairs_render_the_shared_turns_with_the_chat_template_and_differ_in_the_reply():
    from qlora_cli.builtin import resolve_builtin_model
    from qlora_cli.model import load_tokenizer
    from qlora_cli.config import ModelConfig

    tokenizer = load_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama"))
    resolve_builtin_model("builtin:tiny-llama")
    fmt = FORMATS["chat-pairs"].for_tokenizer(tokenizer)
    user = {"role": "user", "content": "Name a color."}
    pair = fmt.to_pair({"chosen": [user, {"role": "assistant", "content": "Blue."}],
                        "rejected": [user, {"role": "assistant", "content": "No."}]})
    assert pair.prompt == fmt.prompt("Name a color.")
    assert (pair.chosen.strip(), pair.rejected.strip()) == ("Blue.", "No.")
    trl_style = fmt.to_pair({"prompt": [user], "chosen": [{"role": "assistant", "content": "Blue."}],
                             "rejected": [{"role": "assistant", "content": "No."}]})
    assert trl_style == pair
    with pytest.raises(SkipRecord, match="differ before their last reply"):
        fmt.to_pair({"chosen": [user, {"role": "assistant", "content": "Blue."}],
                     "rejected": [{"role": "user", "content": "Other."}, {"role": "assistant", "content": "No."}]})


# --------------------------------------------------------------------------- data: counted, never silently lost


def _tiny_tokenizer():
    from qlora_cli.config import ModelConfig
    from qlora_cli.model import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama"))


def test_long_prompts_are_dropped_and_long_replies_counted_by_the_recipe_limits(tmp_path):
    rows = _pairs(10) + [
        {"prompt": "word " * 80, "chosen": " yes", "rejected": " no"},  # prompt over source_max_len=48
        {"prompt": "Q", "chosen": " yes " * 30, "rejected": " no"},  # chosen over target_max_len=16
        {"prompt": "Q", "chosen": " same", "rejected": " same"},
    ]
    recipe = validate_recipe(yaml.safe_load(_preference_recipe(tmp_path, rows=rows).read_text()))
    data = prepare_preference_data(recipe.data, "dpo", _tiny_tokenizer(), seed=0)
    assert dict(data.skipped) == {
        "prompt longer than data.source_max_len=48 tokens": 1,
        "chosen and rejected replies are identical": 1,
    }
    assert len(data.train) + len(data.eval) == 11
    assert data.truncated == 1


def test_kto_reads_a_pair_as_a_desirable_and_an_undesirable_reply(tmp_path):
    recipe = validate_recipe(yaml.safe_load(_preference_recipe(tmp_path, "kto", training={"batch_size": 2}).read_text()))
    data = prepare_preference_data(recipe.data, "kto", _tiny_tokenizer(), seed=0)
    assert len(data.train) + len(data.eval) == 2 * len(_pairs())
    labels = list(data.train["label"]) + list(data.eval["label"])
    assert sum(labels) == len(labels) // 2  # every pair gave one of each
    assert list(data.train["label"][:6]) != [True, False] * 3  # shuffled once: TRL's KTO reads rows in order


def test_a_kto_file_with_one_label_only_is_refused_with_the_counts(tmp_path):
    rows = [{"prompt": f"Q{i}", "completion": f" A{i}", "label": True} for i in range(12)]
    recipe = validate_recipe(yaml.safe_load(_preference_recipe(tmp_path, "kto", rows=rows).read_text()))
    with pytest.raises(QloraError, match="8 desirable and 0 undesirable: add undesirable"):
        prepare_preference_data(recipe.data, "kto", _tiny_tokenizer(), seed=0)


def test_preview_shows_the_prompt_masked_and_both_replies(tmp_path, cli):
    recipe = _preference_recipe(tmp_path)
    code, out, err = cli("data", "preview", "--config", str(recipe), "-n", "1")
    assert code == 0, err
    assert "for dpo: 20 train and 4 eval pairs" in out
    assert "pair 1: prompt" in out and "masked │ Reverse:" in out
    assert " chosen │ " in out and "rejected │ " in out


# --------------------------------------------------------------------------- DPO runs (tiny model, fp32)


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An SFT run on the chosen replies; DPO continuing it with a live and a precomputed reference; one DPO run
    from a fresh adapter, resumed from its checkpoint-2 into another folder."""
    root = tmp_path_factory.mktemp("dpo")
    sft = _preference_recipe(root, "sft", "sft.yaml", training={"max_steps": 6, "learning_rate": 3e-3},
                             eval={"loss_before_after": False})
    runs = {name: root / name for name in ("sft", "live", "precomputed", "fresh", "resumed")}
    printed = {"sft": _train("--config", str(sft), f"output_dir={runs['sft']}")}
    dpo = _preference_recipe(root, "dpo", "dpo.yaml")
    for name in ("live", "precomputed"):
        printed[name] = _train("--config", str(dpo), f"output_dir={runs[name]}", f"model.adapter={runs['sft']}",
                               f"preference.reference={name}")
    printed["fresh"] = _train("--config", str(dpo), f"output_dir={runs['fresh']}")
    printed["resumed"] = _train("--config", str(dpo), f"output_dir={runs['resumed']}",
                                "--resume-from", str(runs["fresh"] / "checkpoint-2"))
    return {"runs": runs, "printed": printed, "dpo": dpo}


def test_dpo_starts_at_ln2_with_zero_rewards_from_a_fresh_adapter(dpo_runs):
    run = dpo_runs["runs"]["fresh"]
    first = next(e for e in json.loads((run / "log_history.json").read_text()) if "loss" in e)
    assert first["loss"] == pytest.approx(LN2, abs=1e-6)
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_loss_before"] == pytest.approx(LN2, abs=1e-6)
    assert metrics["eval_reward_margin_before"] == 0


def test_continuing_an_sft_adapter_its_reference_is_base_plus_that_adapter(dpo_runs):
    """At step 0 the policy is base + the SFT adapter; only a reference equal to it gives ln 2 exactly."""
    for name in ("live", "precomputed"):
        losses = _losses(dpo_runs["runs"][name])
        assert losses[0] == pytest.approx(LN2, abs=1e-6), name
    assert "continuing" in (dpo_runs["runs"]["live"] / "report.md").read_text()


def test_a_precomputed_reference_trains_the_same_run_as_a_live_one(dpo_runs):
    live, precomputed = (_losses(dpo_runs["runs"][name]) for name in ("live", "precomputed"))
    assert live[1] != pytest.approx(LN2, abs=1e-4)  # the policy moved: the loss now reads the reference
    assert precomputed == pytest.approx(live, abs=2e-5)


def test_a_resumed_dpo_run_ends_with_the_uninterrupted_adapter(dpo_runs):
    runs = dpo_runs["runs"]
    fresh, resumed = (load_file(runs[name] / "adapter_model.safetensors") for name in ("fresh", "resumed"))
    assert fresh.keys() == resumed.keys()
    for key in fresh:
        torch.testing.assert_close(resumed[key], fresh[key], rtol=0, atol=1e-6)


def test_a_dpo_run_folder_holds_the_trained_adapter_only_and_a_report_of_its_rewards(dpo_runs):
    run = dpo_runs["runs"]["fresh"]
    assert not (run / "ref").exists()  # TRL's frozen reference copy is not the model that was trained
    assert (run / "completed").exists()
    report = (run / "report.md").read_text()
    assert "DPO through TRL, beta 0.1" in report
    assert "Held-out preference accuracy" in report and "Held-out reward margin" in report
    assert (run / "figures/rewards.png").is_file() and (run / "figures/preference_accuracy.png").is_file()
    assert "Preference training: DPO through TRL" in dpo_runs["printed"]["fresh"]
    assert "20 train, 4 eval pairs" in dpo_runs["printed"]["fresh"]


def test_a_dpo_run_merges_exactly_and_what_reads_a_run_reads_it(dpo_runs, tmp_path, cli, hendrycks):
    run = dpo_runs["runs"]["live"]
    code, out, err = cli("merge-adapter", "--adapter", str(run), "--output", str(tmp_path / "merged"))
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "merged/merge_report.json").read_text())
    assert report["max_abs_logit_diff"] <= report["tolerance"], report
    code, out, err = cli("generate", "--adapter", str(run), "--max-new-tokens", "4", "--prompt", "Reverse: a b c")
    assert code == 0 and out.strip(), err[-3000:]
    code, out, err = cli("eval", "mmlu", "--model", "builtin:tiny-llama", "--adapter", str(run), "--data",
                         str(hendrycks), "--split", "test", "--output", str(tmp_path / "mmlu.json"))  # fmt: skip
    assert code == 0 and json.loads((tmp_path / "mmlu.json").read_text())["total"] == 6, err[-3000:]
    code, out, err = cli("serve", "--adapter", str(run), "--print-vllm-command")  # a plain LoRA: vLLM loads it
    assert code == 0 and out.startswith("vllm serve ") and "--enable-lora" in out, err[-3000:]


def test_a_dpo_run_is_served_live_and_answers_as_generate_does(dpo_runs, cli):
    from tests.test_serve import http, start_server, stop  # skips here when the serve extra is not installed

    run, prompt = dpo_runs["runs"]["fresh"], "Reverse: apple river stone\nAnswer:"
    code, out, err = cli("generate", "--adapter", str(run), "--max-new-tokens", "6", "--prompt", prompt)
    assert code == 0, err[-3000:]
    process, url = start_server("--adapter", f"dpo={run}")
    try:
        request = {"model": "dpo", "prompt": prompt, "max_tokens": 6, "temperature": 0}
        status, body = http("POST", f"{url}/v1/completions", json.dumps(request).encode(),
                            {"Content-Type": "application/json"})  # fmt: skip
    finally:
        stop(process)  # SIGTERM: drained, the exit status says so
    assert status == 200, body
    assert body["choices"][0]["text"].strip() == out.strip() != ""


def test_sigterm_stops_a_dpo_run_after_its_step_with_a_full_checkpoint(tmp_path):
    from tests.test_resume import _start, _wait_for

    recipe = _preference_recipe(tmp_path, "dpo", training={"max_steps": 400, "save_steps": 2, "save_total_limit": 2})
    run = tmp_path / "run"
    process = _start(recipe, run)
    _wait_for(run / "checkpoint-2", process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    last = max(int(p.name.removeprefix("checkpoint-")) for p in run.glob("checkpoint-*"))
    assert 2 <= last < 400 and f"SIGTERM: stopped after step {last} of 400" in err
    assert f"Resume with: qlora train --config {recipe} output_dir={run} --resume" in err
    saved = {p.name for p in (run / f"checkpoint-{last}").iterdir()}
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= saved
    assert not (run / "completed").exists() and not (run / "adapter_model.safetensors").exists()


def test_dpo_leaves_the_4bit_base_bit_identical_and_trains_the_adapter(tmp_path):
    """TRL casts a quantized model's trainable weights; nothing may touch the frozen 4-bit base."""
    from qlora_cli.config import load_recipe
    from qlora_cli.data.preference import prepare_preference_data
    from qlora_cli.model import add_lora, load_model
    from qlora_cli.preference import build_preference_trainer

    recipe = load_recipe(_preference_recipe(tmp_path), [f"output_dir={tmp_path / 'run'}"])
    loaded = load_model(recipe.model, recipe.quantization)
    loaded.model = add_lora(loaded.model, recipe.lora, kind=loaded.kind, tokenizer=loaded.tokenizer)

    def frozen() -> str:
        digest = hashlib.sha256()
        for name, tensor in sorted(loaded.model.state_dict().items()):
            if "lora_" not in name:
                digest.update(name.encode() + tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    before = frozen()
    dtypes = {name: p.dtype for name, p in loaded.model.named_parameters() if p.requires_grad}
    data = prepare_preference_data(recipe.data, "dpo", loaded.tokenizer, seed=0)
    trainer = build_preference_trainer(recipe, loaded, data)
    assert {name: p.dtype for name, p in loaded.model.named_parameters() if p.requires_grad} == dtypes  # not bf16
    adapter = {name: p.detach().clone() for name, p in loaded.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert frozen() == before
    moved = [name for name, p in loaded.model.named_parameters() if p.requires_grad and not torch.equal(p, adapter[name])]
    assert moved


# --------------------------------------------------------------------------- ORPO and KTO


@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_orpo_and_kto_train_and_lower_their_loss(method, tmp_path):
    recipe = _preference_recipe(tmp_path, method, training={"max_steps": 12, "learning_rate": 3e-3, "batch_size": 4,
                                                            "logging_steps": 4})
    _train("--config", str(recipe), f"output_dir={tmp_path / 'run'}")
    losses = _losses(tmp_path / "run")
    assert losses[-1] < losses[0], losses
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert metrics["tokens"] > 0  # ORPO's batches have no input_ids: counted from its chosen/rejected masks


# --------------------------------------------------------------------------- the real model on real pairs


def test_dpo_on_real_hh_rlhf_pairs_raises_held_out_preference_accuracy_and_margin(shared_data, tmp_path):
    """SmolLM2-135M-Instruct, HH-RLHF helpful-base pairs: a short DPO run prefers the chosen replies more."""
    from tests.conftest import REPO

    _train(
        "--config", str(REPO / "configs/smollm2-135m-hh-rlhf-dpo.yaml"), f"output_dir={tmp_path / 'run'}",
        f"data.path={shared_data / 'hh_rlhf/helpful-base/test.jsonl.gz'}", "data.max_train_samples=96",
        "data.source_max_len=128", "data.target_max_len=64", "training.max_steps=8",
        "training.gradient_accumulation_steps=1", "training.save_steps=100",
    )  # fmt: skip
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["eval_loss_before"] == pytest.approx(LN2, abs=1e-3)
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert metrics["eval_reward_margin_after"] > metrics["eval_reward_margin_before"] == 0
    assert metrics["eval_preference_accuracy_after"] > 0.5


def test_plan_counts_a_pair_as_two_sequences_through_the_policy():
    from qlora_cli.plan import known_architecture, plan_memory, render_plan

    arch = known_architecture("llama-7b")
    pairs, no_dropout = {"dataset": "preference"}, {"dropout": 0.0}  # preference training turns dropout off
    recipes = {
        "sft": _validate(data=pairs, training={"batch_size": 2}, lora=no_dropout),
        "dpo": _validate(data=pairs, training={"batch_size": 2, "method": "dpo"}),
        "dpo without dropout": _validate(data=pairs, training={"batch_size": 2, "method": "dpo"}, lora=no_dropout),
    }
    planned = {name: plan_memory(recipe, arch, device="cuda") for name, recipe in recipes.items()}
    sft_act, dpo_act, same = (planned[name].estimates[0].activations_full for name in recipes)
    assert dpo_act > 1.9 * sft_act
    assert dpo_act == same  # lora.dropout=0.1 in the recipe keeps no dropped copies in DPO
    assert "batch 2 pairs (chosen + rejected)" in render_plan(planned["dpo"])


def test_plan_counts_trls_frozen_copy_of_the_adapter_as_the_reference():
    from qlora_cli.plan import known_architecture, plan_memory

    arch = known_architecture("llama-7b")
    pairs = {"data": {"dataset": "preference"}, "training": {"batch_size": 2}}
    copies = {}
    for method in ("sft", "dpo", "orpo"):
        recipe = _validate(**{**pairs, "training": {"batch_size": 2, "method": method}})
        qlora, _, full = plan_memory(recipe, arch, device="cuda").estimates
        copies[method] = (qlora.reference_weights, qlora.lora_weights, full.reference_weights)
    assert copies["sft"] == (0, copies["sft"][1], 0) and copies["orpo"][0] == copies["orpo"][2] == 0
    reference, adapter, full_model = copies["dpo"]
    assert reference == adapter > 0 and full_model == 2 * arch.params  # a bf16 copy of the whole model
