"""The loss over the vocabulary without the logits of every position: chunked, or Liger's fused kernel.

A causal LM's plain loss holds the fp32 logits of every position it scores, and autograd keeps their
log-softmax and gradient too: three tokens x vocab fp32 tensors, which at a 49k-150k vocabulary and a
4k-token row outweigh a 4-bit 8B model. Here the head is applied to the positions that have a label, a chunk
of them at a time, and each chunk's gradient is taken at once, so only one chunk's logits ever exist.
The result is transformers' `ForCausalLMLoss` (shift, -100 ignored, sum / num_items_in_batch or mean).

`training.loss` picks the path (`choose_loss`, announced at a run's start); `HeadLoss` is the Trainer's
`compute_loss_func` on the chunked and fused paths (qlora_cli/trainer.py calls the model for it).
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from qlora_cli.config import Recipe
from qlora_cli.errors import QloraError
from qlora_cli.model_kind import IGNORE_INDEX

# Model types whose logits are `lm_head(final normed hidden state)`, a bias-free linear layer and nothing after it
# (no softcapping or logit scale): tests/test_loss.py checks each against the model's own loss.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma"})
CHUNK_ELEMENTS = 2**24  # logits per chunk: 64 MiB in fp32, 341 positions at SmolLM2's 49k vocabulary
LIGER_FIX = "pip install 'qlora-cli[liger]'"


@dataclass(frozen=True)
class LossChoice:
    """Which loss path a run takes (`chunked`, `fused` or `plain`), and why: `auto` depends on the model and machine."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def fused_problem(device: str) -> str | None:
    """Why Liger's fused kernel cannot run on `device` (cpu, cuda, cuda:N), or None. It is Triton code: CUDA only."""
    if not device.startswith("cuda"):
        return "Liger's fused kernel needs a CUDA GPU: use training.loss=chunked (or auto) here"
    if not liger_installed():
        return f"Liger's fused kernel needs liger-kernel: {LIGER_FIX}"
    return None


def choose_loss(recipe: Recipe, model_type: str, *, encoder_decoder: bool, device: str) -> LossChoice:
    """`training.loss` for this model on this device; an explicit chunked or fused that cannot work is refused.

    The recipe itself is valid (config.py refuses chunked and fused with a sharding engine); whether the
    fused kernel can run is preflight's question, asked before this for an explicit `fused`.
    """
    setting, t = recipe.training.loss, recipe.training
    if t.method != "sft":  # config.py refuses chunked and fused for them
        return LossChoice("plain", f"training.method={t.method}: TRL computes its log-probabilities itself, in tiles")
    if setting == "plain":
        return LossChoice("plain", "training.loss=plain")
    if t.fsdp or t.deepspeed:  # auto: config.py refuses the others
        engine = "training.fsdp" if t.fsdp else "training.deepspeed"
        return LossChoice("plain", f"auto: {engine} shards the output head")
    problem = _head_problem(recipe, model_type, encoder_decoder=encoder_decoder)
    if problem and setting != "auto":
        raise QloraError(f"training.loss={setting}: {problem}: use training.loss=plain (or auto)")
    if problem:
        return LossChoice("plain", f"auto: {problem}")
    if setting != "auto":
        return LossChoice(setting, f"training.loss={setting}")
    if fused_problem(device) is None:
        return LossChoice("fused", "auto: Liger's fused kernel, on CUDA with liger-kernel installed")
    needs = f"liger-kernel here ({LIGER_FIX})" if device.startswith("cuda") else "a CUDA GPU"
    reason = f"auto: the {model_type} head is a plain linear layer; Liger's fused kernel needs {needs}"
    return LossChoice("chunked", reason)


def _head_problem(recipe: Recipe, model_type: str, *, encoder_decoder: bool) -> str | None:
    if encoder_decoder:
        return f"{recipe.model.name_or_path} is an encoder-decoder model, whose loss stays the model's own"
    if model_type not in PLAIN_HEAD_MODEL_TYPES:
        known = ", ".join(sorted(PLAIN_HEAD_MODEL_TYPES))
        return f"a {model_type!r} model's head is not known to be a plain linear layer (known: {known})"
    targets = recipe.lora.target_modules
    if recipe.lora.enabled and isinstance(targets, list) and "lm_head" in targets:
        return "LoRA adapts the output head (lora.target_modules has lm_head)"
    if recipe.lora.enabled and (recipe.lora.trainable_tokens or recipe.lora.train_embeddings):
        return "peft wraps the output head to train its rows (lora.trainable_tokens or lora.train_embeddings)"
    return None


def loss_for_model(recipe: Recipe, config: Any, *, device: str) -> LossChoice:
    """`choose_loss` for a transformers model config: `qlora train` asks before any weight loads."""
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    return choose_loss(recipe, config.model_type, encoder_decoder=encoder_decoder, device=device)


# --------------------------------------------------------------------------- the loss


def rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """transformers' `ForCausalLMLoss` of the logits `hidden @ weight.T`, which are never all computed.

    Position i predicts labels[i + 1]; only positions whose label is not -100 reach the head, so it reads
    padded batches and packed rows (documents' first labels masked) alike. The logits are computed in
    `compute_dtype` (autocast's, where the model runs under it; else the hidden states' and weight's) and
    upcast to fp32, as the plain path does. Sum / num_items_in_batch when given, else the mean.
    """
    shifted = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(hidden.device)
    kept = shifted != IGNORE_INDEX
    rows, targets = hidden[kept], shifted[kept]
    if not torch.is_grad_enabled():  # evaluation: the Function would still see requires_grad and take gradients
        rows, weight = rows.detach(), weight.detach()
    dtype = compute_dtype or torch.promote_types(rows.dtype, weight.dtype)
    if fused:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        total = liger_fused_linear_cross_entropy(rows.to(dtype), weight.to(dtype), targets, reduction="sum").float()
    else:
        total = ChunkedLinearCrossEntropy.apply(rows, weight, targets, dtype, rows_per_chunk(weight.shape[0]))
    count = kept.sum() if num_items_in_batch is None else num_items_in_batch
    return total / (count.to(total.device) if torch.is_tensor(count) else count)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of `rows @ weight.T` against `targets`, `chunk_rows` rows at a time.

    Each chunk's gradient (softmax - one-hot) is taken in forward, while its logits exist, and only what it
    gives the rows (and the weight, when it is trained) is kept; backward scales those by grad_output.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype, chunk_rows: int
    ) -> torch.Tensor:
        head = weight.to(dtype)
        wants_rows, trains_head = ctx.needs_input_grad[:2]
        grad_rows = torch.empty_like(rows) if wants_rows else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if trains_head else None
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for start in range(0, rows.shape[0], chunk_rows):
            part = slice(start, start + chunk_rows)
            grad_part = None if grad_rows is None else grad_rows[part]
            total += _chunk(rows[part].to(dtype), head, targets[part], grad_part, grad_weight)
        ctx.grads, ctx.weight_dtype = (grad_rows, grad_weight), weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_rows, grad_weight = ctx.grads
        del ctx.grads  # held from forward to here, no longer
        scaled_rows = None if grad_rows is None else grad_rows * grad_total
        scaled_weight = None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype)
        return scaled_rows, scaled_weight, None, None, None


def _chunk(
    x: torch.Tensor,
    head: torch.Tensor,
    targets: torch.Tensor,
    grad_x: torch.Tensor | None,
    grad_head: torch.Tensor | None,
) -> torch.Tensor:
    """One chunk's summed loss; writes its rows' gradient into `grad_x` and adds the head's into `grad_head`.

    A function of its own so that the chunk's logits are freed when it returns, before the next chunk's exist.
    """
    logits = nn.functional.linear(x, head).float()
    lse = logits.logsumexp(dim=-1)
    loss = (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    if grad_x is None and grad_head is None:
        return loss
    grad_logits = logits.sub_(lse[:, None]).exp_()  # the softmax, over the logits in place
    grad_logits[torch.arange(targets.shape[0], device=targets.device), targets] -= 1
    grad_logits = grad_logits.to(x.dtype)
    if grad_x is not None:
        grad_x.copy_(grad_logits @ head)
    if grad_head is not None:
        grad_head += (grad_logits.T @ x).float()
    return loss


class HeadLoss:
    """The Trainer's `compute_loss_func` on the chunked and fused paths.

    The Trainer calls the model with `logits_to_keep=1` inside `capturing()` (QloraTrainer.compute_loss): a
    forward hook on the decoder keeps its output, the final normed hidden state, which the head would have
    multiplied. Not `output_hidden_states=True`: that keeps every layer's output, which evaluation, and a
    16-bit run without checkpointing, would otherwise free.
    """

    def __init__(self, model: Any, choice: LossChoice, *, autocast_dtype: torch.dtype | None = None) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = base.get_output_embeddings()
        if type(head) is not nn.Linear or head.bias is not None:
            what = type(head).__name__ + (" with a bias" if getattr(head, "bias", None) is not None else "")
            raise QloraError(
                f"training.loss={choice.name}: the output head is a {what}, not a bias-free linear layer: "
                "use training.loss=plain"
            )
        self.head, self.decoder = head, base.get_decoder()
        self.fused = choice.name == "fused"
        self.autocast_dtype = autocast_dtype
        self._hidden: torch.Tensor | None = None

    @contextmanager
    def capturing(self) -> Iterator[None]:
        """While the model runs inside, its decoder's output is kept for the loss."""
        handle = self.decoder.register_forward_hook(self._keep)
        try:
            yield
        finally:
            handle.remove()
            self._hidden = None

    def _keep(self, module: nn.Module, args: Any, output: Any) -> None:
        self._hidden = output.last_hidden_state

    def __call__(
        self, outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        if self._hidden is None:
            raise RuntimeError("HeadLoss reads the hidden state a model call inside capturing() kept")
        return linear_cross_entropy(
            self._hidden, self.head.weight, labels, num_items_in_batch,
            compute_dtype=self.autocast_dtype, fused=self.fused,
        )  # fmt: skip
