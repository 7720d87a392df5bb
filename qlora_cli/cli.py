"""The `qlora` command: a thin layer that parses arguments and calls the library."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal, Optional

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
data_app = typer.Typer(help="The dataset registry, and a recipe's data as training will see it.", no_args_is_help=True)
app.add_typer(data_app, name="data")
recipes_app = typer.Typer(help="List the bundled recipes, or copy one to edit.", invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")
eval_app = typer.Typer(help="Evaluate a model or a finetuned run.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
chat_eval_app = typer.Typer(
    help="The paper's chatbot evaluation: answer a benchmark, judge pairs of answers, score, rate (Elo).",
    no_args_is_help=True,
)
eval_app.add_typer(chat_eval_app, name="chat")
export_app = typer.Typer(help="A finished run for other runtimes: llama.cpp, Ollama.", no_args_is_help=True)
app.add_typer(export_app, name="export")

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Recipe YAML file.", show_default=False)]
Overrides = Annotated[
    Optional[list[str]],
    typer.Argument(help="Dotted overrides applied after the recipe, e.g. training.max_steps=20 lora.r=16."),
]


class ComputeDtypeChoice(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


ComputeDtypeOption = Annotated[
    Optional[ComputeDtypeChoice],
    typer.Option(
        "--compute-dtype",
        help="What the model computes in: auto (bf16 where the GPU or CPU has bf16 units, else fp16 on a GPU, fp32 "
        "on a CPU), bf16, fp16 (GPUs only) or fp32. Default: the recipe's (auto for a plain model).",
        show_default=False,
    ),
]


def _dtype(choice: ComputeDtypeChoice | None) -> str | None:
    return choice.value if choice is not None else None


GgufOption = Annotated[
    Optional[str],
    typer.Option("--gguf-file", help="A GGUF file in the --model folder or hub repo (needs the gguf extra).",
                 show_default=False),
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
    num_processes: Annotated[
        int, typer.Option("--num-processes", min=1, help="Data-parallel processes started through accelerate launch.")
    ] = 1,
) -> None:
    """Finetune a model with the recipe CONFIG; overrides follow as key.path=value.

    SIGINT/SIGTERM stop after the current step with a full checkpoint; --resume picks it up exactly.
    """
    from qlora_cli.config import load_recipe
    from qlora_cli.preflight import preflight

    recipe = load_recipe(config, overrides or [])
    preflight(recipe)
    if num_processes > 1:
        from qlora_cli.distributed import launch

        flags = [
            *(["--overwrite"] if overwrite else []),
            *(["--resume"] if resume else []),
            *(["--resume-from", str(resume_from)] if resume_from else []),
            *(["--force"] if force else []),
        ]
        launch(config, overrides or [], num_processes=num_processes, train_flags=flags)
        return
    from qlora_cli.distributed import is_main_process
    from qlora_cli.train import train as run_training

    result = run_training(recipe, overwrite=overwrite, resume=resume, resume_from=resume_from, force=force)
    if is_main_process():
        _print_summary(result)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run's output_dir, finished or still training.")],
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output",
            "-o",
            help="report.md or report.html; figures go beside it in figures/.",
            show_default="RUN_DIR/report.md",
        ),
    ] = None,
) -> None:
    """Plot a run (loss, learning rate, tokens/s, memory, MMLU) and write a one-page summary."""
    from qlora_cli.report import write_report

    typer.echo(f"Report written to {write_report(run_dir, output)}")


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
    device: Annotated[
        str, typer.Option(help="cuda, or cpu (computing in what compute_dtype: auto picks for this CPU).")
    ] = "cuda",
    compute_dtype: ComputeDtypeOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    read_data: Annotated[
        bool,
        typer.Option(
            "--data",
            help="Read the recipe's data (tokenizer and dataset, no weights): plan its longest row instead of the "
            "length limits, and show its packing and padding.",
        ),
    ] = False,
) -> None:
    """Predict peak GPU memory of a recipe beside 16-bit LoRA and full finetuning; no weights needed."""
    from qlora_cli.plan import parse_size, plan_for, render_plan

    budget = parse_size(gpu_memory) if gpu_memory else None
    overrides = [*(overrides or []), *([f"quantization.compute_dtype={compute_dtype.value}"] if compute_dtype else [])]
    result = plan_for(config, overrides, model, device=device, num_processes=num_processes, read_data=read_data)
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


@data_app.command("preview")
def data_preview(
    config: ConfigOption,
    overrides: Overrides = None,
    num: Annotated[int, typer.Option("--num", "-n", min=0, help="How many examples to show.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per example on stdout.")] = False,
) -> None:
    """Show formatted examples with the masked (source) and trained (target) parts, and what was cut."""
    from qlora_cli.config import load_recipe
    from qlora_cli.data.preview import json_lines, preview_data, summary, text_report

    preview = preview_data(load_recipe(config, overrides or []), num)
    if as_json:
        for line in json_lines(preview):
            typer.echo(line)
        typer.echo(summary(preview), err=True)
    else:
        typer.echo(text_report(preview))


@data_app.command("formats")
def data_formats() -> None:
    """List the registered datasets and formats, with their hub copies and native schemas."""
    from qlora_cli.data.formats import formats_table

    typer.echo(formats_table())


@recipes_app.callback()
def recipes_list(ctx: typer.Context) -> None:
    """List the bundled recipes with their dataset, model size and training numbers."""
    if ctx.invoked_subcommand is None:
        from qlora_cli.recipes import bundled_recipes, recipe_table

        typer.echo(recipe_table(bundled_recipes()))


@recipes_app.command("copy")
def recipes_copy(
    name: Annotated[str, typer.Argument(help="A bundled recipe, e.g. guanaco-7b.")],
    dest: Annotated[Path, typer.Argument(help="File or folder to write the standalone copy to.")],
    force: Annotated[bool, typer.Option(help="Replace DEST if it exists.")] = False,
) -> None:
    """Write a bundled recipe, with everything it extends resolved, to DEST for editing."""
    from qlora_cli.recipes import copy_recipe

    typer.echo(f"Wrote {copy_recipe(name, dest, force=force)}")


class Quantization(str, Enum):
    nf4 = "nf4"
    fp4 = "fp4"
    int8 = "int8"
    none = "none"


class MmluSplit(str, Enum):
    test = "test"
    val = "val"


class MmluShots(str, Enum):
    five = "5"
    zero = "0"


@eval_app.command("mmlu")
def eval_mmlu(
    model: Annotated[Optional[str], typer.Option(help="Base model: hub id, local folder or builtin:tiny-llama")] = None,
    adapter: Annotated[Optional[str], typer.Option(help="Trained LoRA adapter folder.", show_default=False)] = None,
    quantization: Annotated[
        Optional[Quantization], typer.Option(help="Load the base as: default nf4, or the recipe's.", show_default=False)
    ] = None,
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="Recipe: model, quantization and its run's adapter.")
    ] = None,
    gguf_file: GgufOption = None,
    compute_dtype: ComputeDtypeOption = None,
    data: Annotated[
        Optional[str], typer.Option(help="Hendrycks folder, or the paper's JSON Lines; default: cais/mmlu (hub).")
    ] = None,
    split: Annotated[MmluSplit, typer.Option(help="Questions to score.")] = MmluSplit.test,
    shots: Annotated[MmluShots, typer.Option(help="Dev examples before each question.")] = MmluShots.five,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N questions of each subject.")] = None,
    subjects: Annotated[Optional[str], typer.Option(help="Comma-separated subjects, e.g. anatomy,virology.")] = None,
    max_length: Annotated[int, typer.Option(min=1, help="Longest prompt in tokens; drop shots to fit.")] = 2048,
    output: Annotated[Optional[Path], typer.Option(help="Write all results and settings as JSON.")] = None,
    predictions: Annotated[Optional[Path], typer.Option(help="Write one JSON line per question.")] = None,
) -> None:
    """MMLU accuracy as the QLoRA paper reports it (5-shot mean over subjects); 0-shot too."""
    from qlora_cli.config import MmluEvalConfig, load_recipe
    from qlora_cli.eval.mmlu import format_table, run_mmlu
    from qlora_cli.model import chosen_model, inference_target

    recipe = load_recipe(config) if config else None
    target = inference_target(recipe, chosen_model(model, gguf_file), quantization and quantization.value, adapter)
    cfg = MmluEvalConfig(
        data=data,
        split=split.value,
        shots=int(shots.value),
        limit=limit,
        subjects=subjects.split(",") if subjects else None,
        batch_size=batch_size,
        max_length=max_length,
    )
    result = run_mmlu(*target, cfg, output=output, predictions=predictions, compute_dtype=_dtype(compute_dtype))
    typer.echo(format_table(result))


class JudgeMode(str, Enum):
    relative = "relative"
    pairwise = "pairwise"


KeyEnv = Annotated[str, typer.Option(help="Environment variable holding the endpoint's API key (never a flag).")]


@chat_eval_app.command("answer")
def chat_answer(
    benchmark: Annotated[str, typer.Option(help="vicuna (80 questions), oa (953 OpenAssistant prompts) or a file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Answers JSONL; an existing one is continued.")],
    adapter: Annotated[Optional[Path], typer.Option(help="A trained adapter (4-bit base + adapter, as trained).")] = None,
    model: Annotated[
        Optional[str], typer.Option(help="A local model folder or hub id; with --endpoint, the model it serves.")
    ] = None,
    gguf_file: GgufOption = None,
    config: RecipeOption = None,
    endpoint: Annotated[
        Optional[str], typer.Option(help="OpenAI-compatible base URL (qlora serve, vLLM, a hosted API), e.g. …/v1.")
    ] = None,
    api_key_env: KeyEnv = "OPENAI_API_KEY",
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.7,
    top_p: TopP = 0.9,
    max_tokens: Annotated[int, typer.Option(min=1)] = 512,
    batch_size: Annotated[int, typer.Option(min=1, help="Answers generated (or requested) together.")] = 8,
    seed: int = 0,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N questions.")] = None,
    no_system: Annotated[bool, typer.Option("--no-system", help="Leave out the paper's system text.")] = False,
    compute_dtype: ComputeDtypeOption = None,
) -> None:
    """Answer a benchmark's questions (the paper: top-p 0.9, temperature 0.7, its system text)."""
    from qlora_cli.eval.chat.answer import AnswerRequest, answer

    from qlora_cli.eval.chat.benchmarks import PAPER_SYSTEM

    if adapter is None and model is None:
        raise QloraError("pass --adapter, --model (a local model), or --endpoint with --model (the model it serves)")
    system = None if no_system else PAPER_SYSTEM
    request = AnswerRequest(benchmark, output, adapter, model, config, endpoint, api_key_env, system, temperature,
                            top_p, max_tokens, batch_size, seed, limit, gguf_file, _dtype(compute_dtype))  # fmt: skip
    typer.echo(f"Answers in {answer(request)}")


