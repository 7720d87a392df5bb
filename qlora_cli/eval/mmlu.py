"""MMLU 5-shot / 0-shot, scored exactly as the original MMLU code and the QLoRA paper's code do.

Prompts: the original `evaluate.py` of hendrycks/test (header, dev shots in order, shots dropped from the
end until the prompt fits). Scoring: the paper's `MMLUEvalCallback` (the next-token logits after
`Answer:`, restricted to the four letter tokens; the prediction is the largest). The paper's number is the
mean of the per-subject accuracies.
"""

from __future__ import annotations

import copy
import csv
import difflib
import inspect
import json
import os
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from qlora_cli.config import MmluEvalConfig, ModelConfig, QuantizationConfig
from qlora_cli.errors import QloraError
from qlora_cli.model import LoadedModel, load_for_inference

HUB_ID = "cais/mmlu"
LETTERS = ("A", "B", "C", "D")
CATEGORIES = ("STEM", "humanities", "social sciences", "other")

# The original MMLU categories (hendrycks/test categories.py), subject -> category.
_CATEGORY_SUBJECTS = {
    "STEM": (
        "abstract_algebra astronomy college_biology college_chemistry college_computer_science "
        "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
        "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
        "high_school_mathematics high_school_physics high_school_statistics machine_learning"
    ),
    "humanities": (
        "formal_logic high_school_european_history high_school_us_history high_school_world_history "
        "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory "
        "professional_law world_religions"
    ),
    "social sciences": (
        "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
        "high_school_microeconomics high_school_psychology human_sexuality professional_psychology "
        "public_relations security_studies sociology us_foreign_policy"
    ),
    "other": (
        "anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management "
        "marketing medical_genetics miscellaneous nutrition professional_accounting professional_medicine "
        "virology"
    ),
}
SUBJECT_CATEGORY = {s: cat for cat, subjects in _CATEGORY_SUBJECTS.items() for s in subjects.split()}
SUBJECTS = tuple(sorted(SUBJECT_CATEGORY))


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # a letter


@dataclass(frozen=True)
class Item:
    """One prompt ready to score; `index` counts questions within the subject, from 0."""

    subject: str
    index: int
    prompt: str
    answer: str
    shots: int | None  # shots kept after fitting the length limit; None for prompts built by someone else


def load_items(cfg: MmluEvalConfig, tokenizer: Any) -> list[Item]:
    """Questions from the hub, a Hendrycks folder, or the paper's JSON Lines, as prompts to score."""
    subjects = cfg.subjects
    prebuilt = _prebuilt_file(cfg)
    if prebuilt is not None:
        items = read_prebuilt(prebuilt)
        _check_subjects(subjects, {i.subject for i in items}, prebuilt)
        wanted = set(subjects or [i.subject for i in items])
        return [i for i in items if i.subject in wanted and (cfg.limit is None or i.index < cfg.limit)]
    if cfg.data:
        dev, evaluated = read_hendrycks(Path(cfg.data), cfg.split, need_dev=cfg.shots > 0)
    else:
        dev, evaluated = read_hub(cfg.split)
    _check_subjects(subjects, evaluated.keys(), cfg.data or HUB_ID)
    items = []
    for subject in sorted(subjects or evaluated):
        questions = evaluated[subject][: cfg.limit]
        items += build_prompts(subject, dev.get(subject, []), questions, cfg.shots, tokenizer, cfg.max_length)
    return items


def read_hendrycks(folder: Path, split: str, *, need_dev: bool) -> tuple[dict, dict]:
    """`dev/<subject>_dev.csv` and `<split>/<subject>_<split>.csv`: no header; question, A-D, answer letter."""
    split_dir = folder / split
    files = sorted(split_dir.glob(f"*_{split}.csv"))
    if not files:
        raise QloraError(f"{split_dir}: no <subject>_{split}.csv files (expected the Hendrycks MMLU layout)")
    evaluated = {f.name.removesuffix(f"_{split}.csv"): _read_csv(f) for f in files}
    dev = {}
    if need_dev:
        for subject in evaluated:
            path = folder / "dev" / f"{subject}_dev.csv"
            if not path.is_file():
                raise QloraError(f"{path}: missing; few-shot prompts need the dev questions (or use --shots 0)")
            dev[subject] = _read_csv(path)
    return dev, evaluated


