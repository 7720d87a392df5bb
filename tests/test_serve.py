"""`qlora serve`: the real server on 127.0.0.1, talked to with the real `openai` client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from qlora_cli.builtin import resolve_builtin_model  # noqa: E402
from qlora_cli.config import ModelConfig, QuantizationConfig  # noqa: E402
from qlora_cli.generate import Generator  # noqa: E402
from qlora_cli.model import load_for_inference  # noqa: E402
from qlora_cli.serve.engine import Engine, Job  # noqa: E402
from qlora_cli.serve.models import ServedModel  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.trained import llama_adapter, second_llama_adapter  # noqa: E402, F401 (fixtures)

KEY = "sk-test"
WORDS = "apple stone cloud tiger green music paper light house ocean bread chair dream flame glass honey".split()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """A plain request, for what the openai client would not send (broken JSON, no key)."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def health(url: str) -> dict:
    return http("GET", f"{url}/health")[1]


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "qlora_cli", "serve", "--port", str(port), *args],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "2"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}: {process.stderr.read()[-3000:]}")
        try:
            if http("GET", f"{url}/health")[0] == 200:
                return process, url
        except OSError:  # not listening yet
            time.sleep(0.5)
    process.kill()
    pytest.fail("the server did not come up")


@pytest.fixture(scope="module")
def server(llama_adapter, second_llama_adapter):
    process, url = start_server(
        "--adapter", f"one={llama_adapter}", "--adapter", f"two={second_llama_adapter}", "--api-key", KEY,
        "--max-tokens", "64", "--max-concurrent", "32", "--max-body-bytes", "65536",
    )  # fmt: skip
    yield url
    stop(process)


def stop(process: subprocess.Popen, *, signalled: bool = False) -> None:
    """uvicorn drains, then re-raises the signal: the exit status says SIGTERM, as a shell expects."""
    if not signalled:
        process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == -signal.SIGTERM
    assert "Stopped: every request in flight was answered" in process.stderr.read()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def chat(client, content: str, model: str = "one", **options):
    options = {"temperature": 0, "max_tokens": 24, **options}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **options)


def test_models_lists_every_adapter_by_its_name(client):
    assert [m.id for m in client.models.list()] == ["one", "two"]


def test_chat_completion_with_usage(client):
    reply = chat(client, "Repeat the words. apple river")
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "one"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_is_rendered_in_the_runs_prompt_format(client, llama_adapter):
    """The demo recipe trains alpaca prompts: the chat prompt is the alpaca prompt, token for token."""
    from qlora_cli.data.formats import FORMATS
    from qlora_cli.model import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(llama_adapter)))
    expected = len(tokenizer(FORMATS["alpaca"].prompt("Name a colour."), add_special_tokens=False)["input_ids"]) + 1
    assert chat(client, "Name a colour.").usage.prompt_tokens == expected  # + BOS


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_chunks_reassemble_to_the_unstreamed_text(client, kind):
    if kind == "chat":
        whole = chat(client, "Reverse the order of the words. stone river").choices[0].message.content
        chunks = chat(client, "Reverse the order of the words. stone river", stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        options = {"model": "one", "prompt": "Write the digits as words. 4 2", "max_tokens": 24, "temperature": 0}
        whole = client.completions.create(**options).choices[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(**options, stream=True))
    assert whole and streamed == whole


def test_stream_can_report_usage(client):
    chunks = list(chat(client, "Repeat the words. apple", stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_two_adapters_on_one_base_answer_differently(client):
    prompt = "Repeat the words. apple river stone"
    assert chat(client, prompt, model="one").choices[0].message.content != chat(
        client, prompt, model="two"
    ).choices[0].message.content


def test_concurrent_requests_are_batched_and_equal_their_one_at_a_time_answers(client, server):
    prompts = [f"Repeat the words. {word} river" for word in WORDS]
    alone = [chat(client, p).choices[0].message.content for p in prompts]
    before = health(server)["batches"]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: chat(client, p).choices[0].message.content, prompts))
    after = health(server)
    assert together == alone
    assert after["largest_batch"] > 1 and after["batches"] - before < len(prompts)
    assert after["active_requests"] == 0


def test_seed_makes_sampling_repeatable(client):
    options = {"temperature": 1.0, "top_p": 0.9, "max_tokens": 16}
    first, again, other = (
        chat(client, "Repeat the words. cloud", seed=seed, **options).choices[0].message.content for seed in (7, 7, 8)
    )
    assert first == again
    assert other != first


def test_stop_strings_end_the_reply_before_them(client):
    options = {"model": "one", "prompt": "Write the digits as words. 1 2 3", "max_tokens": 24, "temperature": 0}
    whole = client.completions.create(**options).choices[0].text
    assert len(whole) > 4
    stop = whole[2:4]
    cut = client.completions.create(**options, stop=[stop]).choices[0]
    assert cut.text == whole[: whole.index(stop)].rstrip() and cut.finish_reason == "stop"


@pytest.mark.parametrize(
    ("options", "status", "param"),
    [
        ({"model": "three"}, 404, "model"),
        ({"max_tokens": 65}, 400, "max_tokens"),  # over --max-tokens
        ({"n": 2}, 400, "n"),
        ({"temperature": 5}, 400, "temperature"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "apple " * 600}]}, 400, "messages"),  # context is 512 tokens
    ],
)
def test_bad_requests_get_openai_errors_naming_the_field(client, server, options, status, param):
    request = {"model": "one", "messages": [{"role": "user", "content": "hi"}], **options}
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**request)
    assert caught.value.status_code == status
    error = caught.value.body
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    assert health(server)["status"] == "ok"  # still serving


