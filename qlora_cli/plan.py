"""Predict a recipe's peak GPU memory from the model's shape alone, before renting a GPU.

The arithmetic mirrors what `qlora train` builds (model.py): linear layers stored in 4 bits plus their
block constants, embeddings / head / norms upcast to fp32 by `prepare_model_for_kbit_training`, LoRA
adapters kept in fp32 by peft, and the tensors autograd saves for a LLaMA layer under transformers 5
(counted with `saved_tensors_hooks`, see tests/test_plan.py). scripts/bench_memory.py checks the
prediction against measured peaks. `qlora train` asks it whether `gradient_checkpointing: auto` is needed.
The loss over the vocabulary is counted for the path the run takes (qlora_cli/loss.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qlora_cli.config import LoraConfig, ModelConfig, QuantizationConfig, Recipe
from qlora_cli.errors import QloraError
from qlora_cli.loss import choose_loss, rows_per_chunk

GIB = 2**30
BLOCK_SIZE = 64  # bitsandbytes 4-bit: one absmax per 64 weights
DQ_BLOCK_SIZE = 256  # double quant: the 8-bit absmaxes get one fp32 constant per 256
CUDA_CONTEXT = GIB // 2  # CUDA context and library workspaces: outside torch's allocator
CPU_PROCESS = GIB // 2  # interpreter + torch/transformers/peft/bitsandbytes, measured RSS after imports
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma"}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Architecture:
    """A LLaMA-style decoder: separate q, k, v, o projections and a gated MLP (gate, up, down)."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads
    tied_embeddings: bool = False
    hub_ids: tuple[str, ...] = ()
    model_type: str = "llama"  # transformers' name: which loss paths its head allows

    @property
    def attention_width(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every linear layer of one decoder layer."""
        h, a, kv, i = self.hidden, self.attention_width, self.kv_width, self.intermediate
        return {
            "q_proj": (h, a),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (a, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params(self) -> int:
        return self.layers * sum(n_in * n_out for n_in, n_out in self.linears().values())

    @property
    def other_params(self) -> int:
        """Embeddings, output head and norms: never quantized."""
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.vocab * self.hidden + head + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


def _llama(name: str, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int = 0,
           vocab: int = 32000, hub_ids: tuple[str, ...] = ()) -> Architecture:  # fmt: skip
    return Architecture(name, hidden, layers, intermediate, heads, kv_heads or heads, vocab, hub_ids=hub_ids)


# Published config.json values; the paper's models are LLaMA 7B-65B.
ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        _llama("llama-7b", 4096, 32, 11008, 32, hub_ids=("huggyllama/llama-7b",)),
        _llama("llama-13b", 5120, 40, 13824, 40, hub_ids=("huggyllama/llama-13b",)),
        _llama("llama-33b", 6656, 60, 17920, 52, hub_ids=("huggyllama/llama-30b", "llama-30b")),
        _llama("llama-65b", 8192, 80, 22016, 64, hub_ids=("huggyllama/llama-65b",)),
        _llama("llama2-7b", 4096, 32, 11008, 32, hub_ids=("meta-llama/Llama-2-7b-hf",)),
        _llama("llama2-13b", 5120, 40, 13824, 40, hub_ids=("meta-llama/Llama-2-13b-hf",)),
        _llama("llama2-70b", 8192, 80, 28672, 64, 8, hub_ids=("meta-llama/Llama-2-70b-hf",)),
        _llama("llama3-8b", 4096, 32, 14336, 32, 8, 128256, hub_ids=("meta-llama/Meta-Llama-3-8B",)),
        _llama("llama3-70b", 8192, 80, 28672, 64, 8, 128256, hub_ids=("meta-llama/Meta-Llama-3-70B",)),
        _llama("mistral-7b", 4096, 32, 14336, 32, 8, hub_ids=("mistralai/Mistral-7B-v0.1",)),
    ]
}


def known_architecture(name: str) -> Architecture | None:
    key = name.lower()
    for arch in ARCHITECTURES.values():
        if key == arch.name or key in (h.lower() for h in arch.hub_ids):
            return arch
    return None


def architecture_for(
    name_or_path: str, *, gguf_file: str | None = None, revision: str | None = None, trust_remote_code: bool = False
) -> Architecture:
    """A shortcut (llama-65b) or a well-known hub id needs nothing; otherwise read only config.json, or the
    header of a GGUF file (its tensors are neither read nor dequantized)."""
    known = known_architecture(name_or_path)
    if known is not None and gguf_file is None:
        return known
    from transformers import AutoConfig

    from qlora_cli.builtin import resolve_builtin_model
    from qlora_cli.gguf import require_gguf_package, split_gguf_path
    from qlora_cli.model import _from_pretrained

    source, gguf_file = split_gguf_path(resolve_builtin_model(name_or_path), gguf_file)
    common: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if gguf_file:
        require_gguf_package(gguf_file)
        common["gguf_file"] = gguf_file
    try:
        config = _from_pretrained(AutoConfig.from_pretrained, source, "model config", **common)
    except QloraError as exc:
        raise QloraError(f"{exc} (or plan with a shortcut: --model {' | '.join(ARCHITECTURES)})") from None
    return architecture_from_config(config, name_or_path)


def recipe_architecture(model: ModelConfig) -> Architecture:
    """The architecture of a recipe's model, a GGUF file (`model.gguf_file` or a .gguf path) included."""
    return architecture_for(
        model.name_or_path,
        gguf_file=model.gguf_file,
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
    )


def architecture_from_config(config: Any, name: str) -> Architecture:
    model_type = getattr(config, "model_type", "?")
    if model_type not in LLAMA_LIKE:
        raise QloraError(
            f"{name}: qlora plan knows LLaMA-style decoders ({', '.join(sorted(LLAMA_LIKE))}), not {model_type!r}"
        )
    heads = config.num_attention_heads
    return Architecture(
        name=name,
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        intermediate=config.intermediate_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        vocab=config.vocab_size,
        head_dim=getattr(config, "head_dim", None) or 0,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        model_type=model_type,
    )


# --------------------------------------------------------------------------- storage


def bits_per_parameter(quant: QuantizationConfig, *, in_features: int | None = None) -> float:
    """Stored bits per quantized weight, block constants included: 4.127 for NF4/FP4 + double quant.

    Double quant stores the fp32 absmax of every 64-weight block as 8 bits, plus one fp32 constant
    per 256 of those. LLM.int8 keeps one fp32 scale per output row (`in_features` weights).
    """
    if quant.bits == 4:
        if quant.double_quant:
            return 4 + 8 / BLOCK_SIZE + 32 / (BLOCK_SIZE * DQ_BLOCK_SIZE)
        return 4 + 32 / BLOCK_SIZE
    if quant.bits == 8:
        return 8 + (32 / in_features if in_features else 0)
    raise ValueError("bits_per_parameter is for quantized (4- or 8-bit) weights")


OPTIMIZER_BYTES = {"8bit": 2 + 8 / 256, "adafactor": 0, "sgd": 0, "lion": 4}  # per trainable parameter


def optimizer_bytes_per_param(optim: str) -> float:
    """AdamW keeps two fp32 moments (8 bytes); 8-bit variants two bytes plus block constants."""
    name = optim.lower()
    return next((v for k, v in OPTIMIZER_BYTES.items() if k in name), 8)  # "8bit" first: paged_lion_8bit is 8-bit


# --------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class Setup:
    """One way to finetune a model: quantized base + LoRA, 16-bit base + LoRA, or full finetuning."""

    label: str
    quant: QuantizationConfig
    lora: bool


@dataclass(frozen=True)
class Estimate:
    """Bytes per process (per GPU)."""

    label: str
    base_weights: int
    lora_weights: int
    reference_weights: int  # dpo, kto: TRL's frozen copy of what trains (the adapter, or the whole model)
    gradients: int
    optimizer_state: int
    optimizer_paged: int  # of which in CUDA unified memory (paged optimizers): it can spill to CPU RAM
    optimizer_step: int  # temporaries of one optimizer update (bitsandbytes' CPU kernel: 3x a tensor)
    activations_checkpointed: int
    activations_full: int
    overhead: int
    gradient_checkpointing: bool
    # lora.init pissa/olora/loftq: the 16-bit base and every residual, held on the CPU while the adapter starts
    start_copy: int = 0
    start_copy_on_device: bool = False  # a CPU run: the same memory as training's; on a GPU it is CPU RAM

    @property
    def activations(self) -> int:
        return self.activations_checkpointed if self.gradient_checkpointing else self.activations_full

    def allocated(self, *, checkpointing: bool | None = None) -> int:
        """What torch's allocator peaks at (max_memory_allocated): gradients appear as activations are freed."""
        use = self.gradient_checkpointing if checkpointing is None else checkpointing
        act = self.activations_checkpointed if use else self.activations_full
        weights = self.base_weights + self.lora_weights + self.reference_weights
        fixed = weights + self.optimizer_state - self.optimizer_paged
        start = self.base_weights + self.lora_weights + self.start_copy if self.start_copy_on_device else 0
        return max(fixed + max(act, self.gradients + self.optimizer_step), start)

    def peak(self, *, checkpointing: bool | None = None) -> int:
        """Everything the GPU holds at once, the paged optimizer state included."""
        return self.allocated(checkpointing=checkpointing) + self.optimizer_paged + self.overhead

    def resident(self) -> int:
        """The peak without the paged optimizer state, which can wait in CPU RAM."""
        return self.peak() - self.optimizer_paged

    def verdict(self, budget: int) -> str:
        if self.peak() <= budget:
            return "fits"
        if self.resident() <= budget:
            return f"fits, {(self.peak() - budget) / GIB:.1f} GiB paged out"
        return "does not fit"


@dataclass(frozen=True)
class RecipeData:
    """What the recipe's own data holds (`qlora plan --data`): its longest row is the one that meets the peak."""

    longest: int  # tokens of the longest training row (packed row, example, or prompt + longer reply + EOS)
    summary: str  # `qlora data preview`'s summary: counts, truncation, packing and padding


@dataclass(frozen=True)
class MemoryPlan:
    arch: Architecture
    device: str
    compute_bytes: int
    compute_dtype: str
    compute_reason: str
    batch_size: int
    seq_len: int
    seq_len_reason: str
    packed: bool  # data.packing: batch_size counts rows of seq_len tokens
    sequences_per_row: int  # dpo, orpo: 2, a row is a pair
    num_processes: int
    fsdp: bool
    auto_checkpointing: bool  # training.gradient_checkpointing=auto: planned as on, decided by `qlora train`
    lora_r: int
    lora_modules: tuple[str, ...]
    optim: str
    loss: str  # the loss path over the vocabulary: plain, chunked or fused
    loss_reason: str
    estimates: tuple[Estimate, ...]
    data: RecipeData | None = None  # `qlora plan --data`

    def to_dict(self, budget: int | None = None) -> dict[str, Any]:
        out = asdict(self)
        for est, row in zip(self.estimates, out["estimates"]):
            row.update(allocated=est.allocated(), peak=est.peak(), resident=est.resident())
            if budget is not None:
                row["verdict"] = est.verdict(budget)
        return out


def setups_for(recipe: Recipe) -> list[Setup]:
    """The recipe's own setup, then 16-bit LoRA and full finetuning of the same model beside it."""
    q = recipe.quantization
    own = Setup(_label(q, recipe.lora.enabled), q, recipe.lora.enabled)
    sixteen = q.model_copy(update={"bits": 16})
    others = [Setup("16-bit LoRA", sixteen, True), Setup("full finetuning", sixteen, False)]
    return [own] + [s for s in others if (s.quant.bits, s.lora) != (own.quant.bits, own.lora)]


def _label(q: QuantizationConfig, lora: bool) -> str:
    if not lora:
        return "full finetuning"
    if q.bits == 4:
        return f"QLoRA {q.quant_type}{' + DQ' if q.double_quant else ''}"
    return f"{q.bits}-bit LoRA"


def planned_compute_dtype(quant: QuantizationConfig, device: str) -> tuple[str, str]:
    """The dtype and why. `auto` on a GPU: bf16 (planning assumes one that has it); on the CPU: this CPU's choice."""
    if quant.compute_dtype != "auto":
        return quant.compute_dtype, f"quantization.compute_dtype={quant.compute_dtype}"
    if device == "cuda":
        return "bf16", "auto: assumes a GPU with bf16"
    from qlora_cli.model import choose_compute_dtype

    chosen = choose_compute_dtype("auto", "cpu")
    return chosen.name, chosen.reason


def compute_bytes_for(quant: QuantizationConfig, device: str) -> int:
    return 4 if planned_compute_dtype(quant, device)[0] == "fp32" else 2


def lora_modules(recipe: Recipe) -> tuple[str, ...]:
    names = ATTENTION + MLP
    if recipe.lora.target_modules == "all-linear":
        return names
    chosen = tuple(n for n in names if n in recipe.lora.target_modules)
    if not chosen:
        raise QloraError(f"lora.target_modules {recipe.lora.target_modules} names none of {', '.join(names)}")
    return chosen


def plan_memory(
    recipe: Recipe, arch: Architecture, *, device: str = "cuda", num_processes: int = 1, data: RecipeData | None = None
) -> MemoryPlan:
    if device not in ("cuda", "cpu"):
        raise QloraError(f"device must be cuda or cpu, not {device!r}")
    if num_processes < 1:
        raise QloraError(f"--num-processes must be at least 1, not {num_processes}")
    modules = lora_modules(recipe)
    cfg = recipe.data
    if data is not None:
        seq_len, seq_len_reason = data.longest, "the longest training row of the recipe's data"
    elif cfg.packing:  # best-fit decreasing fills rows to within a few tokens (qlora data preview)
        seq_len, seq_len_reason = cfg.max_packed_len, "data.max_packed_len, rows planned full"
    else:
        seq_len, seq_len_reason = cfg.source_max_len + cfg.target_max_len, "data.source_max_len + data.target_max_len"
    compute_dtype, compute_reason = planned_compute_dtype(recipe.quantization, device)
    loss = choose_loss(recipe, arch.model_type, encoder_decoder=False, device=device)
    estimates = tuple(
        _estimate(setup, recipe, arch, modules, device=device, seq_len=seq_len, num_processes=num_processes,
                  loss=loss.name)
        for setup in setups_for(recipe)
    )  # fmt: skip
    return MemoryPlan(
        arch=arch,
        device=device,
        compute_bytes=compute_bytes_for(recipe.quantization, device),
        compute_dtype=compute_dtype,
        compute_reason=compute_reason,
        batch_size=recipe.training.batch_size,
        seq_len=seq_len,
        seq_len_reason=seq_len_reason,
        packed=recipe.data.packing,
        sequences_per_row=sequences_per_row(recipe),
        num_processes=num_processes,
        fsdp=recipe.training.fsdp and num_processes > 1,
        auto_checkpointing=recipe.training.gradient_checkpointing == "auto",
        lora_r=recipe.lora.r,
        lora_modules=modules,
        optim=recipe.training.optim,
        loss=loss.name,
        loss_reason=loss.reason,
        estimates=estimates,
        data=data,
    )


def _estimate(
    setup: Setup, recipe: Recipe, arch: Architecture, modules: tuple[str, ...], *, device: str, seq_len: int,
    num_processes: int, loss: str,
) -> Estimate:  # fmt: skip
    c = compute_bytes_for(setup.quant, device)
    quantized = setup.quant.bits in (4, 8)
    layer = arch.linears()
    if quantized:
        linear_bits = sum(n * m * bits_per_parameter(setup.quant, in_features=n) for n, m in layer.values())
        # prepare_model_for_kbit_training upcasts every 16-bit parameter left (embeddings, head, norms) to fp32
        base = int(arch.layers * linear_bits / 8) + 4 * arch.other_params
    else:
        base = c * arch.params
    tensors = _trainable_tensors(arch, recipe.lora, modules) if setup.lora else _model_tensors(arch)
    trainable = sum(tensors)
    lora_weights = 4 * trainable if setup.lora else 0  # peft keeps adapters in fp32 whatever the base
    # TRL scores the reference with a frozen copy of the adapter ("ref", also for a fresh one: measured on SmolLM2,
    # +0.072 GiB loaded), or of the whole model when full finetuning; ORPO has no reference
    reference = (lora_weights if setup.lora else c * arch.params) if recipe.training.method in ("dpo", "kto") else 0
    gradients = 4 * trainable if setup.lora else c * trainable
    per_param = optimizer_bytes_per_param(recipe.training.optim)
    optimizer = int(per_param * trainable)
    # bitsandbytes pages only tensors of 1e5 elements or more, and only on a GPU
    paged = "paged" in recipe.training.optim and device == "cuda"
    optimizer_paged = int(per_param * sum(n for n in tensors if n >= 1e5)) if paged else 0
    optimizer_step = 3 * 4 * max(tensors) if device == "cpu" else 0

    shard = num_processes if recipe.training.fsdp and num_processes > 1 else 1
    gathered = 0
    if shard > 1:  # FSDP keeps 1/N of every state; a layer is all-gathered, the next one prefetched
        gathered = 2 * (base - (4 if quantized else c) * arch.other_params) // arch.layers
        base, lora_weights, reference, gradients, optimizer, optimizer_paged, optimizer_step = (
            x // shard for x in (base, lora_weights, reference, gradients, optimizer, optimizer_paged, optimizer_step)
        )
    elif num_processes > 1:  # DDP reduces gradients through buckets of the same size
        gradients *= 2

    start_copy = 0
    if setup.lora and recipe.lora.changes_base:  # qlora_cli.model.start_from_16bit
        copy = c * arch.params if quantized else 0  # a quantized base is loaded again in 16 bits beside it
        residuals = c * arch.layers * sum(layer[m][0] * layer[m][1] for m in modules)  # all kept until the last
        svd = 4 * 4 * max(layer[m][0] * layer[m][1] for m in modules)  # one layer's W, factors and error in fp32
        start_copy = copy + residuals + svd

    tokens = sequences_per_row(recipe) * recipe.training.batch_size * seq_len
    act = activations_for(setup, recipe, arch, modules, device=device, tokens=tokens, loss=loss)
    return Estimate(
        label=setup.label,
        base_weights=base,
        lora_weights=lora_weights,
        reference_weights=reference,
        gradients=gradients,
        optimizer_state=optimizer,
        optimizer_paged=optimizer_paged,
        optimizer_step=optimizer_step,
        activations_checkpointed=act.total(checkpointing=True) + gathered,
        activations_full=act.total(checkpointing=False) + gathered,
        overhead=CUDA_CONTEXT if device == "cuda" else CPU_PROCESS,
        gradient_checkpointing=recipe.training.gradient_checkpointing is not False,  # auto: planned as on
        start_copy=start_copy,
        start_copy_on_device=device == "cpu",
    )


def activations_for(
    setup: Setup, recipe: Recipe, arch: Architecture, modules: tuple[str, ...], *, device: str, tokens: int, loss: str
) -> Activations:
    c = compute_bytes_for(setup.quant, device)
    residual = 4 if setup.quant.bits in (4, 8) else c
    saved, adapter_saved = (residual, 4) if device == "cpu" else (c, c)  # the CPU's: tests/test_plan.py
    return Activations(arch, setup, recipe, modules, c=c, residual=residual, saved=saved, adapter_saved=adapter_saved,
                       tokens=tokens, loss=loss)  # fmt: skip


def sequences_per_row(recipe: Recipe) -> int:
    """A dpo or orpo row is a pair: its chosen and rejected sequences go through the policy in one batch.

    The reference's forward (dpo, kto) keeps nothing for the backward pass: what it holds for a moment is no more
    than the policy's log-probabilities hold (`Activations.loss_held`)."""
    return 2 if recipe.training.method in ("dpo", "orpo") else 1


def _trainable_tensors(arch: Architecture, lora: LoraConfig, modules: tuple[str, ...]) -> list[int]:
    """Element counts of every LoRA A (r x in) and B (out x r) matrix, DoRA's magnitudes (one per output), and the
    embedding rows that lora.trainable_tokens or lora.train_embeddings train (the head's too, when not tied)."""
    layer = arch.linears()
    per_layer = [lora.r * n for m in modules for n in layer[m]]
    if lora.dora:
        per_layer += [layer[m][1] for m in modules]
    rows = arch.vocab if lora.train_embeddings else len(lora.trainable_tokens)
    embeddings = [rows * arch.hidden] * (1 if arch.tied_embeddings else 2) if rows else []
    return per_layer * arch.layers + embeddings


def _model_tensors(arch: Architecture) -> list[int]:
    layer = [n_in * n_out for n_in, n_out in arch.linears().values()] + [arch.hidden] * 2
    head = [] if arch.tied_embeddings else [arch.vocab * arch.hidden]
    return [arch.vocab * arch.hidden, *head, arch.hidden, *layer * arch.layers]


@dataclass(frozen=True)
class Activations:
    """Bytes autograd keeps between forward and backward, plus the transients at the peak.

    Per token and decoder layer (elements): SDPA keeps q, k, v and its output (2a + 2kv) and an fp32
    log-sum-exp per head, the two RMSNorms their fp32 inputs (2h) and reciprocal RMS (2), the gated MLP
    gate, act(gate) and up (3i); RoPE's cos and sin are per position, not per token, and left out. A LoRA
    adapter keeps its input (shared between q/k/v, and gate/up reuse the norm output) and its rank-r middle;
    with dropout every adapter keeps its own dropped copy and a bool mask. A trainable base keeps the inputs
    of every linear layer and the normalized states for the norms' weight gradients.
    """

    arch: Architecture
    setup: Setup
    recipe: Recipe
    modules: tuple[str, ...]
    c: int  # compute dtype bytes
    residual: int  # residual stream: fp32 when prepare_model_for_kbit_training upcast the embeddings
    # Bytes of each activation the base's layers keep, and the adapters': the compute dtype under a GPU's autocast
    # (not measured: no GPU was lent). On the CPU, which trains without autocast, the residual stream's, as 4-bit
    # layers hand their output back in their input's dtype; and fp32, as peft computes adapters in their own dtype.
    saved: int
    adapter_saved: int
    tokens: int
    loss: str  # the loss path: plain, chunked or fused

    def per_layer(self) -> int:
        a = self.arch
        h, att, kv, i = a.hidden, a.attention_width, a.kv_width, a.intermediate
        elements = 2 * att + 2 * kv + 3 * i
        fp32 = 2 * h + 2 + a.heads
        if self.setup.lora:
            layer = a.linears()
            lora = self.recipe.lora
            # a bool mask: CUDA's fused dropout and qlora_cli.dropout.CpuDropout; preference methods train with
            # dropout off (TRL's disable_dropout, qlora_cli.preference)
            if lora.dropout > 0 and self.recipe.training.method == "sft":
                inputs = sum(layer[m][0] for m in self.modules)
                adapter = inputs
                masks = inputs
            else:
                qkv = any(m in self.modules for m in ATTENTION[:3])
                adapter = h * qkv + att * ("o_proj" in self.modules) + i * ("down_proj" in self.modules)
                masks = 0
            adapter += lora.r * len(self.modules)
            if lora.dora:  # the base layer's output and the adapter's, each kept to be scaled by magnitude / norm
                adapter += 2 * sum(layer[m][1] for m in self.modules)
            return self.tokens * (self.saved * elements + self.adapter_saved * adapter + 4 * fp32 + masks)
        elements += h + att + i + 2 * h
        return self.tokens * (self.saved * elements + 4 * fp32)

    def total(self, *, checkpointing: bool) -> int:
        """The larger of two moments: the loss over the vocabulary (`loss_held`), and later one layer's backward.

        Only once the loss's tensors are freed does checkpointing recompute a layer, or a 4-bit layer dequantize
        a weight for its backward matmul; without checkpointing, every layer's saved tensors are there all along.
        """
        a = self.arch
        layer = self.per_layer()
        loss = self.loss_held()
        dequantized = 0
        largest = max(n_in * n_out for n_in, n_out in a.linears().values())
        if self.setup.quant.bits in (4, 8):  # one layer's weight dequantized for its matmul
            dequantized = self.c * largest
        if self.setup.lora and self.recipe.lora.dora:  # DoRA's weight norm: W + s·B A of one layer, in fp32
            dequantized += 2 * 4 * largest
        if checkpointing:  # each layer's input (the residual stream) is kept for the recomputation
            return a.layers * self.tokens * a.hidden * self.residual + max(loss, layer + dequantized)
        return a.layers * layer + max(loss, dequantized)

    def loss_held(self) -> int:
        """The most the loss over the vocabulary holds at once, on each path.

        plain: backward starts at the log-softmax output autograd saved, that output's gradient and the
        logits' gradient, three fp32 tokens x vocab tensors (the logits are gone by then).
        chunked: one chunk's fp32 logits and logsumexp's temporary of their size, while the chunk is computed
        in forward (their gradient in the compute dtype comes after that temporary is gone), plus the gradient
        for the hidden states it keeps and the labelled positions' hidden states it reads (all, at most).
        fused: Liger's chunk of about tokens x hidden / vocab positions (a power of two), its logits in the
        compute dtype with their gradient written over them, and the same hidden-state tensors.
        A trained head (full finetuning) adds its fp32 gradient, gathered over the chunks.
        """
        a = self.arch
        if self.recipe.training.method != "sft":  # TRL's log-probabilities, one tile at a time
            rows, columns = min(self.tokens, TRL_TILE_TOKENS), min(a.vocab, TRL_TILE_VOCAB)
            return rows * columns * TRL_TILE_BYTES + 2 * self.tokens * a.hidden * self.residual
        if self.loss == "plain":
            return 3 * 4 * self.tokens * a.vocab
        if self.loss == "chunked":
            rows, per_logit = min(self.tokens, rows_per_chunk(a.vocab)), 2 * 4
        else:
            rows, per_logit = min(self.tokens, _liger_chunk_rows(self.tokens, a.vocab, a.hidden)), self.c
        head_gradient = 0 if self.setup.lora else 4 * a.vocab * a.hidden
        return rows * a.vocab * per_logit + 2 * self.tokens * a.hidden * self.residual + head_gradient


# TRL 1.16's chunked log-probabilities (trl/kernels/chunked_logprob.py), what dpo, orpo and kto train through: tiles
# of up to 4096 positions x 32768 vocabulary columns. Where Triton cannot run (the CPU), its torch fallback holds
# the tile in the compute dtype and about eight fp32 temporaries of it at once: 33 bytes an element, measured on
# SmolLM2-135M (bf16, 1152 positions; scripts/bench_memory.py --methods sft,dpo, docs/benchmarks.md §13). With
# Triton (CUDA) a kernel folds each tile in one pass, holding little beyond the tile: this over-counts there, on the
# safe side (not measured: no GPU was lent).
TRL_TILE_TOKENS, TRL_TILE_VOCAB, TRL_TILE_BYTES = 4096, 32768, 33


def _liger_chunk_rows(tokens: int, vocab: int, hidden: int) -> int:
    """Liger's fused linear cross-entropy takes positions in chunks of about tokens x hidden / vocab, rounded up
    to a power of two: a chunk's logits about the size of the hidden states."""
    per_chunk = -(-tokens // -(-vocab // hidden))
    return 1 << (per_chunk - 1).bit_length()


# --------------------------------------------------------------------------- gradient checkpointing: auto

AUTO_MARGIN = 0.15  # the planner's accuracy target (docs/benchmarks.md): off only when the plan fits with that to spare


@dataclass(frozen=True)
class Checkpointing:
    """Whether a run checkpoints activations, and why (printed at its start, kept in metrics.json)."""

    on: bool
    reason: str

    def __str__(self) -> str:
        return f"{'on' if self.on else 'off'} ({self.reason})"


def choose_checkpointing(
    recipe: Recipe, arch: Architecture, *, device: str, available: int, num_processes: int = 1
) -> Checkpointing:
    """`auto`: off when the recipe's peak without checkpointing fits `available` bytes with AUTO_MARGIN to spare.

    Checkpointing recomputes every layer's forward during backward; where memory allows, that is time lost.
    """
    forced = _forced(recipe)
    if forced is not None:
        return forced
    need = plan_memory(recipe, arch, device=device, num_processes=num_processes).estimates[0].peak(checkpointing=False)
    there = "GPU memory free" if device == "cuda" else "RAM available"
    fits = need <= (1 - AUTO_MARGIN) * available
    verdict = "fits in" if fits else "needs more than"
    reason = (f"auto: without it the plan's peak of {need / GIB:.2f} GiB {verdict} {100 * (1 - AUTO_MARGIN):.0f}% "
              f"of the {available / GIB:.2f} GiB {there}")  # fmt: skip
    return Checkpointing(not fits, reason)


def available_memory(device: str, *, processes_here: int = 1) -> int:
    """What one process may use: its GPU's free memory, or this machine's available RAM (Linux: MemAvailable)
    shared by the processes on it."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available) // processes_here


def checkpointing_for_run(recipe: Recipe, *, num_processes: int = 1) -> Checkpointing:
    """`qlora train`'s decision, once per process; under a process group every rank takes rank 0's, so FSDP
    and DDP replicas recompute (or not) alike."""
    import torch
    import torch.distributed as dist

    forced = _forced(recipe)
    if forced is not None:
        return forced
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        arch = recipe_architecture(recipe.model)
    except QloraError as exc:
        choice = Checkpointing(True, f"auto: on, the planner cannot size this model ({exc})")
    else:
        here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device == "cpu" else 1
        available = available_memory(device, processes_here=here)
        choice = choose_checkpointing(recipe, arch, device=device, available=available, num_processes=num_processes)
    if dist.is_available() and dist.is_initialized():
        shared = [choice]
        dist.broadcast_object_list(shared, src=0)
        choice = shared[0]
    return choice


def _forced(recipe: Recipe) -> Checkpointing | None:
    setting = recipe.training.gradient_checkpointing
    if setting == "auto":
        return None
    return Checkpointing(setting, f"training.gradient_checkpointing={str(setting).lower()}")


# --------------------------------------------------------------------------- parsing and display

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'48GB', '48GiB', '80g', '512MB': binary units, as GPU makers count (a '48GB' card holds 48 GiB)."""
    match = _SIZE.match(text)
    if not match or (not match.group(2) and not match.group(3)):
        raise QloraError(f"--gpu-memory {text!r}: write a size such as 24GB, 48GiB or 80G")
    value, unit = float(match.group(1)), match.group(2).lower()
    return int(value * 1024 ** " kmgt".index(unit or " "))


def render_plan(plan: MemoryPlan, budget: int | None = None) -> str:
    a = plan.arch
    procs = "1 process"
    if plan.num_processes > 1:
        procs = f"{plan.num_processes} processes{' with FSDP' if plan.fsdp else ' (DDP)'}"
    rows = " packed rows" if plan.packed else " pairs (chosen + rejected)" if plan.sequences_per_row == 2 else ""
    head = [
        f"{a.name}: {a.params / 1e9:.2f}B parameters ({a.layers} layers, hidden {a.hidden}, vocab {a.vocab})",
        f"batch {plan.batch_size}{rows} x {plan.seq_len} tokens ({plan.seq_len_reason}), {plan.optim}, "
        f"{plan.compute_dtype} compute on {plan.device} "
        f"({plan.compute_reason}), {procs}",
        *(f"data: {line}" for line in (plan.data.summary.splitlines() if plan.data else [])),
        f"LoRA r={plan.lora_r} on {', '.join(plan.lora_modules)}",
        f"loss over the vocabulary: {plan.loss} ({plan.loss_reason})",
        "memory per GPU; 1 GiB = 2^30 bytes, and a GPU sold as 48GB holds 48 GiB",
        "",
    ]
    ests = plan.estimates
    ckpt = ests[0].gradient_checkpointing

    def gib(n: int) -> str:
        return f"{n / GIB:.2f} GiB" if n else "-"

    rows: list[tuple[str, list[str]]] = [
        ("base weights", [gib(e.base_weights) for e in ests]),
        ("LoRA adapters (fp32)", [gib(e.lora_weights) for e in ests]),
        ("reference copy (dpo, kto)", [gib(e.reference_weights) for e in ests]),
        (
            "16-bit start (pissa, olora, loftq)",
            [gib(e.start_copy) + ("" if e.start_copy_on_device or not e.start_copy else " RAM") for e in ests],
        ),
        ("gradients", [gib(e.gradients) for e in ests]),
        ("optimizer state", [gib(e.optimizer_state) for e in ests]),
        ("  of which paged", [gib(e.optimizer_paged) for e in ests]),
        (f"activations, checkpointing on{' *' if ckpt else ''}", [gib(e.activations_checkpointed) for e in ests]),
        (f"activations, checkpointing off{'' if ckpt else ' *'}", [gib(e.activations_full) for e in ests]),
        ("framework overhead", [gib(e.overhead) for e in ests]),
        ("peak GPU memory", [gib(e.peak()) for e in ests]),
        ("  in GB (10^9 bytes)", [f"{e.peak() / 1e9:.1f} GB" for e in ests]),
        ("  without paged optimizer", [gib(e.resident()) for e in ests]),
        (f"peak with checkpointing {'off' if ckpt else 'on'}", [gib(e.peak(checkpointing=not ckpt)) for e in ests]),
    ]
    if budget is not None:
        rows.append((f"verdict for {budget / GIB:g} GiB", [e.verdict(budget) for e in ests]))
    header = ("", [e.label for e in ests])
    width0 = max(len(r[0]) for r in rows)
    widths = [max(len(header[1][k]), *(len(r[1][k]) for r in rows)) for k in range(len(ests))]
    lines = [
        "  ".join([label.ljust(width0), *(cell.rjust(w) for cell, w in zip(cells, widths))]).rstrip()
        for label, cells in [header, *rows]
    ]
    notes = [
        "",
        "* the recipe's setting. Peak = weights + adapters + optimizer + the larger of activations and gradients",
        "(gradients appear as activations are freed) + overhead. Paged optimizer state can spill to CPU RAM.",
    ]
    if any(e.start_copy for e in ests):
        notes.append("The 16-bit start is held before training and freed: " + (
            "on the CPU the peak is the larger of it (with the weights) and training's."
            if ests[0].start_copy_on_device else "it needs that much CPU RAM (RAM), not GPU memory."
        ))  # fmt: skip
    if plan.auto_checkpointing:
        notes.append(f"Checkpointing auto: `qlora train` turns it off where the peak with it off fits in "
                     f"{100 * (1 - AUTO_MARGIN):.0f}% of the memory there.")  # fmt: skip
    return "\n".join(head + lines + notes)


def plan_for(
    config: Path | None,
    overrides: list[str],
    model: str | None,
    *,
    device: str = "cuda",
    num_processes: int = 1,
    read_data: bool = False,
) -> MemoryPlan:
    """`qlora plan`: the recipe file (or the defaults), with --model replacing its model; with `read_data`, sized
    to the recipe's data (its tokenizer and dataset, no weights) instead of its length limits."""
    from qlora_cli.config import default_recipe, load_recipe

    if config is None and model is None:
        raise QloraError("qlora plan needs --config RECIPE or --model NAME (e.g. --model llama-65b)")
    if config is None:
        recipe = default_recipe(model, overrides)
    else:
        recipe = load_recipe(config, [*overrides, *([f"model.name_or_path={model}"] if model else [])])
    arch = recipe_architecture(recipe.model)
    data = recipe_data(recipe) if read_data else None
    return plan_memory(recipe, arch, device=device, num_processes=num_processes, data=data)


def recipe_data(recipe: Recipe) -> RecipeData:
    from qlora_cli.data.preview import longest_row, preview_data, summary

    preview = preview_data(recipe, 0)
    return RecipeData(longest_row(preview.data, recipe.data.target_max_len), summary(preview))
