"""Finetune large language models the QLoRA way."""

__version__ = "0.1.0"
