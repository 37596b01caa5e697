"""The server service's start-up: sinks retried until they answer, each outage logged once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from eth_twisted.interfaces import IRecord
from eth_twisted.model import Message, Outcome
from eth_twisted.server.service import ServerSettings, assemble_server
from eth_twisted.sinks.memory import MemorySink
from eth_twisted.web.app import SiteSettings


@implementer(IRecord)
class SlowToStart(MemorySink):
    """A record whose first ``failures`` start attempts fail like an unreachable database."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.attempts = 0

    def start(self) -> defer.Deferred[None]:
        self.attempts += 1
        if self.attempts <= self.failures:
            return defer.fail(ConnectionRefusedError("connection refused"))
        return super().start()

    def store_batch(
        self, messages: Sequence[Message], verdicts: Sequence[Outcome] | None = None
    ) -> Any:
        return super().store_batch(messages, verdicts)


SETTINGS = ServerSettings(listen="tcp:0:interface=127.0.0.1", site=SiteSettings(stats=None))


def _lines(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [
        (e["log_level"].name, e.get("log_format", ""))
        for e in events
        if e.get("log_namespace", "").startswith("eth_twisted.server.service")
        and e["log_level"].name in ("error", "warn", "info")
    ]


def test_a_sink_outage_at_start_is_logged_once_when_it_starts_and_once_when_it_ends() -> None:
    """Ten failed attempts give one error line and one recovery line, not ten errors."""
    reactor = MemoryReactorClock()
    record = SlowToStart(failures=10)
    server = assemble_server(SETTINGS, record=record, reactor=reactor)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        server.startService()
        for _ in range(12):
            reactor.advance(30)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert server.ready and record.attempts == 11
    lines = _lines(events)
    assert [level for level, _ in lines if level == "error"] == ["error"]
    assert any("started after" in text for level, text in lines if level == "info")
    server.stopService()


def test_stopping_while_waiting_to_retry_ends_the_wait_at_once() -> None:
    """A stop between attempts does not wait out the backoff (up to 30 s)."""
    reactor = MemoryReactorClock()
    record = SlowToStart(failures=100)
    server = assemble_server(SETTINGS, record=record, reactor=reactor)
    server.startService()
    reactor.advance(1)
    reactor.advance(2)
    assert record.attempts == 3
    stopped = server.stopService()
    reactor.advance(0)
    assert stopped.called
    assert not [c for c in reactor.getDelayedCalls() if c.active()]
