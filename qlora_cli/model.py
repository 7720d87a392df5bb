"""Load a base model (quantized the QLoRA way) and its tokenizer, and put LoRA on every linear layer."""

from __future__ import annotations

import inspect
import json
import os
import sys
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from qlora_cli.adapter_init import (
    lora_scale,
    loftq_start,
    read_base_change,
    rebuild_base,
    residual,
    round_trip,
    set_weight,
    write_base_change,
)
from qlora_cli.builtin import resolve_builtin_model
from qlora_cli.config import LoraConfig, ModelConfig, QuantizationConfig, Recipe
from qlora_cli.data.tokenize import PaddingCollator
from qlora_cli.errors import QloraError, refusing_pickled_code
from qlora_cli.gguf import dequantized_folder, split_gguf_path
from qlora_cli.dropout import use_cpu_dropout
from qlora_cli.kernels import bf16_matmul_slowdown, bf16_matrix_units, choose_cpu_kernel, onednn_isa_cap
from qlora_cli.model_kind import ModelKind, kind_of
from qlora_cli.run_folder import ADAPTER_CONFIG_FILE, has_adapter, staged_folder

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRAINED_ADAPTER = "default"  # peft's name for the adapter a run trains (TRL adds a frozen "ref" copy beside it)
COMPUTE_DTYPE_SETTING = "quantization.compute_dtype"  # where a recipe sets it; inference commands: --compute-dtype


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def device_for_process() -> str:
    """Each process owns one device: its local rank's GPU, or the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


@dataclass(frozen=True)
class ComputeDtype:
    """The dtype 4-bit layers compute in, and why: runs state it, since `auto` depends on the machine."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return dtype_name(self.dtype)


def choose_compute_dtype(
    name: str, device: str | None = None, *, setting: str = COMPUTE_DTYPE_SETTING, inference: bool = False
) -> ComputeDtype:
    """`auto`: bf16 where the GPU or CPU has bf16 units, fp16 on older GPUs, fp32 on CPUs without them.

    `setting` names where `name` came from, for the reason and for errors. fp16 inference on a CPU is refused:
    CPUs have no fp16 matrix units worth using, and fp16's range overflows where bf16 and fp32 do not.
    """
    device = device or device_for_process()
    on_gpu = device.startswith("cuda")
    if name != "auto":
        if name == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
            raise QloraError(
                f"{setting}=bf16 but this GPU has no bf16: use fp16 (as the paper did on such GPUs) or fp32"
            )
        if name == "fp16" and not on_gpu and inference:
            raise QloraError(f"{setting}=fp16 on the CPU: use fp32, or bf16 on a CPU with bf16 units (auto picks)")
        return ComputeDtype(DTYPES[name], f"{setting}={name}")
    if on_gpu:
        if torch.cuda.is_bf16_supported():
            return ComputeDtype(torch.bfloat16, "auto: this GPU computes in bf16")
        return ComputeDtype(torch.float16, "auto: this GPU has no bf16, so fp16 (as the paper on such GPUs)")
    units = bf16_matrix_units()
    if units:
        return ComputeDtype(torch.bfloat16, f"auto: this CPU has {units} bf16 matrix units, so bf16 is faster than fp32")
    if (cap := onednn_isa_cap()) and (present := bf16_matrix_units(within_isa_cap=False)):
        reason = f"auto: {cap[0]}={cap[1]} keeps matmuls off this CPU's {present} units, so fp32"
        return ComputeDtype(torch.float32, reason)
    return ComputeDtype(torch.float32, "auto: this CPU has no bf16 matrix units, so bf16 would be ~60x slower")


def resolve_compute_dtype(name: str, device: str | None = None) -> torch.dtype:
    return choose_compute_dtype(name, device).dtype


def slow_compute_warning(compute: ComputeDtype, device: str) -> str | None:
    """bf16 asked for on a CPU without bf16 units (auto never picks it there): it runs, at a cost measured here."""
    if device != "cpu" or compute.dtype != torch.bfloat16 or bf16_matrix_units():
        return None
    return (
        f"{compute.reason} on a CPU without bf16 matrix units: a bf16 matmul ran {bf16_matmul_slowdown():.0f}x "
        "slower than fp32 here just now; fp32 (or auto) computes faster"
    )


