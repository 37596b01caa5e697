"""The sender against a real loopback server that answers with a burst of garbage: bounded work, one line."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogLevel, globalLogPublisher

from eth_twisted.client.outbox import Cursor, OutboxSettings, open_outbox
from eth_twisted.client.sender import DeliveryService
from eth_twisted.link.netstring import encode
from eth_twisted.link.payload import render_html
from eth_twisted.metrics import ClientMetrics
from tests.support import async_wait_until

pytestmark = [pytest.mark.live]


class Garbage(Protocol):
    """Answers the first bytes it gets with 20,000 replies outside the protocol, in one write."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(encode(b"ack:nonsense") * 20_000)  # type: ignore[union-attr]


@pytest_twisted.inlineCallbacks
def test_garbage_burst_from_a_real_server_is_one_protocol_error(tmp_path: Any) -> Any:
    """A server writing 20,000 invalid replies at once costs the client one protocol error per connection."""
    port = reactor.listenTCP(0, Factory.forProtocol(Garbage), interface="127.0.0.1")  # type: ignore[attr-defined]
    outbox = open_outbox(OutboxSettings(spool=str(tmp_path / "spool.sqlite3")), clock=reactor)
    outbox.append([(render_html(7), 7)], Cursor(1, "0xg", 7, "0xh"))
    metrics = ClientMetrics(CollectorRegistry())
    link = DeliveryService(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
        outbox,
        clock=reactor,
        metrics=metrics,
        retry_policy=lambda attempt: 0.2,
    )
    errors: list[Any] = []

    def observe(event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if (
            "DeliveryService" in str(event.get("log_namespace"))
            and level is not None
            and level >= LogLevel.error
        ):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    link.startService()
    try:

        def invalid() -> float:
            return (
                metrics.registry.get_sample_value("eth_client_replies_total", {"kind": "invalid"})
                or 0
            )

        yield async_wait_until(
            lambda: metrics.registry.get_sample_value("eth_client_reconnects_total") >= 3,
            timeout=20,
            what="three connections",
        )
        connections = metrics.registry.get_sample_value("eth_client_reconnects_total")
        assert 1 <= invalid() <= connections
        assert len(errors) <= connections
        assert outbox.depth() == 1
    finally:
        globalLogPublisher.removeObserver(observe)
        yield link.stopService()
        yield port.stopListening()
        outbox.close()
