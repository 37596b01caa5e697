"""The stats site against hostile requests, on Twisted's fakes (StubTreq, StringTransport, Clock).

Issue 13, items 14-19: header values that cannot be decoded, trickled or
oversized headers, request bodies, too many connections, pipelined requests
whose answers are never read, responses that grow with history.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from typing import Any, cast

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from eth_twisted.model import Message, Record, Totals
from eth_twisted.sinks.memory import MemorySink
from eth_twisted.web.limits import (
    ABORT_GRACE,
    MIN_PAGE_BYTES,
    GuardedChannel,
    GuardedSite,
    SiteLimits,
)
from eth_twisted.web.pages import MAX_PAYLOAD, PAGE_OVERHEAD, json_bytes, record_json
from tests.support.web import SlowRecord, server_fixture


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    """Every log event emitted during the test."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def failures(events: list[dict[str, Any]]) -> list[str]:
    """The format strings of the logged tracebacks."""
    return [str(e.get("log_format")) for e in events if e.get("log_failure") is not None]


# -- item 19: an Authorization header that is not UTF-8 ------------------------------------


@pytest.mark.parametrize(
    "value", [b"Bearer \xff\xfe", b"\xffearer tok", b"Bearer t\xf6k", b"Bearer \x80"]
)
def test_non_utf8_authorization_is_a_401_without_a_traceback(
    value: bytes, logged: list[dict[str, Any]]
) -> None:
    """An Authorization header that is not UTF-8 is an invalid token (401), never a 500 or a log line."""
    s = server_fixture(token="tok")
    reply = s.http.get("/api/stats", headers={b"Authorization": [value]})
    assert reply.code == 401, reply.body
    assert reply.json()["error"] == "unauthorized"
    assert failures(logged) == []


def test_token_is_compared_as_bytes() -> None:
    """A non-ASCII token matches its own UTF-8 bytes and nothing else (not its Latin-1 form)."""
    s = server_fixture(token="tök")
    good = s.http.get("/api/stats", headers={b"Authorization": [b"Bearer t\xc3\xb6k"]})
    assert good.code == 200
    latin1 = s.http.get("/api/stats", headers={b"Authorization": [b"Bearer t\xf6k"]})
    assert latin1.code == 401


# -- the channel on a StringTransport ---------------------------------------------------------


class Wire(StringTransport):
    """A StringTransport that ends like TCP: a close or an abort is followed by connectionLost.

    With ``buffer_limit`` it also fills like TCP: past that many unread bytes
    it pauses its producer, and :meth:`drain` (the peer reading) resumes it.
    ``reads=False`` is a peer that never reads: only an abort ends it.
    """

    def __init__(
        self, clock: Clock, host: str, *, reads: bool = True, buffer_limit: int | None = None
    ):
        address = (
            IPv6Address("TCP", host, 40000) if ":" in host else IPv4Address("TCP", host, 40000)
        )
        super().__init__(peerAddress=address, lenient=True)
        self.clock = clock
        self.reads = reads
        self.buffer_limit = buffer_limit
        self.full = False
        self.lost = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if (
            self.buffer_limit is not None
            and not self.full
            and len(self.value()) > self.buffer_limit
        ):
            self.full = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        """The peer reads everything written so far."""
        data = self.value()
        self.clear()
        if self.full:
            self.full = False
            self.producer.resumeProducing()
        return data

    def loseConnection(self) -> None:
        if not self.disconnecting and self.reads:
            self.clock.callLater(0, self._lost)
        super().loseConnection()

    def abortConnection(self) -> None:
        self.aborted = True
        super().loseConnection()
        self.clock.callLater(0, self._lost)

    def _lost(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone()))


def connect(s: Any, host: str = "10.0.0.1", **kw: Any) -> tuple[Any, Wire]:
    """A channel of the fixture's site on a fresh :class:`Wire` from ``host``."""
    wire = Wire(s.clock, host, **kw)
    channel = s.site.buildProtocol(wire.peerAddr)
    wire.protocol = channel
    channel.makeConnection(wire)
    return channel, wire


