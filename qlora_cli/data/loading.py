"""Load a dataset (hub or local files), format records, split, and tokenize; cached by `datasets`."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from qlora_cli.config import DataConfig
from qlora_cli.data.formats import FORMATS, DatasetFormat, SkipRecord
from qlora_cli.data.packing import PackedRows, pack
from qlora_cli.data.tokenize import tokenize_batch
from qlora_cli.errors import QloraError
from qlora_cli.model_kind import ModelKind

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
NO_TARGET_LEFT = "no target tokens left after truncation"


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, labels, length, source, target
    eval: Any | None
    skipped: Counter = field(default_factory=Counter)
    packed: PackedRows | None = None  # data.packing: the training examples packed into rows; evaluation is not

    @property
    def train_rows(self) -> Any:
        """What the Trainer trains on: the packed rows, else the examples."""
        return self.packed.rows if self.packed is not None else self.train

    @property
    def truncated(self) -> int:
        return sum(self.train["truncated"]) + (sum(self.eval["truncated"]) if self.eval is not None else 0)


def prepare_data(cfg: DataConfig, tokenizer: Any, *, kind: ModelKind, seed: int) -> PreparedData:
    fmt = FORMATS[cfg.dataset].for_tokenizer(tokenizer)
    skipped: Counter = Counter()

    def examples(record: dict[str, Any]) -> list[tuple]:
        return [(ex.source, ex.target) for ex in fmt.examples(record)]

    train, evaluation = formatted_splits(cfg, fmt, Rows(examples, ("source", "target")), skipped, seed=seed)

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenize_batch(tokenizer, batch, cfg, kind=kind)

    train = _drop_untrained(train.map(tokenize, batched=True, desc="Tokenizing train"), skipped)
    if evaluation is not None:
        evaluation = _drop_untrained(evaluation.map(tokenize, batched=True, desc="Tokenizing eval"), skipped)
    if len(train) == 0:
        raise QloraError(
            f"no example of {describe_source(cfg, fmt)} has a target token left to train on ({skips(skipped)}): "
            f"check data.target_max_len ({cfg.target_max_len}) and that the tokenizer has an EOS token"
        )
    packed = pack(train, cfg) if cfg.packing else None
    return PreparedData(train=train, eval=evaluation, skipped=skipped, packed=packed)


@dataclass(frozen=True)
class Rows:
    """What a format makes of one record: rows of `columns` (supervised examples, pairs, labelled replies)."""

    of_record: Callable[[dict[str, Any]], list[tuple]]
    columns: tuple[str, ...]
    blank: tuple = ()  # a skipped record's placeholder row; "" in every column unless given


def formatted_splits(cfg: DataConfig, fmt: DatasetFormat, rows: Rows, skipped: Counter, *, seed: int) -> tuple[Any, Any]:
    """(train, eval-or-None) in `rows.columns`: loaded, formatted (skips counted), held out and capped as the
    recipe says."""
    train, evaluation = load_raw(cfg, fmt)
    train = _format(train, fmt, rows, skipped)
    if len(train) == 0:
        raise QloraError(f"dataset {describe_source(cfg, fmt)} has no usable examples ({skips(skipped)})")
    if evaluation is not None:
        evaluation = _format(evaluation, fmt, rows, skipped)
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
    return train, evaluation


def load_raw(cfg: DataConfig, fmt: DatasetFormat) -> tuple[Any, Any | None]:
    """Return (train, eval-or-None) as datasets.Dataset in the format's native schema."""
    import datasets

    if cfg.path or cfg.data_files:
        train_files, eval_files = local_files(cfg)
        return _read_local(train_files), (_read_local(eval_files) if eval_files else None)
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


