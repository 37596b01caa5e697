"""The whole link secured end to end: eth server and eth client with TLS, mTLS and the shared secret."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from eth_twisted.client import make_client_service
from tests.certs import make_pki
from tests.live_helpers import start_server
from tests.support import async_wait_until

pytestmark = [pytest.mark.live, pytest.mark.slow]

SECRET = b"a shared secret of 32 bytes!!!!!"
VENV_BIN = Path(sys.executable).parent


def rows(path: Path) -> list[tuple[Any, ...]]:
    return sqlite3.connect(path).execute(
        "SELECT block_number, client_id FROM ethereum_data ORDER BY block_number").fetchall()


@pytest_twisted.inlineCallbacks
def test_mtls_and_secret_end_to_end(tmp_path: Path, anvil: Any) -> None:
    """Over TLS with a client certificate and the HMAC handshake, every block arrives with the client's name."""
    pki = make_pki(tmp_path / "pki")
    db = tmp_path / "server.sqlite3"
    server, port = yield start_server(
        {"migrate": True, "sqlite": str(db)},
        tls={"cert": pki.server.cert, "key": pki.server.key, "client_ca": pki.ca},
        secret=SECRET,
    )
    client = make_client_service(
        reactor=reactor, connect=f"tcp:host=127.0.0.1:port={port}", rpc_urls=[anvil.url],
        spool=str(tmp_path / "spool.sqlite3"), interval=0.5,
        tls={"host": "127.0.0.1", "port": port, "ca": pki.ca, "cert": pki.client.cert, "key": pki.client.key},
        secret=SECRET, client_name="edge-1",
    )
    client.startService()
    try:
        yield async_wait_until(lambda: len(rows(db)) >= 3 and client.outbox.depth() == 0, 30,
                               what="three blocks stored over the secured link")
    finally:
        yield client.stopService()
        yield server.stopService()
    stored = rows(db)
    numbers = [n for n, _ in stored]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    assert {cid for _, cid in stored} == {"edge-1"}


@pytest_twisted.inlineCallbacks
def test_wrong_secret_delivers_nothing(tmp_path: Path, anvil: Any) -> None:
    """A client with the wrong secret never gets a message stored; its outbox keeps them."""
    pki = make_pki(tmp_path / "pki")
    db = tmp_path / "server.sqlite3"
    server, port = yield start_server(
        {"migrate": True, "sqlite": str(db)},
        tls={"cert": pki.server.cert, "key": pki.server.key}, secret=SECRET,
    )
    client = make_client_service(
        reactor=reactor, connect=f"tcp:host=127.0.0.1:port={port}", rpc_urls=[anvil.url],
        spool=str(tmp_path / "spool.sqlite3"), interval=0.5,
        tls={"host": "127.0.0.1", "port": port, "ca": pki.ca}, secret=b"another secret, also 32 bytes!!!",
    )
    client.startService()
    try:
        yield async_wait_until(lambda: client.outbox.depth() >= 2, 20, what="blocks waiting in the outbox")
        assert not client.delivery.connected
    finally:
        yield client.stopService()
        yield server.stopService()
    assert rows(db) == []
    errors = server.metrics.protocol_errors
    assert errors.labels(reason="auth-bad-proof")._value.get() >= 1


def test_cli_refuses_secret_over_plaintext(tmp_path: Path) -> None:
    """`eth server` with a secret but no TLS refuses to start, naming the way out."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    proc = subprocess.run([str(VENV_BIN / "eth"), "server", "--secret-file", str(secret)],
                          capture_output=True, timeout=60)
    assert proc.returncode == 2
    assert b"plaintext" in proc.stderr


def test_cli_client_wrong_ca_fails_closed(tmp_path: Path) -> None:
    """`eth client --tls` with a CA file that does not exist is refused before anything runs."""
    proc = subprocess.run([str(VENV_BIN / "eth"), "client", "--tls", "--tls-ca", str(tmp_path / "nope.pem")],
                          capture_output=True, timeout=60)
    assert proc.returncode == 2 and b"--tls-ca" in proc.stderr
