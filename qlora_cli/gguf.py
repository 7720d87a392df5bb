"""GGUF checkpoints (llama.cpp's format) as a base: dequantized once into a cached Hugging Face folder.

transformers reads GGUF (`from_pretrained(..., gguf_file=...)`) but will not quantize what it reads, so the
file is dequantized to fp32 once, saved under `cache_dir()`, and from there loads (and is quantized to
NF4) like any other base. The weights are then the GGUF's own quantization, re-quantized to NF4: they are
no better than the GGUF file, and a little worse.
"""

from __future__ import annotations

import hashlib
import json
import importlib.util
import os
from pathlib import Path

from qlora_cli.builtin import materialize
from qlora_cli.errors import QloraError


def split_gguf_path(name_or_path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """`folder/model.gguf` given as the model is the same as the folder with `gguf_file: model.gguf`."""
    if gguf_file is None and name_or_path.endswith(".gguf") and os.path.isfile(name_or_path):
        return os.path.dirname(os.path.abspath(name_or_path)), os.path.basename(name_or_path)
    return name_or_path, gguf_file


def require_gguf_package(gguf_file: str) -> None:
    """transformers reads GGUF through the optional `gguf` package: say so in one line, before it fails deeper."""
    if importlib.util.find_spec("gguf") is None:
        raise QloraError(f"reading {gguf_file} needs the gguf package: pip install 'qlora-cli[gguf]'")


def dequantized_folder(source: str, gguf_file: str) -> Path:
    """The cached Hugging Face copy of `source`/`gguf_file` (a local folder or a hub repo)."""
    require_gguf_package(gguf_file)
    local = Path(source) / gguf_file
    identity = f"{local.resolve()}:{local.stat().st_size}:{local.stat().st_mtime_ns}" if local.is_file() else (
        f"{source}/{gguf_file}")  # fmt: skip
    key = f"gguf-{Path(gguf_file).stem}-{hashlib.sha1(identity.encode()).hexdigest()[:12]}"

    def build(folder: Path) -> None:
        import torch
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        except Exception as exc:  # a truncated or foreign file fails deep in the gguf reader (struct.error, …)
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise QloraError(f"cannot read {gguf_file} from {source} (truncated, or not a GGUF file?): {reason}") from None
        # The weights as plain tensors and the config without the GGUF's quantization, which is undone now.
        # (save_pretrained refuses a model that transformers loaded from GGUF.)
        save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        model.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return materialize(key, build)
