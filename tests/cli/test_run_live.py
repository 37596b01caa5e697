"""`eth run`: server and client in one process on the embedded defaults."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port, wait_until

pytestmark = [pytest.mark.live, pytest.mark.slow]

VENV_BIN = Path(sys.executable).parent


def test_eth_run_against_anvil(tmp_path: Path, anvil: Any) -> None:
    """eth run reports its data, dashboard and blocks, dodges a taken port and stops on Ctrl-C.

    It prints where its data lives, the dashboard URL and one line per stored block, takes a
    free port when its own is taken, and stops cleanly on Ctrl-C.
    """
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy_port = taken.getsockname()[1]
    stats_port = free_port()
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "eth"),
            "run",
            "--rpc",
            anvil.url,
            "--interval",
            "0.5",
            "--port",
            str(busy_port),
            "--stats",
            f"tcp:{stats_port}:interface=127.0.0.1",
            "--data-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env=dict(os.environ),
    )
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(raw.decode() for raw in proc.stdout), daemon=True
    )  # type: ignore[union-attr]
    reader.start()
    try:
        wait_until(
            lambda: sum("stored block" in line for line in lines) >= 3,
            30,
            what="three stored-block lines",
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/api/stats", timeout=5) as r:
            assert r.status == 200
        # DNS rebinding: a page whose name now points at 127.0.0.1 sends its own Host, and is refused.
        rebound = urllib.request.Request(
            f"http://127.0.0.1:{stats_port}/api/stats",
            headers={"Host": f"rebound.attacker.test:{stats_port}"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(rebound, timeout=5)
        assert refused.value.code == 421
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        reader.join(5)
        taken.close()
    text = "".join(lines)
    assert proc.returncode == 0, text
    assert f"port {busy_port} is taken; using a free port" in text
    assert str(tmp_path / "eth-server.sqlite3") in text
    assert str(tmp_path / "eth-client-spool.sqlite3") in text
    assert f"dashboard at http://127.0.0.1:{stats_port}/" in text
    assert "Starting factory" not in text
    stored = [int(line.split()[2]) for line in lines if line.startswith("stored block")]
    assert stored == list(range(stored[0], stored[0] + len(stored)))
    rows = (
        sqlite3.connect(tmp_path / "eth-server.sqlite3")
        .execute("SELECT block_number FROM ethereum_data ORDER BY block_number")
        .fetchall()
    )
    assert [r[0] for r in rows][: len(stored)] == stored


def test_eth_run_site_needs_its_token(tmp_path: Path, anvil: Any) -> None:
    """With ETH_STATS_TOKEN, eth run's API answers 401 without it and 200 with it.

    The token is not printed.
    """
    stats_port = free_port()
    env = dict(os.environ, ETH_STATS_TOKEN="run-secret-token")
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "eth"),
            "run",
            "--rpc",
            anvil.url,
            "--interval",
            "0.5",
            "--port",
            str(free_port()),
            "--stats",
            f"tcp:{stats_port}:interface=127.0.0.1",
            "--data-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env=env,
    )
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(raw.decode() for raw in proc.stdout), daemon=True
    )  # type: ignore[union-attr]
    reader.start()
    url = f"http://127.0.0.1:{stats_port}/api/stats"
    try:
        wait_until(
            lambda: any("dashboard at" in line for line in lines), 30, what="the dashboard line"
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=5)
        assert refused.value.code == 401
        authorised = urllib.request.Request(
            url, headers={"Authorization": "Bearer run-secret-token"}
        )
        with urllib.request.urlopen(authorised, timeout=5) as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        reader.join(5)
    text = "".join(lines)
    assert proc.returncode == 0, text
    assert "needs the stats token" in text and "run-secret-token" not in text
