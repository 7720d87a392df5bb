"""`qlora report`: plots and a one-page summary of a run, read from the files a run leaves behind.

Everything comes from the run folder (qlora_cli.run_folder): the recipe, the metrics written when training
ends, and the Trainer's log history (the finished run's, or the newest checkpoint's while it still trains).
Figures are drawn on matplotlib's Agg canvas without pyplot: no display, no global state.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_cli.config import DataConfig, QuantizationConfig, Recipe
from qlora_cli.errors import QloraError
from qlora_cli.run_folder import FIGURES_DIR, RECIPE_FILE, REPORT_FILE, RunFolder, read_recipe

Rows = list[tuple[str, str]]


@dataclass
class Run:
    folder: Path
    recipe: Recipe
    metrics: dict[str, Any] | None  # None until the run finishes
    log_history: list[dict[str, Any]]


def load_run(folder: str | Path) -> Run:
    run = RunFolder(Path(folder))
    if not run.is_run():
        raise QloraError(f"{run.path} is not a qlora run folder (no {RECIPE_FILE})")
    return Run(run.path, read_recipe(run.path), run.read_metrics(), run.log_history())


def series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every log entry that has `key`."""
    points = [(entry["step"], float(entry[key])) for entry in history if key in entry]
    return [s for s, _ in points], [v for _, v in points]


def mmlu_keys(history: list[dict[str, Any]]) -> list[str]:
    """Overall MMLU accuracies (`mmlu_accuracy`, `eval_mmlu_accuracy`...), not per-subject ones."""
    keys = {k for entry in history for k in entry if "mmlu" in k and k.endswith("accuracy")}
    return sorted(keys)


def smooth(values: list[float]) -> list[float]:
    """TensorBoard's debiased exponential moving average, its window growing with the length of the run."""
    weight = 1 - min(1.0, 20 / max(len(values), 1))  # averages over about 5% of the run
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i) if weight else value)
    return out


# --------------------------------------------------------------------------- figures