def statuses(data: bytes) -> list[int]:
    """Status codes of every answer in ``data``."""
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def error_of(data: bytes) -> dict[str, Any]:
    """The JSON body of the (last) answer in ``data``."""
    return cast(dict[str, Any], json.loads(data.rpartition(b"\r\n\r\n")[2]))


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


# -- item 14: a whole-request header deadline ---------------------------------------------------


def test_trickled_headers_are_cut_at_the_deadline_however_often_a_byte_arrives() -> None:
    """A byte every second does not extend the header deadline: 408 and close at header_timeout."""
    limits = SiteLimits(stats_header_timeout=10.0, idle_timeout=30.0)
    s = server_fixture(limits=limits)
    _channel, wire = connect(s)
    wire.protocol.dataReceived(b"GET /healthz HTTP/1.1\r\n")
    for byte in b"X-Slow: aaaaaaaa":
        s.clock.advance(0.6)
        wire.protocol.dataReceived(bytes([byte]))
    assert wire.value() == b"" and not wire.disconnecting
    s.clock.advance(10.0 - 16 * 0.6 - 0.01)
    assert wire.value() == b""
    s.clock.advance(0.02)
    assert statuses(wire.value()) == [408]
    assert error_of(wire.value())["error"] == "request-timeout"
    assert wire.disconnecting
    s.clock.advance(0)
    assert wire.lost and s.site.table.open == set()


def test_the_deadline_runs_per_request_from_its_first_byte() -> None:
    """On a kept-alive connection each request has its own deadline.

    Idle time between them is the idle timer's.
    """
    s = server_fixture(limits=SiteLimits(stats_header_timeout=10.0, idle_timeout=30.0))
    _channel, wire = connect(s)
    wire.protocol.dataReceived(HEALTHZ)
    assert statuses(wire.drain()) == [200]
    s.clock.advance(25.0)  # idle, below the idle timeout
    wire.protocol.dataReceived(b"GET /healthz HTTP/1.1\r\n")
    s.clock.advance(9.0)
    wire.protocol.dataReceived(b"Host: 127.0.0.1\r\n\r\n")
    assert statuses(wire.drain()) == [200]
    s.clock.advance(9.0)
    assert not wire.disconnecting


def test_a_silent_connection_is_closed_at_the_idle_timeout_without_a_log_line(
    logged: list[dict[str, Any]],
) -> None:
    """A connection that never sends a byte is closed after idle_timeout, and nothing is logged for it."""
    s = server_fixture(limits=SiteLimits(idle_timeout=30.0))
    _channel, wire = connect(s)
    s.clock.advance(29.9)
    assert not wire.disconnecting
    s.clock.advance(0.2)
    assert wire.disconnecting
    assert [e for e in logged if "Timing out" in str(e.get("log_format"))] == []
    assert [e for e in logged if "refused or cut" in str(e.get("log_format"))] == []
    assert s.site.table.refused["idle-timeout"] == 1


def test_a_peer_that_does_not_read_its_refusal_is_aborted() -> None:
    """After a refusal the peer has ABORT_GRACE seconds to read it, then the connection is aborted."""
    s = server_fixture(limits=SiteLimits(stats_header_timeout=1.0))
    _channel, wire = connect(s, reads=False)
    wire.protocol.dataReceived(b"G")
    s.clock.advance(1.0)
    assert statuses(wire.value()) == [408] and not wire.aborted
    s.clock.advance(ABORT_GRACE)
    assert wire.aborted
    s.clock.advance(0)
    assert s.site.table.open == set()


def test_refusals_are_logged_at_most_once_a_minute(logged: list[dict[str, Any]]) -> None:
    """A hundred trickling connections cut in one minute make one warning, with the counts."""
    s = server_fixture(
        limits=SiteLimits(
            stats_header_timeout=1.0, stats_max_per_ip=1000, stats_max_connections=1000
        )
    )
    for _ in range(100):
        _channel, wire = connect(s)
        wire.protocol.dataReceived(b"G")
    s.clock.advance(1.0)
    warnings = [e for e in logged if "refused or cut" in str(e.get("log_format"))]
    assert len(warnings) == 1
    assert s.site.table.refused["request-timeout"] == 100


