"""The `qlora` command: a thin layer that parses arguments and calls the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from qlora_cli import __version__
from qlora_cli.errors import QloraError

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
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in output_dir.")] = False,
) -> None:
    """Finetune a model with the recipe CONFIG; overrides follow as key.path=value."""
    from qlora_cli.config import load_recipe

    recipe = load_recipe(config, overrides or [])
    from qlora_cli.train import train as run_training

    result = run_training(recipe, overwrite=overwrite, resume=resume)
    _print_summary(result)


@app.command()
def plan(
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="Recipe YAML file; default: the paper's hyperparameters.")
    ] = None,
    overrides: Overrides = None,
    model: Annotated[
        Optional[str],
        typer.Option(help="Architecture shortcut (llama-7b ... llama-65b, llama2-70b, ...) or model id / folder."),
    ] = None,
    gpu_memory: Annotated[Optional[str], typer.Option(help="GPU size for a verdict, e.g. 24GB or 80GB.")] = None,
    num_processes: Annotated[int, typer.Option(help="GPUs the run spreads over (DDP; FSDP with training.fsdp).")] = 1,
    device: Annotated[str, typer.Option(help="cuda, or cpu (fp32 compute).")] = "cuda",
    json_output: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Predict peak GPU memory of a recipe beside 16-bit LoRA and full finetuning; no weights needed."""
    from qlora_cli.plan import parse_size, plan_for, render_plan

    budget = parse_size(gpu_memory) if gpu_memory else None
    result = plan_for(config, overrides or [], model, device=device, num_processes=num_processes)
    typer.echo(json.dumps(result.to_dict(budget), indent=2) if json_output else render_plan(result, budget))


@config_app.command("show")
def config_show(config: ConfigOption, overrides: Overrides = None) -> None:
    """Print the fully resolved recipe (extends and overrides applied, defaults filled in)."""
    from qlora_cli.config import load_recipe

    typer.echo(load_recipe(config, overrides or []).to_yaml(), nl=False)


@config_app.command("validate")
def config_validate(files: Annotated[list[Path], typer.Argument(help="Recipe files to check.")]) -> None:
    """Check recipes without loading any model; exit 2 if any is invalid."""
    from qlora_cli.config import load_recipe

    failures = 0
    for file in files:
        try:
            load_recipe(file)
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


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        app()
    except QloraError as exc:
        if debug:
            raise
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
