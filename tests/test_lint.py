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
