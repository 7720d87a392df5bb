"""MMLU: prompts character for character, scoring against hand-computed logits, aggregation, the callback,
and the real data (the paper code's JSON, all 57 Hendrycks subjects) when ../shared/data is present."""

from __future__ import annotations

import csv
import inspect
import json

import pytest
import torch

from qlora_cli.config import MmluEvalConfig, ModelConfig, QuantizationConfig
from qlora_cli.errors import QloraError
from qlora_cli.eval.mmlu import (
    SUBJECTS,
    Item,
    Question,
    build_prompts,
    cache_argument_name,
    format_question,
    format_subject,
    letter_token_ids,
    load_items,
    score_prompts,
    summarize,
)
from tests.conftest import bnb_defaults_of_an_avx512_bf16_cpu, run_cli, run_script
from tests.data_fixtures import hendrycks  # noqa: F401 (fixture)

HEADER = "The following are multiple choice questions (with answers) about  high school physics.\n\n"


class WordTokenizer:
    """Counts whitespace-separated words: makes the shot-dropping limit exact and readable."""

    def __call__(self, text: str, **kwargs) -> dict:
        return {"input_ids": list(range(len(text.split())))}




# --------------------------------------------------------------------------- prompts


def test_prompts_match_the_original_code_character_for_character(hendrycks):
    items = load_items(MmluEvalConfig(data=str(hendrycks), split="test", shots=5), WordTokenizer())
    shots = "".join(
        f"Dev question {i}?\nA. a{i}\nB. b{i}\nC. c{i}\nD. d{i}\nAnswer: {'ABCD'[i % 4]}\n\n" for i in range(5)
    )
    assert items[0].prompt == HEADER + shots + 'What is 2+2?\nA. 3\nB. 4\nC. "five", maybe\nD. 22\nAnswer:'
    assert (items[0].subject, items[0].index, items[0].answer, items[0].shots) == ("high_school_physics", 0, "B", 5)
    assert [i.subject for i in items] == ["high_school_physics"] * 3 + ["philosophy"] * 3
    assert items[3].prompt.startswith(
        "The following are multiple choice questions (with answers) about  philosophy.\n\nDev question 0?"
    )

    zero = load_items(MmluEvalConfig(data=str(hendrycks), split="test", shots=0), WordTokenizer())
    assert zero[1].prompt == HEADER + "Which one is a unit of force?\nA. newton\nB. joule\nC. watt\nD. pascal\nAnswer:"


def test_shots_are_dropped_from_the_end_until_the_prompt_fits():
    dev = [Question("high_school_physics", f"Q{i} is long", ("w", "x", "y", "z"), "C") for i in range(5)]
    question = Question("high_school_physics", "Final?", ("1", "2", "3", "4"), "A")
    shot = "Q{} is long\nA. w\nB. x\nC. y\nD. z\nAnswer: C\n\n"
    tail = "Final?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    # header 12 words, each shot 13, the question 10: three shots make 12 + 39 + 10 = 61 words
    (item,) = build_prompts("high_school_physics", dev, [question], 5, WordTokenizer(), max_length=61)
    assert item.shots == 3
    assert item.prompt == HEADER + "".join(shot.format(i) for i in range(3)) + tail
    (short,) = build_prompts("high_school_physics", dev, [question], 5, WordTokenizer(), max_length=60)
    assert short.shots == 2
    (bare,) = build_prompts("high_school_physics", dev, [question], 5, WordTokenizer(), max_length=1)
    assert (bare.shots, bare.prompt) == (0, HEADER + tail)


def test_subject_words_keep_the_originals_leading_spaces():
    assert format_subject("us_foreign_policy") == " us foreign policy"
    q = Question("x", "Q", ("a", "b", "c", "d"), "D")
    assert format_question(q, with_answer=True) == "Q\nA. a\nB. b\nC. c\nD. d\nAnswer: D\n\n"


