"""The server reaches Redis over TLS, verifying its certificate (--redis-tls-ca)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from eth_twisted.errors import SinkError
from eth_twisted.model import Message, Outcome
from eth_twisted.sinks.redis import RedisSettings, make_redis_sink
from tests.support import free_port, wait_for_port
from tests.support.certs import PKI, make_pki

pytestmark = pytest.mark.live


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, PKI]]:
    """A private redis-server speaking only TLS, with a certificate for localhost."""
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed: run scripts/test"
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
            "--tls-cert-file",
            pki.server.cert,
            "--tls-key-file",
            pki.server.key,
            "--tls-ca-cert-file",
            pki.ca,
            "--tls-auth-clients",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port, 10)
        yield port, pki
    finally:
        proc.kill()
        proc.wait(10)


@pytest_twisted.inlineCallbacks
def test_redis_over_verified_tls(tls_redis: tuple[int, PKI]) -> None:
    """With the right CA the sink stores over TLS; with another CA it refuses to talk at all."""
    port, pki = tls_redis
    sink = make_redis_sink(
        RedisSettings(
            redis_host="localhost",
            redis_port=port,
            redis_prefix="tls:",
            redis_tls_ca=pki.ca,
            redis_timeout=3.0,
        ),
        reactor=reactor,
    )
    yield sink.start()
    try:
        outcomes = yield sink.store_batch([Message.build(b"over tls", "10.0.0.1", 1.0)])
        assert outcomes == [Outcome.STORED]
    finally:
        yield sink.stop()
    impostor = make_redis_sink(
        RedisSettings(
            redis_host="localhost",
            redis_port=port,
            redis_prefix="tls:",
            redis_tls_ca=pki.other_ca,
            redis_timeout=2.0,
        ),
        reactor=reactor,
    )
    with pytest.raises(SinkError):
        yield impostor.start()
    yield impostor.stop()
