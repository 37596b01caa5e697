"""The stats site of a real server (SQLite, loopback port) attacked with raw sockets.

Issue 13, items 14-19, live: every attack runs while a well-behaved client on
another loopback address keeps getting ``/healthz`` answered.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sqlite3
import threading
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads

from eth_twisted.link.netstring import NetstringDecoder
from eth_twisted.model import sha256_hex
from eth_twisted.sinks.sql.migrations import migrate_sqlite
from eth_twisted.web.app import SiteSettings
from eth_twisted.web.limits import SiteLimits
from tests.support import async_wait_until, free_port
from tests.support.live import sqlite_storage, start_server
from tests.support.web import send_from

pytestmark = pytest.mark.live

TOKEN = "live-token"


def raw_request(port: int, data: bytes, source: str = "127.0.0.1", timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes (or the timeout)."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    ) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
        return b"".join(chunks)


def status_of(answer: bytes) -> int:
    """The status code of a raw HTTP answer (0 when there is none)."""
    if not answer.startswith(b"HTTP/1."):
        return 0
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> Any:
    """The JSON body of a raw HTTP answer."""
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def get(port: int, path: str, source: str = "127.0.0.2", token: str | None = None) -> int:
    """A well-behaved one-shot GET from ``source``; its status."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n".encode()
    return status_of(raw_request(port, request, source))


@defer.inlineCallbacks
def start_site(tmp_path: Path, **kw: Any) -> Any:
    """A real server on SQLite with its stats site (token required); fire with (server, web port)."""
    web = free_port()
    storage = sqlite_storage(tmp_path / "eth-server.sqlite3")
    site = SiteSettings(
        stats=f"tcp:{web}:interface=127.0.0.1",
        stats_token=TOKEN,
        limits=kw.pop("stats_limits", None) or SiteLimits(),
    )
    server, _port = yield start_server(storage, site=site, **kw)
    yield async_wait_until(
        lambda: threads.deferToThread(get, web, "/healthz").addCallback(lambda c: c == 200),
        10,
        what="stats site to answer",
    )
    return server, web


@pytest_twisted.inlineCallbacks
def test_non_utf8_authorization_is_a_401_live(tmp_path: Path):
    """A raw request whose Authorization is not UTF-8 gets 401; the site keeps serving."""
    server, web = yield start_site(tmp_path)
    try:
        request = (
            b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe\xfd\r\n"
            b"Connection: close\r\n\r\n"
        )
        answer = yield threads.deferToThread(raw_request, web, request)
        assert status_of(answer) == 401, answer[:200]
        assert body_of(answer)["error"] == "unauthorized"
        assert (yield threads.deferToThread(get, web, "/api/stats", token=TOKEN)) == 200
        assert (yield threads.deferToThread(get, web, "/healthz")) == 200
    finally:
        yield server.stopService()