def test_data_errors_name_the_file_and_line(hendrycks, tmp_path):
    with pytest.raises(QloraError, match="unknown MMLU subject 'philosophyy'.*did you mean 'philosophy'"):
        load_items(MmluEvalConfig(data=str(hendrycks), shots=0, split="test", subjects=["philosophyy"]), None)

    (hendrycks / "dev" / "high_school_physics_dev.csv").unlink()
    with pytest.raises(QloraError, match="high_school_physics_dev.csv: missing"):
        load_items(MmluEvalConfig(data=str(hendrycks), split="test", shots=5), WordTokenizer())

    bad = hendrycks / "test" / "philosophy_test.csv"
    with bad.open("a", newline="") as f:
        csv.writer(f).writerow(["Q", "a", "b", "c", "d", "E"])
    with pytest.raises(QloraError, match=rf"{bad}:4: answer must be one of A, B, C, D, got 'E'"):
        load_items(MmluEvalConfig(data=str(hendrycks), split="test", shots=0), WordTokenizer())

    jsonl = tmp_path / "bad.json"
    jsonl.write_text('{"subject": "anatomy", "input": "Q\\nAnswer:", "output": "A"}\n{"subject": "anatomy"}\n')
    with pytest.raises(QloraError, match=rf"{jsonl}:2: expected a JSON object with subject, input, output"):
        load_items(MmluEvalConfig(data=str(jsonl)), WordTokenizer())



def test_hub_offline_says_how_to_use_local_data():
    with pytest.raises(QloraError, match="cais/mmlu.*--data"):
        load_items(MmluEvalConfig(), WordTokenizer())


def test_paper_json_lines_are_read_as_built(tmp_path):
    path = tmp_path / "zero_shot_mmlu_val.json"
    rows = [
        {"subject": s, "input": f"{s} {i}\nAnswer:", "output": "ABCD"[i]}
        for s in ("anatomy", "virology")
        for i in range(3)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_folder = load_items(MmluEvalConfig(data=str(tmp_path), split="val", shots=0, limit=2), None)
    assert [(i.subject, i.index, i.prompt, i.answer, i.shots) for i in by_folder] == [
        ("anatomy", 0, "anatomy 0\nAnswer:", "A", None),
        ("anatomy", 1, "anatomy 1\nAnswer:", "B", None),
        ("virology", 0, "virology 0\nAnswer:", "A", None),
        ("virology", 1, "virology 1\nAnswer:", "B", None),
    ]
    only = load_items(MmluEvalConfig(data=str(path), subjects=["virology"]), None)
    assert [i.prompt for i in only] == [f"virology {i}\nAnswer:" for i in range(3)]


# --------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def tiny_llama():
    """Built with bitsandbytes' AVX512-BF16 defaults, in fp32 (the scores below are checked against fp32 by hand).

    The fused kernel's bf16 scores are checked in tests/test_kernels.py.
    """
    from qlora_cli.model import load_for_inference

    fp32 = QuantizationConfig(compute_dtype="fp32")  # NF4 + double quant
    with bnb_defaults_of_an_avx512_bf16_cpu():
        return load_for_inference(ModelConfig(name_or_path="builtin:tiny-llama"), fp32)


def _prompts(n_per_group: int = 5, shots: int = 3) -> tuple[list[str], list[tuple]]:
    """Two groups with shared prefixes (long with shots, a short header without) and questions of different lengths."""
    prompts, groups = [], []
    for subject in ("apple river", "stone cloud"):
        prefix = f"The following are about {subject}.\n\n" + "Repeat the words. green music\nAnswer: A\n\n" * shots
        for i in range(n_per_group):
            prompts.append(prefix + "house " * (1 + 3 * i) + "\nA. one\nB. two\nC. three\nD. four\nAnswer:")
            groups.append((subject, shots))
    return prompts, groups


@pytest.mark.parametrize("shots", [3, 0])
def test_scores_equal_logits_computed_by_hand(tiny_llama, shots):
    model, tokenizer = tiny_llama.model, tiny_llama.tokenizer
    prompts, groups = _prompts(shots=shots)
    letters = letter_token_ids(tokenizer)
    bos = tokenizer.bos_token_id
    with torch.no_grad():
        by_hand = torch.stack(
            [
                model(input_ids=torch.tensor([[bos, *tokenizer(p, add_special_tokens=False).input_ids]])).logits[0, -1]
                for p in prompts
            ]
        )[:, letters]
    cache_argument = cache_argument_name(set(inspect.signature(model.forward).parameters))
    assert cache_argument, "this transformers release passes the KV cache under a name score_prompts does not know"
    reused_cache = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: reused_cache.append(kwargs.get(cache_argument) is not None), with_kwargs=True
    )
    try:
        scored = score_prompts(tiny_llama, prompts, batch_size=4, groups=groups)
    finally:
        hook.remove()
    assert reused_cache.count(True) == 4  # two groups of five in batches of 4: each group's prefix encoded once
    assert reused_cache.count(False) == 2  # the two prefixes, however short a share of their prompts
    torch.testing.assert_close(scored, by_hand, atol=1e-4, rtol=1e-4)
    assert scored.argmax(1).tolist() == by_hand.argmax(1).tolist()


