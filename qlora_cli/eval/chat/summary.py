"""`qlora eval chat scores / elo`: a folder of reviews as a table, JSON, a chart, and the run's report.

Reviews kept inside a run folder (e.g. `runs/guanaco/chat_eval/`) also land in that run: the table in
`chat_eval.json`, the Elo chart in its figures, both in its `report.md` (rewritten here).
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_cli.eval.chat.answer import read_answers
from qlora_cli.eval.chat.reviews import read_review_dir
from qlora_cli.eval.chat.scores import as_json, elo_chart, elo_ratings, elo_table, relative_scores, relative_table
from qlora_cli.run_folder import FIGURES_DIR, RunFolder


def summarize_scores(folder: Path, *, reference: Path | None, output: Path | None, resamples: int, seed: int) -> str:
    files = read_review_dir(folder)
    reference_ids = {a["answer_id"] for a in read_answers(reference)} if reference else None
    scores = relative_scores(files, reference_ids=reference_ids, resamples=resamples, seed=seed)
    _keep(RunFolder.enclosing(folder), "relative", as_json(scores), output)
    return relative_table(scores)


def summarize_elo(folder: Path, *, output: Path | None, chart: Path | None, orderings: int, seed: int) -> str:
    files = read_review_dir(folder)
    ratings = elo_ratings(files, orderings=orderings, seed=seed)
    run = RunFolder.enclosing(folder)
    charts = [chart or (output.with_suffix(".png") if output else None)]
    charts.append(run.path / FIGURES_DIR / "elo.png" if run is not None else None)
    written = [elo_chart(ratings, path) for path in charts if path is not None]
    _keep(run, "elo", as_json(ratings), output)
    unparsed = sum(f.unparsed for f in files if f.mode == "pairwise")
    return elo_table(ratings, orderings, unparsed) + "".join(f"\nChart: {path}" for path in written)


def _keep(run: RunFolder | None, key: str, rows: list[dict], output: Path | None) -> None:
    """The table as --output JSON, and in the run the reviews lie in (with its report rewritten)."""
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(rows, indent=2) + "\n")
    if run is not None:
        from qlora_cli.report import write_report

        run.write_chat_eval(key, rows)
        if run.is_completed():
            write_report(run.path)
