"""Local files in every supported type, splits, skip counts, clear errors, caching, and the real data."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from qlora_cli.config import DataConfig
from qlora_cli.data import FORMATS, prepare_data
from qlora_cli.model_kind import CausalLM
from qlora_cli.data.loading import NO_TARGET_LEFT, load_raw, local_files
from qlora_cli.errors import QloraError
from tests.data_fixtures import tokenizer, write_jsonl  # noqa: F401  (fixture)

RECORDS = [{"instruction": f"Repeat {w}.", "input": "", "output": w} for w in ["apple", "river", "stone", "cloud"]]


def prepare(tok, **data):
    return prepare_data(DataConfig(**data), tok, kind=CausalLM(), seed=0)


def _write(path: Path, records: list[dict]) -> Path:
    import pandas as pd

    if path.name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    elif path.suffix == ".jsonl":
        write_jsonl(path, records)
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=2))
    elif path.suffix == ".csv":
        pd.DataFrame(records).to_csv(path, index=False)
    else:
        pd.DataFrame(records).to_parquet(path)
    return path


@pytest.mark.parametrize("name", ["data.json", "data.jsonl", "data.jsonl.gz", "data.csv", "data.parquet"])
def test_every_local_file_type_loads_the_same_records(tmp_path, name):
    path = _write(tmp_path / name, RECORDS)
    train, evaluation = load_raw(DataConfig(path=str(path)), FORMATS["alpaca"])
    assert evaluation is None
    assert [(r["instruction"], r["input"] or "", r["output"]) for r in train] == [
        (r["instruction"], r["input"], r["output"]) for r in RECORDS
    ]


def test_unformattable_records_are_counted_and_skipped(tmp_path, tokenizer):
    records = [*RECORDS, {"instruction": "x", "input": ""}, {"instruction": "y", "output": ""}]
    data = prepare(tokenizer, path=str(write_jsonl(tmp_path / "d.jsonl", records)), eval_size=0)
    assert len(data.train) == 4
    assert dict(data.skipped) == {"missing field 'output'": 1, "empty target": 1}


def test_records_holding_several_instances_give_one_example_each(tmp_path, tokenizer):
    task = {"instruction": "Sort.", "instances": [{"input": "2 1", "output": "1 2"}, {"input": "b a", "output": "a b"}]}
    path = write_jsonl(tmp_path / "seed.jsonl", [task] * 3)
    data = prepare(tokenizer, dataset="self-instruct", path=str(path), eval_size=0)
    assert data.train["source"][:2] == ["Sort.\nInput: 2 1\nOutput:", "Sort.\nInput: b a\nOutput:"]
    assert len(data.train) == 6


def test_no_usable_example_stops_with_the_reasons(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x"}] * 3)
    with pytest.raises(QloraError, match=r"d.jsonl has no usable examples \(3 skipped: missing field 'output'\)"):
        prepare(tokenizer, path=str(path), eval_size=0)


def test_broken_json_lines_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n{"instruction": "d"}\n')
    with pytest.raises(QloraError, match=re.escape(f"{path}:3:") + ".*invalid JSON Lines record"):
        load_raw(DataConfig(path=str(path)), FORMATS["alpaca"])


def test_broken_json_array_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(QloraError, match=re.escape(f"{path}:3:") + ".*invalid JSON"):
        load_raw(DataConfig(path=str(path)), FORMATS["alpaca"])


def test_broken_gzipped_json_lines_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"chosen": "a"}\n{"chosen": "b"\n')
    with pytest.raises(QloraError, match=re.escape(f"{path}:2:")):
        load_raw(DataConfig(dataset="hh-rlhf", path=str(path)), FORMATS["hh-rlhf"])


def test_empty_and_missing_files_are_named(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(QloraError, match="empty.jsonl is empty"):
        load_raw(DataConfig(path=str(tmp_path / "empty.jsonl")), FORMATS["alpaca"])
    with pytest.raises(QloraError, match="data file not found: .*nope.json"):
        local_files(DataConfig(path=str(tmp_path / "nope.json")))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(QloraError, match="notes.txt: unsupported file type"):
        local_files(DataConfig(path=str(tmp_path / "notes.txt")))


def test_a_folder_holds_out_its_validation_files(tmp_path):
    (tmp_path / ".cache").mkdir()  # a hub snapshot's download metadata is not data
    for name in ["train.jsonl", "extra.jsonl", "validation.jsonl", "test.jsonl", ".cache/meta.json"]:
        write_jsonl(tmp_path / name, RECORDS)
    train, held_out = local_files(DataConfig(path=str(tmp_path)))
    assert [Path(f).name for f in train] == ["extra.jsonl", "train.jsonl"]
    assert [Path(f).name for f in held_out] == ["validation.jsonl"]


def test_a_folder_without_train_files_is_all_training_data(tmp_path):
    (tmp_path / "helpful").mkdir()
    write_jsonl(tmp_path / "helpful" / "test.jsonl", RECORDS)
    assert local_files(DataConfig(path=str(tmp_path))) == ([str((tmp_path / "helpful" / "test.jsonl").resolve())], [])


def test_eval_split_file_is_used_instead_of_holding_out(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", RECORDS * 5)
    write_jsonl(tmp_path / "eval.jsonl", RECORDS[:3])
    data = prepare(tokenizer, path=str(tmp_path), eval_size=8)
    assert (len(data.train), len(data.eval)) == (20, 3)


def test_hold_out_is_seeded_and_sample_limits_apply(tmp_path, tokenizer):
    records = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(40)]
    path = str(write_jsonl(tmp_path / "d.jsonl", records))
    first = prepare(tokenizer, path=path, eval_size=10)
    again = prepare(tokenizer, path=path, eval_size=10)
    assert (len(first.train), len(first.eval)) == (30, 10)
    assert first.eval["target"] == again.eval["target"]
    assert not set(first.eval["target"]) & set(first.train["target"])
    limited = prepare(tokenizer, path=path, eval_size=10, max_train_samples=5, max_eval_samples=2)
    assert (len(limited.train), len(limited.eval)) == (5, 2)


def test_second_preparation_is_served_from_the_datasets_cache(tmp_path, tokenizer):
    path = str(write_jsonl(tmp_path / "d.jsonl", RECORDS * 3))
    first = prepare(tokenizer, path=path, eval_size=0)
    tokenized = Path(first.train.cache_files[-1]["filename"])
    written = tokenized.stat().st_mtime_ns
    again = prepare(tokenizer, path=path, eval_size=0)
    assert again.train.cache_files[-1]["filename"] == str(tokenized)
    assert tokenized.stat().st_mtime_ns == written


class AsciiWordTokenizer:
    """Knows ASCII words only and has no EOS: a target of punctuation leaves nothing to train on."""

    bos_token_id, eos_token_id = 1, None

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[2 + len(w) for w in re.findall(r"[A-Za-z]+", t)] for t in texts]}


def test_examples_without_target_tokens_are_dropped_and_counted(tmp_path):
    records = [*RECORDS, {"instruction": "Shout.", "output": "?!"}]
    data = prepare(AsciiWordTokenizer(), path=str(write_jsonl(tmp_path / "d.jsonl", records)), eval_size=0)
    assert len(data.train) == 4 and data.skipped[NO_TARGET_LEFT] == 1


def test_every_target_gone_stops_with_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Shout.", "output": "?!"}] * 3)
    with pytest.raises(QloraError, match="no example of .*d.jsonl has a target token left"):
        prepare(AsciiWordTokenizer(), path=str(path), eval_size=0)


def test_hub_dataset_offline_fails_with_the_local_path_hint():
    with pytest.raises(QloraError, match="'tatsu-lab/alpaca'.*data.path=FILE"):
        load_raw(DataConfig(dataset="alpaca"), FORMATS["alpaca"])


# --------------------------------------------------------------------------- the real files in ../shared/data

REAL = [
    ("alpaca", "alpaca/antelofski_alpaca_sample_pretty_200.json"),
    ("hh-rlhf", "hh_rlhf/helpful-base/test.jsonl.gz"),
    ("self-instruct", "self_instruct/seed_tasks.jsonl"),
    ("oasst1", "oasst1/qlora_oa_questions.jsonl"),
    ("flan-v2", "flan_v2/t0_submix_sample2000.jsonl"),
    ("flan-v2", "flan_v2/cot_aqua_train.jsonl"),
]
# The T0 submix sample really has 62 TREC records whose completion is only '<|endoftext|>': nothing to learn.
EXPECTED_SKIPS = {"flan_v2/t0_submix_sample2000.jsonl": {"empty target": 62}}


@pytest.fixture(scope="module")
def llama_tokenizer():
    from transformers import AutoTokenizer

    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "llama2_hf")


@pytest.mark.parametrize(("dataset", "file"), REAL, ids=[f for _, f in REAL])
def test_real_file_loads_formats_and_tokenizes_with_no_unexpected_skip(shared_data, llama_tokenizer, dataset, file):
    data = prepare_data(
        DataConfig(dataset=dataset, path=str(shared_data / file), eval_size=0, max_train_samples=200),
        llama_tokenizer,
        kind=CausalLM(),
        seed=0,
    )
    assert dict(data.skipped) == EXPECTED_SKIPS.get(file, {})
    for row in data.train.select(range(20)):
        assert row["input_ids"][0] == llama_tokenizer.bos_token_id
        assert row["labels"][: row["source_tokens"]] == [-100] * row["source_tokens"]
        assert 0 < row["target_tokens"] <= 128
        if row["target_tokens"] < 128:  # not cut: the target ends with EOS
            assert row["input_ids"][-1] == llama_tokenizer.eos_token_id
