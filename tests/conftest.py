"""Shared fixtures: no test touches the network, and builtin assets are built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _builtin_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["QLORA_CACHE"] = str(tmp_path_factory.mktemp("qlora-cache"))


@pytest.fixture
def shared_data() -> Path:
    """Real public data beside the checkout; tests using it skip on a user's clone, which has none."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA
