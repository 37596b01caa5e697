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
from twisted.internet.protocol import Factory, Protocol

from eth_twisted.client.endpoints import RPCSettings
from eth_twisted.client.outbox import OutboxSettings
from eth_twisted.client.poller import PollSettings
from eth_twisted.client.service import ClientSettings, LinkSettings, make_client_service
from eth_twisted.link.handshake import AuthClientEndpoint
from eth_twisted.link.netstring import NetstringDecoder, encode
from eth_twisted.link.tls import client_tls_endpoint
from eth_twisted.model import MAX_CLIENT_ID, bounded, sha256_hex
from eth_twisted.server.service import ServerTLS
from eth_twisted.web.app import SiteSettings
from tests.support import async_wait_until
from tests.support.certs import issue_into, long_subject, make_pki
from tests.support.link import abort_all, silent_connections
from tests.support.live import mysql_storage, sqlite_storage, start_server
from tests.support.mysql import mysql_query

pytestmark = [pytest.mark.live, pytest.mark.slow]

SECRET = b"a shared secret of 32 bytes!!!!!"
VENV_BIN = Path(sys.executable).parent


def client_settings(tmp_path: Path, anvil: Any, link: LinkSettings) -> ClientSettings:
    """The client of these tests: anvil polled every 0.5 s, a spool in ``tmp_path``, no stats site."""
    settings = ClientSettings(
        link=link,
        rpc=RPCSettings(rpc=(anvil.url,)),
        poll=PollSettings(interval=0.5),
        outbox=OutboxSettings(spool=str(tmp_path / "spool.sqlite3")),
        site=SiteSettings(stats=None),
    )
    settings.check()
    return settings


def rows(path: Path) -> list[tuple[Any, ...]]:
    return (
        sqlite3.connect(path)
        .execute("SELECT block_number, client_id FROM ethereum_data ORDER BY block_number")
        .fetchall()
    )


@pytest_twisted.inlineCallbacks
def test_mtls_and_secret_end_to_end(tmp_path: Path, anvil: Any) -> None:
    """Over TLS with a client certificate and the HMAC handshake, every block arrives.

    Each block arrives with the client's name.
    """
    pki = make_pki(tmp_path / "pki")
    db = tmp_path / "server.sqlite3"
    server, port = yield start_server(
        sqlite_storage(str(db)),
        tls=ServerTLS(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca),
        secret=SECRET,
    )
    client = make_client_service(
        client_settings(
            tmp_path,
            anvil,
            LinkSettings(
                port=port,
                tls=True,
                tls_ca=pki.ca,
                tls_cert=pki.client.cert,
                tls_key=pki.client.key,
                secret=SECRET,
                client_name="edge-1",
            ),
        ),
        reactor=reactor,
    )
    client.startService()
    try:
        yield async_wait_until(
            lambda: len(rows(db)) >= 3 and client.outbox.depth() == 0,
            30,
            what="three blocks stored over the secured link",
        )
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
        sqlite_storage(str(db)),
        tls=ServerTLS(tls_cert=pki.server.cert, tls_key=pki.server.key),
        secret=SECRET,
    )
    client = make_client_service(
        client_settings(
            tmp_path,
            anvil,
            LinkSettings(
                port=port, tls=True, tls_ca=pki.ca, secret=b"another secret, also 32 bytes!!!"
            ),
        ),
        reactor=reactor,
    )
    client.startService()
    try:
        yield async_wait_until(
            lambda: client.outbox.depth() >= 2, 20, what="blocks waiting in the outbox"
        )
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
    proc = subprocess.run(
        [str(VENV_BIN / "eth"), "server", "--secret-file", str(secret)],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert b"plaintext" in proc.stderr


def test_cli_client_wrong_ca_fails_closed(tmp_path: Path) -> None:
    """`eth client --tls` with a CA file that does not exist is refused before anything runs."""
    proc = subprocess.run(
        [str(VENV_BIN / "eth"), "client", "--tls", "--tls-ca", str(tmp_path / "nope.pem")],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 2 and b"--tls-ca" in proc.stderr


class Replies(Protocol):
    """Collects the server's netstring replies."""

    def __init__(self) -> None:
        self.decoder = NetstringDecoder(1024)
        self.replies: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.replies += self.decoder.feed(data)


@pytest_twisted.inlineCallbacks
def test_mtls_client_with_a_long_subject_is_stored_in_mariadb(
    tmp_path: Path, mysql_db: dict[str, Any]
) -> Any:
    """A client certificate with a 300+ character subject: every message OK.

    Every message is stored with the bounded client_id.
    """
    pki = make_pki(tmp_path / "pki")
    client = issue_into(pki, "corporate-client", "unused", subject=long_subject())
    subject = long_subject().rfc4514_string()
    server, port = yield start_server(
        mysql_storage(mysql_db),
        tls=ServerTLS(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca),
    )
    try:
        endpoint = client_tls_endpoint(
            reactor, "127.0.0.1", port, ca_file=pki.ca, cert_file=client.cert, key_file=client.key
        )
        proto = yield endpoint.connect(Factory.forProtocol(Replies))
        payloads = [f"corporate block {n}".encode() for n in range(3)]
        proto.transport.write(b"".join(encode(p) for p in payloads))
        yield async_wait_until(lambda: len(proto.replies) == 3, 15, what="three replies")
        proto.transport.loseConnection()
    finally:
        yield server.stopService()
    assert proto.replies == [b"OK " + sha256_hex(p).encode() for p in payloads]
    rows = mysql_query(mysql_db, "SELECT payload, client_id FROM ethereum_data ORDER BY payload")
    expected = bounded(subject, MAX_CLIENT_ID)
    assert len(subject) > 300 and len(expected) == MAX_CLIENT_ID
    assert rows == [(p, expected) for p in payloads]


@pytest_twisted.inlineCallbacks
def test_eleven_silent_addresses_do_not_lock_out_the_secret(tmp_path: Path) -> Any:
    """The issue's attack at default limits: the right secret still gets OK.

    The attack is 11 addresses x 100 silent TLS connections.
    """
    pki = make_pki(tmp_path / "pki")
    db = tmp_path / "server.sqlite3"
    server, port = yield start_server(
        sqlite_storage(str(db)),
        tls=ServerTLS(tls_cert=pki.server.cert, tls_key=pki.server.key),
        secret=SECRET,
    )
    hosts = [f"127.0.0.{n}" for n in range(2, 13)]
    silent = yield silent_connections(port, hosts, 100, pki=pki)
    try:
        errors = server.metrics.protocol_errors
        yield async_wait_until(
            lambda: all(c.handshaken or c.lost for c in silent),
            60,
            what="every silent connection through its TLS handshake",
        )
        endpoint = AuthClientEndpoint(
            client_tls_endpoint(reactor, "127.0.0.1", port, ca_file=pki.ca),
            SECRET,
            "edge-1",
            reactor,
        )
        proto = yield endpoint.connect(Factory.forProtocol(Replies))
        proto.transport.write(encode(b"past the silent crowd"))
        yield async_wait_until(lambda: proto.replies, 15, what="the reply")
        assert proto.replies == [b"OK " + sha256_hex(b"past the silent crowd").encode()]
        assert errors.labels(reason="auth-busy")._value.get() == 0
        assert errors.labels(reason="auth-evicted")._value.get() == 11 * (100 - 64)
        proto.transport.loseConnection()
    finally:
        abort_all(silent)
        yield server.stopService()
    assert rows(db)[0][1] == "edge-1"