@chat_eval_app.command("judge")
def chat_judge(
    answers: Annotated[list[Path], typer.Option("--answers", help="Two answers files (give it twice).")],
    judge_endpoint: Annotated[str, typer.Option(help="The judge's OpenAI-compatible base URL.")],
    judge_model: Annotated[str, typer.Option(help="The judge's model name, e.g. gpt-4.")],
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Folder of review files (and the cache).")],
    mode: Annotated[JudgeMode, typer.Option(help="relative: two scores out of 10; pairwise: 1, 2 or 3 (tie).")] = (
        JudgeMode.relative
    ),
    judge_prompts: Annotated[
        Optional[Path], typer.Option(help="FastChat judge prompts (the paper's eval/prompts/*.jsonl as published).")
    ] = None,
    benchmark: Annotated[
        Optional[str], typer.Option(help="Questions, for answers files that do not carry them (the paper's).")
    ] = None,
    api_key_env: KeyEnv = "OPENAI_API_KEY",
    judge_max_tokens: Annotated[int, typer.Option(min=1, help="Longest review (the paper's: 1024).")] = 1024,
    concurrency: Annotated[int, typer.Option(min=1, help="Judge calls in flight.")] = 4,
    max_retries: Annotated[int, typer.Option(min=0, help="Retries (with backoff) of a call answered 429 or 5xx.")] = 8,
    dry_run: Annotated[bool, typer.Option(help="Print the number of calls and prompt tokens, call nothing.")] = False,
) -> None:
    """Judge two systems' answers question by question, in both orders (the paper's GPT-4 judge: temperature 0.2)."""
    from qlora_cli.eval.chat.judge import JudgeRequest, judge

    if len(answers) != 2:
        raise QloraError(f"--answers: give exactly two answers files (got {len(answers)})")
    request = JudgeRequest((answers[0], answers[1]), mode.value, judge_endpoint, judge_model, output_dir,
                           judge_prompts, benchmark, api_key_env, max_tokens=judge_max_tokens,
                           concurrency=concurrency, max_retries=max_retries, dry_run=dry_run)  # fmt: skip
    for path in judge(request):
        typer.echo(str(path))