def bnb_config(quant: QuantizationConfig, compute_dtype: torch.dtype, *, fsdp: bool = False) -> Any | None:
    """The paper's BitsAndBytesConfig: NF4, double quantization, compute in `compute_dtype`.

    FSDP shards the packed 4-bit weights with everything else, so their storage dtype must equal the
    compute dtype; `quant_storage: auto` takes care of that (and preflight refuses any other).
    """
    from transformers import BitsAndBytesConfig

    if quant.bits == 16:
        return None
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant.quant_storage == "auto":
        storage = compute_dtype if fsdp else torch.uint8
    else:
        storage = {"uint8": torch.uint8, **DTYPES}[quant.quant_storage]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage,
    )


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    kind: ModelKind
    compute: ComputeDtype
    source: str  # the resolved folder or hub id
    cpu_kernel: str | None  # how 4-bit layers multiply on the CPU (qlora_cli.kernels); None: no 4-bit layers
    base_changed_by: str | None = None  # an adapter whose start changed the base (qlora_cli.adapter_init)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.compute.dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """Prompts encoded exactly as training encoded sources (BOS first where the tokenizer adds one, or EOS last
        for seq2seq)."""
        rows = self.tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
        return self.kind.source_ids(self.tokenizer, rows)

    def batch(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Token rows padded on the side the model generates from, on the model's device."""
        collate = PaddingCollator(self.tokenizer.pad_token_id, padding_side=self.kind.padding_side)
        return {key: value.to(self.device) for key, value in collate([{"input_ids": r} for r in rows]).items()}