def figures(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Name -> matplotlib Figure for every curve the history has data for."""
    made: dict[str, Any] = {}
    steps, loss = series(history, "loss")
    eval_steps, eval_loss = series(history, "eval_loss")
    if loss or eval_loss:
        fig, ax = _figure("Loss", "loss")
        if loss:
            ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
            ax.plot(steps, smooth(loss), color="tab:blue", linewidth=2, label="train loss (smoothed)")
        if eval_loss:
            ax.plot(eval_steps, eval_loss, color="tab:orange", marker="o", label="eval loss")
        ax.legend()
        made["loss"] = fig
    for name, key, title, label in [
        ("learning_rate", "learning_rate", "Learning rate", "learning rate"),
        ("throughput", "tokens_per_s", "Training throughput (non-padding tokens)", "tokens/s"),
    ]:
        x, y = series(history, key)
        if x:
            fig, ax = _figure(title, label)
            ax.plot(x, y, marker="." if len(x) < 50 else None, label=label)
            made[name] = fig
    mem_steps, memory = series(history, "memory_bytes")
    if mem_steps:
        fig, ax = _figure("Memory", "GiB")
        ax.plot(mem_steps, [m / 2**30 for m in memory], label="current")
        peak_steps, peak = series(history, "peak_memory_bytes")
        ax.plot(peak_steps, [m / 2**30 for m in peak], linestyle="--", label="peak")
        ax.legend()
        made["memory"] = fig
    rewards = [(key, label) for key, label in PREFERENCE_CURVES if series(history, key)[0]]
    if rewards:  # dpo, kto: TRL logs rewards relative to the reference
        fig, ax = _figure("Preference rewards (beta x log-ratio to the reference)", "reward")
        for key, label in rewards:
            x, y = series(history, key)
            ax.plot(x, y, marker="." if len(x) < 50 else None, label=label)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.legend()
        made["rewards"] = fig
    x, y = series(history, "rewards/accuracies")
    if x:
        fig, ax = _figure("Preference accuracy (chosen reward above rejected)", "accuracy")
        ax.plot(x, y, marker="." if len(x) < 50 else None, label="train")
        eval_x, eval_y = series(history, "eval_rewards/accuracies")
        if eval_x:
            ax.plot(eval_x, eval_y, marker="o", label="eval")
        ax.legend()
        made["preference_accuracy"] = fig
    keys = mmlu_keys(history)
    if keys:
        fig, ax = _figure("MMLU accuracy", "accuracy")
        for key in keys:
            x, y = series(history, key)
            ax.plot(x, y, marker="o", label=key)
        ax.legend()
        made["mmlu"] = fig
    return made


PREFERENCE_CURVES = [
    ("rewards/chosen", "chosen"),
    ("rewards/rejected", "rejected"),
    ("rewards/margins", "margin (chosen - rejected)"),
]


def _figure(title: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.add_subplot()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


# --------------------------------------------------------------------------- tables


def hub_dataset(cfg: DataConfig) -> str | None:
    """The hub dataset the run trained on, or None when it read local files."""
    from qlora_cli.data.formats import FORMATS

    if cfg.path or cfg.data_files:
        return None
    return cfg.hub_id or FORMATS[cfg.dataset].hub_id


def _compute_dtype(q: QuantizationConfig, metrics: dict[str, Any] | None) -> str:
    """What the run computed in (recorded since `auto` depends on the machine), else the recipe's setting."""
    if metrics and metrics.get("compute_dtype"):
        return f"{metrics['compute_dtype']}: {metrics.get('compute_dtype_reason', q.compute_dtype)}"
    return q.compute_dtype


def recipe_rows(recipe: Recipe, metrics: dict[str, Any] | None) -> Rows:
    q, lora, data, t = recipe.quantization, recipe.lora, recipe.data, recipe.training
    if q.bits == 4:
        base = f"{q.bits}-bit {q.quant_type.upper()}{' + double quantization' if q.double_quant else ''}"
    else:
        base = f"{q.bits}-bit"
    targets = "every linear layer" if lora.target_modules == "all-linear" else ", ".join(lora.target_modules)
    source = hub_dataset(data) or data.path or ", ".join(data.data_files or [])
    rows = [
        ("Model", f"{recipe.model.name_or_path} ({base}, compute dtype {_compute_dtype(q, metrics)})"),
        ("LoRA", f"r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g} on {targets}" if lora.enabled else "off"),
        ("Method", _method(recipe)),
        ("Dataset", f"{data.dataset} from {source}; source/target max {data.source_max_len}/{data.target_max_len}"),
        ("Batch", f"{t.batch_size} per device x {t.gradient_accumulation_steps} accumulation "
                  f"= {t.effective_batch_size}"),
        ("Optimizer", f"{t.optim}, lr {t.learning_rate:g} ({t.lr_scheduler}, warmup {t.warmup_ratio:g}), "
                      f"max grad norm {t.max_grad_norm:g}"),
    ]
    if metrics:
        trainable, total = metrics["trainable_params"], metrics["total_params"]
        rows += [
            ("Trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"),
            ("Runtime", f"{metrics['steps']} steps of {t.max_steps} in {_duration(metrics['runtime_s'])}"
                        + (f" ({_duration(metrics['training_s'])} training)" if "training_s" in metrics else "")
                        + f", {metrics['tokens']:,} tokens, {metrics['tokens_per_s']:,.0f} tokens/s"),
            ("Peak memory", f"{metrics['peak_memory_bytes'] / 2**30:.2f} GiB ({metrics['peak_memory_kind']})"),
        ]
        if "gradient_checkpointing" in metrics:  # recorded since `auto` depends on the machine
            on = "on" if metrics["gradient_checkpointing"] else "off"
            rows.append(("Gradient checkpointing", f"{on} ({metrics['gradient_checkpointing_reason']})"))
        if "loss_path" in metrics:
            rows.append(("Loss over the vocabulary", f"{metrics['loss_path']} ({metrics['loss_path_reason']})"))
    return rows


def _method(recipe: Recipe) -> str:
    t, p = recipe.training, recipe.preference
    start = f", continuing {recipe.model.adapter}" if recipe.model.adapter else ""
    if t.method == "sft":
        return f"supervised (loss on {'source and target' if recipe.data.train_on_source else 'the target'}){start}"
    reference = f", reference log-probs {p.reference}" if t.method != "orpo" else ""
    loss = f", loss {p.loss_type}" if t.method == "dpo" else ""
    return f"{t.method.upper()} through TRL, beta {p.beta:g}{loss}{reference}{start}"


def result_rows(metrics: dict[str, Any] | None, history: list[dict[str, Any]]) -> Rows:
    """Final numbers: from metrics.json when the run finished, the last logged values otherwise."""
    metrics = metrics or {}
    rows: Rows = []
    if metrics.get("train_loss") is not None:
        rows.append(("Train loss (mean over the run)", f"{metrics['train_loss']:.4f}"))
    for label, key in [("Last train loss", "loss"), ("Last eval loss", "eval_loss")]:
        steps, values = series(history, key)
        if values:
            rows.append((label, f"{values[-1]:.4f} (step {steps[-1]})"))
    if "exact_match_before" in metrics:
        rows.append((
            f"Exact match ({metrics['exact_match_samples']} held-out prompts)",
            f"{100 * metrics['exact_match_before']:.1f}% before -> {100 * metrics['exact_match_after']:.1f}% after",
        ))
    if "eval_loss_before" in metrics:
        before, after = metrics["eval_loss_before"], metrics["eval_loss_after"]
        rows.append(("Held-out loss", f"{before:.4f} before -> {after:.4f} after"))
    for label, key, percent in [
        ("Held-out preference accuracy (chosen reward above rejected)", "eval_preference_accuracy", True),
        ("Held-out reward margin", "eval_reward_margin", False),
    ]:
        if f"{key}_before" in metrics:
            before, after = metrics[f"{key}_before"], metrics[f"{key}_after"]
            shown = (f"{100 * before:.1f}%", f"{100 * after:.1f}%") if percent else (f"{before:.4f}", f"{after:.4f}")
            rows.append((label, f"{shown[0]} before -> {shown[1]} after"))
    if "knowledge_probes" in metrics:
        n = metrics["knowledge_probes"]
        rows.append((
            "General questions answered right (knowledge probes)",
            f"{metrics['knowledge_before']}/{n} before -> {metrics['knowledge_after']}/{n} after",
        ))
    for key in mmlu_keys(history):
        steps, values = series(history, key)
        rows.append((key, f"{100 * values[-1]:.2f}% (step {steps[-1]})"))
    return rows


def chat_eval_rows(tables: dict[str, list[dict[str, Any]]]) -> Rows:
    rows: Rows = []
    for s in tables.get("relative", []):
        orders = " / ".join("-" if v is None else f"{v:.1f}%" for v in (s["reference_first"], s["reference_second"]))
        if s["mean"] is None:
            rows.append((f"{s['system']} vs {s['reference']}", f"no readable review ({s['unparsed']} unparsed)"))
            continue
        rows.append((f"{s['system']} vs {s['reference']}", f"{orders} by order, mean {s['mean']:.1f}% "
                     f"(95% interval {s['low']:.1f}-{s['high']:.1f})"))  # fmt: skip
    for r in tables.get("elo", []):
        rows.append((f"Elo {r['system']}", f"{r['mean']:.0f} ± {r['interval']:.1f} "
                     f"(single orderings {r['spread_low']:.0f}-{r['spread_high']:.0f})"))  # fmt: skip
    return rows


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs} s"