ChartOption = Annotated[
    Optional[Path], typer.Option(help="PNG chart (Elo with the spread of orderings).", show_default="beside --output")
]
JsonOption = Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the table as JSON.")]


@chat_eval_app.command("scores")
def chat_scores(
    folder: Annotated[Path, typer.Argument(help="Folder of relative review files (ours or the paper's).")],
    reference: Annotated[
        Optional[Path], typer.Option(help="The reference's answers (default: the answers every file shares).")
    ] = None,
    output: JsonOption = None,
    resamples: Annotated[int, typer.Option(min=100, help="Bootstrap resamples.")] = 10_000,
    seed: int = 0,
) -> None:
    """Relative scores against the reference, both orders and pooled, with a paired bootstrap 95% interval."""
    from qlora_cli.eval.chat.summary import summarize_scores

    typer.echo(summarize_scores(folder, reference=reference, output=output, resamples=resamples, seed=seed))


@chat_eval_app.command("elo")
def chat_elo(
    folder: Annotated[Path, typer.Argument(help="Folder of pairwise (three-class) review files.")],
    output: JsonOption = None,
    chart: ChartOption = None,
    orderings: Annotated[int, typer.Option(min=1, help="Random orderings of the matches.")] = 10_000,
    seed: int = 0,
) -> None:
    """Elo ratings from pairwise verdicts: mean over random orderings, its 95% interval, and the spread."""
    from qlora_cli.eval.chat.summary import summarize_elo

    typer.echo(summarize_elo(folder, output=output, chart=chart, orderings=orderings, seed=seed))


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
    "memory. When that difference exceeds --tolerance the merge fails and writes nothing."
)


