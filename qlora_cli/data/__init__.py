"""Dataset formats, loading and splits, tokenization with source masking."""

from qlora_cli.data.formats import FORMATS, DatasetFormat, Example, SkipRecord
from qlora_cli.data.loading import PreparedData, prepare_data
from qlora_cli.data.tokenize import PaddingCollator, tokenize_example

__all__ = [
    "FORMATS",
    "DatasetFormat",
    "Example",
    "SkipRecord",
    "PaddingCollator",
    "PreparedData",
    "prepare_data",
    "tokenize_example",
]
