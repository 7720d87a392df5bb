import json

import pytest

from qlora_cli.data.formats import FORMATS
from qlora_cli.errors import QloraError
from qlora_cli.generate import Generator, Sampling, cut_at_stop, load_generator, read_prompts
from tests.trained import llama_adapter, merged_model, t5_adapter  # noqa: F401 (fixtures)

# Very different lengths, so batching pads some prompts by many tokens.
PROMPTS = [
    "Write the digits as words.",
    "Hi",
    "Reverse the order of the words: apple river stone cloud tiger green music paper light house ocean.",
    "What is the last word?",
]


@pytest.fixture(scope="module")
def adapter_generator(llama_adapter):
    return load_generator(None, llama_adapter)


@pytest.fixture(scope="module")
def merged_llama(llama_adapter):
    return merged_model("llama")


def test_base_nf4_plus_adapter_loads_as_trained_in_the_recipes_format(adapter_generator):
    import bitsandbytes as bnb

    modules = list(adapter_generator.loaded.model.modules())
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in modules)
    assert adapter_generator.prompt_format.name == "alpaca"
    assert adapter_generator.format("Hi") == FORMATS["alpaca"].prompt("Hi")


def test_greedy_output_is_the_same_for_batch_size_1_and_4(adapter_generator):
    prompts = [adapter_generator.format(p) for p in PROMPTS]
    one = adapter_generator.generate(prompts, Sampling(max_new_tokens=6, batch_size=1))
    four = adapter_generator.generate(prompts, Sampling(max_new_tokens=6, batch_size=4))
    assert one == four
    assert any(one)


def test_generate_on_merged_model_matches_base_plus_adapter(cli, tmp_path, monkeypatch, llama_adapter, merged_llama):
    """In fp32, as `auto` is on a CPU without bf16 units: in bf16 a tiny random model's near-ties fall either way."""
    monkeypatch.setattr("qlora_cli.model.bf16_matrix_units", lambda **_: None)
    adapter_generator = load_generator(None, llama_adapter)
    prompts_file = tmp_path / "prompts.jsonl"
    records = [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS[:2])] + [{"text": PROMPTS[2]}]
    prompts_file.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    code, out, err = cli(
        "generate", "--model", str(merged_llama), "--prompts", str(prompts_file), "--max-new-tokens", "6"
    )
    assert code == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    assert [{k: v for k, v in r.items() if k != "output"} for r in results] == records
    expected = adapter_generator.generate(
        [adapter_generator.format(p) for p in PROMPTS[:3]], Sampling(max_new_tokens=6)
    )  # the merged folder's recipe.yaml brought the alpaca format along
    assert [r["output"] for r in results] == expected


def test_single_prompt_prints_only_the_reply(cli, t5_adapter):
    code, out, err = cli("generate", "--adapter", str(t5_adapter), "--prompt", PROMPTS[0], "--max-new-tokens", "6")
    assert code == 0, err
    generator = load_generator(None, t5_adapter)
    assert generator.loaded.kind.name == "seq2seq"
    expected = generator.generate([generator.format(PROMPTS[0])], Sampling(max_new_tokens=6))[0]
    assert out == expected + "\n"


def test_prompt_and_prompts_are_exclusive(cli, tmp_path):
    code, _, err = cli("generate", "--adapter", str(tmp_path), "--prompt", "a", "--prompts", str(tmp_path / "p"))
    assert code == 2 and "either --prompt" in err
    code, _, err = cli("generate", "--adapter", str(tmp_path))
    assert code == 2 and "either --prompt" in err


def test_guanaco_prompt_and_its_turn_marker_as_stop_string():
    generator = Generator(loaded=None, prompt_format=FORMATS["oasst1"])
    assert generator.format("What is NF4?") == "### Human: What is NF4? ### Assistant:"
    assert generator.stop_strings == ["### Human:"]
    assert Generator(loaded=None, prompt_format=None).stop_strings == []


def test_cut_at_stop():
    assert cut_at_stop(" Paris. ### Human: and", ["### Human:"]) == " Paris. "
    assert cut_at_stop("no marker", ["### Human:"]) == "no marker"
    assert cut_at_stop("a b", []) == "a b"


def test_read_prompts_formats(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first\n\nsecond\n")
    assert read_prompts(text) == [{"prompt": "first"}, {"prompt": "second"}]
    array = tmp_path / "p.json"
    array.write_text(json.dumps(["a", {"instruction": "b", "input": ""}]))
    assert read_prompts(array) == [{"prompt": "a"}, {"instruction": "b", "input": ""}]


def test_read_prompts_names_the_bad_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "no prompt field"}\n')
    with pytest.raises(QloraError, match=r"p.jsonl:2: expected a string or an object with a prompt/instruction/text"):
        read_prompts(bad)
    bad.write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(QloraError, match=r"p.jsonl:2: invalid JSON"):
        read_prompts(bad)