# -- item 14: small header limits -------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (
            b"GET /healthz HTTP/1.1\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(60))
            + b"\r\n",
            431,
        ),
        (
            b"GET /healthz HTTP/1.1\r\n"
            + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 4000) for i in range(5))
            + b"\r\n",
            431,
        ),
        (b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    ],
)
def test_oversized_or_malformed_headers_get_a_json_error_and_close(
    request_bytes: bytes, status: int
) -> None:
    """Past the line, count or byte limit of the headers: 414/431 (400 when malformed), JSON, closed."""
    s = server_fixture()
    _channel, wire = connect(s)
    wire.protocol.dataReceived(request_bytes)
    assert statuses(wire.value()) == [status]
    assert error_of(wire.value())["error"] in ("uri-too-long", "headers-too-large", "bad-request")
    assert b"Content-Security-Policy: default-src 'self'" in wire.value()
    assert wire.disconnecting


def test_a_browser_sized_request_is_within_the_limits() -> None:
    """Twenty ordinary headers and a 4 KiB cookie are served."""
    s = server_fixture()
    _channel, wire = connect(s)
    headers = b"".join(b"X-Browser-%d: %s\r\n" % (i, b"v" * 60) for i in range(20))
    wire.protocol.dataReceived(
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + headers
        + b"Cookie: "
        + b"c" * 4096
        + b"\r\n\r\n"
    )
    assert statuses(wire.value()) == [200]


# -- item 15: bodies are refused at the headers -------------------------------------------------


