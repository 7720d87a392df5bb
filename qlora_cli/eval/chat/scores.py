"""The paper's two summaries of a folder of reviews: relative scores against a reference, and Elo ratings.

Relative (Vicuna, GPT-4 scoring both answers out of 10): for one presentation order a system's score is
100 · Σ its scores / Σ the reference's scores over the parsed reviews; the mean pools both orders (it is
not the average of the two percentages). Its 95% interval comes from a paired bootstrap over questions:
resample the questions with replacement, keep both orders' reviews of each, pool again.

Elo (three-class verdicts): every parsed comparison is one match; ratings start at 1000, K = 32, a tie
scores 0.5 each. Each of `orderings` orderings plays all matches once in a fresh random permutation
(seeded); the table gives the mean over orderings with the 95% interval of that mean, and the spread
(2.5th to 97.5th percentile) of single orderings.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qlora_cli.errors import QloraError
from qlora_cli.eval.chat.reviews import UNPARSED_PAIRWISE, UNPARSED_RELATIVE, ReviewFile


@dataclass(frozen=True)
class RelativeScore:
    system: str
    reference: str
    reference_first: float | None  # percent, the reference's answer shown first
    reference_second: float | None
    mean: float | None  # both orders pooled; None when no review could be read
    low: float | None  # 95% paired bootstrap interval of the mean
    high: float | None
    reviews: int  # parsed, both orders
    unparsed: int


@dataclass(frozen=True)
class EloRating:
    system: str
    mean: float
    interval: float  # half-width of the 95% interval of the mean over orderings
    spread_low: float  # 2.5th and 97.5th percentile of single orderings
    spread_high: float
    matches: int
    wins: int
    ties: int
    losses: int


# --------------------------------------------------------------------------- relative scores


def relative_scores(
    files: list[ReviewFile], *, reference_ids: set[str] | None = None, resamples: int = 10_000, seed: int = 0
) -> list[RelativeScore]:
    files = [f for f in files if f.mode == "relative"]
    if not files:
        raise QloraError("no relative reviews (score pairs) in the folder")
    reference = reference_ids or _shared_answer_ids(files)
    # The name every file shares is the reference's; the paper's file names do not follow the answer order.
    shared_names = set.intersection(*({f.first, f.second} for f in files))
    by_system: dict[str, list[tuple[Any, bool, list[float]]]] = defaultdict(list)  # (question, ref first, scores)
    unparsed: dict[str, int] = defaultdict(int)
    reference_names: set[str] = set()
    for file in files:
        for review in file.reviews:
            ids = (review["answer1_id"], review["answer2_id"])
            if (ids[0] in reference) == (ids[1] in reference):
                raise QloraError(
                    f"{file.path.name}: {file.key} {review[file.key]}: cannot tell which answer is the "
                    "reference (pass --reference with the reference's answers file)"
                )
            reference_first = ids[0] in reference
            if len(shared_names) == 1:
                (named,) = shared_names
                system = file.second if file.first == named else file.first
                reference_names.add(named)
            else:  # one pair of systems: our files name the sides in the answers' order
                system = file.second if reference_first else file.first
                reference_names.add(file.first if reference_first else file.second)
            score = [float(s) for s in review["score"]]
            if score == UNPARSED_RELATIVE:
                unparsed[system] += 1
            else:
                by_system[system].append((review[file.key], reference_first, score))
    reference_name = reference_names.pop() if len(reference_names) == 1 else "the reference"
    systems = sorted(by_system.keys() | unparsed.keys())
    return [_relative(system, reference_name, by_system[system], unparsed[system], resamples, seed) for system in systems]


def _relative(system: str, reference: str, rows: list, unparsed: int, resamples: int, seed: int) -> RelativeScore:
    def percent(selected: list) -> float | None:
        ours = sum(s[1] if first else s[0] for _, first, s in selected)
        theirs = sum(s[0] if first else s[1] for _, first, s in selected)
        return 100 * ours / theirs if theirs else None

    questions = sorted({q for q, _, _ in rows}, key=str)
    if not questions:
        return RelativeScore(system, reference, None, None, None, None, None, 0, unparsed)
    index = {q: i for i, q in enumerate(questions)}
    ours = np.zeros(len(questions))
    theirs = np.zeros(len(questions))
    for question, first, score in rows:
        ours[index[question]] += score[1] if first else score[0]
        theirs[index[question]] += score[0] if first else score[1]
    draws = np.random.default_rng(seed).integers(0, len(questions), size=(resamples, len(questions)))
    pooled = 100 * ours[draws].sum(1) / theirs[draws].sum(1)
    return RelativeScore(
        system=system,
        reference=reference,
        reference_first=percent([r for r in rows if r[1]]),
        reference_second=percent([r for r in rows if not r[1]]),
        mean=percent(rows),
        low=float(np.percentile(pooled, 2.5)),
        high=float(np.percentile(pooled, 97.5)),
        reviews=len(rows),
        unparsed=unparsed,
    )


def _shared_answer_ids(files: list[ReviewFile]) -> set[str]:
    """The reference's answers are the ones every file shares, question by question."""
    seen: dict[Any, list[set[str]]] = defaultdict(list)
    for file in files:
        for review in file.reviews:
            seen[review[file.key]].append({review["answer1_id"], review["answer2_id"]})
    shared: set[str] = set()
    for question, id_sets in seen.items():
        common = set.intersection(*id_sets)
        if len(common) != 1:
            raise QloraError(
                f"question {question}: the review files share {len(common)} answers, not one; pass --reference "
                "with the reference's answers file"
            )
        shared |= common
    return shared


