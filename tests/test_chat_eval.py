"""`qlora eval chat`: parsing, relative scores and Elo on the paper's released reviews; judging end to end."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from qlora_cli.errors import QloraError
from qlora_cli.eval.chat.benchmarks import PAPER_SYSTEM, Question
from qlora_cli.eval.chat.judge import JudgeRequest, judge
from qlora_cli.eval.chat.reviews import parse_pairwise, parse_relative, read_review_dir
from qlora_cli.eval.chat.scores import elo_ratings, relative_scores
from tests.trained import llama_adapter, second_llama_adapter  # noqa: F401 (fixtures)

CHATBOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "chatbot"
needs_paper_data = pytest.mark.skipif(not CHATBOT.is_dir(), reason="../shared/data is absent")
QUESTIONS = [
    {"question_id": i, "text": text, "category": category}
    for i, (text, category) in enumerate([
        ("How can I sleep better?", "generic"),
        ("Name three fruits.", "knowledge"),
        ("Write a haiku about rain.", "writing"),
        ("What is 12 times 7?", "math"),
        ("Write a Python function that reverses a string.", "coding"),
    ], start=1)
]  # fmt: skip


# --------------------------------------------------------------------------- reading a judge's reply


def test_relative_scores_are_read_from_the_first_line_or_where_the_math_prompt_puts_them():
    assert parse_relative("8 6.5\nBecause…") == [8.0, 6.5]
    assert parse_relative("7, 9\nBoth fine.") == [7.0, 9.0]
    assert parse_relative("Solving it first: (2, -3) is a point.\nScores:\nAssistant 1: 10\nAssistant 2: 3") == [10, 3]
    assert parse_relative("First, the steps…\nThe output tuple is (9, 10). Assistant 2 did better.") == [9, 10]
    assert parse_relative("I cannot decide.") == [-1, -1]


def test_pairwise_verdicts_are_the_last_line():
    assert parse_pairwise("Both are good, but the first is clearer.\n1") == 1
    assert parse_pairwise("…\n 3 \n") == 3
    assert parse_pairwise("Assistant 2 wins.") == -1
    assert parse_pairwise("…\n7") == -1


def test_a_guanaco_transcript_is_asked_as_its_turns():
    question = Question("x", "### Human: Hi ### Assistant: Hello! ### Human: And now? ### Assistant:", "generic")
    assert question.messages(PAPER_SYSTEM) == [
        {"role": "system", "content": PAPER_SYSTEM},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And now?"},
    ]
    assert Question(1, "Why?", "generic").messages(None) == [{"role": "user", "content": "Why?"}]


# --------------------------------------------------------------------------- scores on made-up reviews


def _write_reviews(folder: Path, name: str, rows: list[tuple]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{name}.jsonl").open("w") as out:
        for question, first, second, score in rows:
            out.write(json.dumps({"question_id": question, "answer1_id": first, "answer2_id": second,
                                  "text": "", "score": score}) + "\n")  # fmt: skip


def test_the_mean_pools_both_orders_and_unparsed_reviews_are_left_out_and_counted(tmp_path):
    _write_reviews(tmp_path, "ours-vs-ref", [(1, "o1", "r1", [6, 8]), (2, "o2", "r2", [-1, -1])])
    _write_reviews(tmp_path, "ref-vs-ours", [(1, "r1", "o1", [10, 10]), (2, "r2", "o2", [2, 4])])
    files = read_review_dir(tmp_path)
    with pytest.raises(Exception, match="share 2 answers, not one; pass --reference"):
        relative_scores(files)  # one pair of systems: the answers alone cannot tell which is the reference
    [score] = relative_scores(files, reference_ids={"r1", "r2"}, resamples=200)
    assert (score.system, score.reference) == ("ours", "ref")
    assert score.reference_second == pytest.approx(75.0)  # ours shown first: 6 / 8
    assert score.reference_first == pytest.approx(100 * 14 / 12)
    assert score.mean == pytest.approx(100 * 20 / 20)  # pooled, not the average of 75 and 116.7
    assert (score.reviews, score.unparsed) == (3, 1)
    assert score.low <= score.mean <= score.high


def test_elo_is_zero_sum_ties_are_half_and_orderings_are_seeded(tmp_path):
    _write_reviews(tmp_path, "a-vs-b", [(q, f"a{q}", f"b{q}", 1) for q in range(20)])
    _write_reviews(tmp_path, "b-vs-c", [(q, f"b{q}", f"c{q}", 3) for q in range(20)] + [(99, "b", "c", -1)])
    files = read_review_dir(tmp_path)
    ratings = {r.system: r for r in elo_ratings(files, orderings=200, seed=1)}
    assert ratings["a"].mean > 1000 > ratings["c"].mean
    assert sum(r.mean for r in ratings.values()) == pytest.approx(3000)
    assert (ratings["b"].wins, ratings["b"].ties, ratings["b"].losses) == (0, 20, 20)
    again = {r.system: r.mean for r in elo_ratings(files, orderings=200, seed=1)}
    assert again == {name: r.mean for name, r in ratings.items()}


# --------------------------------------------------------------------------- the paper's released reviews


@needs_paper_data
def test_every_released_review_text_parses_to_its_recorded_score():
    vicuna = CHATBOT / "ratings-gpt4" / "vicuna"
    relative = [r for f in read_review_dir(vicuna / "relative-gpt-3.5") for r in f.reviews]
    pairwise = [r for f in read_review_dir(vicuna / "pairwise") for r in f.reviews]
    assert len(relative) == 320 and len(pairwise) == 56 * 80
    assert [parse_relative(r["text"]) for r in relative] == [[float(s) for s in r["score"]] for r in relative]
    assert [parse_pairwise(r["text"]) for r in pairwise] == [r["score"] for r in pairwise]


@needs_paper_data
@pytest.mark.parametrize("given_reference", [False, True])
def test_relative_scores_of_the_released_vicuna_reviews_are_the_papers(given_reference):
    reference = CHATBOT / "generations" / "vicuna" / "answer_gpt35.jsonl"
    files = read_review_dir(CHATBOT / "ratings-gpt4" / "vicuna" / "relative-gpt-3.5")
    from qlora_cli.eval.chat.answer import read_answers

    ids = {a["answer_id"] for a in read_answers(reference)} if given_reference else None
    scores = {s.system.split("-")[0]: s for s in relative_scores(files, reference_ids=ids, resamples=500)}
    for size, (first, second, mean) in {"65b": (96.7, 101.9, 99.3), "7b": (84.1, 89.8, 87.0)}.items():
        s = scores[size]
        assert (round(s.reference_first, 1), round(s.reference_second, 1), round(s.mean, 1)) == (first, second, mean)


@needs_paper_data
def test_elo_of_the_released_vicuna_pairwise_reviews():
    """The paper's Table 1 has GPT-4 at 1348; by its stated method these reviews give about 1375."""
    files = read_review_dir(CHATBOT / "ratings-gpt4" / "vicuna" / "pairwise")
    ratings = elo_ratings(files, orderings=2000, seed=0)
    expected = {"answer-gpt4": 1375, "65b-guanaco": 1022, "30b-guanaco": 989, "answer-vicuna-13b": 971,
                "answer-gpt35": 963, "13b-guanaco": 910, "answer-bard": 896, "7b-guanaco": 873}  # fmt: skip
    got = {next(key for key in expected if r.system.startswith(key)): r.mean for r in ratings}
    assert list(got) == list(expected)  # the same order
    for system, value in expected.items():
        assert abs(got[system] - value) <= 4, (system, got[system])


