"""Imports flow one way: model <- engine <- dataplane/sources <- agent/cli (README "Design").

Read from the source (every import statement, also those inside functions), so a loop between
folders is caught before anything runs. A new top-level module or package must be given its
place in LAYERS."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "kube_network_policies"

# What each part of the package may import from the package (besides itself).
LAYERS: dict[str, set[str]] = {
    "errors": set(),
    "model": {"errors"},
    "metrics": {"errors"},  # a leaf: the dataplane's worker uses its PacketMetrics
    "httpserver": {"errors"},
    "engine": {"errors", "model"},
    "dataplane": {"errors", "model", "engine", "metrics"},
    "sources": {"errors", "model", "engine"},
    "endpoints": {"errors", "metrics", "httpserver"},
    "explain": {"errors", "model", "engine", "sources"},
    "control": {"errors", "model", "engine", "dataplane", "sources", "metrics"},
    "agent": {"errors", "model", "engine", "dataplane", "sources", "metrics", "httpserver", "endpoints", "control"},
}
# The command and the lab may import anything; only the command may import the lab.
OUTER = {"__init__", "__main__", "cli", "lab"}


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_parts(path: Path) -> set[str]:
    """The parts of the package that `path` imports (absolute or relative imports)."""
    here = path.relative_to(PACKAGE.parent).with_suffix("").parts  # ("kube_network_policies", ...)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level]
                names = [".".join((*base, node.module)) if node.module else ".".join(base)]
                if not node.module:
                    names = [f"{names[0]}.{alias.name}" for alias in node.names]
            elif node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        for name in names:
            parts = name.split(".")
            if parts[0] == "kube_network_policies" and len(parts) > 1:
                found.add(parts[1])
    return found


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_part_has_a_place() -> None:
    parts = {part_of(p) for p in modules()}
    assert parts - set(LAYERS) - OUTER == set(), "give new parts of the package their place in LAYERS"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_one_way(path: Path) -> None:
    part = part_of(path)
    if part in OUTER:
        if part != "cli":
            assert part == "lab" or "lab" not in imported_parts(path), f"{path.name} imports the lab"
        return
    wrong = imported_parts(path) - LAYERS[part] - {part}
    assert not wrong, f"{path.relative_to(PACKAGE)} ({part}) imports {sorted(wrong)}, which may not be imported from {part}"


def test_public_class_names_are_unique() -> None:
    """Two public classes with one name (an Agent here and another there) make every import,
    log line and traceback ambiguous."""
    where: dict[str, list[str]] = {}
    for path in modules():
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                where.setdefault(node.name, []).append(str(path.relative_to(PACKAGE)))
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}
