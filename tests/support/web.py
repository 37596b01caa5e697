"""Helpers for the web tests (no tests here): a synchronous StubTreq client and fake sinks."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

import treq
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.server import Site

from eth_twisted.errors import SinkUnavailable
from eth_twisted.link.netstring import NetstringDecoder, encode
from eth_twisted.link.payload import render_html
from eth_twisted.metrics import ClientMetrics, ServerMetrics
from eth_twisted.model import Message
from eth_twisted.sinks import StorageSettings
from eth_twisted.sinks.memory import MemorySink
from eth_twisted.web.app import SiteSettings
from eth_twisted.web.limits import SiteLimits
from eth_twisted.web.site import make_client_site, make_combined_site, make_server_site
from eth_twisted.web.stats import ServerStats
from tests.support import async_wait_until, free_port
from tests.support.live import start_server

BASE = "http://127.0.0.1:8080"


def fired(d: defer.Deferred[Any]) -> Any:
    """The result of a Deferred that must already have fired."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


@dataclass
class Reply:
    """A complete HTTP answer: status, headers (lowercase names), body."""

    code: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Http:
    """Requests through StubTreq, answered synchronously (advance ``clock`` for timeouts)."""

    def __init__(self, site: Site, clock: Clock | None = None) -> None:
        self.stub = StubTreq(site.resource)
        self.clock = clock

    def start(
        self,
        path: str,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        base: str = BASE,
    ) -> defer.Deferred[Any]:
        d = self.stub.request(method, base + path, headers=headers)
        self.stub.flush()
        return d

    def finish(self, d: defer.Deferred[Any]) -> Reply:
        """Flush (giving the clock zero-delay turns, as a reactor would) until the answer is in."""
        self.stub.flush()
        done: list[Any] = []
        d.addBoth(lambda result: (done.append(True), result)[1])
        turns = 0
        while not done and self.clock is not None and turns < 10_000:
            self.clock.advance(0)
            self.stub.flush()
            turns += 1
        response = fired(d)
        body = fired(response.content())
        headers = {
            k.decode().lower(): b", ".join(v).decode()
            for k, v in response.headers.getAllRawHeaders()
        }
        return Reply(response.code, headers, body)

    def get(
        self,
        path: str,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        base: str = BASE,
    ) -> Reply:
        return self.finish(self.start(path, method, headers, base))


class HangingSink:
    """A sink whose ping never answers."""

    name = "hanging"

    def ping(self) -> defer.Deferred[None]:
        return defer.Deferred()


class BrokenRecord(MemorySink):
    """A record whose reads raise an unexpected exception carrying a secret."""

    name = "broken"

    def recent(self, limit: int, before: int | None = None) -> Any:
        raise RuntimeError("mysql://eth:hunter2@db/eth exploded")

    def by_block(
        self, block_number: int, limit: int | None = None, after: int | None = None
    ) -> Any:
        return defer.fail(SinkUnavailable("broken", "password=hunter2 refused"))


class SlowRecord(MemorySink):
    """A record whose reads never answer."""

    def recent(self, limit: int, before: int | None = None) -> Any:
        return defer.Deferred()


def block_message(n: int, ip: str = "10.0.0.1", at: float = 1000.0) -> Message:
    """The html payload of block ``n`` as a message."""
    return Message.build(render_html(n), ip, at, n)


@dataclass
class ServerFixture:
    """A server site over a MemorySink with its stats, metrics and a Clock."""

    clock: Clock
    sink: MemorySink
    stats: ServerStats
    metrics: ServerMetrics
    site: Site
    http: Http

    def store(self, messages: list[Message]) -> list[Any]:
        """Store ``messages`` in the sink and feed the stats, like the router does."""
        outcomes = fired(self.sink.store_batch(messages))
        self.stats.observe(messages, outcomes)
        self.clock.advance(1.1)  # past the snapshot cache
        return outcomes


def server_fixture(
    record: MemorySink | None = None,
    sinks: list[Any] | None = None,
    token: str | None = None,
    allowed_hosts: list[str] | None = None,
    limits: SiteLimits | None = None,
) -> ServerFixture:
    """Build a server site on a Clock at t=10000."""
    clock = Clock()
    clock.advance(10_000)
    sink = record if record is not None else MemorySink()
    stats = ServerStats(clock)
    metrics = ServerMetrics()
    site = make_server_site(
        record=sink,
        sinks=sinks if sinks is not None else [sink],
        stats=stats,
        metrics=metrics,
        clock=clock,
        token=token,
        allowed_hosts=allowed_hosts,
        limits=limits,
    )
    return ServerFixture(clock, sink, stats, metrics, site, Http(site, clock))


def client_site(
    ready: bool | Exception = True, token: str | None = None
) -> tuple[Site, ClientMetrics, Clock]:
    """A client site whose readiness answers ``ready`` (or raises it)."""
    clock = Clock()
    metrics = ClientMetrics()

    def readiness() -> tuple[bool, dict[str, Any]]:
        if isinstance(ready, Exception):
            raise ready
        return ready, {"last_poll_age": 1.5, "link_up": ready}

    return (
        make_client_site(metrics=metrics, readiness=readiness, clock=clock, token=token),
        metrics,
        clock,
    )


def combined_site(client_ready: bool = True) -> tuple[Site, MemorySink, Clock]:
    """An ``eth run`` site over a MemorySink and a client whose readiness is ``client_ready``."""
    clock = Clock()
    sink = MemorySink()
    site = make_combined_site(
        record=sink,
        sinks=[sink],
        stats=ServerStats(clock),
        metrics=ServerMetrics(),
        client_metrics=ClientMetrics(),
        client_readiness=lambda: (client_ready, {"link_up": client_ready}),
        clock=clock,
    )
    return site, sink, clock


@defer.inlineCallbacks
def get(port: int, path: str, token: str | None = None) -> Any:
    """GET over real HTTP; fire with (status, decoded JSON or text)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = yield treq.get(f"http://127.0.0.1:{port}{path}", headers=headers, persistent=False)
    body = yield response.content()
    kind = response.headers.getRawHeaders(b"content-type", [b""])[0]
    if kind.startswith(b"application/json"):
        import json

        return response.code, json.loads(body)
    return response.code, body.decode()


def send_from(source: str, port: int, frames: list[bytes]) -> list[bytes]:
    """Blocking client from loopback address ``source``: send, half-close, read every reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(source, 0)) as s:
        s.sendall(b"".join(encode(f) for f in frames))
        s.shutdown(socket.SHUT_WR)
        decoder = NetstringDecoder(1 << 20)
        replies: list[bytes] = []
        while chunk := s.recv(65536):
            replies += decoder.feed(chunk)
        return replies


@defer.inlineCallbacks
def start_with_stats(storage: StorageSettings, **kw: Any) -> Any:
    """A real server with its stats site on a free loopback port; fire with (server, port, web)."""
    web = free_port()
    site = SiteSettings(
        stats=f"tcp:{web}:interface=127.0.0.1", stats_token=kw.pop("stats_token", None)
    )
    server, port = yield start_server(storage, site=site, **kw)
    yield async_wait_until(
        lambda: get(web, "/healthz").addCallback(lambda r: r[0] == 200),
        10,
        what="stats site to answer",
    )
    return server, port, web