def test_malformed_json_wrong_key_and_oversized_bodies(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    status, body = http("POST", f"{server}/v1/chat/completions", b'{"model": "one", "messages": [', headers)
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = http("GET", f"{server}/v1/models", headers={"Authorization": "Bearer sk-wrong"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert http("GET", f"{server}/v1/models")[0] == 401  # no key at all
    status, body = http("POST", f"{server}/v1/completions", b"x" * 70_000, headers)
    assert status == 413 and body["error"]["code"] == "body_too_large"


def test_print_vllm_command_serves_the_same_adapters(cli, llama_adapter, second_llama_adapter):
    code, out, err = cli(
        "serve", "--adapter", f"one={llama_adapter}", "--adapter", f"two={second_llama_adapter}",
        "--port", "9000", "--print-vllm-command",
    )  # fmt: skip
    assert code == 0, err
    words = out.split()
    assert words[:3] == ["vllm", "serve", resolve_builtin_model("builtin:tiny-llama")]  # the base's folder
    assert "--enable-lora" in words and "--quantization" in words and "bitsandbytes" in words
    assert f"one={llama_adapter.resolve()}" in words and f"two={second_llama_adapter.resolve()}" in words
    assert words[words.index("--max-lora-rank") + 1] == "64" and words[words.index("--port") + 1] == "9000"


# --------------------------------------------------------------------------- the engine itself


@pytest.fixture(scope="module")
def engine(llama_adapter):
    loaded = load_for_inference(ModelConfig(name_or_path="builtin:tiny-llama"), QuantizationConfig())
    return Engine(loaded, {"base": ServedModel("base", None, Generator(loaded, None))}, max_batch_size=8)


def _job(engine: Engine, words: str, max_tokens: int, log: list, name: str) -> Job:
    return Job("base", engine.loaded.prompt_ids([words])[0], max_tokens, emit=lambda t, r: log.append((name, t, r)))


def test_a_short_row_is_answered_while_its_batch_goes_on(engine):
    log: list = []
    short, long = _job(engine, "apple river", 2, log, "short"), _job(engine, "stone cloud", 40, log, "long")
    engine._generate([short, long])
    ends = {name: i for i, (name, _, reason) in enumerate(log) if reason is not None}
    assert log[ends["short"]][2] == "length" and short.completion_tokens == 2
    assert ends["short"] < ends["long"]
    assert any(name == "long" and text for name, text, _ in log[ends["short"] + 1 :])  # long kept streaming


def test_a_cancelled_row_stops_generating(engine):
    log: list = []
    job = _job(engine, "apple river", 60, log, "gone")
    job.emit = lambda text, reason: (log.append((text, reason)), job.cancelled.set())  # the client leaves at once
    engine._generate([job])
    assert log[-1] == (None, "cancelled")
    assert job.completion_tokens < 5


def test_sigterm_lets_the_requests_in_flight_finish(llama_adapter):
    process, url = start_server("--adapter", str(llama_adapter), "--max-tokens", "300", "--max-batch-size", "1")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    name = Path(llama_adapter).name

    def ask(word: str) -> list:
        return list(client.completions.create(model=name, prompt=word, max_tokens=300, temperature=0, stream=True))

    with ThreadPoolExecutor(3) as pool:
        replies = [pool.submit(ask, word) for word in WORDS[:3]]
        deadline = time.monotonic() + 60
        while health(url)["active_requests"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # one generating, the others waiting for it (batch size 1)
        chunks = [reply.result(timeout=300) for reply in replies]
    stop(process, signalled=True)
    assert all(reply[-1].choices[0].finish_reason in ("stop", "length") for reply in chunks)


# --------------------------------------------------------------------------- the command line


def test_adapter_names_default_to_the_folder_and_must_be_unique(tmp_path):
    from qlora_cli.errors import QloraError
    from qlora_cli.serve.models import resolve_target

    target = resolve_target(None, ["runs/guanaco", "alpaca=runs/other"], None)
    assert target.adapters == (("guanaco", Path("runs/guanaco")), ("alpaca", Path("runs/other")))
    with pytest.raises(QloraError, match="the name 'guanaco' is given twice"):
        resolve_target(None, ["runs/guanaco", "guanaco=elsewhere"], None)
    with pytest.raises(QloraError, match="expected PATH or NAME=PATH"):
        resolve_target(None, ["=runs/x"], None)
    with pytest.raises(QloraError, match="pass --adapter"):
        resolve_target(None, [], None)


def test_a_recipe_alone_serves_what_its_run_produced(tmp_path):
    from qlora_cli.serve.models import resolve_target

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{name_or_path: builtin:tiny-llama}}\n")
    assert resolve_target(None, [], recipe).adapters == (("run", tmp_path / "run"),)
    recipe.write_text(recipe.read_text() + "quantization: {bits: 16}\nlora: {enabled: false}\n")
    assert resolve_target(None, [], recipe).model.name_or_path == str(tmp_path / "run")  # full finetuning: the model itself


def test_serve_without_its_extra_says_what_to_install(monkeypatch):
    import importlib.util

    from qlora_cli.errors import QloraError
    from qlora_cli.serve import serve
    from qlora_cli.serve.models import Limits, ServeTarget

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    with pytest.raises(QloraError, match=r"qlora serve needs fastapi: pip install 'qlora-cli\[serve\]'"):
        serve(ServeTarget(None, (), None), host="127.0.0.1", port=0, api_key=None, max_batch_size=1, limits=Limits())


def test_adapters_of_different_bases_are_refused_on_one_server(tmp_path):
    from qlora_cli.adapter import read_adapter
    from qlora_cli.errors import QloraError
    from qlora_cli.serve.models import _check_same_base
    from tests.test_adapter import fake_adapter

    one = read_adapter(fake_adapter(tmp_path / "one", config={"peft_type": "LORA", "base_model_name_or_path": "a/x"}))
    two = read_adapter(fake_adapter(tmp_path / "two", config={"peft_type": "LORA", "base_model_name_or_path": "b/y"}))
    _check_same_base("one", one, "one-again", one, None)
    with pytest.raises(QloraError, match="trained on different bases .*serve them from two servers"):
        _check_same_base("one", one, "two", two, None)