@app.command("merge-adapter", help=MERGE_HELP)
def merge_adapter(
    adapter: Annotated[Path, typer.Option("--adapter", help="Trained adapter folder.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the merged model.", show_default=False)],
    base: Annotated[
        Optional[str], typer.Option(help="Base model folder or hub id (default: the one recorded with the adapter).")
    ] = None,
    gguf_file: Annotated[
        Optional[str],
        typer.Option("--gguf-file", help="A GGUF file in --base (a folder or hub repo).", show_default=False),
    ] = None,
    dtype: Annotated[
        Literal["auto", "bf16", "fp16", "fp32"],
        typer.Option(help="dtype of the merged weights; auto: the one training computed in (fp32 on the CPU)."),
    ] = "auto",
    base_weights: Annotated[
        Optional[Literal["original", "nf4-roundtrip"]],
        typer.Option(help="Which base weights to merge into (see above); default: nf4-roundtrip after 4-bit training."),
    ] = None,
    device: Annotated[
        Optional[str],
        typer.Option(help="cpu or cuda (default: the GPU if there is one). The 16-bit model must fit there."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier merge in --output.")] = False,
    tolerance: Annotated[
        Optional[float],
        typer.Option(
            min=0.0,
            help="Largest logit difference from the trained model to accept; over it the merge fails and writes "
            "nothing.",
            show_default="0.001 for fp32, 2 for fp16, 8 for bf16",
        ),
    ] = None,
) -> None:
    from qlora_cli.merge import MergeRequest
    from qlora_cli.merge import merge_adapter as run_merge
    from qlora_cli.model import chosen_model

    base_model = chosen_model(base, gguf_file, option="--base")
    report = run_merge(MergeRequest(adapter, output, base_model, dtype, base_weights, device, overwrite, tolerance))
    typer.echo(report.summary())


EXPORT_HELP = (
    "Export a finished run as one GGUF file (llama.cpp, Ollama, LM Studio), with an Ollama Modelfile beside it.\n\n"
    "The run is merged as merge-adapter merges it (fp32, nf4-roundtrip after 4-bit training, with its check), "
    "given the chat template training laid prompts out with, and converted by llama.cpp's own converter "
    "(installed apart on first use; see qlora export converter).\n\n"
    "The file is read back: chat template, BOS/EOS and vocabulary must match the run's tokenizer, and its logits "
    "(dequantized by transformers) must stay within --tolerance of the merged model's; otherwise exit 2 and "
    "nothing is written. Where llama-cpp-python is installed, llama.cpp's own logits of the file are checked too. "
    "Greedy replies of both are printed side by side.\n\n"
    "--adapter-only writes the LoRA alone as a llama.cpp adapter file (llama.cpp's LoRA converter, from "
    "llama-cpp-python's sdist on first use), with a Modelfile that puts it over the base; refused for adapters "
    "llama.cpp would load differently (DoRA, rsLoRA, trained embedding rows). Its alpha/r · B A is read back and "
    "compared with the run's."
)


class OutType(str, Enum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"


@export_app.command("gguf", help=EXPORT_HELP)
def export_gguf(
    run: Annotated[Path, typer.Argument(help="A finished run's output_dir.", show_default=False)],
    outtype: Annotated[OutType, typer.Option(help="Weight type in the file: f32, f16, bf16, or q8_0 (8-bit).")] = (
        OutType.f16
    ),
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Folder for the file, Modelfile and report.", show_default="RUN-OUTTYPE-gguf"),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier export in --output.")] = False,
    tolerance: Annotated[
        Optional[float],
        typer.Option(
            min=0.0,
            help="Largest logit difference from the merged model to accept; over it nothing is written.",
            show_default="0.001 for f32, 0.15 for f16, 0.6 for bf16, 3 for q8_0; llama.cpp's own logits: 0.06, "
            "0.15, 1, 5; --adapter-only: relative, 1e-05, 0.001, 0.008, 0.02",
        ),
    ] = None,
    adapter_only: Annotated[
        bool, typer.Option("--adapter-only", help="Write the LoRA alone, for llama.cpp's --lora and Ollama's ADAPTER.")
    ] = False,
) -> None:
    from qlora_cli.export import ExportRequest, export_gguf
    from qlora_cli.export_adapter import export_lora_gguf

    run_export = export_lora_gguf if adapter_only else export_gguf
    typer.echo(run_export(ExportRequest(run, output, outtype.value, overwrite, tolerance, adapter_only)).summary())


@export_app.command("converter")
def export_converter() -> None:
    """Install llama.cpp's converters now, the model's and the LoRA's (the first export does it too; `make` does it
    for the tests)."""
    from qlora_cli.export import CONVERTER, install_converter
    from qlora_cli.export_adapter import LORA_CONVERTER, install_lora_converter

    typer.echo(f"{CONVERTER} in {install_converter()}")
    typer.echo(f"{LORA_CONVERTER}'s LoRA converter in {install_lora_converter()}")


@app.command()
def generate(
    model: ModelOption = None,
    gguf_file: GgufOption = None,
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
    compute_dtype: ComputeDtypeOption = None,
) -> None:
    """Generate replies with a 4-bit base + adapter, or a merged model, in the recipe's prompt format."""
    import json

    from qlora_cli.generate import Sampling, generate_records, load_generator, read_prompts
    from qlora_cli.model import chosen_model

    if (prompt is None) == (prompts is None):
        raise QloraError("pass either --prompt TEXT or --prompts FILE")
    records = [{"prompt": prompt}] if prompt is not None else read_prompts(prompts)
    generator = load_generator(chosen_model(model, gguf_file), adapter, config, compute_dtype=_dtype(compute_dtype))
    results = generate_records(generator, records, Sampling(max_new_tokens, temperature, top_p, batch_size))
    for result in results:
        typer.echo(result["output"] if prompt is not None else json.dumps(result, ensure_ascii=False))


@app.command()
def chat(
    model: ModelOption = None,
    gguf_file: GgufOption = None,
    adapter: AdapterOption = None,
    config: RecipeOption = None,
    max_new_tokens: MaxNewTokens = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.7,
    top_p: TopP = 0.9,
    compute_dtype: ComputeDtypeOption = None,
) -> None:
    """Chat with a model in the recipe's prompt format, streaming replies; /reset and /exit."""
    from qlora_cli.chat import HELP
    from qlora_cli.chat import chat as run_chat
    from qlora_cli.generate import Sampling, load_generator
    from qlora_cli.model import chosen_model

    generator = load_generator(chosen_model(model, gguf_file), adapter, config, compute_dtype=_dtype(compute_dtype))
    fmt = generator.prompt_format.name if generator.prompt_format else "prompts as typed"
    compute = generator.loaded.compute.name
    typer.echo(f"Chatting with {generator.loaded.source} ({fmt} format, {compute} compute). {HELP}", err=True)
    sampling = Sampling(max_new_tokens, temperature, top_p, batch_size=1)
    run_chat(generator, sampling, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())


@app.command()
def serve(
    adapter: Annotated[
        Optional[list[str]],
        typer.Option("--adapter", help="Trained adapter folder, or NAME=FOLDER; repeat it to serve several on one base."),
    ] = None,
    model: Annotated[
        Optional[str], typer.Option(help="A merged or plain model (folder or hub id), or the base for --adapter.")
    ] = None,
    gguf_file: GgufOption = None,
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="Recipe: its prompt format, and its run when nothing else is given.")
    ] = None,
    compute_dtype: ComputeDtypeOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    api_key: Annotated[
        Optional[str], typer.Option(envvar="QLORA_API_KEY", help="Require `Authorization: Bearer KEY` on /v1/.")
    ] = None,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Requests generated together.")] = 16,
    max_concurrent: Annotated[int, typer.Option(min=1, help="Requests in progress at once; more get 429.")] = 64,
    max_tokens: Annotated[int, typer.Option(min=1, help="The most tokens one request may ask for.")] = 1024,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Largest request body.")] = 1 << 20,
    print_vllm_command: Annotated[
        bool, typer.Option("--print-vllm-command", help="Print the vLLM command serving the same, and exit.")
    ] = False,
) -> None:
    """Serve a model and its trained adapters with the OpenAI API: /v1/chat/completions, /v1/completions."""
    from qlora_cli.model import chosen_model
    from qlora_cli.serve.models import resolve_target, vllm_command

    target = resolve_target(chosen_model(model, gguf_file), adapter or [], config, _dtype(compute_dtype))
    if print_vllm_command:
        typer.echo(vllm_command(target, host=host, port=port, api_key=api_key))
        return
    from qlora_cli.serve import serve as run_server
    from qlora_cli.serve.models import Limits

    limits = Limits(max_concurrent=max_concurrent, max_tokens=max_tokens, max_body_bytes=max_body_bytes)
    run_server(target, host=host, port=port, api_key=api_key, max_batch_size=max_batch_size, limits=limits)


