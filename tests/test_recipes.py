"""Every bundled recipe validates and carries the paper's numbers; `qlora recipes` lists and copies them, from a
checkout and from an installed wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from qlora_cli import bundled_recipes as bundled_module
from qlora_cli.bundled_recipes import bundled_recipe_files, find_bundled_recipe, recipes_dir
from qlora_cli.config import load_recipe
from qlora_cli.errors import QloraError
from qlora_cli.recipes import bundled_recipes, copy_recipe
from tests.conftest import REPO

SIZES = {  # the paper's training table: model, effective batch, lr, steps, LoRA dropout
    "7b": ("huggyllama/llama-7b", 16, 2e-4, 10000, 0.1),
    "13b": ("huggyllama/llama-13b", 16, 2e-4, 10000, 0.1),
    "33b": ("huggyllama/llama-30b", 32, 1e-4, 5000, 0.05),
    "65b": ("huggyllama/llama-65b", 64, 1e-4, 2500, 0.05),
}
DATASETS = {  # recipe prefix -> dataset, source/target length
    "guanaco": ("oasst1", 16, 512),
    "alpaca": ("alpaca", 384, 128),
    "hh-rlhf": ("hh-rlhf", 16, 768),
    "self-instruct": ("self-instruct", 384, 128),
    "unnatural-instructions": ("unnatural-instructions", 384, 128),
    "flan-v2": ("flan-v2", 384, 128),
    "chip2": ("chip2", 384, 128),
    "longform": ("longform", 512, 1024),
}
EXCEPTIONS = {  # (batch, steps) where the table departs from the general rule
    **{f"guanaco-{s}": (16, 1875) for s in SIZES},
    "longform-7b": (16, 4000),
    "longform-13b": (16, 4000),
    "longform-33b": (32, 2343),
    "longform-65b": (32, 2343),
}
PAPER = [(prefix, size) for prefix in DATASETS for size in SIZES]


@pytest.mark.parametrize("path", bundled_recipe_files(), ids=lambda p: p.name)
def test_every_recipe_in_configs_validates(path):
    load_recipe(path)


def test_recipes_dir_is_the_checkout_configs():
    """The editable install maps qlora_cli.configs onto the top-level configs/ of this checkout."""
    assert recipes_dir().resolve() == (REPO / "configs").resolve()
    assert [p.name for p in bundled_recipe_files()] == sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize(("prefix", "size"), PAPER, ids=[f"{p}-{s}" for p, s in PAPER])
def test_recipe_has_the_paper_numbers(prefix, size):
    recipe = load_recipe(recipes_dir() / f"{prefix}-{size}.yaml")
    model, batch, lr, steps, dropout = SIZES[size]
    dataset, source_len, target_len = DATASETS[prefix]
    batch, steps = EXCEPTIONS.get(f"{prefix}-{size}", (batch, steps))
    t = recipe.training
    assert recipe.model.name_or_path == model
    data = recipe.data
    assert (data.dataset, data.source_max_len, data.target_max_len) == (dataset, source_len, target_len)
    assert (t.effective_batch_size, t.learning_rate, t.max_steps) == (batch, lr, steps)
    lora, quant = recipe.lora, recipe.quantization
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (64, 16, dropout, "all-linear")
    assert (quant.bits, quant.quant_type, quant.double_quant) == (4, "nf4", True)
    assert (t.optim, t.lr_scheduler, t.max_grad_norm, t.warmup_ratio) == ("paged_adamw_32bit", "constant", 0.3, 0.03)
    assert t.gradient_checkpointing == "auto"  # the paper checkpointed to fit memory; auto does where needed
    assert recipe.output_dir == f"runs/{prefix}-{size}"


def test_model_id_is_overridable():
    recipe = load_recipe(recipes_dir() / "guanaco-7b.yaml", ["model.name_or_path=/models/my-llama"])
    assert recipe.model.name_or_path == "/models/my-llama"


def test_recipes_command_lists_every_recipe_with_its_numbers(cli):
    code, out, _ = cli("recipes")
    assert code == 0
    table = [line.split() for line in out.splitlines()[1:] if line.strip() and not line.startswith("BATCH")]
    rows = {cells[0]: cells for cells in table}
    assert set(rows) == {p.stem for p in (REPO / "configs").glob("*.yaml")}
    assert rows["guanaco-33b"][:7] == ["guanaco-33b", "oasst1", "33B", "16", "0.0001", "1875", "16/512"]
    assert rows["longform-65b"][:7] == ["longform-65b", "longform", "65B", "32", "0.0001", "2343", "512/1024"]
    assert [name for name in rows if name.startswith("alpaca-")] == [f"alpaca-{size}" for size in SIZES]


def test_copy_writes_a_standalone_recipe_equal_to_the_bundled_one(cli, tmp_path):
    code, out, _ = cli("recipes", "copy", "longform-33b", str(tmp_path))
    assert code == 0 and str(tmp_path / "longform-33b.yaml") in out
    copied = (tmp_path / "longform-33b.yaml").read_text()
    assert "\nextends:" not in copied
    assert load_recipe(tmp_path / "longform-33b.yaml") == load_recipe(REPO / "configs" / "longform-33b.yaml")


def test_copy_refuses_to_overwrite_and_suggests_names(tmp_path):
    dest = tmp_path / "mine.yaml"
    dest.write_text("keep me")
    with pytest.raises(QloraError, match="exists: pass --force"):
        copy_recipe("guanaco-7b", dest)
    assert dest.read_text() == "keep me"
    copy_recipe("guanaco-7b.yaml", dest, force=True)
    assert load_recipe(dest).data.dataset == "oasst1"
    with pytest.raises(QloraError, match="did you mean 'guanaco-13b'"):
        copy_recipe("guanaco-13", tmp_path)
    with pytest.raises(QloraError, match="no bundled recipe 'base/qlora.yaml'"):
        copy_recipe("base/qlora.yaml", tmp_path)
    assert list(tmp_path.iterdir()) == [dest]


def test_bundled_recipes_include_the_demo():
    assert "demo" in {r.name for r in bundled_recipes()}


@pytest.mark.parametrize("name", ["guanaco-65b", "guanaco-65b.yaml"])
def test_find_bundled_recipe_by_name(name):
    found = find_bundled_recipe(name)
    assert found == recipes_dir() / "guanaco-65b.yaml" and found.is_file()
    assert found.resolve() == (REPO / "configs" / "guanaco-65b.yaml").resolve()


@pytest.mark.parametrize(
    "name",
    ["guanaco-66b", "guanaco", "GUANACO-65B", "guanaco-65b.yaml.yaml", "", ".yaml", "qlora", "base", "zero2.json"],
)
def test_find_bundled_recipe_refuses_unknown_names(name):
    """`qlora` is base/qlora.yaml, a piece recipes extend: only top-level recipes are found by name."""
    assert find_bundled_recipe(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "base/qlora",
        "base/qlora.yaml",
        "configs/guanaco-65b.yaml",
        "./guanaco-65b",
        "../configs/guanaco-65b.yaml",
        "base\\qlora.yaml",
        str(REPO / "configs" / "guanaco-65b.yaml"),
    ],
)
def test_find_bundled_recipe_refuses_names_with_a_folder(name):
    """A name with a folder part is a path the user meant: never a bundled file, even where that file exists."""
    assert find_bundled_recipe(name) is None


def test_missing_bundled_recipes_are_one_clear_error(monkeypatch, tmp_path):
    def no_package(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(bundled_module.resources, "files", no_package)
    with pytest.raises(QloraError, match="bundled recipes not found: package qlora_cli.configs is missing") as err:
        recipes_dir()
    assert "\n" not in str(err.value)
    monkeypatch.setattr(bundled_module.resources, "files", lambda name: tmp_path / "gone")
    with pytest.raises(QloraError, match="bundled recipes not found: qlora_cli.configs is not a folder on disk"):
        bundled_recipe_files()


# Build a wheel of the checkout, install it alone into a folder, and run it from elsewhere: the wheel must carry
# the recipes, not only the checkout. Built from a copy so the checkout gets no build/ or refreshed egg-info.
_NOT_SOURCE = {".git", ".venv", ".venv-latest", "runs", "build", "dist", ".pytest_cache", ".whl", ".gl"}


def _copy_filter(folder: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    return skip | (_NOT_SOURCE & set(names) if Path(folder) == REPO else set())


def _pip(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, the folder it is installed in with pip --target)."""
    try:
        setuptools_version = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        pytest.skip("building the wheel without build isolation needs setuptools in this environment")
    if tuple(int(part) for part in setuptools_version.split(".")[:2]) < (70, 1):
        pytest.skip(f"setuptools {setuptools_version} needs the `wheel` package to build wheels; have >= 70.1")
    root = tmp_path_factory.mktemp("wheel")
    source, wheels, site = root / "source", root / "wheels", root / "site"
    shutil.copytree(REPO, source, ignore=_copy_filter)
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(source), cwd=root)
    [wheel] = wheels.glob("qlora_cli-*.whl")
    _pip("install", "--no-deps", "--no-index", "--target", str(site), str(wheel), cwd=root)
    return wheel, site