class GoodClient:
    """A well-behaved client on 127.0.0.2: GET /healthz every 0.1 s in a thread until finished.

    It makes at least one request, and :meth:`finish` waits for the thread without blocking
    the reactor: the server runs in this process, so a request in flight can only be answered
    while the reactor turns.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self.took: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                self.statuses.append(get(self.port, "/healthz"))
            except OSError as e:
                self.errors.append(repr(e))
                self.statuses.append(0)
            self.took.append(round(time.monotonic() - started, 3))
            if self._stop.wait(0.1):
                return

    def start(self) -> GoodClient:
        """Start asking, in a thread of its own."""
        self._thread.start()
        return self

    def finish(self) -> defer.Deferred[None]:
        """Stop after the request in flight; fires once the thread has ended."""
        self._stop.set()
        return threads.deferToThread(self._thread.join, 30)

    def report(self) -> tuple[Any, ...]:
        """What it saw: statuses, errors and seconds per request."""
        return Counter(self.statuses), self.errors, self.took

    def all_answered(self) -> bool:
        """Every request it made was answered 200."""
        return bool(self.statuses) and set(self.statuses) == {200} and not self._thread.is_alive()


@pytest_twisted.inlineCallbacks
def test_good_client_stopped_mid_request_still_gets_its_answer_live(tmp_path: Path):
    """The probe the tests below rely on, stopped while its request waits for the reactor.

    Its answer still arrives: finishing it must not block the reactor the server runs on
    (a blocking join left the request unanswered until a 10 s timeout: status 0 or none).
    """
    server, web = yield start_site(tmp_path)
    site = site_of(server)
    build = site.buildProtocol
    good = GoodClient(web)
    finished: list[defer.Deferred[None]] = []

    def finish_on_its_first_connection(addr: Any) -> Any:
        if addr.host == "127.0.0.2" and not finished:
            finished.append(good.finish())  # the request is in flight: not yet read
        return build(addr)

    site.buildProtocol = finish_on_its_first_connection
    try:
        good.start()
        yield async_wait_until(lambda: bool(finished), 10, what="the probe's connection")
        yield finished[0]
        assert good.statuses == [200], good.report()
    finally:
        yield server.stopService()


def site_of(server: Any) -> Any:
    """The GuardedSite a server's stats listener serves."""
    return server.getServiceNamed("stats").factory


def open_fds() -> int:
    """Descriptors this process holds."""
    return len(os.listdir("/proc/self/fd"))


def trickle(
    port: int, sources: list[str], per_source: int, every: float, seconds: float
) -> dict[str, Any]:
    """Open connections from each source, send a request line, then one header byte every ``every`` s.

    Returns how many the server still held open after ``seconds``, the
    statuses it answered, and how many connects it accepted at all.
    """
    socks: list[socket.socket] = []
    for source in sources:
        for _ in range(per_source):
            try:
                s = socket.create_connection(
                    ("127.0.0.1", port), timeout=5, source_address=(source, 0)
                )
            except OSError:
                continue
            s.sendall(b"GET /healthz HTTP/1.1\r\n")
            s.setblocking(False)
            socks.append(s)
    alive = set(socks)
    answers: dict[socket.socket, bytes] = {s: b"" for s in socks}
    started = time.monotonic()
    while alive and time.monotonic() - started < seconds:
        for s in list(alive):
            try:
                s.send(b"X")
            except OSError:
                alive.discard(s)
        until = time.monotonic() + every
        while alive and time.monotonic() < until:
            readable, _, _ = select.select(list(alive), [], [], max(0.0, until - time.monotonic()))
            for s in readable:
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if data:
                    answers[s] += data
                else:
                    alive.discard(s)
    result = {
        "connected": len(socks),
        "still_open": len(alive),
        "statuses": Counter(status_of(a) for a in answers.values()),
    }
    for s in socks:
        s.close()
    return result


@pytest_twisted.inlineCallbacks
def test_trickling_connections_are_cut_and_capped_live(tmp_path: Path):
    """200 connections trickling header bytes are all closed within the header deadline.

    They come from 20 addresses, a byte every 0.3 s; the site never holds more than its cap,
    and /healthz from elsewhere keeps answering.
    """
    limits = SiteLimits(stats_max_connections=64, stats_max_per_ip=16, stats_header_timeout=1.5)
    server, web = yield start_site(tmp_path, stats_limits=limits)
    table = site_of(server).table
    peak: list[int] = [0]
    sampler = task.LoopingCall(lambda: peak.__setitem__(0, max(peak[0], len(table.open))))
    sampler.start(0.05)
    fds_before = open_fds()
    fds_peak: list[int] = [0]
    fd_sampler = task.LoopingCall(lambda: fds_peak.__setitem__(0, max(fds_peak[0], open_fds())))
    fd_sampler.start(0.1)
    try:
        good = GoodClient(web).start()
        try:
            sources = [f"127.0.1.{i}" for i in range(1, 21)]
            result = yield threads.deferToThread(trickle, web, sources, 10, 0.3, 6.0)
        finally:
            yield good.finish()
        assert result["connected"] == 200
        assert result["still_open"] == 0, result
        assert result["statuses"][408] >= 1, result
        assert peak[0] <= 64
        # Descriptors (the sockets of both ends live in this process): the attacker's 200 plus at
        # most the site's 64, never 400.
        assert fds_peak[0] - fds_before <= 200 + 64 + 16, (fds_before, fds_peak[0])
        assert good.all_answered(), (*good.report(), dict(site_of(server).table.refused))
    finally:
        sampler.stop()
        fd_sampler.stop()
        yield server.stopService()