def _print_summary(result) -> None:
    from qlora_cli.run_folder import CARD_FILE, REPORT_FILE

    def clip(text: str, width: int, *, tail: bool = False) -> str:
        """One line of about `width` characters, cut between words: a prompt keeps its end, a reply its start."""
        text = " ".join(text.split())
        if len(text) <= width:
            return text
        return "… " + text[-width:].partition(" ")[2] if tail else text[:width].rpartition(" ")[0] + " …"

    m = result.metrics
    lines = [
        f"Finished {m['steps']} steps in {m['runtime_s']:.0f} s: {m['training_s']:.0f} s training at "
        f"{m['tokens_per_s']:.0f} tokens/s, the rest evaluating and saving."
    ]
    if result.losses:
        first, last = result.losses[0][1], result.losses[-1][1]
        low = min(loss for _, loss in result.losses)
        lines.append(f"Loss {first:.3f} -> {last:.3f} (lowest {low:.3f})  {_sparkline([l for _, l in result.losses])}")
    if "exact_match_before" in m:
        lines.append(
            f"Exact match on {m['exact_match_samples']} held-out prompts: "
            f"{100 * m['exact_match_before']:.1f}% before -> {100 * m['exact_match_after']:.1f}% after finetuning"
        )
    if "eval_loss_before" in m:
        before, after = m["eval_loss_before"], m["eval_loss_after"]
        lines.append(f"Held-out loss: {before:.3f} before -> {after:.3f} after finetuning")
    if "knowledge_probes" in m:
        n = m["knowledge_probes"]
        lines.append(
            f"General questions answered right: {m['knowledge_before']}/{n} before -> {m['knowledge_after']}/{n} after"
        )
        for lost in m["knowledge_lost"]:
            lines.append(f"  lost: {lost['question']} {clip(lost['before'], 60)!r} -> {clip(lost['after'], 60)!r}")
    if answers := m.get("held_out_answers"):
        lines.append("Held-out prompts, answered before and after finetuning:")
        for answer in answers:
            lines.append(f"  {clip(answer['prompt'], 100, tail=True)}")
            for label, key in [("expected", "expected"), ("base", "before"), ("finetuned", "after")]:
                lines.append(f"    {label:<10} {clip(answer[key], 80)}")
    lines.append(f"Adapter saved to {result.output_dir}")
    lines.append(f"Report: {result.output_dir / REPORT_FILE}; model card: {result.output_dir / CARD_FILE}")
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


