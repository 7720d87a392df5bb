import json
import re

import pytest

from qlora_cli.config import load_recipe
from qlora_cli.report import figures, load_run, smooth, write_report
from tests.conftest import REPO, run_cli


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real `qlora train` (4 steps, logged every step, eval every 2, tensorboard on), shared by this module."""
    from qlora_cli.builtin import resolve_builtin_model

    out = tmp_path_factory.mktemp("run") / "tiny"
    result = run_cli(
        "train",
        "--config",
        str(REPO / "configs/demo.yaml"),
        f"output_dir={out}",
        # a local folder rather than builtin:, so the model card's loading snippet can run as written
        f"model.name_or_path={resolve_builtin_model('builtin:tiny-llama')}",
        "lora.r=8",
        "training.max_steps=4",
        "training.batch_size=2",
        "training.logging_steps=1",
        "training.eval_steps=2",
        "training.save_steps=4",
        "training.eval_batch_size=4",
        "training.report_to=tensorboard",
        "data.eval_size=4",
        "eval.exact_match_samples=0",
        "eval.loss_before_after=false",
        "eval.knowledge_probes=[]",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _logged(run_dir, key):
    history = json.loads((run_dir / "log_history.json").read_text())
    return [entry["step"] for entry in history if key in entry]


def test_train_writes_report_whose_figures_exist_and_decode(tiny_run):
    from matplotlib.image import imread

    report = (tiny_run / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {link.rsplit("/", 1)[-1] for link in links} == {
        "loss.png", "learning_rate.png", "throughput.png", "memory.png"
    }  # fmt: skip
    for link in links:
        pixels = imread(tiny_run / link)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert "Status: finished." in report
    assert "Trainable parameters" in report and "Last eval loss" in report


def test_curves_have_one_point_per_logged_step(tiny_run):
    run = load_run(tiny_run)
    assert _logged(tiny_run, "loss") == [1, 2, 3, 4]
    drawn = {line.get_label(): line for fig in figures(run.log_history).values() for line in fig.axes[0].lines}
    assert list(drawn["train loss"].get_xdata()) == [1, 2, 3, 4]
    assert list(drawn["train loss (smoothed)"].get_xdata()) == [1, 2, 3, 4]
    assert list(drawn["eval loss"].get_xdata()) == _logged(tiny_run, "eval_loss") == [2, 4]
    assert list(drawn["learning rate"].get_xdata()) == [1, 2, 3, 4]
    assert list(drawn["tokens/s"].get_xdata()) == [1, 2, 3, 4]
    assert all(rate > 0 for rate in drawn["tokens/s"].get_ydata())
    assert all(gib > 0.05 for gib in drawn["current"].get_ydata())  # resident memory of a process with torch


def test_report_command_writes_html_with_figures_beside_it(tiny_run, cli, tmp_path):
    code, out, err = cli("report", str(tiny_run), "--output", str(tmp_path / "run.html"))
    assert code == 0, err
    page = (tmp_path / "run.html").read_text()
    assert page.startswith("<!doctype html>")
    assert '<img src="figures/loss.png"' in page and "Trainable parameters" in page
    assert (tmp_path / "figures" / "throughput.png").stat().st_size > 1000


def test_tensorboard_event_files_hold_every_logged_loss(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tiny_run / "runs").rglob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("train/loss")] == _logged(tiny_run, "loss")


def test_train_writes_model_card_whose_snippet_loads_the_adapter(tiny_run):
    from huggingface_hub import ModelCard
    from peft import PeftModel

    card = ModelCard.load(tiny_run / "README.md")
    recipe = load_recipe(tiny_run / "recipe.yaml")
    assert card.data.base_model == recipe.model.name_or_path
    assert card.data.library_name == "peft"
    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    namespace: dict = {}
    exec(snippet, namespace)
    assert isinstance(namespace["model"], PeftModel)
    assert namespace["model"].peft_config["default"].r == 8


def _write_run(folder, history, checkpoint):
    recipe = load_recipe(REPO / "configs/demo.yaml", [f"output_dir={folder}", "training.max_steps=300"])
    folder.mkdir()
    (folder / "recipe.yaml").write_text(recipe.to_yaml())
    (folder / checkpoint).mkdir()
    (folder / checkpoint / "trainer_state.json").write_text(json.dumps({"log_history": history}))


def test_unfinished_run_reports_newest_checkpoint_and_mmlu(tmp_path):
    run_dir = tmp_path / "run"
    history = [
        {"step": 10, "loss": 2.0, "learning_rate": 1e-4},
        {"step": 10, "mmlu_accuracy": 0.31, "mmlu_accuracy_anatomy": 0.5, "mmlu_loss": 1.3},
        {"step": 20, "loss": 1.5, "learning_rate": 1e-4},
        {"step": 20, "mmlu_accuracy": 0.36, "mmlu_accuracy_anatomy": 0.4, "mmlu_loss": 1.2},
    ]
    _write_run(run_dir, history[:2], "checkpoint-9")
    (run_dir / "checkpoint-20").mkdir()  # numerically newer than checkpoint-9, though it sorts first as text
    (run_dir / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({"log_history": history}))

    report = write_report(run_dir).read_text()

    assert "not finished, step 20 of 300" in report
    assert "| mmlu_accuracy | 36.00% (step 20) |" in report
    assert (run_dir / "figures" / "mmlu.png").is_file()
    mmlu = figures(load_run(run_dir).log_history)["mmlu"]
    assert [line.get_label() for line in mmlu.axes[0].lines] == ["mmlu_accuracy"]  # not per-subject
    assert list(mmlu.axes[0].lines[0].get_ydata()) == [0.31, 0.36]


def test_report_errors_name_the_folder_or_the_option(tmp_path, cli):
    code, _, err = cli("report", str(tmp_path))
    assert code == 2 and f"{tmp_path} is not a qlora run folder" in err

    run_dir = tmp_path / "run"
    _write_run(run_dir, [{"step": 1, "loss": 1.0}], "checkpoint-1")
    code, _, err = cli("report", str(run_dir), "--output", str(tmp_path / "report.pdf"))
    assert code == 2 and "report.pdf" in err and ".html" in err


def test_smoothing_follows_a_drop_with_lag_and_leaves_short_runs_raw():
    assert smooth([3.0, 1.0, 2.0]) == [3.0, 1.0, 2.0]
    values = [1.0] * 50 + [0.0] * 50
    smoothed = smooth(values)
    assert smoothed[:50] == pytest.approx([1.0] * 50)  # debiased: no ramp up from zero
    assert 0.5 < smoothed[51] < 1.0 and smoothed[-1] < 0.05