def test_predictions_do_not_depend_on_batch_size(tiny_llama):
    prompts, groups = _prompts(7)
    runs = [
        score_prompts(tiny_llama, prompts, batch_size=bs, groups=g)
        for bs, g in ((1, None), (3, groups), (16, groups), (16, None))
    ]
    for other in runs[1:]:
        assert other.argmax(1).tolist() == runs[0].argmax(1).tolist()
        torch.testing.assert_close(other, runs[0], atol=1e-4, rtol=1e-4)


def test_a_group_goes_in_even_batches_longest_first(tiny_llama):
    """Ten questions at batch 8 go as 5 + 5, not 8 + 2: the short batch would pad its prompts to the long ones."""
    prompts, groups = _prompts(10)
    model = tiny_llama.model
    lengths = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["attention_mask"].sum(1).tolist())
        if kwargs.get("attention_mask") is not None else None,
        with_kwargs=True,
    )
    try:
        score_prompts(tiny_llama, prompts, batch_size=8, groups=groups)
    finally:
        hook.remove()
    assert [len(batch) for batch in lengths] == [5, 5, 5, 5]
    for first, second in zip(lengths[::2], lengths[1::2]):
        assert min(first) >= max(second)


def test_seq2seq_scores_the_first_decoder_token():
    from qlora_cli.model import load_for_inference

    fp32 = QuantizationConfig(bits=16, compute_dtype="fp32")
    t5 = load_for_inference(ModelConfig(name_or_path="builtin:tiny-t5"), fp32)
    prompts, _ = _prompts(2)
    letters = letter_token_ids(t5.tokenizer)
    start, eos = torch.tensor([[t5.model.config.decoder_start_token_id]]), t5.tokenizer.eos_token_id
    with torch.no_grad():
        by_hand = torch.stack(
            [
                t5.model(
                    input_ids=torch.tensor([[*t5.tokenizer(p, add_special_tokens=False)["input_ids"], eos]]),
                    decoder_input_ids=start,
                ).logits[0, 0, letters]
                for p in prompts
            ]
        )
    scored = score_prompts(t5, prompts, batch_size=3)
    torch.testing.assert_close(scored, by_hand, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- aggregation


def test_accuracy_per_subject_category_and_overall():
    def item(subject: str, index: int, answer: str) -> Item:
        return Item(subject, index, "", answer, 5)

    items = [item("anatomy", 0, "A"), item("anatomy", 1, "B"), item("anatomy", 2, "C"), item("anatomy", 3, "D")]
    items += [item("virology", 0, "A"), item("college_physics", 0, "B"), item("college_physics", 1, "C")]
    # predictions: anatomy A, A, C, A -> 2/4; virology A -> 1/1; college_physics B, B -> 1/2
    rows = [[9, 0, 0, 0], [9, 1, 0, 0], [0, 0, 9, 0], [5, 0, 0, 4], [3, 2, 1, 0], [0, 7, 0, 0], [0, 7, 6, 0]]
    result = summarize(items, torch.tensor(rows, dtype=torch.float))
    assert {s: (a.correct, a.total) for s, a in result.subjects.items()} == {
        "anatomy": (2, 4),
        "college_physics": (1, 2),
        "virology": (1, 1),
    }
    assert {c: (a.correct, a.total) for c, a in result.categories.items()} == {"STEM": (1, 2), "other": (3, 5)}
    assert result.mean_subject_accuracy == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert (result.questions.correct, result.questions.total) == (4, 7)
    assert result.metrics() == {
        "mmlu_accuracy": pytest.approx(2 / 3),
        "mmlu_accuracy_STEM": 0.5,
        "mmlu_accuracy_other": 0.6,
    }
    assert result.predictions[3] == {
        "subject": "anatomy",
        "index": 3,
        "answer": "D",
        "prediction": "A",
        "logits": {"A": 5.0, "B": 0.0, "C": 0.0, "D": 4.0},
        "shots": 5,
    }


def test_every_subject_has_one_of_the_four_categories():
    from qlora_cli.eval.mmlu import CATEGORIES, SUBJECT_CATEGORY

    assert len(SUBJECTS) == 57
    counts = {c: sum(v == c for v in SUBJECT_CATEGORY.values()) for c in CATEGORIES}
    assert counts == {"STEM": 18, "humanities": 13, "social sciences": 12, "other": 14}


# --------------------------------------------------------------------------- command and callback


def test_command_needs_a_model_or_a_recipe(cli):
    code, _, err = cli("eval", "mmlu", "--data", "x")
    assert code == 2 and "--model" in err and "--config" in err


def test_callback_logs_mmlu_during_training_and_the_command_reproduces_it(cli, hendrycks, tmp_path):
    from tests.conftest import REPO

    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"extends: {REPO / 'configs/demo.yaml'}\n"
        f"output_dir: {run}\n"
        "model: {name_or_path: builtin:tiny-llama}\n"
        "data: {eval_size: 8}\n"
        "quantization: {compute_dtype: fp32}\n"
        "training: {max_steps: 2, batch_size: 4, save_steps: 2, logging_steps: 1}\n"
        f"eval: {{exact_match_samples: 0, loss_before_after: false, knowledge_probes: [],\n"
        f"       mmlu: {{every_n_steps: 2, split: test, shots: 5, data: {hendrycks}}}}}\n"
    )
    code, _, err = cli("eval", "mmlu", "--config", str(recipe), "--data", str(hendrycks))
    assert code == 2 and "holds no trained adapter" in err

    code, out, err = cli("train", "--config", str(recipe))
    assert code == 0, err
    assert "step 2: MMLU" in out + err
    history = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    logged = next(e for e in history if "mmlu_accuracy" in e)
    assert logged["step"] == 2
    assert set(logged) >= {"mmlu_accuracy", "mmlu_accuracy_STEM", "mmlu_accuracy_humanities"}

    out = tmp_path / "results.json"
    preds = tmp_path / "preds.jsonl"
    code, stdout, err = cli(
        "eval", "mmlu", "--config", str(recipe), "--data", str(hendrycks), "--split", "test",
        "--batch-size", "2", "--output", str(out), "--predictions", str(preds),
    )  # fmt: skip
    assert code == 0, err
    results = json.loads(out.read_text())
    assert results["mean_subject_accuracy"] == pytest.approx(logged["mmlu_accuracy"])
    assert results["settings"]["adapter"] == str(run) and results["settings"]["shots"] == 5
    assert results["settings"]["cpu_kernel"] == "dequantize+matmul"  # fp32 compute: never the fused bf16 kernel
    assert set(results["subjects"]) == {"high_school_physics", "philosophy"}
    assert results["categories"]["STEM"]["total"] == 3 and results["total"] == 6
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 6 and set(rows[0]) >= {"subject", "index", "answer", "prediction", "logits"}
    assert sum(r["answer"] == r["prediction"] for r in rows) == results["correct"]
    assert "mean over subjects" in stdout and "philosophy" in stdout