MAX_ERROR_CHARS = 600  # an error is one line a person reads, whatever produced it
# Typer's usage errors (bad option values, unknown commands), whichever click Typer ships with.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        code = app(standalone_mode=False)
    except TrainingInterrupted as exc:
        typer.secho(f"{exc}\nResume with: {_resume_command(sys.argv[1:])}", fg=typer.colors.YELLOW, err=True)
        sys.exit(exc.exit_code)
    except _ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `qlora` alone, or a group without its command: help shown
            sys.exit(exc.exit_code)
        _fail(f"{exc.format_message()}{_usage_hint(exc)}", exc.exit_code)
    except QloraError as exc:
        if debug:
            raise
        _fail(str(exc))
    except (OSError, UnicodeDecodeError) as exc:  # files the commands read or write, however deep down
        if debug:
            raise
        _fail(_file_error(exc))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int = 2) -> None:
    line = " ".join(message.split())
    if len(line) > MAX_ERROR_CHARS:
        line = f"{line[: MAX_ERROR_CHARS - 30]}… ({len(line) - MAX_ERROR_CHARS + 30:,} more characters)"
    typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
    sys.exit(code)


def _usage_hint(exc: Exception) -> str:
    ctx = getattr(exc, "ctx", None)
    return f" (see: {ctx.command_path} --help)" if ctx is not None else ""


def _file_error(exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"a file that should be text is not UTF-8 ({exc.reason} at byte {exc.start})"
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"
