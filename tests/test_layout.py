"""The package's layout rules (CONTRIBUTING.md, docs/architecture.md), read from the code's own imports."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "eth_twisted"
MAX_LINES = 700
"""No module grows past this: split it by concern first (docs/architecture.md)."""

FORBIDDEN = {
    "client": {"server", "cli"},
    "server": {"client", "cli"},
    "link": {"client", "server", "sinks", "web", "cli"},
    "sinks": {"link", "server", "web", "client", "cli"},
    "web": {"server", "client", "link", "cli"},
}
"""Folder -> the folders it may never import (the data path, drawn as imports)."""

ROOT_MAY_IMPORT = {"testing": {"client"}}
"""Root modules sit below every folder; only the shipped fakes reach up (to the client's outbox types)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, top_level_only: bool = False) -> set[str]:
    """Every ``eth_twisted`` module ``path`` imports (only those at module level with ``top_level_only``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("eth_twisted")
        ):
            found.add(node.module)
            for (
                alias
            ) in node.names:  # "from eth_twisted.link import tls" imports the module link.tls
                candidate = f"{node.module}.{alias.name}"
                if (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists():
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("eth_twisted")}
    return found


def folder_of(module: str) -> str:
    """``client`` for eth_twisted.client.rpc, ``(root)`` for eth_twisted.model."""
    parts = module.split(".")
    if len(parts) >= 2 and (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return "(root)"


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_rules_read_the_whole_package() -> None:
    """The checks below see every folder of the layout (a typo in a rule would check nothing)."""
    assert {folder_of(m) for m in MODULES} == {
        "(root)",
        "cli",
        "client",
        "link",
        "server",
        "sinks",
        "web",
    }
    assert len(MODULES) > 40


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folders_never_import_across_the_data_path(folder: str) -> None:
    """client/ and server/ never import each other.

    sinks/, link/ and web/ never reach the parts above them.
    """
    crossings = sorted(
        f"{module} imports {target}"
        for module, path in MODULES.items()
        if folder_of(module) == folder
        for target in imports_of(path)
        if folder_of(target) in FORBIDDEN[folder]
    )
    assert crossings == []


def test_root_modules_import_no_folder() -> None:
    """model, errors, interfaces, options, metrics, systemd, outage sit below every folder."""
    crossings = sorted(
        f"{module} imports {target}"
        for module, path in MODULES.items()
        if folder_of(module) == "(root)" and module != "eth_twisted"
        for target in imports_of(path)
        if folder_of(target) != "(root)"
        and folder_of(target) not in ROOT_MAY_IMPORT.get(module.split(".")[-1], set())
    )
    assert crossings == []


def test_no_import_cycles() -> None:
    """No module imports, at import time, a module that imports it back (directly or around a loop)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in MODULES.items():
        graph[module] = {
            t for t in imports_of(path, top_level_only=True) if t in MODULES and t != module
        }
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert cycles == []


def test_no_module_is_over_the_size_limit() -> None:
    """Every module stays under about 700 lines."""
    sizes = {
        module: len(path.read_text(encoding="utf-8").splitlines())
        for module, path in MODULES.items()
    }
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}


def test_the_checks_catch_a_crossing(tmp_path: Path) -> None:
    """The import reader sees from-imports, module imports and function-level imports alike."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from eth_twisted.server.router import Router\n"
        "import eth_twisted.client.rpc\n"
        "def f():\n    from eth_twisted.link import tls\n"
    )
    found = imports_of(probe)
    assert {"eth_twisted.server.router", "eth_twisted.client.rpc", "eth_twisted.link.tls"} <= found
    assert imports_of(probe, top_level_only=True) == {
        "eth_twisted.server.router",
        "eth_twisted.client.rpc",
    }