def local_files(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(train files, eval files): a folder's files named for a validation or test split are held out."""
    from qlora_cli.builtin import resolve_builtin_data

    names = [cfg.path] if cfg.path else list(cfg.data_files or [])
    train: list[str] = []
    held_out: list[str] = []
    for name in names:
        path = resolve_builtin_data(name)
        if path.is_dir():
            folder_train, folder_eval = _folder_splits(path)
            train += folder_train
            held_out += folder_eval
        elif path.is_file():
            train.append(str(path))
        elif path.is_symlink():
            raise QloraError(f"data file {path} is a symbolic link that leads nowhere (a loop, or a missing target)")
        else:
            raise QloraError(f"data file not found: {path}")
    for f in train + held_out:
        if _suffix(Path(f)) not in _BUILDERS:
            raise QloraError(f"{f}: unsupported file type (use json, jsonl, jsonl.gz, csv or parquet)")
    return train, held_out


def _folder_splits(folder: Path) -> tuple[list[str], list[str]]:
    """Files named for a validation (else test) split, the way `datasets` names them, are held out."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    folder = folder.resolve()
    files = sorted(
        str(p)
        for p in folder.rglob("*")
        if p.is_file() and _suffix(p) in _BUILDERS and not _hidden(p.relative_to(folder))
    )
    if not files:
        raise QloraError(f"data.path {folder} holds no json, jsonl, jsonl.gz, csv or parquet file")
    named = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    validation, test = set(named.get("validation", [])), set(named.get("test", []))
    train = [f for f in files if f not in validation | test]
    if not train:  # e.g. a folder of test files only: that is what there is to train on
        return files, []
    return train, sorted((validation or test) & set(files))


def _read_local(files: list[str]) -> Any:
    import datasets

    builders = {_builder_for(f) for f in files}
    if len(builders) > 1:
        raise QloraError(f"cannot mix file types in one split: {', '.join(files)}")
    builder = builders.pop()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # it logs parse errors that we report below
    try:
        return datasets.load_dataset(builder, data_files={"train": files}, split="train")
    except Exception as exc:  # datasets wraps parse errors in several exception types
        if builder == "json":
            for f in files:
                if problem := json_problem(f):
                    raise QloraError(problem) from None
        if "column names don't match" in str(_root(exc)):
            raise QloraError(
                f"{', '.join(files)}: these files have different columns and cannot be read as one dataset; "
                "list only files of one schema in data.data_files"
            ) from None
        raise QloraError(f"cannot read {', '.join(files)}: {_root_cause(exc)}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def json_problem(file: str) -> str | None:
    """Name the file, line and column of the first JSON error; `datasets` reports a byte offset at best."""
    opener = gzip.open if file.endswith(".gz") else open
    try:
        with opener(file, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        return f"{file}: cannot read as UTF-8 JSON text ({exc})"
    if not text.strip():
        return f"{file} is empty: it holds no records"
    try:
        document = json.loads(text)
        return f"{file} holds no records" if document in ([], {}) else None  # else its shape, not its syntax
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("["):
            return f"{file}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"{file}:{number}:{exc.colno}: invalid JSON Lines record: {exc.msg}"
        if not isinstance(record, dict):
            return f"{file}:{number}: a JSON Lines record must be an object, got {type(record).__name__}"
    return None


def _hidden(path: Path) -> bool:
    return any(part.startswith(".") for part in path.parts)


def _suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1] if suffixes else ""


def _builder_for(file: str) -> str:
    return _BUILDERS[_suffix(Path(file))]


def _format(dataset: Any, fmt: DatasetFormat, rows: Rows, skipped: Counter) -> Any:
    """Records -> rows; a record may give several rows, or one 'skip' row with the reason."""
    blank = rows.blank or ("",) * len(rows.columns)

    def to_columns(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in (*rows.columns, "skip")}
        for values in zip(*batch.values()):
            record = dict(zip(batch, values))
            try:
                made = [(*row, "") for row in rows.of_record(record)]
            except SkipRecord as reason:
                made = [(*blank, str(reason))]
            unused = fmt.unused(record) if fmt.unused else None
            if unused and made and not made[0][-1]:
                made.append((*blank, unused))  # counted with the skips, then dropped with them
            for row in made:
                for key, value in zip(out, row):
                    out[key].append(value)
        return out

    formatted = dataset.map(
        to_columns, batched=True, remove_columns=dataset.column_names, desc=f"Formatting {fmt.name}"
    )
    skipped.update(reason for reason in formatted["skip"] if reason)
    return formatted.filter(lambda row: not row["skip"], desc="Dropping skipped records").remove_columns("skip")


def _drop_untrained(dataset: Any, skipped: Counter) -> Any:
    """An example with no target token left would add nothing but a 0/0 loss."""
    kept = dataset.filter(lambda row: row["target_tokens"] > 0, desc="Dropping examples without target tokens")
    if len(kept) < len(dataset):
        skipped[NO_TARGET_LEFT] += len(dataset) - len(kept)
    return kept


def skips(skipped: Counter) -> str:
    return ", ".join(f"{n} skipped: {reason}" for reason, n in skipped.most_common()) or "the file is empty"


def describe_source(cfg: DataConfig, fmt: DatasetFormat) -> str:
    return cfg.path or ", ".join(cfg.data_files or []) or cfg.hub_id or fmt.hub_id or fmt.name


def _root(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


def _root_cause(exc: BaseException) -> str:
    root = _root(exc)
    return str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
