"""Adapters that start non-zero and so change the base: PiSSA, OLoRA and LoftQ (`lora.init`).

Each takes a start B0 A0 out of the 16-bit base W and trains against the residual W - s·B0 A0 (s: LoRA's scale),
quantized as the recipe says, so that at step 0 base + adapter is W up to the quantization error of the residual.
PiSSA puts W's r largest singular directions in the adapter, OLoRA the first r of its QR decomposition (both
peft's own code, run on a 16-bit copy: peft refuses PiSSA on a quantized layer and would take OLoRA from the
NF4 weights), LoftQ alternates quantizing the residual and fitting the adapter to the quantization error (our
loop: peft's moves every weight to CUDA, and it quantizes without the double quantization training loads with).

The 4-bit residual cannot be recovered from anything but W and B0 A0, so the run folder keeps B0 A0 (`base_init/`,
a plain peft adapter) and the norm of each residual layer; every command that loads such an adapter rebuilds the
residual from the 16-bit base and refuses when a norm differs (another base, or another revision of it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from qlora_cli.config import LoraConfig
from qlora_cli.errors import QloraError
from qlora_cli.run_folder import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHT_FILES,
    BASE_INIT_DIR,
    BASE_INIT_FILE,
    checkpoint_step,
)

PEFT_PREFIX = "base_model.model."  # peft's saved keys: PREFIX + module name + .lora_A.weight / .lora_B.weight
NORM_TOLERANCE = 1e-3  # relative; rounding of W - s·B0 A0 across devices and dtypes stays far below it


@dataclass(frozen=True)
class BaseChange:
    """What an adapter's base became: W - scale · B0 A0 in each adapted layer (B0 A0 in `folder`)."""

    folder: Path  # base_init/: the initial adapter as a peft folder, and BASE_INIT_FILE
    init: str
    scale: float
    residual_norms: dict[str, float]  # module name -> Frobenius norm of its 16-bit residual

    def initial_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module name -> (A0, B0) in fp32."""
        from safetensors.torch import load_file

        saved = load_file(self.folder / ADAPTER_WEIGHT_FILES[0])
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, a in saved.items():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
                pairs[name] = (a.float(), saved[key.replace(".lora_A.", ".lora_B.")].float())
        return pairs


def lora_scale(lora: LoraConfig) -> float:
    """peft's scale of B A: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    return lora.alpha / (math.sqrt(lora.r) if lora.rslora else lora.r)


def residual(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W - s·B A in fp32, written as peft's PiSSA/OLoRA write it, cast back to W's dtype."""
    return (weight.float() - scale * b.to(weight.device) @ a.to(weight.device)).to(weight.dtype)


def round_trip(weight: torch.Tensor, *, blocksize: int, quant_type: str, double_quant: bool) -> torch.Tensor:
    """A weight quantized to 4 bits as bitsandbytes' loader quantizes it, and dequantized again."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        weight.contiguous(), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    return bnbf.dequantize_4bit(packed, state)


def loftq_start(
    weight: torch.Tensor, r: int, scale: float, iterations: int, quantize: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) with quantize(W - s·B0 A0) + s·B0 A0 close to W: alternately quantize, then fit the error's top r."""
    w = weight.float()
    a = torch.zeros(r, w.shape[1])
    b = torch.zeros(w.shape[0], r)
    for _ in range(iterations):
        error = (w - quantize((w - scale * b @ a).to(weight.dtype)).float()) / scale
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
        root = s[:r].sqrt()
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
    return a.contiguous(), b.contiguous()


def set_weight(module: Any, weight: torch.Tensor) -> None:
    """Replace a layer's weight: quantized again as it was (a 4-bit layer) or copied in (a 16-bit one)."""
    import bitsandbytes as bnb

    old = module.weight
    if not isinstance(old, bnb.nn.Params4bit):
        old.data.copy_(weight.to(old.dtype))
        return
    module.weight = bnb.nn.Params4bit(
        weight.to(old.quant_state.dtype).cpu(),
        requires_grad=False,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
        module=module,
    ).to(old.device)


def residual_norm(weight: torch.Tensor) -> float:
    return float(weight.double().norm())


def rebuild_base(model: Any, base16: Any, change: BaseChange) -> None:
    """Put W - s·B0 A0 (W from `base16`, which may be `model` itself) into every adapted layer of `model`.

    Refuses, before changing anything, when a residual's norm differs from the one recorded in training.
    """
    modules, originals = dict(model.named_modules()), dict(base16.named_modules())
    initial = change.initial_weights()
    missing = sorted(set(initial) - set(modules))
    if missing:
        raise QloraError(f"{change.folder}: the base has no layer {missing[0]}, which the adapter was initialised in")
    residuals = {
        name: residual(originals[name].weight.detach(), a, b, change.scale) for name, (a, b) in initial.items()
    }
    for name, weight in residuals.items():
        recorded, rebuilt = change.residual_norms[name], residual_norm(weight)
        if abs(rebuilt - recorded) > NORM_TOLERANCE * recorded:
            raise QloraError(
                f"the adapter was trained on {change.init}'s residual of another base: layer {name} rebuilds to norm "
                f"{rebuilt:.6g}, training recorded {recorded:.6g}. Load it on the base (and revision) it was trained on"
            )
    for name, weight in residuals.items():
        set_weight(modules[name], weight)


def write_base_change(folder: Path, init: str, scale: float, residuals: dict[str, torch.Tensor]) -> None:
    """BASE_INIT_FILE beside the initial adapter peft has already saved into `folder`."""
    record = {"init": init, "scale": scale, "residual_norms": {n: residual_norm(w) for n, w in residuals.items()}}
    (folder / BASE_INIT_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_base_change(adapter: Path) -> BaseChange | None:
    """The base change recorded for an adapter: in its folder, or its run's for a checkpoint; None for plain LoRA."""
    adapter = Path(adapter)
    candidates = [adapter / BASE_INIT_DIR]
    if checkpoint_step(adapter) is not None:
        candidates.append(adapter.parent / BASE_INIT_DIR)
    folder = next((c for c in candidates if (c / BASE_INIT_FILE).is_file()), None)
    config = adapter / ADAPTER_CONFIG_FILE
    init = json.loads(config.read_text()).get("init_lora_weights") if config.is_file() else None
    if folder is None:
        if isinstance(init, str) and init.split("_niter_")[0] in ("pissa", "olora", "loftq", "corda"):
            raise QloraError(
                f"{adapter} is a {init} adapter without the record of its base ({BASE_INIT_DIR}/): its base cannot be "
                "rebuilt; load its conversion to plain LoRA instead"
            )
        return None
    record = json.loads((folder / BASE_INIT_FILE).read_text())
    return BaseChange(folder, record["init"], float(record["scale"]), record["residual_norms"])
