"""What `qlora serve` serves: one loaded model, its trained adapters by name, and the same set as a vLLM command."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from qlora_cli.adapter import TrainedAdapter, prompt_format, read_adapter
from qlora_cli.builtin import resolve_builtin_model
from qlora_cli.config import ModelConfig, load_recipe
from qlora_cli.data.formats import GUANACO_CHAT_TEMPLATE
from qlora_cli.errors import QloraError
from qlora_cli.generate import Generator, load_generator
from qlora_cli.model import LoadedModel, attach_adapter


VLLM_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # its --dtype


@dataclass(frozen=True)
class Limits:
    max_concurrent: int = 64  # requests generating or waiting; more get 429
    max_tokens: int = 1024  # the most one request may ask for
    max_body_bytes: int = 1 << 20


@dataclass(frozen=True)
class ServedModel:
    """A name clients ask for: an adapter of the loaded model (None: the model itself) and how it was prompted."""

    name: str
    adapter: str | None  # peft's name for it
    generator: Generator  # the prompt format of its recipe, and where a reply ends

    @property
    def stop(self) -> tuple[str, ...]:
        return tuple(self.generator.stop_strings)


@dataclass(frozen=True)
class ServeTarget:
    """The command line's choice, resolved: a model (a merged or plain one, or the base for adapters) and adapters."""

    model: ModelConfig | None
    adapters: tuple[tuple[str, Path], ...]  # (name, folder), in the order given
    config: Path | None
    compute_dtype: str | None = None  # --compute-dtype; None: as trained (auto for a plain model)


def resolve_target(
    model: ModelConfig | None, adapter_specs: list[str], config: Path | None, compute_dtype: str | None = None
) -> ServeTarget:
    """`--adapter [NAME=]PATH` (repeatable); `--config` alone serves what its run produced."""
    adapters = []
    for spec in adapter_specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not name or not path:
            raise QloraError(f"--adapter {spec!r}: expected PATH or NAME=PATH")
        if name in dict(adapters):
            raise QloraError(f"--adapter: the name {name!r} is given twice; name them NAME=PATH")
        adapters.append((name, Path(path)))
    if config is not None and not adapters and model is None:
        recipe = load_recipe(config)
        run = Path(recipe.output_dir)
        if recipe.lora.enabled:
            adapters.append((run.name, run))
        else:
            model = ModelConfig(name_or_path=str(run))
    if model is None and not adapters:
        raise QloraError("pass --adapter (a trained adapter folder), --model (a model folder or hub id) or --config")
    return ServeTarget(model, tuple(adapters), config, compute_dtype)


def load_served(target: ServeTarget) -> tuple[LoadedModel, dict[str, ServedModel]]:
    """The base once, quantized as its adapters were trained; every adapter on it under its own name."""
    if not target.adapters:
        generator = load_generator(target.model, None, target.config, compute_dtype=target.compute_dtype)
        name = target.model.name_or_path  # type: ignore[union-attr]  # resolve_target: a model when no adapters
        return generator.loaded, {name: ServedModel(name, None, generator)}
    (first_name, first_path), *others = target.adapters
    generator = load_generator(target.model, first_path, target.config, compute_dtype=target.compute_dtype)
    loaded, first = generator.loaded, read_adapter(first_path)
    served = {first_name: ServedModel(first_name, "default", generator)}
    explicit = load_recipe(target.config) if target.config else None
    for index, (name, path) in enumerate(others, start=1):
        trained = read_adapter(path)
        _check_same_base(first_name, first, name, trained, target.model)
        attach_adapter(loaded, trained.path, name=f"adapter-{index}")
        own = Generator(loaded, prompt_format(explicit or trained.recipe, loaded.tokenizer))
        served[name] = ServedModel(name, f"adapter-{index}", own)
    return loaded, served


def _check_same_base(
    first_name: str, first: TrainedAdapter, name: str, other: TrainedAdapter, model: ModelConfig | None
) -> None:
    """Adapters share the one loaded base: it must be the one each was trained on, quantized the same way."""
    if model is None and first.base_model().name_or_path != other.base_model().name_or_path:
        raise QloraError(
            f"adapters {first_name} and {name} were trained on different bases ({first.base_model().name_or_path}, "
            f"{other.base_model().name_or_path}): serve them from two servers"
        )
    if first.quantization.model_dump() != other.quantization.model_dump():
        raise QloraError(
            f"adapters {first_name} and {name} were trained on differently quantized bases: serve them from two servers"
        )


def vllm_command(target: ServeTarget, *, host: str, port: int, api_key: str | None) -> str:
    """The vLLM server for the same base and adapters (as LoRA modules) and the same OpenAI endpoints."""
    if not target.adapters:
        model = target.model  # type: ignore[union-attr]  # resolve_target: a model when no adapters
        command = ["vllm", "serve", _vllm_model(model), "--served-model-name", model.name_or_path]
    else:
        adapters = [_vllm_adapter(name, read_adapter(path)) for name, path in target.adapters]
        first = adapters[0]
        base = _vllm_model(target.model or first.base_model())
        command = ["vllm", "serve", base]
        if first.quantization.bits == 4:
            command += ["--quantization", "bitsandbytes"]  # the adapters were trained against a 4-bit base
        rank = max(int(a.config.get("r", 16)) for a in adapters)
        command += ["--enable-lora", "--max-lora-rank", str(rank), "--lora-modules"]
        command += [f"{name}={a.path.resolve()}" for (name, _), a in zip(target.adapters, adapters)]
        if first.recipe is not None and first.recipe.data.dataset == "oasst1":
            command += ["--chat-template", GUANACO_CHAT_TEMPLATE]  # the tokenizer has none: Guanaco's layout
    if target.compute_dtype:
        command += ["--dtype", VLLM_DTYPES[target.compute_dtype]]
    command += ["--host", host, "--port", str(port)]
    if api_key:
        command += ["--api-key", api_key]
    return shlex.join(command)


def _vllm_adapter(name: str, adapter: TrainedAdapter) -> TrainedAdapter:
    """The adapter vLLM loads as trained: itself, a 16-bit run's plain-LoRA conversion, or a refusal in one line.

    vLLM's LoRA applies rsLoRA's scale but has no DoRA, no trained embedding rows, and cannot rebuild a base that a
    PiSSA/OLoRA/LoftQ start changed (the conversion against the untouched base matches only an unquantized run).
    """
    plain = adapter.plain_lora()
    if plain is not None and adapter.quantization.bits == 16:
        adapter = plain
    unsupported = [need for need in adapter.needs() if need != "rsLoRA scaling"]
    if unsupported:
        raise QloraError(
            f"vLLM cannot serve adapter {name} as trained ({unsupported[0]}): serve it with `qlora serve`, or merge "
            "it with `qlora merge-adapter` and hand vLLM the merged folder"
        )
    return adapter


def _vllm_model(model: ModelConfig) -> str:
    """What `vllm serve` takes: a folder or hub id, or the path of a local GGUF file."""
    name = resolve_builtin_model(model.name_or_path)
    if not model.gguf_file:
        return name
    path = Path(name) / model.gguf_file
    if not path.is_file():
        raise QloraError(f"vLLM serves a GGUF file from disk: download {model.gguf_file} from {name} first")
    return str(path)
