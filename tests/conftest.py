"""Shared fixtures: no test touches the network, and builtin assets are built once per session."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# `make test` runs two pytest-xdist workers, a test file each at a time. Each gets its share of the cores, and the
# subprocesses it starts inherit that share: two workers with a thread per core each oversubscribe the CPU, and
# torch's threads then spin against each other (measured on 2 cores: 30 min 38 s that way; 15 min 56 s with one
# thread each, against 19 min for one process with both).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The longest files start first, so that the workers finish together rather than one waiting on the demo.
SLOWEST_FILES = ("test_demo", "test_lora_family_real", "test_preference", "test_export", "test_distributed")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.stem
        return SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)

    items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept


@pytest.fixture(scope="session", autouse=True)
def _builtin_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One builtin cache for the run, shared by its workers (a worker waits while another builds an entry), so
    SmolLM2 is dequantized once; the tests' own trained artifacts (tests/trained.py) are per worker."""
    run = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run = run.parent  # the run's folder, above each worker's
    (run / "qlora-cache").mkdir(exist_ok=True)
    os.environ["QLORA_CACHE"] = str(run / "qlora-cache")
    os.environ["QLORA_TEST_ARTIFACTS"] = str(tmp_path_factory.mktemp("test-artifacts"))


@pytest.fixture
def shared_data() -> Path:
    """Real public data beside the checkout; tests using it skip on a user's clone, which has none."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@contextmanager
def bnb_defaults_of_an_avx512_bf16_cpu() -> Iterator[None]:
    """4-bit layers built inside get the default bitsandbytes gives them on an AVX512-BF16 CPU.

    There, `Linear4bit` repacks its weight in place at its first no-grad forward in eval mode, unless told
    not to. This lets a test on any CPU check that our code always tells it; on such a CPU it changes nothing.
    """
    import bitsandbytes.nn.modules

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
        yield


@pytest.fixture
def avx512_bf16_defaults() -> Iterator[None]:
    with bnb_defaults_of_an_avx512_bf16_cpu():
        yield


@pytest.fixture
def no_isa_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """No cap on oneDNN's instructions from the caller's environment (docs/cpu-kinds.md runs the suite under one)."""
    for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def amx_cpu(monkeypatch: pytest.MonkeyPatch, no_isa_cap: None) -> None:
    """torch's feature checks report AMX and AVX512-BF16, whatever this CPU has."""
    import torch

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    """Run the real `qlora` command in a subprocess (python -m qlora_cli), as a user would."""
    return _run_python("-m", "qlora_cli", *args, cwd=cwd, timeout=timeout, env=env)


def run_script(name: str, *args: str, timeout: float = 600):
    """Run scripts/NAME from the checkout in a subprocess, as the README tells users to."""
    return _run_python(str(REPO / "scripts" / name), *args, timeout=timeout)


def python_env(env: dict | None = None) -> dict[str, str]:
    """The environment a subprocess runs this checkout's Python code in."""
    return {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}


def _run_python(*argv: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, *argv],
        cwd=cwd or REPO,
        env=python_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """`qlora ARGS` in this process (no new interpreter: saves the imports): its exit code and what it printed."""
    import contextlib
    import io
    import sys

    from qlora_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setattr(sys, "argv", ["qlora", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess(["qlora", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    """Run `qlora ARGS` in this process (fast, for errors and small commands): returns (code, out, err)."""

    def invoke(*args: str) -> tuple[int, str, str]:
        result = cli_in_process(*args)
        return result.returncode, result.stdout, result.stderr

    return invoke
