"""The house plan's rules about imports, checked on the source (every import statement, function-level ones too):

- no import cycle between modules (a function-local import may not hide one; imports under `if TYPE_CHECKING` and
  registries' discovery through `importlib` are not edges);
- packages depend one way: cli -> launch/train/export/metrics -> objectives/augment/data -> models -> nn -> ops,
  with the small shared modules (errors, storage, checkpoint, schema, imaging, config, families) where the table
  below puts them;
- the engine, export, metrics and the CLI know families only through the registry: they import no family's own
  module and compare nothing against a family's name.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"

# What each part of the package may import from pipeline (besides itself and `pipeline` for __version__).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "storage": {"errors"},
    "ops": {"errors"},
    "schema": {"errors"},
    "checkpoint": {"errors", "storage"},
    "imaging": set(),
    "nn": {"ops", "errors"},
    "data": {"errors", "storage"},
    "augment": {"ops", "errors"},
    "models": {"nn", "ops", "errors"},
    "objectives": {"models", "nn", "ops", "augment", "errors"},
    "families": {"models", "objectives", "augment", "nn", "ops", "schema", "errors"},
    "metrics": {"data", "models", "export", "imaging", "storage", "checkpoint", "errors", "families", "schema", "ops"},
    "config": {"families", "schema", "errors", "augment", "data", "metrics"},
    "export": {"families", "models", "checkpoint", "storage", "schema", "imaging", "errors"},
    "train": {"config", "families", "models", "objectives", "augment", "data", "export", "metrics", "checkpoint",
              "storage", "imaging", "errors", "ops", "nn", "schema"},
    "launch": {"config", "errors", "train", "schema", "storage"},
    "cli": {"config", "train", "launch", "export", "metrics", "data", "ops", "models", "families", "errors",
            "imaging", "storage"},
}  # fmt: skip
FAMILY_AGNOSTIC = ("train", "export", "metrics", "cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, under `if TYPE_CHECKING`) of every pipeline import in the file."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for b in node.body for n in ast.walk(b))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            # `from pipeline.x import y` may import the submodule pipeline.x.y
            names = [f"{base}.{a.name}" if (ROOT / f"{base}.{a.name}".replace(".", "/")).exists()
                     or (ROOT / (f"{base}.{a.name}".replace(".", "/") + ".py")).exists() else base
                     for a in node.names]  # fmt: skip
        else:
            continue
        for name in names:
            if name == "pipeline" or name.startswith("pipeline."):
                found.append((name, node.lineno, id(node) in typing_only))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        src = _module_name(path)
        graph[src]
        for name, _, typing_only in _imports(path):
            if not typing_only and name != src:
                graph[src].add(name)
    return graph


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycle_between_modules() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_packages_depend_one_way() -> None:
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        src = _module_name(path)
        part = _part(src)
        for name, line, typing_only in _imports(path):
            target = _part(name)
            if typing_only or target in ("", part) or target in ALLOWED.get(part, set()):
                continue
            wrong.append(f"{path.relative_to(ROOT)}:{line} ({part}) imports {name}")
    assert not wrong, "\n".join(wrong)


def _family_modules() -> set[str]:
    names = {p.stem for p in (PACKAGE / "families").glob("*.py") if p.stem != "__init__"}
    return names | {"stylegan_sampling"}


@pytest.mark.parametrize("part", FAMILY_AGNOSTIC)
def test_engine_export_metrics_and_cli_know_families_only_through_the_registry(part: str) -> None:
    families = _family_modules()
    paths = [PACKAGE / f"{part}.py"] if (PACKAGE / f"{part}.py").exists() else list((PACKAGE / part).rglob("*.py"))
    if part == "export":  # converters read one family's foreign checkpoints by design
        paths = [p for p in paths if "converters" not in p.parts]
    found = []
    for path in paths:
        for name, line, _ in _imports(path):
            if name.rsplit(".", 1)[-1] in families:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
                if any(c in families for c in consts):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} compares with a family name")
    assert not found, "\n".join(found)
