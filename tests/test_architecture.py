"""The package's shape (docs/architecture.md): no import cycle, light inference commands, one owner of run files."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_cli import run_folder
from tests.conftest import REPO

PACKAGE = REPO / "qlora_cli"


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (in functions too: lazy imports count)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qlora_cli"):
                imported |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        graph[name] = {m for m in imported if m in modules and m != name and not name.startswith(m + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that is on one (depth-first search)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert "qlora_cli.trainer" in graph["qlora_cli.train"]  # the graph is really read
    assert cycles(graph) == []


INFERENCE = ["qlora_cli.generate", "qlora_cli.chat", "qlora_cli.merge", "qlora_cli.serve.api"]


@pytest.mark.parametrize("module", INFERENCE)
def test_inference_commands_do_not_import_the_trainer(module):
    probe = f"import sys, {module}; print('transformers.trainer' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def test_the_trainer_probe_would_notice_the_trainer():
    probe = "import sys, qlora_cli.trainer; print('transformers.trainer' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.stdout.strip() == "True", result.stderr[-2000:]


def test_run_file_names_are_written_only_in_run_folder():
    names = {
        value
        for key, value in vars(run_folder).items()
        if key.endswith(("_FILE", "_DIR", "_PREFIX")) and isinstance(value, str)
    } | set(run_folder.ADAPTER_WEIGHT_FILES)
    assert {"recipe.yaml", "trainer_state.json", "checkpoint-", "adapter_config.json", "metrics.json"} <= names
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "run_folder.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
            elif isinstance(node, ast.JoinedStr):  # f"checkpoint-{step}"
                head = node.values[0] if node.values else None
                if isinstance(head, ast.Constant) and str(head.value).startswith(run_folder.CHECKPOINT_PREFIX):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: f{head.value!r}...")
    assert offenders == []