@pytest.fixture
def spooled(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records every temporary file twisted.web opens for a request body."""
    import tempfile

    import twisted.web.http as twisted_http

    opened: list[int] = []
    real = tempfile.TemporaryFile

    def recording(*args: Any, **kw: Any) -> Any:
        opened.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(twisted_http.tempfile, "TemporaryFile", recording)
    return opened


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"POST /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 314572800\r\n\r\n", 405),
        (b"PUT /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n", 405),
        (b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\n", 413),
        (b"HEAD /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n", 413),
        (
            (
                b"POST /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 314572800\r\n"
                b"Expect: 100-continue\r\n\r\n"
            ),
            405,
        ),
    ],
)
def test_a_body_is_refused_at_its_headers_and_never_spooled(
    head: bytes, status: int, spooled: list[int]
) -> None:
    """A declared body gets 413 (405 for other methods) as soon as the headers end.

    Nothing is read or spooled.
    """
    s = server_fixture(token="tok")
    _channel, wire = connect(s)
    wire.protocol.dataReceived(head)
    assert statuses(wire.value()) == [status], wire.value()[:200]
    assert b"100 Continue" not in wire.value()
    assert wire.disconnecting
    wire.protocol.dataReceived(b"x" * 65536)  # whatever follows is dropped, not buffered
    assert spooled == []
    assert statuses(wire.value()) == [status]
    if status == 405:
        assert b"Allow: GET, HEAD" in wire.value()


def test_a_post_without_a_body_is_an_ordinary_405_on_a_kept_connection() -> None:
    """A method other than GET/HEAD without a body is answered 405 by the app; the connection stays."""
    s = server_fixture()
    _channel, wire = connect(s)
    wire.protocol.dataReceived(
        b"POST /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
    )
    assert statuses(wire.drain()) == [405]
    wire.protocol.dataReceived(HEALTHZ)
    assert statuses(wire.drain()) == [200]
    assert not wire.disconnecting


# -- item 14: connection caps -----------------------------------------------------------------


def test_at_the_per_address_cap_the_longest_waiting_connection_of_that_address_is_cut() -> None:
    """A new connection from an address at its cap cuts that address's oldest idle one; others keep theirs."""
    s = server_fixture(limits=SiteLimits(stats_max_connections=10, stats_max_per_ip=2))
    _a1, w1 = connect(s, "10.0.0.1")
    s.clock.advance(1)
    _a2, w2 = connect(s, "10.0.0.1")
    _b1, wb = connect(s, "10.0.0.2")
    _a3, w3 = connect(s, "10.0.0.1")
    assert (w1.aborted, w2.aborted, wb.aborted, w3.aborted) == (True, False, False, False)
    w3.protocol.dataReceived(HEALTHZ)
    assert statuses(w3.value()) == [200]
    s.clock.advance(0)
    assert len(s.site.table.open) == 3


def test_ipv6_peers_share_their_slash_64() -> None:
    """Two addresses in one IPv6 /64 count against one per-address cap."""
    s = server_fixture(limits=SiteLimits(stats_max_connections=10, stats_max_per_ip=1))
    _a, wa = connect(s, "2001:db8::1")
    _b, wb = connect(s, "2001:db8::2")
    _c, wc = connect(s, "2001:db8:0:1::1")
    assert (wa.aborted, wb.aborted, wc.aborted) == (True, False, False)


def test_at_the_global_cap_the_longest_waiting_connection_is_cut() -> None:
    """A new connection at max_connections cuts the connection that has waited longest without a request."""
    s = server_fixture(limits=SiteLimits(stats_max_connections=3, stats_max_per_ip=3))
    wires = []
    for i in range(3):
        wires.append(connect(s, f"10.0.1.{i}")[1])
        s.clock.advance(1)
    wires[0].protocol.dataReceived(HEALTHZ)  # answered: it waits again, now the newest waiter
    newcomer = connect(s, "10.0.2.1")[1]
    assert [w.aborted for w in wires] == [False, True, False]
    assert not newcomer.disconnecting


def test_when_every_connection_is_busy_a_new_one_gets_a_503() -> None:
    """Connections with a request in progress are never cut; a new one beyond the cap is refused 503."""
    s = server_fixture(
        record=SlowRecord(), limits=SiteLimits(stats_max_connections=2, stats_max_per_ip=2)
    )
    busy = [connect(s, "10.0.0.1")[1] for _ in range(2)]
    for wire in busy:
        wire.protocol.dataReceived(b"GET /api/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    refused = connect(s, "10.0.0.9")[1]
    assert statuses(refused.value()) == [503]
    assert b"Retry-After: 1" in refused.value()
    assert error_of(refused.value())["error"] == "busy"
    assert not any(w.aborted or w.disconnecting for w in busy)


def test_the_site_speaks_http_1_1_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even with the h2 package present, ALPN offers only http/1.1.

    HTTP/2 would bypass the channel's limits.
    """
    import twisted.web.http as twisted_http

    monkeypatch.setattr(twisted_http, "H2_ENABLED", True)
    site = server_fixture().site
    assert site.acceptableProtocols() == [b"http/1.1"]
    assert isinstance(site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1)), GuardedChannel)


# -- pipelined requests whose answers are never read ----------------------------------------------


def test_pipelined_requests_wait_while_the_peer_leaves_answers_unread() -> None:
    """With the write buffer full, queued requests are not parsed: the answers owed stay one at a time."""
    s = server_fixture()
    _channel, wire = connect(s, buffer_limit=4096)
    one = b"GET /api/openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    wire.protocol.dataReceived(one * 100)
    first = wire.value()
    assert len(statuses(first)) == 1
    answers = statuses(wire.drain())
    while len(answers) < 100:
        more = statuses(wire.drain())
        assert len(more) == 1, "one answer per drain: none is queued behind a full buffer"
        answers += more
    assert answers == [200] * 100
    assert not wire.disconnecting


def test_a_peer_that_never_reads_its_pipelined_answers_is_timed_out() -> None:
    """Requests held behind unread answers do not hold the connection open past the idle timeout."""
    s = server_fixture(limits=SiteLimits(idle_timeout=30.0))
    _channel, wire = connect(s, buffer_limit=4096)
    wire.protocol.dataReceived(b"GET /api/openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 50)
    s.clock.advance(30.1)
    assert wire.disconnecting


# -- item 16: pages bounded in bytes, read a few at a time ------------------------------------------


def escaped(i: int, size: int = 64 * 1024) -> Message:
    """A payload of control bytes: valid UTF-8 whose JSON is six times its size."""
    return Message.build(b"%08d" % i + b"\x01" * (size - 8), "10.0.0.1", 1000.0 + i)


def test_a_page_of_escaped_payloads_stops_at_the_byte_budget() -> None:
    """limit=200 of 64 KiB payloads that escape to 384 KiB each answers at most page_bytes.

    next_before pages through every record exactly once.
    """
    s = server_fixture()
    s.store([escaped(i) for i in range(40)])
    budget = SiteLimits().page_bytes
    seen: list[int] = []
    before: int | None = None
    pages = 0
    while True:
        reply = s.http.get("/api/messages?limit=200" + (f"&before={before}" if before else ""))
        assert reply.code == 200
        assert len(reply.body) <= budget, len(reply.body)
        page = reply.json()
        seen += [m["id"] for m in page["messages"]]
        pages += 1
        before = page["next_before"]
        if before is None:
            break
    assert seen == list(range(40, 0, -1))
    assert pages >= 40 * 6 * 64 * 1024 // budget


def test_a_record_longer_than_max_payload_is_cut_and_says_so() -> None:
    """A payload over MAX_PAYLOAD is shown up to it (never inside a UTF-8 character), with its whole size."""
    s = server_fixture()
    text = ("é" * (MAX_PAYLOAD // 2 + 10)).encode()  # two bytes each: the cut falls inside one
    binary = b"\xff" * (MAX_PAYLOAD * 4)
    small = b"short"
    s.store([Message.build(p, "10.0.0.1", 1.0) for p in (text, binary, small)])
    by_size = {m["size"]: m for m in s.http.get("/api/messages").json()["messages"]}
    cut_text = by_size[len(text)]
    assert cut_text["payload_truncated"] and cut_text["payload_encoding"] == "utf-8"
    assert cut_text["payload"] == "é" * (MAX_PAYLOAD // 2)
    cut_binary = by_size[len(binary)]
    assert cut_binary["payload_truncated"] and cut_binary["payload_encoding"] == "base64"
    assert base64.b64decode(cut_binary["payload"]) == b"\xff" * MAX_PAYLOAD
    assert by_size[5]["payload_truncated"] is False and by_size[5]["payload"] == "short"


def test_one_record_always_fits_a_page() -> None:
    """The worst-escaping record at MAX_PAYLOAD is under the smallest page budget.

    So paging always advances.
    """
    worst = record_json(
        Record(1, "0" * 64, b"\x01" * (4 * MAX_PAYLOAD), 2**63 - 1, "x" * 45, "\x02" * 255, 1.0)
    )
    assert len(json_bytes(worst)) + PAGE_OVERHEAD <= MIN_PAGE_BYTES
    with pytest.raises(ValueError, match="page_bytes"):
        SiteLimits(page_bytes=MIN_PAGE_BYTES - 1).check()
    s = server_fixture(limits=SiteLimits(page_bytes=MIN_PAGE_BYTES))
    s.store(
        [Message.build(b"\x01" * (4 * MAX_PAYLOAD), "10.0.0.1", 1.0) for _ in range(1)]
        + [
            Message.build(b"\x01" * (4 * MAX_PAYLOAD) + b"%d" % i, "10.0.0.1", 1.0)
            for i in range(2)
        ]
    )
    for before in ("", "?before=3", "?before=2"):
        reply = s.http.get("/api/messages" + before)
        assert len(reply.json()["messages"]) == 1
        assert len(reply.body) <= MIN_PAGE_BYTES


def test_block_records_are_paged_by_count_and_bytes() -> None:
    """/api/blocks/<n> pages with limit and after and covers every record.

    A page holds 50 records by default, at most page_bytes each.
    """
    s = server_fixture()
    s.store(
        [Message.build(b"%d" % i + b"\x01" * 60000, "10.0.0.1", 1.0, 7) for i in range(30)]
        + [Message.build(b"tiny-%d" % i, "10.0.0.2", 2.0, 7) for i in range(120)]
    )
    first = s.http.get("/api/blocks/7").json()
    assert first["limit"] == 50 and first["after"] is None
    assert len(s.http.get("/api/blocks/7").body) <= SiteLimits().page_bytes
    seen = [r["id"] for r in first["records"]]
    after = first["next_after"]
    while after is not None:
        reply = s.http.get(f"/api/blocks/7?limit=200&after={after}")
        assert reply.code == 200 and len(reply.body) <= SiteLimits().page_bytes
        page = reply.json()
        seen += [r["id"] for r in page["records"]]
        after = page["next_after"]
    assert seen == list(range(1, 151))
    assert s.http.get("/api/blocks/8").code == 404
    assert s.http.get("/api/blocks/7?after=150").json()["records"] == []


class CountingRecord(MemorySink):
    """A record whose reads wait until released, counting how many are in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Any] = []
        self.asked: list[int] = []

    def recent(self, limit: int, before: int | None = None) -> Any:
        from twisted.internet import defer

        self.asked.append(limit)
        d: defer.Deferred[Any] = defer.Deferred()
        self.waiting.append((d, super().recent(limit, before)))
        return d

    def release(self) -> None:
        d, rows = self.waiting.pop(0)
        rows.addCallback(d.callback)


def test_heavy_reads_wait_for_a_place() -> None:
    """At most heavy_requests record reads run at once; the others start as places free up."""
    record = CountingRecord()
    s = server_fixture(record=record, limits=SiteLimits(heavy_requests=2))
    pending = [s.http.start("/api/messages") for _ in range(5)]
    assert len(record.waiting) == 2
    record.release()
    assert len(record.waiting) == 2
    while record.waiting:
        record.release()
    assert [s.http.finish(d).code for d in pending] == [200] * 5


def test_an_abandoned_read_keeps_its_place_until_it_ends() -> None:
    """A request that times out during its read answers 503 at once, but keeps its place.

    Its place stays taken until the read (which a database thread cannot stop) ends: abandoned
    reads never pile up.
    """
    from eth_twisted.web.app import HANDLER_TIMEOUT

    record = CountingRecord()
    s = server_fixture(record=record, limits=SiteLimits(heavy_requests=1))
    first = s.http.start("/api/messages")
    s.clock.advance(HANDLER_TIMEOUT / 2)
    second = s.http.start("/api/messages")
    s.clock.advance(HANDLER_TIMEOUT / 2 + 0.1)
    assert s.http.finish(first).code == 503
    assert len(record.waiting) == 1  # the first's read still runs; the second has not started one
    record.release()  # the abandoned read ends: its place goes to the second
    assert len(record.waiting) == 1
    record.release()
    assert s.http.finish(second).code == 200


def test_a_request_that_times_out_waiting_for_a_place_never_reads() -> None:
    """A request still waiting for a place at its deadline is a 503 and gives up its turn unused."""
    from eth_twisted.web.app import HANDLER_TIMEOUT

    record = CountingRecord()
    s = server_fixture(record=record, limits=SiteLimits(heavy_requests=1))
    first = s.http.start("/api/messages")
    s.clock.advance(1.0)
    waiting = s.http.start("/api/messages")
    s.clock.advance(HANDLER_TIMEOUT)  # both deadlines pass; the first's read is still running
    assert s.http.finish(first).code == 503 and s.http.finish(waiting).code == 503
    record.release()  # the place is free, and nobody is left to take it
    assert record.waiting == [] and len(record.asked) == 1
    later = s.http.start("/api/messages")
    record.release()
    assert s.http.finish(later).code == 200 and len(record.asked) == 2


def test_a_large_page_is_encoded_in_pieces_between_reactor_turns() -> None:
    """Building a 1 MiB page gives the reactor turns: it is not finished before the clock runs."""
    s = server_fixture()
    s.store([escaped(i, 32 * 1024) for i in range(30)])
    d = s.http.start("/api/messages?limit=200")
    answered: list[Any] = []
    d.addCallback(lambda response: (answered.append(response), response)[1])
    assert answered == []
    reply = s.http.finish(d)
    assert reply.code == 200 and len(reply.json()["messages"]) >= 4


def test_chart_history_is_read_without_payloads() -> None:
    """The chart's 600 points of history come from payload-free summaries, never from whole records."""
    record = CountingRecord()
    for n in range(700):
        record.store_batch([Message.build(b"block %d" % n, "10.0.0.1", float(n), n)])
    s = server_fixture(record=record)
    s.stats.seed(Totals(records=700))
    d = s.http.start("/api/stats")
    chart = s.http.finish(d).json()["chart"]
    assert len(chart) == 600 and chart[-1] == [699.0, 699]
    assert record.asked == []  # recent(), which carries payloads, was never called


# -- item 18: /api/stats costs the same however many addresses were ever seen ----------------------


def test_stats_answers_cost_the_same_with_5000_addresses_as_with_10() -> None:
    """/api/stats is the cached encoded top-N snapshot, as cheap with 5,000 addresses as with 10.

    200 requests with 5,000 addresses seen take about as long as with 10 (measured in this test,
    as a ratio), and the answer stays small.
    """
    import time

    def fixture(addresses: int) -> Any:
        s = server_fixture()
        s.stats.seed(
            Totals(
                records=addresses,
                first_by_ip={f"10.1.{i // 256}.{i % 256}": 1 + i % 5 for i in range(addresses)},
            )
        )
        assert s.http.get("/api/stats").code == 200
        return s

    def run(s: Any) -> float:
        started = time.perf_counter()
        for _ in range(200):
            s.http.get("/api/stats")
        return time.perf_counter() - started

    few, many = fixture(10), fixture(5000)
    baseline = min(run(few) for _ in range(3))
    loaded = min(run(many) for _ in range(3))
    assert loaded < 3 * baseline, (loaded, baseline)
    body = many.http.get("/api/stats")
    assert len(body.body) < 64 * 1024
    assert body.json()["totals"]["clients"] == 5000 and len(body.json()["clients"]) == 20


# -- item 17: eth run's site has eth server's protections --------------------------------------


def run_options(*argv: str, environ: dict[str, str] | None = None) -> Any:
    from eth_twisted.cli.run import RunOptions

    config = RunOptions(environ=environ or {})
    config.parseOptions(list(argv))
    return config


def test_eth_run_defaults_to_the_loopback_host_allowlist_and_takes_the_token(tmp_path: Any) -> None:
    """eth run resolves the Host allowlist, the token and the listener limits as eth server does."""
    from eth_twisted.server.tap import Options as ServerOptions

    config = run_options("--data-dir", str(tmp_path))
    server = ServerOptions(environ={})
    server.parseOptions([])
    assert (
        config.site.stats_allowed_hosts
        == server.settings.site.stats_allowed_hosts
        == ["localhost", "127.0.0.1", "::1"]
    )
    assert config.site.stats_token is None and config.site.limits == SiteLimits()
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    config = run_options(
        "--stats-token-file",
        str(token_file),
        "--stats-allowed-hosts",
        "dash.example",
        "--stats-max-connections",
        "9",
        environ={"ETH_STATS_HEADER_TIMEOUT": "3"},
    )
    assert config.site.stats_token == "from-file"
    assert config.site.stats_allowed_hosts == ["dash.example"]
    assert config.site.limits == SiteLimits(stats_max_connections=9, stats_header_timeout=3.0)
    assert run_options(environ={"ETH_STATS_TOKEN": "env-token"}).site.stats_token == "env-token"
    assert run_options("--stats", "tcp:8080:interface=0.0.0.0").site.stats_allowed_hosts is None


def test_eth_run_site_refuses_a_rebound_host_and_needs_the_token(tmp_path: Any) -> None:
    """The site eth run serves answers 421 to a Host outside the allowlist and 401 without the token."""
    from twisted.application import service
    from twisted.internet.testing import MemoryReactorClock

    from eth_twisted.cli.run import RunService
    from eth_twisted.metrics import ClientMetrics, ServerMetrics
    from eth_twisted.web.stats import ServerStats
    from tests.support.web import Http

    class FakeServer(service.Service):
        def __init__(self) -> None:
            self.record = MemorySink()
            self.sinks = [self.record]
            self.stats = ServerStats(Clock())
            self.metrics = ServerMetrics()

    class FakeClient:
        metrics = ClientMetrics()

        def readiness(self) -> tuple[bool, dict[str, Any]]:
            return True, {}

    config = run_options("--data-dir", str(tmp_path), environ={"ETH_STATS_TOKEN": "run-token"})
    reactor = MemoryReactorClock()
    run = RunService(FakeServer(), lambda port: None, config.site, reactor, 1.0, io.StringIO())
    run.client = FakeClient()
    run._serve_site("tcp:0:interface=127.0.0.1")
    site = run.getServiceNamed("stats").factory
    assert isinstance(site, GuardedSite)
    http = Http(site)
    auth = {"Authorization": "Bearer run-token"}
    assert http.get("/api/stats", headers=auth).code == 200
    assert http.get("/api/stats").code == 401
    assert (
        http.get("/api/stats", headers=auth, base="http://rebound.attacker.test:8080").code == 421
    )
    assert http.get("/healthz", base="http://rebound.attacker.test:8080").code == 200
    assert "needs the stats token" in run.out.getvalue() and "run-token" not in run.out.getvalue()


def test_the_sites_factory_chatter_stays_out_of_the_console(logged: list[dict[str, Any]]) -> None:
    """eth's console drops the stats site's 'Starting factory' info line, as it did before the site moved."""
    from twisted.logger import LogLevel, PredicateResult

    from eth_twisted.cli.main import _drop_chatter

    site = server_fixture().site
    site.doStart()
    site.doStop()
    chatter = [e for e in logged if "factory" in str(e.get("log_format"))]
    assert chatter and all(_drop_chatter(e) is PredicateResult.no for e in chatter)
    warning = dict(chatter[0], log_level=LogLevel.warn)
    assert _drop_chatter(warning) is PredicateResult.maybe


@pytest.mark.parametrize("command", ["server", "client", "run"])
def test_a_site_on_the_network_without_allowlist_or_token_is_warned_about(command: str) -> None:
    """A stats listener beyond loopback with neither an allowlist nor a token gets a warning.

    The start-up warning names both fixes.
    """
    from eth_twisted.cli.run import RunOptions
    from eth_twisted.client import tap as client_tap
    from eth_twisted.server import tap as server_tap

    options = {"server": server_tap.Options, "client": client_tap.Options, "run": RunOptions}[
        command
    ]

    def warnings(*argv: str, environ: dict[str, str] | None = None) -> list[str]:
        config = options(environ=environ or {})
        config.parseOptions(["--stats", *argv])
        return [w for w in config.warnings if "DNS rebinding" in w]

    assert (
        warnings("tcp:8080:interface=0.0.0.0")
        and "--stats-allowed-hosts" in warnings("tcp:8080")[0]
    )
    assert warnings("tcp:8080:interface=127.0.0.1") == []
    assert warnings("tcp:8080:interface=0.0.0.0", "--stats-allowed-hosts", "dash.example") == []
    assert warnings("tcp:8080:interface=0.0.0.0", environ={"ETH_STATS_TOKEN": "t"}) == []
    assert warnings("none") == [] and warnings("unix:/run/eth/stats.sock") == []
