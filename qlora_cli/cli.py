"""The `qlora` command: a thin layer that parses arguments and calls the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from qlora_cli import __version__
from qlora_cli.errors import QloraError, TrainingInterrupted

app = typer.Typer(
    help="Finetune large language models the QLoRA way.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
config_app = typer.Typer(help="Show or check recipes.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Recipe YAML file.", show_default=False)]
Overrides = Annotated[
    Optional[list[str]],
    typer.Argument(help="Dotted overrides applied after the recipe, e.g. training.max_steps=20 lora.r=16."),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qlora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Finetune large language models the QLoRA way."""


@app.command()
def train(
    config: ConfigOption,
    overrides: Overrides = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a completed run in output_dir.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue from the newest complete checkpoint in output_dir.")] = False,
    resume_from: Annotated[
        Optional[Path],
        typer.Option(help="Continue from this checkpoint folder (or a run folder's newest); implies --resume."),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Resume even though the recipe changed in a field that affects training.")
    ] = False,
) -> None:
    """Finetune a model with the recipe CONFIG; overrides follow as key.path=value.

    SIGINT/SIGTERM stop after the current step with a full checkpoint; --resume picks it up exactly.
    """
    from qlora_cli.config import load_recipe

    recipe = load_recipe(config, overrides or [])
    from qlora_cli.train import train as run_training

    result = run_training(recipe, overwrite=overwrite, resume=resume, resume_from=resume_from, force=force)
    _print_summary(result)


@config_app.command("show")
def config_show(config: ConfigOption, overrides: Overrides = None) -> None:
    """Print the fully resolved recipe (extends and overrides applied, defaults filled in)."""
    from qlora_cli.config import load_recipe

    typer.echo(load_recipe(config, overrides or []).to_yaml(), nl=False)


@config_app.command("validate")
def config_validate(files: Annotated[list[Path], typer.Argument(help="Recipe files to check.")]) -> None:
    """Check recipes without loading any model; exit 2 if any is invalid."""
    from qlora_cli.config import check_trainer_choices, load_recipe

    failures = 0
    for file in files:
        try:
            check_trainer_choices(load_recipe(file).training)
            typer.echo(f"ok      {file}")
        except QloraError as exc:
            failures += 1
            typer.echo(f"invalid {exc}", err=True)
    if failures:
        raise typer.Exit(2)


def _print_summary(result) -> None:
    m = result.metrics
    lines = [f"Finished {m['steps']} steps in {m['runtime_s']:.0f} s ({m['tokens_per_s']:.0f} tokens/s)."]
    if result.losses:
        first, last = result.losses[0][1], result.losses[-1][1]
        low = min(loss for _, loss in result.losses)
        lines.append(f"Loss {first:.3f} -> {last:.3f} (lowest {low:.3f})  {_sparkline([l for _, l in result.losses])}")
    if "exact_match_before" in m:
        lines.append(
            f"Exact match on {m['exact_match_samples']} held-out prompts: "
            f"{100 * m['exact_match_before']:.1f}% before -> {100 * m['exact_match_after']:.1f}% after finetuning"
        )
    lines.append(f"Adapter saved to {result.output_dir}")
    typer.echo("\n".join(lines))


def _sparkline(values: list[float], width: int = 40) -> str:
    if len(values) > width:
        step = len(values) / width
        values = [values[int(i * step)] for i in range(width)]
    low, high = min(values), max(values)
    ticks = "▁▂▃▄▅▆▇█"
    span = (high - low) or 1.0
    return "".join(ticks[int((v - low) / span * (len(ticks) - 1))] for v in values)


def _resume_command(argv: list[str]) -> str:
    """The command that was run, minus options that would not resume it, plus --resume."""
    import shlex

    kept, args = [], iter(argv)
    for arg in args:
        if arg == "--resume-from":
            next(args, None)  # and its value
        elif arg not in ("--overwrite", "--resume", "--force") and not arg.startswith("--resume-from="):
            kept.append(arg)
    return shlex.join(["qlora", *kept, "--resume"])


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        app()
    except TrainingInterrupted as exc:
        typer.secho(f"{exc}\nResume with: {_resume_command(sys.argv[1:])}", fg=typer.colors.YELLOW, err=True)
        sys.exit(exc.exit_code)
    except QloraError as exc:
        if debug:
            raise
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