# --------------------------------------------------------------------------- Elo


def elo_ratings(
    files: list[ReviewFile], *, orderings: int = 10_000, seed: int = 0, k: float = 32, start: float = 1000
) -> list[EloRating]:
    pairwise = [file for file in files if file.mode == "pairwise"]
    if not pairwise:
        raise QloraError("no pairwise (three-class) reviews in the folder")
    matches = [
        (file.first, file.second, {1: 1.0, 2: 0.0, 3: 0.5}[review["score"]])
        for file in pairwise
        for review in file.reviews
        if review["score"] != UNPARSED_PAIRWISE
    ]
    systems = sorted({name for file in pairwise for name in (file.first, file.second)})
    index = {name: i for i, name in enumerate(systems)}
    first = np.array([index[a] for a, _, _ in matches], dtype=int)
    second = np.array([index[b] for _, b, _ in matches], dtype=int)
    outcome = np.array([s for _, _, s in matches], dtype=float)
    rng = np.random.default_rng(seed)
    final = np.concatenate([
        _play(first, second, outcome, len(systems), min(1000, orderings - done), rng, k, start)
        for done in range(0, orderings, 1000)
    ])  # fmt: skip
    ratings = []
    for name, i in index.items():
        played = (first == i) | (second == i)
        won = ((first == i) & (outcome == 1.0)) | ((second == i) & (outcome == 0.0))
        tied = played & (outcome == 0.5)
        ratings.append(
            EloRating(
                system=name,
                mean=float(final[:, i].mean()),
                interval=float(1.96 * final[:, i].std(ddof=1) / np.sqrt(len(final))) if len(final) > 1 else 0.0,
                spread_low=float(np.percentile(final[:, i], 2.5)),
                spread_high=float(np.percentile(final[:, i], 97.5)),
                matches=int(played.sum()),
                wins=int(won.sum()),
                ties=int(tied.sum()),
                losses=int(played.sum() - won.sum() - tied.sum()),
            )
        )
    return sorted(ratings, key=lambda r: -r.mean)


def _play(first, second, outcome, systems: int, orderings: int, rng, k: float, start: float) -> np.ndarray:
    """`orderings` independent Elo runs at once, each over all matches in its own random order."""
    ratings = np.full((orderings, systems), start, dtype=np.float64)
    order = np.argsort(rng.random((orderings, len(outcome))), axis=1)
    rows = np.arange(orderings)
    for step in range(len(outcome)):
        match = order[:, step]
        a, b, s = first[match], second[match], outcome[match]
        expected = 1 / (1 + 10 ** ((ratings[rows, b] - ratings[rows, a]) / 400))
        change = k * (s - expected)
        ratings[rows, a] += change
        ratings[rows, b] -= change
    return ratings


# --------------------------------------------------------------------------- output


def relative_table(scores: list[RelativeScore]) -> str:
    lines = [f"{'system':<48} {'ref first':>9} {'ref second':>10} {'mean':>7} {'95% interval':>15} {'reviews':>8}"]
    for s in scores:
        lines.append(
            f"{s.system:<48} {_pct(s.reference_first):>9} {_pct(s.reference_second):>10} {_pct(s.mean):>7} "
            f"{'-' if s.low is None else f'{s.low:.1f}-{s.high:.1f}':>15} {s.reviews:>8}"
            + (f"  ({s.unparsed} unparsed, left out)" if s.unparsed else "")
        )
    reference = scores[0].reference if scores else "the reference"
    lines.append(f"\nPercent of {reference}'s score; mean pools both orders; interval: paired bootstrap over questions.")
    return "\n".join(lines)


def elo_table(ratings: list[EloRating], orderings: int, unparsed: int) -> str:
    lines = [f"{'system':<48} {'Elo':>7} {'95% CI of mean':>15} {'single orderings':>17} {'W/T/L':>15}"]
    for r in ratings:
        lines.append(
            f"{r.system:<48} {r.mean:>7.0f} {f'±{r.interval:.1f}':>15} "
            f"{f'{r.spread_low:.0f}-{r.spread_high:.0f}':>17} {f'{r.wins}/{r.ties}/{r.losses}':>15}"
        )
    lines.append(f"\nMean over {orderings:,} random orderings of all matches (start 1000, K 32); "
                 f"{unparsed} unparsed reviews left out.")  # fmt: skip
    return "\n".join(lines)


def as_json(rows: list) -> list[dict[str, Any]]:
    return [asdict(row) for row in rows]


def elo_chart(ratings: list[EloRating], path: Path) -> Path:
    """Each system's mean Elo with the spread of single orderings."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 0.45 * len(ratings) + 1.2), layout="constrained")
    axes = figure.add_subplot()
    shown = list(reversed(ratings))
    means = [r.mean for r in shown]
    spread = [[max(0.0, r.mean - r.spread_low) for r in shown], [max(0.0, r.spread_high - r.mean) for r in shown]]
    axes.errorbar(means, range(len(shown)), xerr=spread, fmt="o", capsize=3)
    axes.set_yticks(range(len(shown)), [r.system for r in shown])
    axes.set_xlabel("Elo: mean over orderings; bars: 95% of single orderings")
    axes.grid(alpha=0.3, axis="x")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
