"""The code stays as clean as it was written: ruff (lint and format) and mypy report nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_ruff_reports_nothing() -> None:
    """`ruff check .` passes on the whole tree."""
    proc = subprocess.run(
        [str(BIN / "ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_ruff_format_changes_nothing() -> None:
    """`ruff format --check .` finds every file already formatted."""
    proc = subprocess.run(
        [str(BIN / "ruff"), "format", "--check", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_mypy_reports_nothing() -> None:
    """`mypy eth_twisted` finds no type error."""
    proc = subprocess.run(
        [str(BIN / "mypy"), "eth_twisted"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _inherited_hooks(cls: type) -> set[str]:
    """Names a Twisted or zope base class, or an interface ``cls`` implements, already documents."""
    from zope.interface import implementedBy

    names: set[str] = set()
    for base in cls.__mro__[1:]:
        if base.__module__.split(".")[0] in ("twisted", "zope"):
            names.update(vars(base))
    for interface in implementedBy(cls).flattened():
        names.update(interface.names(all=True))
    return names


def undocumented(cls: type) -> list[str]:
    """The public methods (and properties) ``cls`` defines without a docstring of their own.

    A method that overrides a hook of a Twisted or zope base class (``dataReceived``,
    ``startService``, ``buildProtocol``) or that an implemented interface declares is
    documented there, and is exempt.
    """
    import inspect

    hooks = _inherited_hooks(cls)
    missing = []
    for name, value in vars(cls).items():
        if name.startswith("_") or name in hooks:
            continue
        function = value.fget if isinstance(value, property) else value
        if isinstance(function, (staticmethod, classmethod)):
            function = function.__func__
        if inspect.isfunction(function) and not inspect.getdoc(function):
            missing.append(name)
    return missing


def undocumented_public_methods(package: str = "eth_twisted") -> list[str]:
    """``module.Class.method`` for each public method of a public class with no docstring."""
    import importlib
    import inspect
    import pkgutil

    root = importlib.import_module(package)
    missing = []
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and not name.startswith("_"):
                missing += [f"{module.__name__}.{name}.{m}" for m in undocumented(cls)]
    return missing


def test_every_public_method_has_a_docstring() -> None:
    """Every public method says what it does, unless it is a hook Twisted or zope documents."""
    assert undocumented_public_methods() == []


def test_the_docstring_check_sees_a_missing_docstring_and_exempts_hooks() -> None:
    """The check finds an undocumented method and property, and not a Twisted hook or an interface's."""
    from twisted.internet.interfaces import IPushProducer
    from twisted.internet.protocol import Protocol
    from zope.interface import implementer

    @implementer(IPushProducer)
    class Probe(Protocol):
        def dataReceived(self, data: bytes) -> None:
            pass

        def pauseProducing(self) -> None:
            pass

        def speak(self) -> None:
            pass

        def told(self) -> None:
            """Documented."""

        @property
        def loud(self) -> bool:
            return True

    assert undocumented(Probe) == ["speak", "loud"]


def test_pre_commit_runs_the_same_checks() -> None:
    """`.pre-commit-config.yaml` is valid and runs what this file runs (ruff, format, mypy, docstrings)."""
    import yaml

    config = ROOT / ".pre-commit-config.yaml"
    proc = subprocess.run(
        [str(BIN / "pre-commit"), "validate-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    hooks = {
        h["id"]: h["entry"] for r in yaml.safe_load(config.read_text())["repos"] for h in r["hooks"]
    }
    assert hooks["ruff"].startswith(".venv/bin/ruff check")
    assert hooks["ruff-format"].startswith(".venv/bin/ruff format")
    assert hooks["mypy"].endswith("mypy eth_twisted")
    assert "tests/test_lint.py -k docstring" in hooks["docstrings"]