def model_source(cfg: ModelConfig) -> str:
    """The folder or hub id to load: builtin models built, a GGUF file dequantized into a cached folder."""
    name, gguf_file = split_gguf_path(resolve_builtin_model(cfg.name_or_path), cfg.gguf_file)
    return str(dequantized_folder(name, gguf_file)) if gguf_file else name


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    name = resolve_builtin_model(cfg.tokenizer) if cfg.tokenizer else model_source(cfg)
    tokenizer = _from_pretrained(
        AutoTokenizer.from_pretrained, name, "tokenizer", revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    tokenizer.padding_side = "right"
    return tokenizer


def model_config(cfg: ModelConfig) -> Any:
    """The transformers config: what can be checked before any weight is loaded."""
    from transformers import AutoConfig

    common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    return _from_pretrained(AutoConfig.from_pretrained, model_source(cfg), "model", **common)


def model_kind(cfg: ModelConfig) -> ModelKind:
    """From the model's config alone, without loading any weights."""
    return kind_of(model_config(cfg))


def load_model(
    cfg: ModelConfig,
    quant: QuantizationConfig,
    *,
    device: str | None = None,
    gradient_checkpointing: bool = False,
    for_training: bool = True,
    generation: bool = False,
    fsdp: bool = False,
    compute_setting: str = COMPUTE_DTYPE_SETTING,
) -> LoadedModel:
    """Quantized while loading, shard by shard: the full-precision model is never materialized.

    `generation`: a model that is not trained and generates token by token may use bitsandbytes' fused CPU
    kernel where it computes what the model would (qlora_cli.kernels); training, scoring and merge checks never do.
    """
    import transformers

    device = device or device_for_process()
    source = model_source(cfg)
    compute = choose_compute_dtype(quant.compute_dtype, device, setting=compute_setting, inference=not for_training)
    if warning := slow_compute_warning(compute, device):
        print(f"warning: {warning}", file=sys.stderr)
    compute_dtype = compute.dtype
    common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    kind = kind_of(model_config(cfg))
    auto_class = getattr(transformers, kind.auto_class)
    kwargs: dict[str, Any] = {
        **common,
        "dtype": compute_dtype,
        "device_map": {"": device},
        "quantization_config": bnb_config(quant, compute_dtype, fsdp=fsdp),
    }
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = _from_pretrained(auto_class.from_pretrained, source, "model", **kwargs)
    tokenizer = load_tokenizer(cfg)
    ensure_pad_token(tokenizer, model)
    fit_embeddings(tokenizer, model)
    cpu_kernel = choose_cpu_kernel(model, compute_dtype, device, inference=generation and not for_training)
    if not for_training:
        model.eval()
    else:
        # A cache in a training forward would also turn off transformers' isolation of packed documents.
        model.config.use_cache = False
        if quant.bits in (4, 8) and not fsdp:  # FSDP shards the base in its storage dtype: no fp32 upcast
            from peft import prepare_model_for_kbit_training

            # its own checkpointing goes through transformers' deprecated name (a FutureWarning every run)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if gradient_checkpointing:  # also makes the embeddings' output require grad, for the LoRA layers after it
            model.activation_checkpointing_enable({"use_reentrant": False})
    return LoadedModel(model, tokenizer, kind, compute, source, cpu_kernel)


def load_for_inference(
    cfg: ModelConfig,
    quant: QuantizationConfig,
    adapter: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    generation: bool = False,
    compute_dtype: str | None = None,
) -> LoadedModel:
    """Base (quantized as recipe says) plus an optional trained adapter, in eval mode.

    It computes as training did, unless `compute_dtype` (an inference command's --compute-dtype) says otherwise
    or `generation` picks the fused CPU kernel for decoding (qlora_cli.kernels). The dtype and why go to stderr.
    """
    setting = COMPUTE_DTYPE_SETTING
    if compute_dtype is not None:
        quant, setting = quant.model_copy(update={"compute_dtype": compute_dtype}), "--compute-dtype"
    loaded = load_model(cfg, quant, device=device, for_training=False, generation=generation, compute_setting=setting)
    if adapter is not None:
        attach_adapter(loaded, adapter, base=cfg)
    print(f"{loaded.source}: computing in {loaded.compute.name} ({loaded.compute.reason})", file=sys.stderr)
    return loaded


def attach_adapter(
    loaded: LoadedModel,
    adapter: str | os.PathLike,
    name: str = TRAINED_ADAPTER,
    *,
    base: ModelConfig | None = None,
    trainable: bool = False,
) -> None:
    """Load a trained LoRA adapter onto `loaded` under `name` (a second one sits beside the first), in eval mode;
    `trainable`: to train it further (model.adapter), in train mode.

    An adapter whose start changed the base (PiSSA, OLoRA, LoftQ) first has that base rebuilt from the 16-bit
    weights of `base`; it cannot share the base with another adapter.
    """
    from peft import PeftConfig, PeftModel

    if not has_adapter(adapter):
        raise QloraError(f"{adapter} is not a PEFT adapter folder (no {ADAPTER_CONFIG_FILE})")
    change = read_base_change(Path(adapter))
    if (change or loaded.base_changed_by) and isinstance(loaded.model, PeftModel):
        changed = f"{adapter} ({change.init})" if change else loaded.base_changed_by
        raise QloraError(
            f"adapter {changed} was trained on a base its start changed, so it cannot share a base with another "
            "adapter: load it alone, or its conversion to plain LoRA"
        )
    config = None
    if change:
        rebuild_base(loaded.model, _sixteen_bit_base(loaded, base), change)
        loaded.base_changed_by = f"{adapter} ({change.init})"
        # The base is rebuilt: peft must not take the start out of it again (nor want LoftQ's CUDA-only setup).
        saved = json.loads((Path(adapter) / ADAPTER_CONFIG_FILE).read_text())
        config = PeftConfig.from_peft_type(**{**saved, "init_lora_weights": True})
    with refusing_pickled_code(adapter):
        try:
            if isinstance(loaded.model, PeftModel):
                loaded.model.load_adapter(str(adapter), adapter_name=name, is_trainable=trainable)
            else:
                loaded.model = PeftModel.from_pretrained(
                    loaded.model, str(adapter), adapter_name=name, is_trainable=trainable, config=config
                )
        except torch.OutOfMemoryError:
            raise
        except (ValueError, RuntimeError) as exc:  # no matching modules / size mismatch
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = next((line for line in lines if "size mismatch" in line), lines[0] if lines else repr(exc))
            raise QloraError(f"adapter {adapter} does not fit base model {loaded.source}: {reason}") from None
    check_adapter_fits(loaded.model, adapter, loaded.source, name)
    if trainable:
        use_cpu_dropout(loaded.model)
        loaded.model.train()
    else:
        loaded.model.eval()


def chosen_model(model: str | None, gguf_file: str | None = None, *, option: str = "--model") -> ModelConfig | None:
    """An inference command's `--model` (and `--gguf-file`, a GGUF file in that folder or hub repo)."""
    if gguf_file is not None and model is None:
        raise QloraError(f"--gguf-file names a file in {option} (a folder or hub repo): pass {option} too")
    return None if model is None else ModelConfig(name_or_path=model, gguf_file=gguf_file)


def inference_target(
    recipe: Recipe | None, model: ModelConfig | None, quantization: str | None, adapter: str | None
) -> tuple[ModelConfig, QuantizationConfig, str | None]:
    """What an inference command loads: its --model/--quantization/--adapter, or what a recipe's run produced.

    With a recipe, the run's output_dir is the adapter (LoRA) or the model itself (full finetuning);
    --model, --quantization and --adapter still override.
    """
    if recipe is None:
        if model is None:
            raise QloraError("pass --model (a hub id, a local folder or builtin:tiny-llama) or --config RECIPE")
        return model, QuantizationConfig.named(quantization or "nf4"), adapter
    quant = recipe.quantization if quantization is None else QuantizationConfig.named(quantization)
    if model is not None:
        return model, quant, adapter
    run = recipe.output_dir
    if adapter is None and recipe.lora.enabled:
        if not has_adapter(run):
            raise QloraError(f"output_dir {run} holds no trained adapter yet: train first, or pass --adapter")
        adapter = run
    model_cfg = recipe.model if recipe.lora.enabled else recipe.model.model_copy(update={"name_or_path": run})
    return model_cfg, quant, adapter


def check_adapter_fits(model: Any, adapter: str | os.PathLike, base: str, name: str = "default") -> None:
    """peft skips adapter weights with no matching module and leaves unmatched modules untrained; refuse both."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    saved = set(load_peft_weights(str(adapter), device="cpu"))
    expected = set(get_peft_model_state_dict(model, adapter_name=name))
    unused, missing = sorted(saved - expected), sorted(expected - saved)
    if unused:
        raise QloraError(
            f"adapter {adapter} does not fit base model {base}: {len(unused)} adapter weights match no module "
            f"of the base (first: {unused[0]})"
        )
    if missing:
        raise QloraError(
            f"adapter {adapter} does not fit base model {base}: it has no weights for {len(missing)} adapted "
            f"modules of the base (first: {missing[0]})"
        )


def ensure_pad_token(tokenizer: Any, model: Any) -> None:
    """Reuse `unk` as padding when there is one (no resize); otherwise add `<pad>` and resize embeddings."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of every linear layer (16-bit or bitsandbytes 4/8-bit) except the output head."""
    import bitsandbytes as bnb

    linear_types = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, linear_types) and module is not head
    }
    head_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is head}
    return sorted(names - head_names)