def silent_connections(port: int, source: str, n: int, hold: float) -> int:
    """Open ``n`` silent connections from ``source``; after ``hold`` s, how many the server still holds."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        socks.append(s)
    time.sleep(hold)
    alive = 0
    for s in socks:
        s.setblocking(False)
        try:
            alive += s.recv(1) == b"" and 0 or 1
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
        s.close()
    return alive


@pytest_twisted.inlineCallbacks
def test_silent_connections_from_one_address_are_held_to_its_cap_live(tmp_path: Path):
    """300 silent connections from one address leave it 16 places; /healthz from another address answers."""
    server, web = yield start_site(
        tmp_path, stats_limits=SiteLimits(stats_max_per_ip=16, stats_max_connections=64)
    )
    try:
        good = GoodClient(web).start()
        try:
            alive = yield threads.deferToThread(silent_connections, web, "127.0.0.1", 300, 1.0)
        finally:
            yield good.finish()
        assert alive == 16
        assert len(site_of(server).table.open) <= 16 + 1
        assert good.all_answered(), (*good.report(), dict(site_of(server).table.refused))
    finally:
        yield server.stopService()


def deleted_temp_files() -> int:
    """Descriptors of this process on unlinked files (where twisted.web spools request bodies)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").endswith("(deleted)")
        except OSError:
            pass
    return count


