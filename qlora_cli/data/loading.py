"""Load a dataset (hub or local files), format records, split, and tokenize; cached by `datasets`."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from qlora_cli.config import DataConfig
from qlora_cli.data.formats import FORMATS, DatasetFormat, SkipRecord
from qlora_cli.data.tokenize import tokenize_batch
from qlora_cli.errors import QloraError

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, labels, length, source, target
    eval: Any | None
    skipped: Counter = field(default_factory=Counter)

    @property
    def truncated(self) -> int:
        return sum(self.train["truncated"]) + (sum(self.eval["truncated"]) if self.eval is not None else 0)


def prepare_data(cfg: DataConfig, tokenizer: Any, *, seq2seq: bool, seed: int) -> PreparedData:
    fmt = FORMATS[cfg.dataset]
    train, evaluation = load_raw(cfg, fmt)
    skipped: Counter = Counter()
    train = _format(train, fmt, skipped)
    if len(train) == 0:
        raise QloraError(f"dataset {_describe_source(cfg, fmt)} has no usable examples ({_skips(skipped)})")
    if evaluation is not None:
        evaluation = _format(evaluation, fmt, skipped)
    elif cfg.eval_size > 0:
        if cfg.eval_size >= len(train):
            raise QloraError(
                f"data.eval_size={cfg.eval_size} but the dataset has only {len(train)} usable examples: "
                "lower data.eval_size (0 disables evaluation)"
            )
        split = train.train_test_split(test_size=cfg.eval_size, seed=seed, shuffle=True)
        train, evaluation = split["train"], split["test"]
    if cfg.max_train_samples:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if evaluation is not None and cfg.max_eval_samples:
        evaluation = evaluation.select(range(min(cfg.max_eval_samples, len(evaluation))))

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenize_batch(tokenizer, batch, cfg, seq2seq=seq2seq)

    train = train.map(tokenize, batched=True, desc="Tokenizing train")
    if evaluation is not None:
        evaluation = evaluation.map(tokenize, batched=True, desc="Tokenizing eval")
    return PreparedData(train=train, eval=evaluation, skipped=skipped)


def load_raw(cfg: DataConfig, fmt: DatasetFormat) -> tuple[Any, Any | None]:
    """Return (train, eval-or-None) as datasets.Dataset in the format's native schema."""
    import datasets

    if cfg.path or cfg.data_files:
        files = local_files(cfg)
        builder = _builder_for(files[0])
        try:
            with _without_datasets_error_logs():
                return datasets.load_dataset(builder, data_files={"train": files}, split="train"), None
        except Exception as exc:  # datasets wraps parse errors in several exception types
            problem = next(filter(None, map(json_problem, files)), None) if builder == "json" else None
            raise QloraError(problem or f"cannot read {', '.join(files)}: {_root_cause(exc)}") from None
    hub_id = cfg.hub_id or fmt.hub_id
    if hub_id is None:
        raise QloraError(f"dataset {fmt.name!r} has no hub copy: point data.path at a local file")
    try:
        loaded = datasets.load_dataset(
            hub_id, cfg.hub_config or fmt.hub_config, data_files=fmt.hub_data_files
        )
    except Exception as exc:
        raise QloraError(
            f"cannot load dataset {hub_id!r} from the Hugging Face hub ({_root_cause(exc)}); "
            f"offline, download it and set data.path=FILE"
        ) from None
    evaluation = loaded[fmt.eval_split] if fmt.eval_split and fmt.eval_split in loaded else None
    return loaded["train"], evaluation


def local_files(cfg: DataConfig) -> list[str]:
    from qlora_cli.demo import resolve_builtin_data

    names = [cfg.path] if cfg.path else list(cfg.data_files or [])
    files: list[str] = []
    for name in names:
        path = resolve_builtin_data(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if _suffix(p) in _BUILDERS)
            if not found:
                raise QloraError(f"data.path {path} holds no json, jsonl, jsonl.gz, csv or parquet file")
            files += [str(p) for p in found]
        elif path.is_file():
            files.append(str(path))
        else:
            raise QloraError(f"data file not found: {path}")
    for f in files:
        if _suffix(Path(f)) not in _BUILDERS:
            raise QloraError(f"{f}: unsupported file type (use json, jsonl, jsonl.gz, csv or parquet)")
    return files


@contextmanager
def _without_datasets_error_logs() -> Iterator[None]:
    """datasets logs a parse failure with its traceback before raising; we report the failure in one line."""
    from datasets.utils import logging as datasets_logging

    level = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logging.set_verbosity(level)


def json_problem(file: str) -> str | None:
    """Where a JSON or JSON Lines file breaks, by line: datasets' parse errors name neither file nor line."""
    try:
        with (gzip.open if file.endswith(".gz") else open)(file, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        return f"{file}: cannot read it as UTF-8 text ({exc})"
    if not text.strip():
        return f"{file}: the file is empty"
    try:
        json.loads(text)
        return None  # one valid JSON document
    except json.JSONDecodeError as whole:
        document_error = f"{file}:{whole.lineno}: invalid JSON ({whole.msg}, column {whole.colno})"
    lines = text.splitlines()
    first = next(number for number, line in enumerate(lines, 1) if line.strip())
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == first:  # not JSON Lines: one document, broken somewhere
                return document_error
            return f"{file}:{number}: broken JSON line ({exc.msg}, column {exc.colno})"
        if not isinstance(record, dict):
            return f"{file}:{number}: expected one JSON object per line, got {type(record).__name__}"
    return None


def _suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1] if suffixes else ""


def _builder_for(file: str) -> str:
    return _BUILDERS[_suffix(Path(file))]


def _format(dataset: Any, fmt: DatasetFormat, skipped: Counter) -> Any:
    def to_columns(record: dict[str, Any]) -> dict[str, str]:
        try:
            source, target = fmt.to_example(record)
            return {"source": source, "target": target, "skip": ""}
        except SkipRecord as reason:
            return {"source": "", "target": "", "skip": str(reason)}

    formatted = dataset.map(to_columns, remove_columns=dataset.column_names, desc=f"Formatting {fmt.name}")
    skipped.update(reason for reason in formatted["skip"] if reason)
    return formatted.filter(lambda row: not row["skip"]).remove_columns("skip")


def _skips(skipped: Counter) -> str:
    return ", ".join(f"{n} skipped: {reason}" for reason, n in skipped.most_common()) or "the file is empty"


def _describe_source(cfg: DataConfig, fmt: DatasetFormat) -> str:
    return cfg.path or ", ".join(cfg.data_files or []) or cfg.hub_id or fmt.hub_id or fmt.name


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
