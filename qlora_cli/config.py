"""Recipe schema, YAML loading with `extends:`, and torchtune-style dotted overrides.

A recipe document is validated once, here, without I/O and before any model is loaded: every key and
every name (datasets, optimizers, schedulers), so `config show`, `config validate` and `train` agree.
What depends on the machine is `qlora_cli.preflight`. Everything downstream takes the typed `Recipe`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from qlora_cli.errors import ConfigError, QloraError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = Field(description="Hub id, local folder, or builtin:tiny-llama / builtin:tiny-t5.")
    tokenizer: str | None = Field(None, description="Tokenizer hub id or folder; defaults to the model's.")
    gguf_file: str | None = Field(
        None, description="A GGUF file in name_or_path (a folder or hub repo): dequantized once, then quantized as set."
    )
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    adapter: str | None = Field(
        None,
        description="A finished run (or PEFT adapter folder) whose adapter training continues from, e.g. DPO after "
        "SFT; for dpo and kto it is also the reference.",
    )


class QuantizationConfig(_Section):
    bits: Literal[4, 8, 16] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 on a GPU that supports it, else fp16 on older GPUs, fp32 on the CPU."
    )
    quant_storage: Literal["auto", "uint8", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Storage dtype of packed 4-bit weights; FSDP needs it equal to the compute dtype."
    )

    @classmethod
    def named(cls, name: Literal["nf4", "fp4", "int8", "none"]) -> QuantizationConfig:
        """The inference commands' --quantization: nf4 (the paper's, with double quant), fp4, int8, none (16-bit)."""
        if name == "int8":
            return cls(bits=8)
        if name == "none":
            return cls(bits=16)
        return cls(bits=4, quant_type=name)


BASE_CHANGING_INITS = ("pissa", "olora", "loftq")


class LoraConfig(_Section):
    enabled: bool = Field(True, description="false = full finetuning (needs quantization.bits=16).")
    r: int = Field(64, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="all-linear = every linear layer but the output head, found in the model."
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    dora: bool = Field(
        False, description="DoRA: a trained magnitude per output row beside the direction LoRA learns; slower."
    )
    rslora: bool = Field(
        False, description="rsLoRA: scale by alpha/sqrt(r), not alpha/r (retune alpha or the learning rate)."
    )
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = Field(
        "default",
        description="How A and B start. default (A random, B zero) and gaussian keep the base as it is; pissa, olora "
        "and loftq take r directions out of the 16-bit base into the adapter and quantize what remains.",
    )
    pissa_niter: int | None = Field(
        None, gt=0, description="init=pissa: a randomized SVD with this many iterations instead of the full one."
    )
    loftq_iter: int = Field(1, gt=0, description="init=loftq: rounds of quantize, then fit the adapter to the error.")
    trainable_tokens: list[str] = Field(
        default_factory=list,
        description="Tokens whose embedding (and head) rows train too; those the vocabulary lacks are added as "
        "special tokens.",
    )
    train_embeddings: bool = Field(
        False, description="Train the whole input embedding and output head (peft's modules_to_save)."
    )

    @property
    def changes_base(self) -> bool:
        """The adapter starts non-zero, so the base it trains against is the 16-bit base minus that start."""
        return self.init in BASE_CHANGING_INITS

    @model_validator(mode="after")
    def _compatible(self) -> LoraConfig:
        if self.pissa_niter is not None and self.init != "pissa":
            raise ValueError(f"lora.pissa_niter applies to init=pissa, not init={self.init}")
        if self.loftq_iter != 1 and self.init != "loftq":
            raise ValueError(f"lora.loftq_iter applies to init=loftq, not init={self.init}")
        if self.dora and self.changes_base:
            raise ValueError(  # peft's conversion to plain LoRA subtracts B0 A0 and has no magnitude to carry
                f"lora.dora with init={self.init}: the DoRA magnitude is taken from the base that {self.init} "
                "changes, and the adapter could not be written as plain LoRA against the untouched base"
            )
        if self.changes_base and (self.trainable_tokens or self.train_embeddings):
            raise ValueError(
                f"lora.init={self.init} with trained embedding rows: its plain LoRA conversion keeps only A and B"
            )
        if self.trainable_tokens and self.train_embeddings:
            raise ValueError("lora.train_embeddings already trains every row: drop lora.trainable_tokens")
        if len(set(self.trainable_tokens)) != len(self.trainable_tokens) or "" in self.trainable_tokens:
            raise ValueError("lora.trainable_tokens must be distinct, non-empty tokens")
        return self


class DataConfig(_Section):
    dataset: str = Field("alpaca", description="A registered dataset name; see `qlora data formats`.")
    path: str | None = Field(None, description="Local file or folder in the dataset's native schema.")
    data_files: list[str] | None = Field(None, description="Several local files (instead of path).")
    hub_id: str | None = Field(None, description="Override the dataset's hub id.")
    hub_config: str | None = None
    source_max_len: int = Field(384, gt=0)
    target_max_len: int = Field(128, gt=0)
    train_on_source: bool = False
    eval_size: int = Field(1024, ge=0, description="Held out from train when the dataset has no eval split.")
    max_train_samples: int | None = Field(None, gt=0)
    max_eval_samples: int | None = Field(None, gt=0)
    packing: bool = Field(
        False,
        description="Pack several training examples into each row (batch_size then counts rows); decoder-only models.",
    )
    max_packed_len: int = Field(2048, gt=0, description="Tokens a packed row holds at most.")

    @model_validator(mode="after")
    def _known_dataset(self) -> DataConfig:
        from qlora_cli.data.formats import FORMATS

        if self.dataset not in FORMATS:
            raise ValueError(f"unknown dataset {self.dataset!r}{_suggest(self.dataset, FORMATS)}")
        if self.path and self.data_files:
            raise ValueError("set data.path or data.data_files, not both")
        return self


TRAINING_METHODS = ("sft", "dpo", "orpo", "kto")
PREFERENCE_METHODS = TRAINING_METHODS[1:]


class TrainingConfig(_Section):
    method: Literal["sft", "dpo", "orpo", "kto"] = Field(
        "sft",
        description="sft: supervised (the paper's); dpo, orpo: pairs of a chosen and a rejected reply; kto: replies "
        "labelled desirable or not. The preference methods run TRL's trainers; their settings are in `preference:`.",
    )
    batch_size: int = Field(1, gt=0, description="Per-device micro batch.")
    gradient_accumulation_steps: int = Field(16, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: str = "constant"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    max_steps: int = Field(10000, gt=0)
    optim: str = "paged_adamw_32bit"
    max_grad_norm: float = Field(0.3, gt=0)
    adam_beta2: float = Field(0.999, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="auto = off where `qlora plan` predicts the run fits the memory there without it "
        "(with a margin), on otherwise; decided when training starts.",
    )
    group_by_length: bool = True
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(250, gt=0)
    save_total_limit: int | None = Field(40, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="Evaluate loss on the held-out split every N steps.")
    eval_batch_size: int = Field(8, gt=0)
    seed: int = 42
    report_to: list[Literal["none", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["none"], description="Experiment trackers; wandb and mlflow are optional extras."
    )
    max_bad_steps: int = Field(0, ge=0, description="Non-finite losses tolerated before the run stops.")
    loss: Literal["auto", "chunked", "fused", "plain"] = Field(
        "auto",
        description="The head + cross-entropy over the vocabulary. chunked: a few positions at a time, never all "
        "their fp32 logits at once; fused: Liger's kernel (CUDA, the liger extra); plain: the model's own. "
        "auto = fused where it can run, else chunked where the head is a plain linear layer, else plain.",
    )
    fsdp: bool = False
    deepspeed: str | None = None

    @field_validator("optim")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        from transformers.training_args import OptimizerNames

        return _one_of(value, [choice.value for choice in OptimizerNames])

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        from transformers.trainer_utils import SchedulerType

        return _one_of(value, [choice.value for choice in SchedulerType])

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing(cls, value: Any) -> Any:
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError(f"must be true, false or auto, not {value!r}")

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        """Accept one tracker as a plain string (`training.report_to=tensorboard`)."""
        value = [value] if isinstance(value, str) else value
        if isinstance(value, list) and "none" in value and len(value) > 1:
            raise ValueError("'none' cannot be combined with other trackers")
        return value

    @property
    def effective_batch_size(self) -> int:
        """Per process; multiply by the number of processes for the global batch."""
        return self.batch_size * self.gradient_accumulation_steps


class PreferenceConfig(_Section):
    """Settings of training.method dpo, orpo and kto (TRL's DPOConfig, ORPOConfig, KTOConfig fields)."""

    beta: float = Field(
        0.1, gt=0, description="dpo, kto: how far the policy may move from the reference; orpo: the odds-ratio weight."
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="dpo: sigmoid (DPO), ipo (IPO), hinge (SLiC), robust (label noise)."
    )
    reference: Literal["live", "precomputed"] = Field(
        "live",
        description="dpo, kto: the reference log-probs computed beside each step, or once before training (a pass "
        "over the data first; no reference forward in a step).",
    )
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of desirable replies' losses.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of undesirable replies' losses.")

    # Which training.method reads each field; a field set for another method is refused.
    APPLIES: ClassVar[dict[str, tuple[str, ...]]] = {
        "beta": PREFERENCE_METHODS,
        "loss_type": ("dpo",),
        "reference": ("dpo", "kto"),
        "desirable_weight": ("kto",),
        "undesirable_weight": ("kto",),
    }

    def misplaced(self, method: str) -> list[str]:
        """Fields set away from their default that `method` does not read (a saved recipe holds every default)."""
        return [
            name
            for name, info in type(self).model_fields.items()
            if method not in self.APPLIES[name] and getattr(self, name) != info.default
        ]


class MmluEvalConfig(_Section):
    every_n_steps: int = Field(200, gt=0)
    split: Literal["val", "test"] = "val"
    shots: Literal[0, 5] = 5
    limit: int | None = Field(None, gt=0)
    data: str | None = Field(None, description="Hendrycks folder or paper JSON; default: the hub's cais/mmlu.")
    batch_size: int = Field(4, gt=0)
    max_length: int = Field(2048, gt=0)
    subjects: list[str] | None = Field(None, description="Only these subjects; default: all in the data.")


NonBlank = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class KnowledgeProbe(_Section):
    question: NonBlank = Field(description="Asked in the dataset's prompt format.")
    answer: NonBlank = Field(description="A reply that contains it (any case) is right.")


class EvalConfig(_Section):
    mmlu: MmluEvalConfig | None = None
    exact_match_samples: int = Field(
        0, ge=0, description="Greedy-generate N held-out examples before and after training: exact match, three shown."
    )
    loss_before_after: bool = Field(
        False, description="Evaluate the loss on the held-out split before and after training."
    )
    knowledge_probes: list[KnowledgeProbe] = Field(
        default_factory=list,
        description="General questions the base answers right, asked before and after training: what finetuning kept.",
    )
    max_new_tokens: int = Field(64, gt=0, description="Per generated answer: held-out examples and knowledge probes.")
    batch_size: int = Field(8, gt=0, description="Prompts generated together for exact match and knowledge probes.")


class Recipe(_Section):
    output_dir: str
    model: ModelConfig
    quantization: QuantizationConfig = QuantizationConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    preference: PreferenceConfig = PreferenceConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if not self.lora.enabled and self.quantization.bits != 16:
            raise ValueError(
                f"full finetuning (lora.enabled=false) cannot train a {self.quantization.bits}-bit base: "
                "set quantization.bits=16 or enable LoRA"
            )
        if self.training.fsdp and self.quantization.bits == 8:
            raise ValueError("FSDP cannot shard 8-bit (LLM.int8) weights: use quantization.bits=4 or 16")
        self._check_lora()
        self._check_engines()
        self._check_method()
        return self

    def _check_method(self) -> None:
        from qlora_cli.data.formats import FORMATS

        method, fmt = self.training.method, FORMATS[self.data.dataset]
        for name in self.preference.misplaced(method):
            readers = "|".join(PreferenceConfig.APPLIES[name])
            raise ValueError(f"preference.{name} applies to training.method={readers}, not {method}")
        if method not in fmt.methods:
            serving = [f.name for f in FORMATS.values() if method in f.methods]
            raise ValueError(
                f"data.dataset={fmt.name} has no data for training.method={method} ({fmt.description}); "
                f"datasets that do: {', '.join(serving)}"
            )
        if method == "sft":
            return
        if not self.lora.enabled:
            raise ValueError(  # the reference is the model with the adapter's start, which full finetuning lacks
                f"training.method={method} trains a LoRA adapter on the quantized base: set lora.enabled=true"
            )
        if self.data.packing:
            raise ValueError(f"data.packing packs supervised examples; training.method={method} trains on pairs")
        if self.training.loss in ("chunked", "fused"):
            raise ValueError(
                f"training.loss={self.training.loss} is the supervised loss; training.method={method} is TRL's own: "
                "leave training.loss=auto"
            )
        if method == "kto" and self.training.batch_size < 2:
            raise ValueError(  # TRL refuses it too, once the model is loaded
                "training.method=kto needs training.batch_size of at least 2: its KL term scores each prompt with "
                "another row's reply from the same batch"
            )
        if self.eval.exact_match_samples:
            raise ValueError(
                f"eval.exact_match_samples compares generations with held-out targets; training.method={method} "
                "reports held-out preference accuracy and margin instead: set it to 0"
            )

    def _check_lora(self) -> None:
        lora, bits = self.lora, self.quantization.bits
        if self.model.adapter and not lora.enabled:
            raise ValueError("model.adapter continues a LoRA adapter: set lora.enabled=true")
        if not lora.enabled:
            return
        if self.model.adapter and lora.init != "default":
            raise ValueError(f"lora.init={lora.init} starts a new adapter; model.adapter continues a trained one")
        if lora.init == "loftq" and bits != 4:
            raise ValueError(f"lora.init=loftq fits the adapter to 4-bit quantization error; this base is {bits}-bit")
        if lora.changes_base and bits == 8:
            raise ValueError(
                f"lora.init={lora.init} re-quantizes the base, which 8-bit (LLM.int8) loading cannot: use 4 or 16 bits"
            )
        if lora.changes_base and (self.training.fsdp or self.training.deepspeed):
            raise ValueError(
                f"lora.init={lora.init} rebuilds the whole base in each process; sharding engines are not supported"
            )

    def _check_engines(self) -> None:
        t, q = self.training, self.quantization
        if t.fsdp and t.deepspeed:
            raise ValueError("training.fsdp and training.deepspeed are two sharding engines: choose one")
        if t.loss in ("chunked", "fused") and (t.fsdp or t.deepspeed):
            engine = "training.fsdp" if t.fsdp else "training.deepspeed"
            raise ValueError(  # the loss multiplies by the head's weight, which each process holds only a shard of
                f"training.loss={t.loss} needs the whole output head on every process, and {engine} shards it: "
                "use training.loss=plain (auto picks it there)"
            )
        declared = None if q.compute_dtype == "auto" else q.compute_dtype  # auto: the machine decides (preflight)
        problem = fsdp_storage_problem(q, declared) if t.fsdp else None
        if problem:
            raise ValueError(problem)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def fsdp_storage_problem(quant: QuantizationConfig, compute_dtype: str | None) -> str | None:
    """FSDP shards only floating-point tensors, so packed 4-bit weights must be stored in the compute dtype.

    `compute_dtype` None: not known yet (`auto` resolves on the machine); only uint8 storage is wrong for sure.
    """
    storage = quant.quant_storage
    if quant.bits != 4 or storage in ("auto", compute_dtype) or (compute_dtype is None and storage != "uint8"):
        return None
    return (
        f"with training.fsdp, quantization.quant_storage={storage} must equal the compute dtype"
        f"{f' ({compute_dtype})' if compute_dtype else ''}: set quantization.quant_storage=auto"
    )


# Recipe fields that change what a resumed run computes are everything except these.
NOT_TRAINING = (
    "output_dir",
    "eval",
    "data.max_eval_samples",
    "training.logging_steps",
    "training.save_steps",
    "training.save_total_limit",
    "training.eval_steps",
    "training.eval_batch_size",
    "training.report_to",
    "training.max_bad_steps",
    "training.gradient_checkpointing",
    "training.loss",  # the same loss and gradients (to rounding), computed holding less
)


def training_drift(saved: dict[str, Any], current: Recipe) -> list[str]:
    """`key: old -> new` for each field of a saved recipe document that differs and changes training."""
    old, new = _flatten(saved), _flatten(current.model_dump(mode="json"))
    missing = "<unset>"
    return [
        f"{key}: {old.get(key, missing)!r} -> {new.get(key, missing)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key, missing) != new.get(key, missing) and not _not_training(key)
    ]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _not_training(key: str) -> bool:
    return any(key == field or key.startswith(field + ".") for field in NOT_TRAINING)


# --------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file (following `extends:`), apply `key.path=value` overrides, validate.

    A bare name that is not a file here (`guanaco-65b`, `guanaco-65b.yaml`) is the bundled recipe of that name.
    """
    path = Path(path)
    if not path.exists() and len(path.parts) == 1:
        bundled = _bundled(path)
        if bundled is None:
            raise ConfigError(f"recipe not found: {path} is no file here and no bundled recipe (see `qlora recipes`)")
        path = bundled
    raw = _read_with_extends(path, seen=())
    for item in overrides:
        _apply_override(raw, item)
    return validate_recipe(raw, source=str(path))


def default_recipe(model: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The schema's defaults (the paper's hyperparameters) for `model`, for commands run without a recipe."""
    raw: dict[str, Any] = {"output_dir": "runs/default", "model": {"name_or_path": model}}
    for item in overrides:
        _apply_override(raw, item)
    return validate_recipe(raw, source="defaults")


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None


def _bundled(path: Path) -> Path | None:
    from qlora_cli.bundled_recipes import find_bundled_recipe

    try:
        return find_bundled_recipe(str(path))
    except QloraError:
        return None  # a broken install: report the file the user named as missing


# A recipe is a few kilobytes; these bounds keep a hostile one (YAML anchors nested like a zip bomb) cheap.
MAX_RECIPE_BYTES = 1 << 20
MAX_EXPANDED_VALUES = 100_000


def safe_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, refusing a document whose aliases would expand past MAX_EXPANDED_VALUES values.

    Anchors and aliases share one node each while parsing; what costs memory and time is everything that
    later walks the result as a tree (validation, error messages, dumping). Counted on the node graph, with
    each shared node's size computed once.
    """
    if len(text.encode()) > MAX_RECIPE_BYTES:
        raise ConfigError(f"{where}: over {MAX_RECIPE_BYTES // 1024} KiB; a recipe is a few lines of YAML")
    sizes: dict[int, int] = {}

    def expanded(node: Any) -> int:
        if id(node) not in sizes:
            sizes[id(node)] = 1  # a node that contains itself counts once
            children = node.value if isinstance(node.value, list) else []
            flat = [part for child in children for part in (child if isinstance(child, tuple) else (child,))]
            sizes[id(node)] = min(1 + sum(expanded(part) for part in flat), MAX_EXPANDED_VALUES + 1)
        return sizes[id(node)]

    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        if expanded(root) > MAX_EXPANDED_VALUES:
            raise ConfigError(f"{where}: YAML aliases expand to more than {MAX_EXPANDED_VALUES:,} values; write them out")
        return loader.construct_document(root)  # the graph already parsed, not the text again
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"recipe not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a recipe is UTF-8 YAML)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        data = safe_yaml(text, str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        started = getattr(exc, "context_mark", None)
        if getattr(exc, "context", None) and started and mark and started.line != mark.line:
            problem += f" ({exc.context} at line {started.line + 1})"
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def _read_with_extends(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"{path}: circular extends: {chain}")
    data = _read_yaml(path)
    parents = data.pop("extends", None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{path}: extends must be a file name or a list of file names")
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = deep_merge(merged, _read_with_extends(path.parent / parent, (*seen, resolved)))
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else in `update` replaces what `base` had."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not of the form key.path=value (e.g. training.max_steps=20)")
    try:
        value = safe_yaml(text, f"override {key}") if text else None
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    node: Any = raw
    model: type[BaseModel] | None = Recipe
    for depth, part in enumerate(parts[:-1]):
        model = _check_key(model, parts[: depth + 1])
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    _check_key(model, parts)
    node[parts[-1]] = value


def _check_key(model: type[BaseModel] | None, parts: list[str]) -> type[BaseModel] | None:
    """Fail on an unknown override key at once, naming the closest valid one; return the sub-model."""
    if model is None:
        return None
    name = parts[-1]
    fields = model.model_fields
    if name not in fields:
        raise ConfigError(f"unknown key {'.'.join(parts)}{_suggest(name, fields)}")
    return _section_type(fields[name].annotation)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    candidates = getattr(annotation, "__args__", None) or (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _one_of(value: str, names: list[str]) -> str:
    """Names that only transformers knows (optimizers, schedulers)."""
    if value not in names:
        raise ValueError(f"unknown value {value!r}{_suggest(value, names)}; one of {', '.join(names)}")
    return value


def _suggest(name: str, valid: Any) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc) or "recipe"
        if err["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            hint = _suggest(loc[-1], parent.model_fields) if parent else ""
            lines.append(f"unknown key {key}{hint}")
        elif err["type"] == "missing":
            lines.append(f"missing required key {key}")
        else:
            message = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            quiet = isinstance(got, dict) or got is None or repr(got) in message
            shown = "" if quiet else f" (got {_short(repr(got))})"
            lines.append(f"{key}: {message}{shown}")
    return "; ".join(lines)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if model is None or part not in model.model_fields:
            return None
        model = _section_type(model.model_fields[part].annotation)
    return model