def test_wheel_ships_the_recipes_and_every_module(installed_wheel):
    wheel, _ = installed_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in [
        "qlora_cli/configs/guanaco-65b.yaml",
        "qlora_cli/configs/demo.yaml",
        "qlora_cli/configs/base/qlora.yaml",
        "qlora_cli/configs/base/llama-65b.yaml",
        "qlora_cli/configs/accelerate/fsdp_qlora.yaml",
        "qlora_cli/configs/deepspeed/zero2.json",
    ]:
        assert name in names
    configs = REPO / "configs"
    bundled = [p for p in configs.rglob("*") if p.suffix in (".yaml", ".json") and "__pycache__" not in p.parts]
    assert {f"qlora_cli/configs/{p.relative_to(configs).as_posix()}" for p in bundled} <= names
    # pyproject.toml lists the packages: a new subpackage left out of that list would be missing here.
    modules = {f"qlora_cli/{p.relative_to(REPO / 'qlora_cli').as_posix()}" for p in (REPO / "qlora_cli").rglob("*.py")}
    assert modules - names == set()
    assert {n.split("/")[0] for n in names} == {"qlora_cli", wheel.name.split("-py")[0] + ".dist-info"}


INSTALLED_RUN = """
import json, sys
from pathlib import Path

site, repo = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
assert all(Path(entry or ".").resolve() != repo for entry in sys.path), sys.path
import qlora_cli
from qlora_cli.cli import main

sys.argv = ["qlora", "recipes"]
try:
    main()
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
from qlora_cli.bundled_recipes import find_bundled_recipe, recipes_dir
from qlora_cli.config import load_recipe

path = find_bundled_recipe("guanaco-65b")
recipe = load_recipe(path)
files = {name: module.__file__ for name, module in sys.modules.items()
         if name.startswith("qlora_cli") and getattr(module, "__file__", None)}
print("RESULT " + json.dumps({
    "site": str(site), "qlora_cli": qlora_cli.__file__, "modules": files, "recipes_dir": str(recipes_dir()),
    "path": str(path), "model": recipe.model.name_or_path, "dataset": recipe.data.dataset, "lora_r": recipe.lora.r,
    "steps": recipe.training.max_steps, "batch": recipe.training.effective_batch_size,
}))
"""


