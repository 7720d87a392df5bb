"""Batched generation with left padding; prompts are encoded exactly as training encoded sources.

`qlora generate` and `qlora chat` load a model (a 4-bit base + adapter as trained, or a merged model) and
wrap raw prompts in the prompt format of the recipe it was trained with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from qlora_cli.adapter import prompt_format, read_adapter
from qlora_cli.config import ModelConfig, QuantizationConfig, load_recipe
from qlora_cli.data.formats import ChatRenderer, DatasetFormat, template_conversation
from qlora_cli.errors import QloraError, read_text
from qlora_cli.gguf import split_gguf_path
from qlora_cli.model import LoadedModel, load_for_inference
from qlora_cli.run_folder import read_recipe

PROMPT_FIELDS = ("prompt", "instruction", "text")


@torch.no_grad()
def generate_texts(
    loaded: LoadedModel,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    streamer: Any = None,
) -> list[str]:
    """Return only the generated continuation of each prompt, cut before a `stop` string; temperature 0 is greedy.

    The one generation loop: `qlora generate`, `qlora chat` and exact match during training all use it.
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    was_training = model.training
    model.eval()
    greedy = temperature <= 0
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p}
    stopping = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = loaded.batch(loaded.prompt_ids(prompts[start : start + batch_size]))
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            streamer=streamer,
            **sampling,
            **stopping,
        )
        new_tokens = loaded.kind.generated_tokens(generated, batch["input_ids"].shape[1])
        outputs += [cut_at_stop(text, stop) for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    if was_training:
        model.train()
    return outputs


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    return text[: min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))]


def possible_stop_start(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of `text` that begins some stop string: text a stream must hold back."""
    lengths = (n for s in stop for n in range(1, min(len(s), len(text)) + 1) if s.startswith(text[-n:]))
    return max(lengths, default=0)


# --------------------------------------------------------------------------- qlora generate / qlora chat


def apply_format(prompt_format: DatasetFormat | None, text: str) -> str:
    return prompt_format.prompt(text) if prompt_format else text


def turn_openings(prompt_format: DatasetFormat | None) -> list[str]:
    """The text that opens a user turn (`### Human:` for Guanaco): a reply ends where the model starts one."""
    marker = "\x00"
    opening = apply_format(prompt_format, marker).partition(marker)[0].strip()
    return [opening] if opening else []


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: int = 8


@dataclass
class Generator:
    """A loaded model and the prompt format of the dataset it was trained on (None: prompts as given)."""

    loaded: LoadedModel
    prompt_format: DatasetFormat | None

    def format(self, text: str) -> str:
        return apply_format(self.prompt_format, text)

    def render(self, messages: list[dict[str, str]]) -> str:
        """A conversation ending in a user turn, as the recipe's format laid out conversations in training.

        Without a recipe: the tokenizer's chat template when it has one, else the messages as typed.
        """
        if self.prompt_format is not None:
            return self.prompt_format.render_conversation(messages)
        tokenizer = self.loaded.tokenizer
        if getattr(tokenizer, "chat_template", None):
            return ChatRenderer(tokenizer).conversation(messages)
        return template_conversation(lambda text: text, messages)

    @property
    def stop_strings(self) -> list[str]:
        return turn_openings(self.prompt_format)

    def generate(self, prompts: list[str], sampling: Sampling, streamer: Any = None) -> list[str]:
        """Complete already formatted prompts; returns the replies without surrounding whitespace."""
        texts = generate_texts(
            self.loaded,
            prompts,
            max_new_tokens=sampling.max_new_tokens,
            batch_size=sampling.batch_size,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            stop=self.stop_strings,
            streamer=streamer,
        )
        return [text.strip() for text in texts]

    def fits(self, prompt: str, max_new_tokens: int) -> bool:
        """Whether prompt + reply fit the model's positions (models with relative positions always fit)."""
        limit = getattr(self.loaded.model.config, "max_position_embeddings", None)
        return limit is None or len(self.loaded.tokenizer(prompt)["input_ids"]) + max_new_tokens <= limit


def load_generator(
    model: ModelConfig | None,
    adapter: Path | None = None,
    config: Path | None = None,
    *,
    device: str | None = None,
    compute_dtype: str | None = None,
) -> Generator:
    """With an adapter: its base quantized as in training; without: a plain (e.g. merged) model in 16 bits.

    The prompt format comes from `config`, else from the recipe beside the adapter (or the merged model);
    `compute_dtype` (--compute-dtype) replaces the training's, or auto's for a plain model.
    """
    recipe = load_recipe(config) if config is not None else None
    if adapter is not None:
        trained = read_adapter(adapter)
        if recipe is not None:
            trained = replace(trained, recipe=recipe)
        recipe = trained.recipe
        loaded = load_for_inference(
            trained.base_model(model), trained.quantization, trained.path, device=device, generation=True,
            compute_dtype=compute_dtype,
        )
    elif model:
        folder = Path(split_gguf_path(model.name_or_path, model.gguf_file)[0])  # a GGUF file: the folder it is in
        if recipe is None and folder.is_dir():
            recipe = read_recipe(folder)  # beside a merged model, or a GGUF file `qlora export gguf` wrote
        trust = bool(recipe and recipe.model.trust_remote_code)
        loaded = load_for_inference(
            model.model_copy(update={"trust_remote_code": trust}), QuantizationConfig(bits=16), device=device,
            generation=True, compute_dtype=compute_dtype,
        )
    else:
        raise QloraError("pass --model (a model folder or hub id), --adapter (a trained adapter folder), or both")
    return Generator(loaded, prompt_format(recipe, loaded.tokenizer))


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """JSON Lines or a JSON array (strings, or objects with a prompt, instruction or text field); else one per line."""
    text = read_text(path, "prompts file")
    if path.suffix not in (".jsonl", ".json"):
        records = [{"prompt": line} for line in text.splitlines() if line.strip()]
    elif text.lstrip().startswith("["):
        records = [_prompt_record(item, f"{path}: item {n}") for n, item in enumerate(_json(text, str(path)), 1)]
    else:
        records = [
            _prompt_record(_json(line, f"{path}:{n}"), f"{path}:{n}")
            for n, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    if not records:
        raise QloraError(f"{path} holds no prompts")
    return records


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise QloraError(f"{where}: invalid JSON: {exc.msg}") from None


def _prompt_record(item: Any, where: str) -> dict[str, Any]:
    record = {"prompt": item} if isinstance(item, str) else item
    if not isinstance(record, dict) or not any(isinstance(record.get(f), str) for f in PROMPT_FIELDS):
        raise QloraError(f"{where}: expected a string or an object with a {'/'.join(PROMPT_FIELDS)} field")
    return record


def prompt_of(record: dict[str, Any]) -> str:
    return next(record[f] for f in PROMPT_FIELDS if isinstance(record.get(f), str))


def generate_records(generator: Generator, records: list[dict[str, Any]], sampling: Sampling) -> list[dict[str, Any]]:
    """Each input record with an `output` field added, in input order."""
    outputs = generator.generate([generator.format(prompt_of(r)) for r in records], sampling)
    return [{**record, "output": output} for record, output in zip(records, outputs)]