def add_lora(model: Any, cfg: LoraConfig, *, kind: ModelKind, tokenizer: Any = None) -> Any:
    """LoRA as `cfg` says; a start that changes the base (lora.init pissa/olora/loftq) is `start_from_16bit`'s."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    targets = linear_module_names(model) if cfg.target_modules == "all-linear" else cfg.target_modules
    if not targets:
        raise QloraError("found no linear layers to put LoRA on; set lora.target_modules explicitly")
    tokens: Any = None
    if cfg.trainable_tokens:
        if tokenizer is None:
            raise QloraError("lora.trainable_tokens needs the tokenizer to find the tokens' rows")
        ids = add_tokens(tokenizer, model, cfg.trainable_tokens)
        tokens = ids if _tied(model) else dict.fromkeys(_embedding_names(model), ids)  # tied: peft does the head
    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias=cfg.bias,
        task_type=TaskType(kind.peft_task_type),
        use_dora=cfg.dora,
        use_rslora=cfg.rslora,
        init_lora_weights="gaussian" if cfg.init == "gaussian" else True,
        trainable_token_indices=tokens,
        modules_to_save=list(_embedding_names(model)) if cfg.train_embeddings else None,
        ensure_weight_tying=cfg.train_embeddings and _tied(model),
    )
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as exc:
        raise QloraError(f"lora.target_modules: {exc}") from None
    use_cpu_dropout(model)
    return model


def add_tokens(tokenizer: Any, model: Any, tokens: list[str]) -> list[int]:
    """The tokens' ids; those the vocabulary lacks are added as special tokens, their rows starting at the mean."""
    new = [token for token in tokens if token not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
        fit_embeddings(tokenizer, model, mean_resizing=True)
    return tokenizer.convert_tokens_to_ids(tokens)


def fit_embeddings(tokenizer: Any, model: Any, *, mean_resizing: bool = False) -> None:
    """Grow the embeddings to a tokenizer with tokens added in training (their trained rows come with the adapter)."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=mean_resizing)


def _embedding_names(model: Any) -> tuple[str, str]:
    """Leaf names of the input embedding and the output head, as peft's module lists take them."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    return names[id(embed)], names[id(head)]


def _tied(model: Any) -> bool:
    return model.get_input_embeddings().weight is model.get_output_embeddings().weight


def start_from_16bit(loaded: LoadedModel, cfg: ModelConfig, lora: LoraConfig, folder: Path | None) -> None:
    """lora.init pissa/olora/loftq (qlora_cli.adapter_init) on `loaded`, already wrapped by `add_lora`.

    Each layer's start comes from its 16-bit weight (a 16-bit copy on the CPU when the base is quantized), the
    residual replaces the layer's weight, quantized as it was; the start and the residual norms go to `folder`
    (None: another process records them).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    peft_model = loaded.model
    base16 = _sixteen_bit_base(loaded, cfg)
    originals = dict(base16.named_modules())
    scale = lora_scale(lora)
    init = f"pissa_niter_{lora.pissa_niter}" if lora.pissa_niter else lora.init
    method = None  # LoftQ: ours (peft's config would want scipy, and its initialisation CUDA)
    if lora.init != "loftq":  # PiSSA and OLoRA: peft's own
        method = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, use_rslora=lora.rslora, init_lora_weights=init)
    residuals = {}
    with torch.no_grad():
        for name, layer in peft_model.base_model.model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            weight = originals[name].weight.detach()
            if method is None:  # LoftQ: quantized as this layer was
                q = layer.get_base_layer().weight
                quantize = partial(
                    round_trip, blocksize=q.blocksize, quant_type=q.quant_type, double_quant=q.compress_statistics
                )
                a, b = loftq_start(weight, lora.r, scale, lora.loftq_iter, quantize)
            else:  # peft's own PiSSA / OLoRA, on a throwaway layer holding a copy of the 16-bit weight
                copy = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
                copy.weight.data.copy_(weight)
                start = LoraLinear(copy, "start", config=method, r=lora.r, lora_alpha=lora.alpha)
                a, b = start.lora_A["start"].weight.detach().float(), start.lora_B["start"].weight.detach().float()
            residuals[name] = residual(weight, a, b, scale)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    for name, weight in residuals.items():
        set_weight(_base_layer(peft_model, name), weight)
    if folder is not None:
        with staged_folder(folder) as staged:
            peft_model.save_pretrained(staged)  # the start as a plain adapter (init True): peft's conversion reads it
            write_base_change(staged, lora.init, scale, residuals)
    peft_model.peft_config["default"].init_lora_weights = init  # what peft's own loaders need to know


def save_as_plain_lora(peft_model: Any, start: Path, folder: Path) -> None:
    """peft's conversion: B A - B0 A0 as a rank-2r LoRA against the untouched base, which any LoRA loader takes."""
    with staged_folder(folder) as staged, warnings.catch_warnings():
        # peft loads the start beside the trained adapter to subtract it (the same way for LoftQ's start)
        warnings.filterwarnings("ignore", message=".*(only works for converting|changes the base weights)")
        peft_model.save_pretrained(staged, path_initial_model_for_weight_conversion=str(start))


def _base_layer(peft_model: Any, name: str) -> Any:
    return peft_model.base_model.model.get_submodule(name).get_base_layer()


def _sixteen_bit_base(loaded: LoadedModel, cfg: ModelConfig | None) -> Any:
    """The base's 16-bit weights as its loader saw them before quantizing (the compute dtype), on the CPU."""
    model = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
    if not _quantized(model):
        return model
    if cfg is None:
        raise QloraError("the adapter's start changed its base: rebuilding that base needs the 16-bit base model")
    copy = QuantizationConfig(bits=16, compute_dtype=loaded.compute.name)
    return load_model(cfg, copy, device="cpu", for_training=False).model


def _quantized(model: Any) -> bool:
    import bitsandbytes as bnb

    return any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def computes_logits_where_asked(model: Any) -> bool:
    """A transformers causal LM whose forward takes `logits_to_keep` and whose loss reads `shift_labels`."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    takes_positions = "logits_to_keep" in inspect.signature(type(base).forward).parameters
    return takes_positions and getattr(base, "loss_function", None) is ForCausalLMLoss


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total), counting a packed 4-bit tensor by the parameters it stores."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if hasattr(param, "quant_state") or param.dtype == torch.uint8:
            n *= 2 * param.element_size()  # two 4-bit values per byte of the storage dtype (bf16 under FSDP)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def _from_pretrained(loader: Any, name: str, what: str, **kwargs: Any) -> Any:
    """Turn the hub's many not-found and offline errors into one clear line with the local-path hint."""
    try:
        with refusing_pickled_code(name):
            return loader(name, **kwargs)
    except (OSError, ValueError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "custom code" in message:
            message += " Set model.trust_remote_code=true only if you trust that code."
        if os.path.isdir(name):
            raise QloraError(f"cannot load {what} from {name}: {message}") from None
        if os.path.exists(name):
            raise QloraError(f"cannot load {what} from {name}: a file, not a model folder") from None
        if name.startswith((os.sep, ".", "~")) or name.count("/") > 1:  # a path, not an org/name hub id
            raise QloraError(f"{what} folder not found: {name}") from None
        raise QloraError(
            f"cannot load {what} {name!r} from the Hugging Face hub ({message}). "
            "If you are offline, download it once and pass its local folder instead."
        ) from None
