"""Finetune large language models the QLoRA way."""

from qlora_cli.kernels import quiet_missing_kernels_package

__version__ = "0.1.0"

quiet_missing_kernels_package()