def _read_csv(path: Path) -> list[Question]:
    subject = path.name.rsplit("_", 1)[0]
    questions = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError:
        raise QloraError(f"{path}: not UTF-8 text (expected MMLU's CSV)") from None
    for line, row in rows:
        where = f"{path}:{line}"
        if len(row) != 6:
            raise QloraError(f"{where}: expected 6 fields (question, A, B, C, D, answer), got {len(row)}")
        if row[5] not in LETTERS:
            raise QloraError(f"{where}: answer must be one of A, B, C, D, got {row[5]!r}")
        questions.append(Question(subject, row[0], tuple(row[1:5]), row[5]))
    return questions


def read_hub(split: str) -> tuple[dict, dict]:
    import datasets

    hub_split = "validation" if split == "val" else "test"
    try:  # only the two splits needed, not the 100k-question auxiliary_train of the "all" config
        loaded = datasets.load_dataset(HUB_ID, data_files={s: f"all/{s}-*.parquet" for s in ("dev", hub_split)})
    except Exception as exc:  # offline, not found, and network errors all arrive as different types
        raise QloraError(
            f"cannot load {HUB_ID} from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "offline, pass --data with a folder in the Hendrycks layout (dev/, test/, val/) or the paper's JSON"
        ) from None

    def grouped(rows: Any) -> dict[str, list[Question]]:
        out: dict[str, list[Question]] = defaultdict(list)
        for row in rows:
            out[row["subject"]].append(
                Question(row["subject"], row["question"], tuple(row["choices"]), LETTERS[row["answer"]])
            )
        return dict(out)

    return grouped(loaded["dev"]), grouped(loaded[hub_split])


def _prebuilt_file(cfg: MmluEvalConfig) -> Path | None:
    """The paper's JSON Lines: a file, or a folder holding `{zero,five}_shot_mmlu_{split}.json`."""
    if not cfg.data:
        return None
    path = Path(cfg.data)
    if path.is_file():
        return path
    if not path.is_dir():
        raise QloraError(f"MMLU data not found: {path}")
    if (path / "dev").is_dir() or (path / cfg.split).is_dir():
        return None
    named = path / f"{'five' if cfg.shots == 5 else 'zero'}_shot_mmlu_{cfg.split}.json"
    if not named.is_file():
        raise QloraError(
            f"{path}: neither the Hendrycks layout (dev/, {cfg.split}/) nor the paper's JSON ({named.name})"
        )
    return named


def read_prebuilt(path: Path) -> list[Item]:
    """The paper code's `{subject, input, output}` records, prompts already built."""
    items: list[Item] = []
    counts: dict[str, int] = defaultdict(int)
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                subject, prompt, answer = record["subject"], record["input"], record["output"]
            except (json.JSONDecodeError, TypeError, KeyError) as exc:
                raise QloraError(f"{path}:{line_no}: expected a JSON object with subject, input, output ({exc})")
            if answer not in LETTERS:
                raise QloraError(f"{path}:{line_no}: output must be one of A, B, C, D, got {answer!r}")
            items.append(Item(subject, counts[subject], prompt, answer, None))
            counts[subject] += 1
    if not items:
        raise QloraError(f"{path}: no records")
    return items


def _check_subjects(wanted: list[str] | None, available: Any, source: Any) -> None:
    for subject in wanted or []:
        if subject not in available:
            close = difflib.get_close_matches(subject, list(available), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise QloraError(f"unknown MMLU subject {subject!r} in {source}{hint}")


# --------------------------------------------------------------------------- prompts


def format_subject(subject: str) -> str:
    """The original joins the words with a leading space each: `about  abstract algebra` has two spaces."""
    return "".join(" " + word for word in subject.split("_"))


def format_question(q: Question, *, with_answer: bool) -> str:
    text = q.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)) + "\nAnswer:"
    return text + f" {q.answer}\n\n" if with_answer else text


