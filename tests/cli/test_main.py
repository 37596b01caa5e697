"""The ``eth`` command itself (eth_twisted/cli/main.py): what it does with a closed pipe."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from eth_twisted.cli.main import EXIT_BROKEN_PIPE


@pytest.mark.parametrize("argv", [["server", "--help"], ["--help"], ["--version"]])
def test_closed_stdout_ends_quietly_without_a_traceback(argv: list[str]) -> None:
    """`eth ... | head` with the reader gone: exit 141, and nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first write: EPIPE every time
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "eth_twisted.cli.main", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (EXIT_BROKEN_PIPE, "")


def test_help_to_an_open_pipe_is_unchanged() -> None:
    """With a reader, --help prints the usage and exits 0, as before."""
    proc = subprocess.run(
        [sys.executable, "-m", "eth_twisted.cli.main", "server", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("eth ") and proc.stderr == ""