def send_body(port: int, head: bytes, body_bytes: int) -> tuple[bytes, bytes]:
    """Send ``head``, read the answer before any body, then push ``body_bytes`` anyway."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head)
        try:
            early = s.recv(65536)
        except TimeoutError:
            early = b""
        late = b""
        try:
            s.sendall(b"x" * body_bytes)
            late = s.recv(65536)
        except OSError:
            pass
        return early, late


@pytest.mark.parametrize(("method", "status"), [("POST", 405), ("GET", 413)])
@pytest_twisted.inlineCallbacks
def test_a_large_body_is_refused_before_it_is_sent_live(tmp_path: Path, method: str, status: int):
    """A request declaring 300 MiB is answered at its headers, before any body byte.

    Nothing is spooled.
    """
    server, web = yield start_site(tmp_path)
    try:
        spooled_before = deleted_temp_files()
        head = (
            f"{method} /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {300 * 1024 * 1024}\r\n\r\n"
        ).encode()
        good = GoodClient(web).start()
        try:
            early, _late = yield threads.deferToThread(send_body, web, head, 8 * 1024 * 1024)
            assert deleted_temp_files() <= spooled_before
        finally:
            yield good.finish()
        assert status_of(early) == status, early[:300]
        assert body_of(early)["error"] in ("method-not-allowed", "body-not-allowed")
        assert good.all_answered(), (*good.report(), dict(site_of(server).table.refused))
    finally:
        yield server.stopService()


def queued_bytes(channel: Any) -> int:
    """Bytes a channel's TCP transport holds unsent (twisted.internet.abstract.FileDescriptor's buffers)."""
    t = channel.transport
    return len(t.dataBuffer) - t.offset + t._tempDataLen


def pipeline_without_reading(port: int, requests: int, wait: float, report: Any) -> int:
    """Pipeline ``requests`` GETs, read nothing for ``wait`` s, call ``report()``, then read every answer."""
    one = b"GET /static/dashboard.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        s.sendall(one * requests)
        time.sleep(wait)
        threads.blockingCallFromThread(reactor, report)
        got = b""
        while got.count(b"HTTP/1.1 200 OK") < requests:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        return got.count(b"HTTP/1.1 200 OK")


@pytest_twisted.inlineCallbacks
def test_pipelined_requests_behind_unread_answers_cost_one_answer_live(tmp_path: Path):
    """500 pipelined requests from a peer that reads nothing leave about one answer queued, not 500.

    Once it reads, every one is answered.
    """
    server, web = yield start_site(tmp_path)
    site = site_of(server)
    one_answer = len((resources.files("eth_twisted.web") / "static" / "dashboard.js").read_bytes())
    built: list[Any] = []
    build = site.buildProtocol
    site.buildProtocol = lambda addr: built.append(build(addr)) or built[-1]
    queued: list[int] = []
    try:
        answered = yield threads.deferToThread(
            pipeline_without_reading,
            web,
            500,
            1.5,
            lambda: queued.append(sum(queued_bytes(c) for c in built if c.transport is not None)),
        )
        assert answered == 500
        assert queued and queued[0] <= 64 * 1024 + 2 * one_answer, (queued, one_answer)
    finally:
        yield server.stopService()


def fetch(port: int, path: str) -> tuple[int, bytes]:
    """GET ``path`` with the token (HTTP/1.0: the body ends at close); (status, body)."""
    request = (
        f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
    )
    answer = raw_request(port, request, "127.0.0.3", timeout=30)
    return status_of(answer), answer.partition(b"\r\n\r\n")[2]


def heartbeats(port: int, stop: threading.Event) -> list[bytes]:
    """A well-behaved netstring client on 127.0.0.2: one probe at a time until ``stop``; its replies."""
    replies: list[bytes] = []
    with socket.create_connection(
        ("127.0.0.1", port), timeout=15, source_address=("127.0.0.2", 0)
    ) as s:
        decoder = NetstringDecoder(1 << 16)
        while not stop.is_set():
            s.sendall(b"0:,")
            got: list[bytes] = []
            while not got:
                got = decoder.feed(s.recv(4096))
            replies += got
            stop.wait(0.05)
    return replies


@pytest_twisted.inlineCallbacks
def test_twenty_parallel_pages_of_escaped_payloads_stay_bounded_live(tmp_path: Path):
    """Twenty parallel pages of 6x-escaping payloads each stay within one page budget.

    200 stored 64 KiB payloads, asked for by 20 clients at once with limit=200: every answer
    is at most one page budget, paging reaches every record, and ingest keeps answering.
    """
    server, web = yield start_site(tmp_path)
    port = server.port.getHost().port
    payloads = [b"%08d" % i + b"\x01" * (64 * 1024 - 8) for i in range(200)]
    replies = yield threads.deferToThread(send_from, "127.0.0.1", port, payloads)
    assert [r.split()[0] for r in replies] == [b"OK"] * 200
    budget = SiteLimits().page_bytes
    stop = threading.Event()
    probes = threads.deferToThread(heartbeats, port, stop)
    try:
        good = GoodClient(web).start()
        try:
            answers = yield defer.gatherResults(
                [threads.deferToThread(fetch, web, "/api/messages?limit=200") for _ in range(20)]
            )
        finally:
            yield good.finish()
        stop.set()
        probe_replies = yield probes
        for status, body in answers:
            assert status == 200 and len(body) <= budget, (status, len(body))
        first = json.loads(answers[0][1])
        assert first["next_before"] is not None and 0 < len(first["messages"]) < 200
        seen = [m["id"] for m in first["messages"]]
        before = first["next_before"]
        while before is not None:
            status, body = yield threads.deferToThread(
                fetch, web, f"/api/messages?limit=200&before={before}"
            )
            page = json.loads(body)
            seen += [m["id"] for m in page["messages"]]
            before = page["next_before"]
        assert len(seen) == len(set(seen)) == 200
        assert probe_replies and all(r.startswith(b"ERR e3b0c442") for r in probe_replies)
        assert good.all_answered(), (*good.report(), dict(site_of(server).table.refused))
    finally:
        stop.set()
        yield server.stopService()


def seed_addresses(path: Path, ipv4: int, ipv6_hosts: int) -> None:
    """Rows from ``ipv4`` IPv4 addresses and ``ipv6_hosts`` hosts of one IPv6 /64, into SQLite."""
    migrate_sqlite(str(path))
    addresses = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(ipv4)]
    addresses += [f"2001:db8:5::{i + 1:x}" for i in range(ipv6_hosts)]
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO ethereum_data (hash, payload, block_number, client_ip, client_id, received_at)"
            " VALUES (?, ?, NULL, ?, NULL, ?)",
            [
                (sha256_hex(b"from %d" % i), b"from %d" % i, ip, 1_700_000_000.0 + i)
                for i, ip in enumerate(addresses)
            ],
        )


@pytest_twisted.inlineCallbacks
def test_stats_of_5000_addresses_are_the_top_20_and_a_count_live(tmp_path: Path):
    """/api/stats over 5,000 IPv4 addresses and 300 hosts of one IPv6 /64 stays a few kilobytes.

    It lists the 20 busiest groups and a count of 5,001; 20 clients polling it hard do not
    stop a netstring client's probes being answered.
    """
    seed_addresses(tmp_path / "eth-server.sqlite3", 5000, 300)
    server, web = yield start_site(tmp_path)
    port = server.port.getHost().port
    try:

        def seeded() -> Any:
            return threads.deferToThread(fetch, web, "/api/stats").addCallback(
                lambda r: (
                    json.loads(r[1]) if json.loads(r[1])["totals"]["records"] == 5300 else None
                )
            )

        stats = yield async_wait_until(seeded, 15, what="stats seeded from SQL")
        assert stats["totals"]["clients"] == 5001
        assert len(stats["clients"]) == 20 and stats["clients_omitted"] == 4981
        assert stats["clients"][0] == {
            "ip": "2001:db8:5::/64",
            "records": 300,
            "messages": 300,
            "latest_block": None,
            "last_seen": None,
        }
        status, body = yield threads.deferToThread(fetch, web, "/api/stats")
        assert status == 200 and len(body) < 64 * 1024

        def hammer() -> Counter[int]:
            codes: Counter[int] = Counter()
            until = time.monotonic() + 2.0
            while time.monotonic() < until:
                codes[fetch(web, "/api/stats")[0]] += 1
            return codes

        stop = threading.Event()
        probes = threads.deferToThread(heartbeats, port, stop)
        results = yield defer.gatherResults([threads.deferToThread(hammer) for _ in range(8)])
        stop.set()
        probe_replies = yield probes
        codes = sum(results, Counter())
        assert set(codes) == {200} and codes[200] > 20, codes
        assert probe_replies and all(r.startswith(b"ERR e3b0c442") for r in probe_replies)
    finally:
        yield server.stopService()


@pytest_twisted.ensureDeferred
async def test_stats_connections_send_without_nagle() -> None:
    """Each connection the stats site accepts has TCP_NODELAY: a small answer is not held.

    Twisted's HTTPChannel sets it; this keeps it so should the channel ever change.
    """
    from twisted.web.resource import Resource

    from eth_twisted.web.limits import GuardedSite

    site = GuardedSite(Resource(), SiteLimits(), reactor)
    channels: list[Any] = []
    build = site.buildProtocol

    def recording(addr: Any) -> Any:
        channel = build(addr)
        channels.append(channel)
        return channel

    site.buildProtocol = recording  # type: ignore[method-assign]
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        await async_wait_until(lambda: channels and channels[0].transport is not None)
        handle = channels[0].transport.getHandle()
        assert handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        client.close()
        await port.stopListening()
