"""The `qlora` command: a thin layer that parses arguments and calls the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

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


AdapterOption = Annotated[
    Optional[Path], typer.Option("--adapter", help="Trained adapter folder (a qlora run or any PEFT LoRA adapter).")
]
ModelOption = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        help="Model folder or hub id: a merged model, or the base for --adapter (default: the adapter's base).",
    ),
]
RecipeOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="Recipe whose prompt format to use (default: the one saved with the model)."),
]
MaxNewTokens = Annotated[int, typer.Option(min=1, help="Most tokens to generate per reply.")]
TopP = Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass (with temperature > 0).")]


MERGE_HELP = (
    "Merge a trained adapter into a 16-bit copy of its base; check and report how close the result is.\n\n"
    "--base-weights nf4-roundtrip merges into the NF4 reconstruction of the base, the weights the adapter was "
    "trained against: the merged model answers like base-NF4 + adapter, the model you trained. Use it after "
    "4-bit training.\n\n"
    "--base-weights original merges into the untouched 16-bit weights, which the adapter never saw: answers drift "
    "by the base's quantization error. Use it for adapters trained on a 16-bit base.\n\n"
    "Writes safetensors shards, config, generation config and tokenizer (loadable without peft) and "
    "merge_report.json: the largest logit difference from base + adapter on a few fixed prompts, and the peak "
    "memory."
)


@app.command("merge-adapter", help=MERGE_HELP)
def merge_adapter(
    adapter: Annotated[Path, typer.Option("--adapter", help="Trained adapter folder.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the merged model.", show_default=False)],
    base: Annotated[
        Optional[str], typer.Option(help="Base model folder or hub id (default: the one recorded with the adapter).")
    ] = None,
    dtype: Annotated[Literal["bf16", "fp16", "fp32"], typer.Option(help="dtype of the merged weights.")] = "bf16",
    base_weights: Annotated[
        Optional[Literal["original", "nf4-roundtrip"]],
        typer.Option(help="Which base weights to merge into (see above); default: nf4-roundtrip after 4-bit training."),
    ] = None,
    device: Annotated[
        Optional[str],
        typer.Option(help="cpu or cuda (default: the GPU if there is one). The 16-bit model must fit there."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier merge in --output.")] = False,
) -> None:
    from qlora_cli.merge import MergeRequest
    from qlora_cli.merge import merge_adapter as run_merge

    report = run_merge(MergeRequest(adapter, output, base, dtype, base_weights, device, overwrite))
    typer.echo(report.summary())


@app.command()
def generate(
    model: ModelOption = None,
    adapter: AdapterOption = None,
    config: RecipeOption = None,
    prompt: Annotated[Optional[str], typer.Option(help="One prompt; prints the reply.")] = None,
    prompts: Annotated[
        Optional[Path],
        typer.Option(help="JSON Lines (prompt/instruction/text field) or text file, one prompt per line; "
                     "prints JSON Lines with an output field added."),
    ] = None,
    max_new_tokens: MaxNewTokens = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: TopP = 1.0,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts generated together (left-padded).")] = 8,
) -> None:
    """Generate replies with a 4-bit base + adapter, or a merged model, in the recipe's prompt format."""
    import json

    from qlora_cli.generate import Sampling, generate_records, load_generator, read_prompts

    if (prompt is None) == (prompts is None):
        raise QloraError("pass either --prompt TEXT or --prompts FILE")
    records = [{"prompt": prompt}] if prompt is not None else read_prompts(prompts)
    generator = load_generator(model, adapter, config)
    results = generate_records(generator, records, Sampling(max_new_tokens, temperature, top_p, batch_size))
    for result in results:
        typer.echo(result["output"] if prompt is not None else json.dumps(result, ensure_ascii=False))


@app.command()
def chat(
    model: ModelOption = None,
    adapter: AdapterOption = None,
    config: RecipeOption = None,
    max_new_tokens: MaxNewTokens = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.7,
    top_p: TopP = 0.9,
) -> None:
    """Chat with a model in the recipe's prompt format, streaming replies; /reset and /exit."""
    from qlora_cli.chat import HELP
    from qlora_cli.chat import chat as run_chat
    from qlora_cli.generate import Sampling, load_generator

    generator = load_generator(model, adapter, config)
    fmt = generator.prompt_format.name if generator.prompt_format else "prompts as typed"
    typer.echo(f"Chatting with {generator.loaded.source} ({fmt} format). {HELP}", err=True)
    sampling = Sampling(max_new_tokens, temperature, top_p, batch_size=1)
    run_chat(generator, sampling, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())


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
