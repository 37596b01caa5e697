"""The code stays as clean as it was written: ruff and mypy (with the zope plugin) report nothing."""

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
    proc = subprocess.run([str(BIN / "ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_mypy_reports_nothing() -> None:
    """`mypy eth_twisted` finds no type error."""
    proc = subprocess.run([str(BIN / "mypy"), "eth_twisted"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