def build_prompts(
    subject: str, dev: list[Question], questions: list[Question], shots: int, tokenizer: Any, max_length: int
) -> list[Item]:
    """Dev shots in order; while a prompt has more than `max_length` tokens, drop the last shot."""
    header = f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
    examples = [format_question(q, with_answer=True) for q in dev[:shots]]
    items = []
    for index, q in enumerate(questions):
        tail = format_question(q, with_answer=False)
        k = len(examples)
        prompt = header + "".join(examples[:k]) + tail
        while k > 0 and len(tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]) > max_length:
            k -= 1
            prompt = header + "".join(examples[:k]) + tail
        items.append(Item(subject, index, prompt, q.answer, k))
    return items


# --------------------------------------------------------------------------- scoring


def letter_token_ids(tokenizer: Any) -> list[int]:
    """The token a model writes for ` A` after `Answer:`; on SentencePiece (LLaMA) the paper's `tokenizer("A")[0]`."""
    ids = [tokenizer(" " + letter, add_special_tokens=False)["input_ids"][-1] for letter in LETTERS]
    if len(set(ids)) != len(ids):
        raise QloraError(f"the tokenizer maps the answer letters A-D to the same tokens {ids}: cannot score MMLU")
    return ids


@torch.no_grad()
def score_prompts(
    loaded: LoadedModel,
    prompts: list[str],
    *,
    batch_size: int,
    groups: list[Hashable] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The four letter logits of each prompt's next token, shape (len(prompts), 4), in prompt order.

    Prompts with the same `groups` key (a subject's prompts) share their leading tokens: the header, and
    at five shots the shots too. A decoder-only model encodes those once and reuses the cache for every
    question, which is where most of the speed on a CPU comes from. Questions are batched
    longest first and padded on the left, with position ids counted over real tokens only, so every row's
    last position is exactly its own prompt's end. Seq2seq models score the first decoder token.
    """
    model, kind = loaded.model, loaded.kind
    letters = letter_token_ids(loaded.tokenizer)
    encoded = loaded.prompt_ids(prompts)
    accepts = _forward_arguments(model)
    cache_argument = cache_argument_name(accepts)
    members: dict[Hashable, list[int]] = defaultdict(list)
    if groups is not None and kind.shares_prompt_prefixes and cache_argument:
        for i, key in enumerate(groups):
            members[key].append(i)
    pooled = [] if members else list(range(len(prompts)))
    plan = []  # (shared prefix length, rows of one batch), a group's batches one after another
    for rows in members.values():
        shared = _common_prefix_length([encoded[i] for i in rows])
        if shared:
            plan += _batches(rows, encoded, batch_size, shared)
        else:
            pooled += rows
    plan += _batches(pooled, encoded, batch_size, 0)

    was_training = model.training
    model.eval()
    out = torch.empty(len(prompts), len(LETTERS))
    prefix_key, prefix_cache = None, None
    if progress:
        from tqdm.auto import tqdm

        plan = tqdm(plan, desc="MMLU", unit="batch", dynamic_ncols=True)
    for shared, rows in plan:
        batch = loaded.batch([encoded[i][shared:] for i in rows])
        if kind.shares_prompt_prefixes:
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            if shared:
                prefix = tuple(encoded[rows[0]][:shared])
                if prefix != prefix_key:
                    ids = torch.tensor([prefix], device=loaded.device)
                    keep = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
                    prefix_key, prefix_cache = prefix, model(input_ids=ids, use_cache=True, **keep)[cache_argument]
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(rows))
                ones = torch.ones(len(rows), shared, dtype=torch.long, device=loaded.device)
                batch.update(
                    {cache_argument: cache, "use_cache": True},
                    attention_mask=torch.cat([ones, batch["attention_mask"]], 1),
                )
                positions = positions + shared
            if "position_ids" in accepts:
                batch["position_ids"] = positions
            if "logits_to_keep" in accepts:
                batch["logits_to_keep"] = 1
        logits = kind.next_token_logits(model, batch)
        out[rows] = logits[:, letters].float().cpu()
    if was_training:
        model.train()
    return out


def _common_prefix_length(sequences: list[list[int]]) -> int:
    """Tokens all sequences start with, leaving each at least its last token to score."""
    return min(len(os.path.commonprefix(sequences)), min(len(s) for s in sequences) - 1)


def _batches(rows: list[int], encoded: list[list[int]], batch_size: int, shared: int) -> list[tuple[int, list[int]]]:
    """Longest first, in as few batches as `batch_size` allows, of even sizes: each holds prompts of similar length.

    Even sizes pad less than full batches and a short last one: 40 questions at batch 32 go as 20 + 20.
    """
    rows = sorted(rows, key=lambda i: -len(encoded[i]))
    count = -(-len(rows) // batch_size)
    bounds = [len(rows) * j // count for j in range(count + 1)] if rows else []
    return [(shared, rows[start:end]) for start, end in zip(bounds, bounds[1:])]


def cache_argument_name(forward_arguments: set[str]) -> str | None:
    """transformers 5.24 renamed `past_key_values` to `cache`, in forward's arguments and in its outputs."""
    return next((name for name in ("cache", "past_key_values") if name in forward_arguments), None)


def _forward_arguments(model: Any) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


# --------------------------------------------------------------------------- results


@dataclass
class Accuracy:
    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total}


@dataclass
class MmluResult:
    subjects: dict[str, Accuracy]
    categories: dict[str, Accuracy]
    questions: Accuracy
    predictions: list[dict[str, Any]] = field(repr=False)

    @property
    def mean_subject_accuracy(self) -> float:
        """The paper's MMLU number: every subject weighs the same, however many questions it has."""
        return sum(a.accuracy for a in self.subjects.values()) / max(len(self.subjects), 1)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for the Trainer's log: `mmlu_accuracy` and `mmlu_accuracy_<category>`."""
        out = {"mmlu_accuracy": self.mean_subject_accuracy}
        for name, acc in self.categories.items():
            out[f"mmlu_accuracy_{name.replace(' ', '_')}"] = acc.accuracy
        return out

    def as_dict(self, settings: dict[str, Any]) -> dict[str, Any]:
        return {
            "settings": settings,
            "mean_subject_accuracy": self.mean_subject_accuracy,
            "question_accuracy": self.questions.accuracy,
            "correct": self.questions.correct,
            "total": self.questions.total,
            "subjects": {
                name: {**acc.as_dict(), "category": SUBJECT_CATEGORY.get(name)} for name, acc in self.subjects.items()
            },
            "categories": {
                name: {**acc.as_dict(), "subjects": sum(SUBJECT_CATEGORY.get(s) == name for s in self.subjects)}
                for name, acc in self.categories.items()
            },
        }


def summarize(items: list[Item], logits: torch.Tensor) -> MmluResult:
    """Per subject, per category (over its questions, as the original does) and overall; with counts."""
    subjects: dict[str, Accuracy] = defaultdict(Accuracy)
    categories: dict[str, Accuracy] = {}
    questions = Accuracy()
    predictions = []
    for item, row in zip(items, logits.tolist()):
        predicted = LETTERS[max(range(len(LETTERS)), key=row.__getitem__)]
        hit = int(predicted == item.answer)
        tallies = [subjects[item.subject], questions]
        if item.subject in SUBJECT_CATEGORY:
            tallies.append(categories.setdefault(SUBJECT_CATEGORY[item.subject], Accuracy()))
        for tally in tallies:
            tally.correct += hit
            tally.total += 1
        predictions.append(
            {
                "subject": item.subject,
                "index": item.index,
                "answer": item.answer,
                "prediction": predicted,
                "logits": dict(zip(LETTERS, row)),
                "shots": item.shots,
            }
        )
    ordered = {name: categories[name] for name in CATEGORIES if name in categories}
    return MmluResult(dict(sorted(subjects.items())), ordered, questions, predictions)


def evaluate(loaded: LoadedModel, items: list[Item], *, batch_size: int, progress: bool = False) -> MmluResult:
    if not items:
        raise QloraError("no MMLU questions to evaluate (check --subjects, --limit and --data)")
    logits = score_prompts(
        loaded,
        [i.prompt for i in items],
        batch_size=batch_size,
        groups=[(i.subject, i.shots) for i in items],
        progress=progress,
    )
    return summarize(items, logits)


def run_mmlu(
    model_cfg: ModelConfig,
    quant: QuantizationConfig,
    adapter: str | None,
    cfg: MmluEvalConfig,
    *,
    output: Path | None = None,
    predictions: Path | None = None,
    compute_dtype: str | None = None,
) -> MmluResult:
    """`qlora eval mmlu`: load the model (and adapter), build the prompts, score, write the files asked for."""
    loaded = load_for_inference(model_cfg, quant, adapter, compute_dtype=compute_dtype)
    items = load_items(cfg, loaded.tokenizer)
    result = evaluate(loaded, items, batch_size=cfg.batch_size, progress=True)
    settings = {
        "model": model_cfg.name_or_path,
        "adapter": adapter,
        "quantization": quant.model_dump(),
        "data": cfg.data or HUB_ID,
        "split": cfg.split,
        "shots": cfg.shots if items[0].shots is not None else "as built in the data",
        "limit": cfg.limit,
        "subjects": cfg.subjects,
        "max_length": cfg.max_length,
        "batch_size": cfg.batch_size,
        "letter_tokens": letter_token_ids(loaded.tokenizer),
        "compute_dtype": loaded.compute.name,
        "compute_dtype_reason": loaded.compute.reason,
        "cpu_kernel": loaded.cpu_kernel,
    }
    write_outputs(result, settings, output, predictions)
    return result


def format_table(result: MmluResult) -> str:
    width = max([len(s) for s in result.subjects] + [len("mean over subjects")])
    lines = [f"{'subject':<{width}}  {'category':<15}  {'n':>5}  {'accuracy':>8}"]
    for name, acc in result.subjects.items():
        lines.append(f"{name:<{width}}  {SUBJECT_CATEGORY.get(name, '-'):<15}  {acc.total:>5}  {acc.accuracy:>8.1%}")
    lines.append("")
    for name, acc in result.categories.items():
        lines.append(f"{name:<{width}}  {'':<15}  {acc.total:>5}  {acc.accuracy:>8.1%}")
    lines.append("")
    lines.append(
        f"{'mean over subjects':<{width}}  {len(result.subjects):>9} subj  {result.mean_subject_accuracy:>8.1%}"
    )
    questions = result.questions
    lines.append(f"{'over questions':<{width}}  {'':<15}  {questions.total:>5}  {questions.accuracy:>8.1%}")
    return "\n".join(lines)


def write_outputs(
    result: MmluResult, settings: dict[str, Any], output: Path | None, predictions: Path | None
) -> None:
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result.as_dict(settings), indent=2) + "\n")
    if predictions:
        predictions.parent.mkdir(parents=True, exist_ok=True)
        with predictions.open("w") as f:
            for row in result.predictions:
                f.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------- during training


class MmluCallback(TrainerCallback):
    """Every `every_n_steps`, score MMLU with the model being trained and log it with the other metrics.

    Holds the trainer to log through it (as the paper's callback does), so the numbers reach
    `log_history` and every tracker; the time it takes is not counted as training (`trainer.paused_clock`).
    Every process scores the same questions, so none is left waiting for the others at the next step.
    """

    def __init__(self, trainer: Any, loaded: LoadedModel, cfg: MmluEvalConfig) -> None:
        self.trainer = trainer
        self.loaded = loaded  # holds the model being trained
        self.cfg = cfg
        self.items = load_items(cfg, loaded.tokenizer)  # fail before training, not at step N

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.cfg.every_n_steps:
            return
        with self.trainer.paused_clock():
            result = evaluate(self.loaded, self.items, batch_size=self.cfg.batch_size)
        self.trainer.log(result.metrics())