# --------------------------------------------------------------------------- real data


def test_zero_shot_prompts_equal_the_paper_codes_test_json(shared_data):
    mmlu = shared_data / "mmlu"
    built = load_items(MmluEvalConfig(data=str(mmlu / "hendrycks"), split="test", shots=0), None)
    paper = [json.loads(line) for line in (mmlu / "qlora" / "zero_shot_mmlu_test.json").open()]
    assert len(built) == len(paper) == 14042
    assert [(i.subject, i.prompt, i.answer) for i in built] == [(r["subject"], r["input"], r["output"]) for r in paper]


def test_five_shot_prompts_and_dropping_match_the_paper_codes_val_json(shared_data):
    """Rebuild each paper prompt from its question and the dev CSVs with the LLaMA tokenizer's 2048 limit."""
    from transformers import AutoTokenizer

    from qlora_cli.eval.mmlu import read_hendrycks

    tokenizer = AutoTokenizer.from_pretrained(shared_data / "models" / "basaran-tiny-random-llama")
    dev, _ = read_hendrycks(shared_data / "mmlu" / "hendrycks", "test", need_dev=True)
    paper = [json.loads(line) for line in (shared_data / "mmlu" / "qlora" / "five_shot_mmlu_val.json").open()]
    checked = dropped = 0
    for n, record in enumerate(paper):
        subject = record["subject"]
        header = f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
        shots = [format_question(q, with_answer=True) for q in dev[subject]]
        kept = max(k for k in range(6) if record["input"].startswith(header + "".join(shots[:k])))
        if kept == 5 and n % 10:
            continue  # every prompt that lost shots, and a tenth of the others
        tail = record["input"][len(header + "".join(shots[:kept])) :]
        question = _parse_question(subject, tail, record["output"])
        (item,) = build_prompts(subject, dev[subject], [question], 5, tokenizer, 2048)
        assert item.prompt == record["input"], f"record {n}"
        assert item.shots == kept
        checked += 1
        dropped += kept < 5
    assert dropped == 56 and checked > 200


