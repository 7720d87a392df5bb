"""training.method dpo, orpo and kto: TRL's trainers, with `QloraOverrides` in front, on the 4-bit base + LoRA.

TRL computes the losses; this module only picks its trainer and config for a recipe and checks two things TRL
leaves to the caller:

- The reference (dpo, kto) is the model the run starts from. Given a model with an adapter, TRL (with peft 0.20
  or later) copies that adapter into a frozen `ref` adapter and scores the reference with it: the base for a
  fresh adapter (B = 0), base + the SFT adapter for `model.adapter`, and for PiSSA/OLoRA/LoftQ the rebuilt
  residual + the adapter's start, not the residual alone that disabling the adapter would give. Without that
  copy the reference would be the adapter-disabled base; where that is not the start, the run is refused.
- Dropout is off (TRL's `disable_dropout`), in qlora's own LoRA dropout modules too.
- TRL casts a quantized model's trainable weights to bf16; the adapter is put back in the dtype qlora trains
  every adapter in (the same tensors, so the `ref` copy and the policy start equal).
"""

from __future__ import annotations

import warnings
from typing import Any

from qlora_cli.config import Recipe
from qlora_cli.data.preference import PreferenceData
from qlora_cli.dropout import remove_lora_dropout
from qlora_cli.errors import QloraError
from qlora_cli.model import LoadedModel
from qlora_cli.trainer import QloraOverrides, training_arguments

REFERENCE_ADAPTER = "ref"  # the name TRL gives its frozen copy of the policy's adapter


def trainer_classes(method: str) -> tuple[type, type]:
    """(TRL trainer, its config class) for a preference method."""
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOTrainer, KTOConfig
    if method == "orpo":
        with warnings.catch_warnings():  # "experimental" is TRL's label for where ORPO lives now, not a problem
            warnings.simplefilter("ignore")
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer
        return ORPOTrainer, ORPOConfig
    raise ValueError(f"not a preference method: {method}")


def method_fields(recipe: Recipe) -> dict[str, Any]:
    """The TRL config fields a recipe sets, beyond what every run's TrainingArguments hold."""
    p, d, method = recipe.preference, recipe.data, recipe.training.method
    fields: dict[str, Any] = {
        "beta": p.beta,
        "max_length": d.source_max_len + d.target_max_len,  # prompts longer than source_max_len were dropped
        "gradient_checkpointing": False,  # TRL's default is on; the loader enabled it where the recipe says
        "remove_unused_columns": True,  # TRL's own signature columns
        "label_names": [],
        "train_sampling_strategy": "random",  # pairs have no single length to group by (said when the run starts)
    }
    if method == "dpo":
        fields |= {"loss_type": [p.loss_type], "precompute_ref_log_probs": p.reference == "precomputed"}
    elif method == "kto":
        fields |= {
            "precompute_ref_log_probs": p.reference == "precomputed",
            "desirable_weight": p.desirable_weight,
            "undesirable_weight": p.undesirable_weight,
            # its KL term pairs each prompt with the next row's reply in a batch it reads in order (shuffled once)
            "train_sampling_strategy": "sequential",
        }
    else:
        fields |= {"max_completion_length": d.target_max_len}
    return fields


def build_preference_trainer(recipe: Recipe, loaded: LoadedModel, data: PreferenceData) -> Any:
    """`loaded.model` is the model to train (with its LoRA adapter, fresh or from model.adapter)."""
    trl_trainer, trl_config = trainer_classes(recipe.training.method)
    args = training_arguments(
        recipe, loaded.compute_dtype, has_eval=data.eval is not None, arguments=trl_config, **method_fields(recipe)
    )
    trainer_class = type(f"Qlora{trl_trainer.__name__}", (QloraOverrides, trl_trainer), {})
    # TRL asks transformers 5 for is_gradient_checkpointing, renamed is_activation_checkpointing: noise to a user
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    remove_lora_dropout(loaded.model)  # before TRL copies the adapter into its reference
    adapter = {name: p.data for name, p in loaded.model.named_parameters() if p.requires_grad}
    trainer = trainer_class(
        model=loaded.model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=loaded.tokenizer,
        recipe=recipe,
    )
    for name, p in loaded.model.named_parameters():
        if name in adapter:
            p.data = adapter[name]
    if recipe.training.method != "orpo":
        check_reference(loaded, recipe)
    return trainer


def check_reference(loaded: LoadedModel, recipe: Recipe) -> None:
    """Refuse a reference that is not the model the run starts from (see the module docstring)."""
    if REFERENCE_ADAPTER in loaded.model.peft_config:
        return
    start = (
        f"model.adapter={recipe.model.adapter}"
        if recipe.model.adapter
        else f"lora.init={recipe.lora.init}" if recipe.lora.changes_base else None
    )
    if start:
        raise QloraError(
            f"TRL scores the reference with the adapter disabled here (no '{REFERENCE_ADAPTER}' copy: peft older "
            f"than 0.20?), which is not the model this run starts from ({start}): upgrade peft"
        )