def markdown_table(rows: Rows, header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {name} | {value.replace('|', '/')} |" for name, value in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the page


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the figures beside `output` in figures/ and the summary page (.md or .html); return its path."""
    run = load_run(run_dir)
    output = Path(output) if output is not None else run.folder / REPORT_FILE
    if output.suffix not in (".md", ".html"):
        raise QloraError(f"--output {output}: the report is written as .md or .html")
    figure_dir = output.parent / FIGURES_DIR
    figure_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for name, fig in figures(run.log_history).items():
        fig.savefig(figure_dir / f"{name}.png", dpi=110)
        images.append((fig.axes[0].get_title(), f"{FIGURES_DIR}/{name}.png"))
    title = f"Run report: {run.folder.resolve().name}"
    last_step = run.log_history[-1]["step"] if run.log_history else 0
    status = "finished" if run.metrics else f"not finished, step {last_step} of {run.recipe.training.max_steps}"
    tables = [
        ("Run", recipe_rows(run.recipe, run.metrics), ("", "")),
        ("Results", result_rows(run.metrics, run.log_history), ("metric", "value")),
        ("Chatbot evaluation", chat_eval_rows(RunFolder(run.folder).read_chat_eval()), ("", "")),
    ]
    if (figure_dir / "elo.png").is_file():  # written by `qlora eval chat elo` for reviews inside the run
        images.append(("Elo ratings (qlora eval chat elo)", f"{FIGURES_DIR}/elo.png"))
    page = _html if output.suffix == ".html" else _markdown
    output.write_text(page(title, status, tables, images))
    return output


def _markdown(title: str, status: str, tables: list, images: list[tuple[str, str]]) -> str:
    parts = [f"# {title}", f"Status: {status}."]
    for heading, rows, header in tables:
        if rows:
            parts += [f"## {heading}", markdown_table(rows, header)]
    parts += [f"## {caption}\n\n![{caption}]({path})" for caption, path in images]
    return "\n\n".join(parts) + "\n"


def _html(title: str, status: str, tables: list, images: list[tuple[str, str]]) -> str:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>", f"<p>Status: {e(status)}.</p>"]
    for heading, rows, header in tables:
        if rows:
            head = "".join(f"<th>{e(h)}</th>" for h in header)
            cells = "".join(f"<tr><th>{e(name)}</th><td>{e(value)}</td></tr>" for name, value in rows)
            body.append(f"<h2>{e(heading)}</h2><table><tr>{head}</tr>{cells}</table>")
    body += [f'<h2>{e(caption)}</h2><img src="{e(path)}" alt="{e(caption)}">' for caption, path in images]
    style = (
        "body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
        "img{max-width:100%}"
    )
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