def _parse_question(subject: str, text: str, answer: str) -> Question:
    body = text.removesuffix("\nAnswer:")
    choices: list[str] = []
    for letter in "DCBA":
        body, _, choice = body.rpartition(f"\n{letter}. ")
        choices.insert(0, choice)
    return Question(subject, body, tuple(choices), answer)


def test_paper_json_is_read_directly(shared_data):
    qlora = shared_data / "mmlu" / "qlora"
    items = load_items(MmluEvalConfig(data=str(qlora), split="val", shots=5), None)
    assert len(items) == 1531 and len({i.subject for i in items}) == 57
    assert items[0].prompt.startswith(HEADER.replace("high school physics", "abstract algebra"))
    direct = load_items(MmluEvalConfig(data=str(qlora / "zero_shot_mmlu_test.json"), limit=1), None)
    assert len(direct) == 57 and all(i.index == 0 and i.prompt.endswith("\nAnswer:") for i in direct)


def test_letter_tokens_are_the_paper_codes_on_the_llama_tokenizer(shared_data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_data / "models" / "basaran-tiny-random-llama")
    paper = [tokenizer(letter, add_special_tokens=False).input_ids[0] for letter in "ABCD"]
    assert letter_token_ids(tokenizer) == paper


def test_full_five_shot_run_over_all_57_subjects(shared_data, tmp_path):
    """The real command on a tiny random LLaMA with the real tokenizer: every subject, one question each."""
    out = tmp_path / "results.json"
    result = run_cli(
        "eval", "mmlu", "--model", str(shared_data / "models" / "basaran-tiny-random-llama"),
        "--quantization", "none", "--data", str(shared_data / "mmlu" / "hendrycks"), "--shots", "5",
        "--limit", "1", "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert sorted(results["subjects"]) == list(SUBJECTS)
    assert results["total"] == 57 and sum(c["subjects"] for c in results["categories"].values()) == 57
    assert "mean over subjects" in result.stdout and "world_religions" in result.stdout


def test_bench_script_finds_the_batched_scorer_equal_to_one_question_at_a_time(hendrycks):
    """scripts/bench_mmlu.py's own check: both scorers predict the same letter for every question."""
    args = ["--model", "builtin:tiny-llama", "--data", str(hendrycks), "--subjects", "high_school_physics,philosophy"]
    args += ["--batch-size", "2"]
    result = run_script("bench_mmlu.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "5-shot, 6 questions from 2 subjects" in result.stdout
    assert "identical predictions: 6/6" in result.stdout
    batched_row = next(line for line in result.stdout.splitlines() if line.startswith("batched"))
    less_work = float(batched_row.split()[-1].rstrip("x"))
    assert less_work > 1.5  # each subject's header and shots went through the linear layers once, not per question