def test_installed_wheel_lists_finds_and_loads_bundled_recipes(installed_wheel, tmp_path):
    _, site = installed_wheel
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", INSTALLED_RUN, str(site), str(REPO)],
        cwd=elsewhere,
        env={**env, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table, _, line = result.stdout.rpartition("RESULT ")
    got = json.loads(line)
    site = Path(got["site"])
    assert Path(got["qlora_cli"]).is_relative_to(site)
    assert all(Path(file).is_relative_to(site) for file in got["modules"].values()), got["modules"]
    assert Path(got["recipes_dir"]) == site / "qlora_cli" / "configs"
    assert Path(got["path"]) == site / "qlora_cli" / "configs" / "guanaco-65b.yaml"
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.strip()}
    assert rows["guanaco-65b"][:7] == ["guanaco-65b", "oasst1", "65B", "16", "0.0001", "1875", "16/512"]
    assert set(rows) - {"RECIPE", "BATCH"} == {p.stem for p in (REPO / "configs").glob("*.yaml")}
    # guanaco-65b.yaml extends base/llama-65b.yaml (which extends qlora.yaml) and base/oasst1.yaml.
    assert (got["model"], got["dataset"], got["lora_r"]) == ("huggyllama/llama-65b", "oasst1", 64)
    assert (got["steps"], got["batch"]) == (1875, 16)
