"""Tiny trained adapters and merged models, made once per test session through the real CLI.

They live in the session's QLORA_TEST_ARTIFACTS (a worker's, under pytest-xdist), so test modules share them; take
them through the module-scoped fixtures, so that training's output never mixes with the output a test captures. Two
steps at a low learning rate leave an adapter that changes logits clearly (~0.3) without collapsing generation onto EOS.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_in_process

MODELS = {"llama": "builtin:tiny-llama", "t5": "builtin:tiny-t5", "llama-fast": "builtin:tiny-llama"}
LEARNING_RATES = {"llama-fast": "3e-3"}  # a second adapter of the same base that answers differently


def artifacts() -> Path:
    return Path(os.environ["QLORA_TEST_ARTIFACTS"])


def trained_adapter(model: str) -> Path:
    out = artifacts() / f"adapter-{model}"
    if not (out / "completed").exists():
        run_cli_in_process(
            "train", "--config", str(REPO / "configs/demo.yaml"), f"output_dir={out}",
            f"model.name_or_path={MODELS[model]}", "training.max_steps=2", "training.batch_size=2",
            f"training.learning_rate={LEARNING_RATES.get(model, '3e-4')}", "training.save_steps=100", "data.eval_size=8",
            "eval.exact_match_samples=0", "eval.loss_before_after=false", "eval.knowledge_probes=[]", "--overwrite",
        )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def llama_adapter() -> Path:
    return trained_adapter("llama")


@pytest.fixture(scope="module")
def second_llama_adapter() -> Path:
    return trained_adapter("llama-fast")


@pytest.fixture(scope="module")
def t5_adapter() -> Path:
    return trained_adapter("t5")


def run_cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """`qlora ARGS` in this process: what it printed. Fails the test on a non-zero exit."""
    result = cli_in_process(*args)
    assert result.returncode == 0, f"qlora {' '.join(args)} exited with {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def merged_model(model: str) -> Path:
    """The adapter merged with the defaults a 4-bit run gets (nf4-roundtrip), in fp32."""
    out = artifacts() / f"merged-{model}"
    if not (out / "merge_report.json").exists():
        from qlora_cli.merge import MergeRequest, merge_adapter

        merge_adapter(MergeRequest(trained_adapter(model), out, dtype="fp32"))
    return out
