"""`qlora data preview`: examples as training sees them, masked and trained parts marked."""

from __future__ import annotations

import json

from tests.conftest import REPO, run_cli
from tests.data_fixtures import write_jsonl

DEMO = str(REPO / "configs" / "demo.yaml")
TINY = "model.name_or_path=builtin:tiny-llama"  # a LLaMA tokenizer: <s> and </s> mark where BOS and EOS go
SMALL = (TINY, "data.eval_size=8", "data.max_train_samples=16")


def test_preview_json_prints_one_object_per_example(tmp_path):
    result = run_cli("data", "preview", "--config", DEMO, "--num", "3", "--json", *SMALL)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert set(row) == {"source", "target", "source_tokens", "target_tokens", "truncated"}
        assert row["source"].startswith("Below is an instruction") and row["source"].endswith("### Response: ")
        assert row["target"] and row["source_tokens"] > row["target_tokens"] > 0 and row["truncated"] is False
    assert "16 train and 8 eval examples; 0 truncated, 0 skipped" in result.stderr


def test_preview_marks_masked_and_trained_parts_and_counts_truncation(cli):
    code, out, _ = cli("data", "preview", "-c", DEMO, "-n", "1", *SMALL, "data.target_max_len=1")
    assert code == 0
    lines = out.splitlines()
    assert "truncated, 0 skipped" in lines[0] and not lines[0].split(": ")[1].startswith("0 truncated")
    header = next(line for line in lines if line.startswith("── example 1"))
    assert "(masked)" in header and "target 1 tokens (trained), truncated" in header
    first_masked = next(line for line in lines if "masked │" in line)
    assert first_masked == (
        " masked │ <s>Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request."
    )
    trained = next(line for line in lines if "trained │" in line)
    assert "</s>" not in trained  # the EOS was cut with the rest of the target


def test_preview_of_a_chat_file_masks_all_but_the_assistant_reply(cli, tmp_path):
    talk = {"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "apple"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [talk] * 4)
    code, out, _ = cli(
        "data", "preview", "-c", DEMO, "-n", "1", TINY, "data.dataset=messages", f"data.path={path}", "data.eval_size=0"
    )
    assert code == 0, out
    assert "messages from" in out and "4 train and 0 eval examples" in out
    assert " masked │ <s>### Human: Name a fruit. ### Assistant:" in out
    assert "trained │  apple</s>" in out


def test_preview_with_train_on_source_marks_the_source_trained(cli):
    code, out, _ = cli("data", "preview", "-c", DEMO, "-n", "1", *SMALL, "data.train_on_source=true")
    assert code == 0
    assert "loss on source and target" in out and "tokens (trained), target" in out and "(masked)" not in out


def test_preview_of_a_broken_file_is_one_error_line(cli, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    code, _, err = cli("data", "preview", "-c", DEMO, f"data.path={path}")
    assert code == 2
    assert err.strip().splitlines()[-1] == f"error: {path}:2:17: invalid JSON Lines record: Expecting value"
    assert "Traceback" not in err and "Failed to load JSON" not in err


def test_preview_shows_how_packing_fills_the_rows(cli):
    code, out, _ = cli("data", "preview", "-c", DEMO, "-n", "1", *SMALL, "data.packing=true", "data.max_packed_len=128",
                       "training.batch_size=2")  # fmt: skip
    assert code == 0, out
    packing = next(line for line in out.splitlines() if line.startswith("packing: "))
    assert packing.startswith("packing: 16 examples packed into ") and "rows of up to 128 tokens" in packing
    assert "a batch of 2 rows is " in out and "unpacked, a batch of 2 examples is " in out


def test_preview_refuses_packing_for_an_encoder_decoder(cli):
    code, _, err = cli("data", "preview", "-c", DEMO, "model.name_or_path=builtin:tiny-t5", "data.packing=true")
    assert code == 2 and "data.packing: t5 is an encoder-decoder model" in err