# --------------------------------------------------------------------------- judging against a fake endpoint


class FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that refuses the first call with 429, then always prefers answer 1."""

    calls: list = []
    rate_limit_first = True

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.calls.append(body)
        if "refuse me" in body["messages"][1]["content"]:
            self._reply(400, {"error": {"message": "prompt too long", "type": "invalid_request_error"}})
            return
        if len(FakeJudge.calls) == 1 and FakeJudge.rate_limit_first:
            self._reply(429, {"error": {"message": "slow down", "type": "rate_limit_error"}}, {"retry-after": "0"})
            return
        content = "9 4\nThe first answer is better." if "two scores" in body["messages"][1]["content"] else "1"
        self._reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": content}}]})  # fmt: skip

    def _reply(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_judge():
    FakeJudge.calls, FakeJudge.rate_limit_first = [], True
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def _answers(path: Path, model: str) -> Path:
    path.write_text("".join(json.dumps({**q, "question": q["text"], "answer_id": f"{model}-{q['question_id']}",
                                         "model_id": model, "text": f"{model} says {q['question_id']}"}) + "\n"
                            for q in QUESTIONS))  # fmt: skip
    return path


def test_judging_retries_429_asks_both_orders_caches_and_dry_runs(tmp_path, fake_judge, capsys):
    pair = (_answers(tmp_path / "a.jsonl", "alpha"), _answers(tmp_path / "b.jsonl", "beta"))
    request = JudgeRequest(pair, "relative", fake_judge, "judge-1", tmp_path / "reviews", concurrency=2)
    files = judge(request)
    assert sorted(f.name for f in files) == ["alpha-vs-beta-reviews-relative.jsonl", "beta-vs-alpha-reviews-relative.jsonl"]
    assert len(FakeJudge.calls) == 2 * len(QUESTIONS) + 1  # both orders, and the call refused with 429 once more
    assert FakeJudge.calls[0]["temperature"] == 0.2
    reviews = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert {tuple(r["score"]) for r in reviews} == {(9.0, 4.0)}
    [score] = relative_scores(read_review_dir(tmp_path / "reviews"), reference_ids={f"beta-{i}" for i in range(1, 6)})
    assert score.system == "alpha" and score.mean == pytest.approx(100.0)  # each wins when shown first
    judge(request)  # a rerun pays for nothing already reviewed
    assert len(FakeJudge.calls) == 2 * len(QUESTIONS) + 1
    assert "0 judge calls to make (10 of 10 already reviewed)" in capsys.readouterr().err
    dry = JudgeRequest(pair, "pairwise", fake_judge, "judge-1", tmp_path / "reviews", dry_run=True)
    judge(dry)
    assert "10 judge calls to make" in capsys.readouterr().err and len(FakeJudge.calls) == 11


def test_a_refused_call_is_one_line_and_the_reviews_received_are_kept(tmp_path, fake_judge):
    first, second = _answers(tmp_path / "a.jsonl", "alpha"), _answers(tmp_path / "b.jsonl", "beta")
    second.write_text(second.read_text().replace("beta says 3", "beta says refuse me"))
    FakeJudge.rate_limit_first = False
    request = JudgeRequest((first, second), "pairwise", fake_judge, "j", tmp_path / "reviews", max_retries=0)
    with pytest.raises(QloraError, match=r"2 of 10 judge calls failed \(first: BadRequestError: .*prompt too long.*"
                       r"the 8 reviews received are saved: rerun"):  # fmt: skip
        judge(request)
    saved = [line for f in (tmp_path / "reviews").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert len(saved) == 8


def test_the_papers_prompt_files_are_used_as_published(tmp_path, fake_judge):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": i, "category": cat, "system_prompt": f"judge {cat}",
                                           "prompt_template": "{question}|{answer_1}|{answer_2}|{prompt}",
                                           "defaults": {"prompt": "two scores please"}}) + "\n"
                               for i, cat in enumerate(["general", "coding", "math"], start=1)))  # fmt: skip
    pair = (_answers(tmp_path / "a.jsonl", "alpha"), _answers(tmp_path / "b.jsonl", "beta"))
    judge(JudgeRequest(pair, "relative", fake_judge, "j", tmp_path / "reviews", judge_prompts=prompts))
    systems = {call["messages"][1]["content"].split("|")[0]: call["messages"][0]["content"] for call in FakeJudge.calls}
    assert systems["What is 12 times 7?"] == "judge math"
    assert systems["Write a Python function that reverses a string."] == "judge coding"
    assert systems["Name three fruits."] == "judge general"


# --------------------------------------------------------------------------- end to end, no network


def test_a_tiny_model_answers_and_a_served_tiny_model_judges(cli, tmp_path, llama_adapter, second_llama_adapter):
    from tests.test_serve import start_server, stop

    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    answers = []
    for adapter in (llama_adapter, second_llama_adapter):
        out = tmp_path / f"{adapter.name}.jsonl"
        code, _, err = cli("eval", "chat", "answer", "--benchmark", str(questions), "--adapter", str(adapter),
                           "--output", str(out), "--max-tokens", "16")  # fmt: skip
        assert code == 0, err
        assert len(out.read_text().splitlines()) == len(QUESTIONS)
        answers += ["--answers", str(out)]
    prompts = tmp_path / "short-prompts.jsonl"  # the tiny judge's context is 512 tokens of a tiny tokenizer
    prompts.write_text(json.dumps({"prompt_id": 1, "category": "general", "system_prompt": "Judge.",
                                   "prompt_template": "Q: {question}\nA1: {answer_1}\nA2: {answer_2}\n{prompt}",
                                   "defaults": {"prompt": "Scores:"}}) + "\n")  # fmt: skip
    process, url = start_server("--model", "builtin:tiny-llama", "--max-tokens", "64")
    try:
        for mode in ("relative", "pairwise"):
            code, _, err = cli("eval", "chat", "judge", *answers, "--mode", mode, "--judge-endpoint", f"{url}/v1",
                               "--judge-model", "builtin:tiny-llama", "--output-dir", str(tmp_path / mode),
                               "--judge-prompts", str(prompts), "--judge-max-tokens", "16")  # fmt: skip
            assert code == 0, err
    finally:
        stop(process)
    reference = tmp_path / f"{second_llama_adapter.name}.jsonl"  # one pair: the shared answers are both sides'
    code, out, err = cli("eval", "chat", "scores", str(tmp_path / "relative"), "--reference", str(reference))
    assert code == 0, err
    assert out.splitlines()[1].startswith("adapter-llama ")  # the system, against adapter-llama-fast
    code, out, err = cli("eval", "chat", "elo", str(tmp_path / "pairwise"), "--orderings", "100",
                         "--output", str(tmp_path / "elo.json"))  # fmt: skip
    assert code == 0, err
    assert "unparsed reviews left out" in out and (tmp_path / "elo.png").is_file()  # beside --output
    assert {r["system"] for r in json.loads((tmp_path / "elo.json").read_text())} == {
        "adapter-llama", "adapter-llama-fast"}


def test_reviews_kept_inside_a_run_reach_its_report(tmp_path):
    from qlora_cli.config import load_recipe
    from qlora_cli.eval.chat.summary import summarize_elo
    from qlora_cli.run_folder import RunFolder
    from tests.conftest import REPO

    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.write_recipe(load_recipe(REPO / "configs/demo.yaml", [f"output_dir={run.path}"]).to_yaml())
    (run.path / "log_history.json").write_text(json.dumps([{"step": 1, "loss": 2.0, "learning_rate": 1e-4}]))
    run.mark_completed()
    _write_reviews(run.path / "chat_eval", "ours-vs-theirs", [(q, f"o{q}", f"t{q}", 1) for q in range(5)])
    summarize_elo(run.path / "chat_eval", output=None, chart=None, orderings=50, seed=0)
    assert [r["system"] for r in run.read_chat_eval()["elo"]] == ["ours", "theirs"]
    report = (run.path / "report.md").read_text()
    assert "## Chatbot evaluation" in report and "| Elo ours |" in report
    assert "figures/elo.png" in report and (run.path / "figures" / "elo.png").is_file()


def test_a_gguf_file_with_an_endpoint_is_refused_before_anything_is_asked(tmp_path):
    from qlora_cli.eval.chat.answer import AnswerRequest, answer

    request = AnswerRequest("vicuna", tmp_path / "a.jsonl", model="m", endpoint="http://127.0.0.1:9", gguf_file="m.gguf")
    with pytest.raises(QloraError, match="--gguf-file loads a model here: an --endpoint serves its own"):
        answer(request)  # vicuna would need the network: refused before the questions load
    assert not (tmp_path / "a.jsonl").exists()


def test_answers_from_an_endpoint_continue_where_a_run_stopped(tmp_path, fake_judge):
    from qlora_cli.eval.chat.answer import AnswerRequest, answer

    FakeJudge.rate_limit_first = False
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    out = tmp_path / "answers.jsonl"
    request = AnswerRequest(str(questions), out, model="served-model", endpoint=fake_judge, limit=2)
    answer(request)
    first = out.read_text().splitlines()
    assert len(first) == 2 and len(FakeJudge.calls) == 2
    assert FakeJudge.calls[0]["messages"][0] == {"role": "system", "content": PAPER_SYSTEM}
    assert (FakeJudge.calls[0]["temperature"], FakeJudge.calls[0]["top_p"]) == (0.7, 0.9)
    answer(AnswerRequest(str(questions), out, model="served-model", endpoint=fake_judge))
    lines = out.read_text().splitlines()
    assert lines[:2] == first and len(lines) == len(QUESTIONS) and len(FakeJudge.calls) == len(QUESTIONS)
    record = json.loads(lines[-1])
    assert record["model_id"] == "served-model" and record["question"] == QUESTIONS[-1]["text"]
