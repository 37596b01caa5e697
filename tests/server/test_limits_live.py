"""The bad-input battery against the real server on loopback sockets.

A well-behaved client on another loopback address (127.0.0.2: Linux routes
all of 127/8) keeps sending and must get OK for every message throughout.
"""

from __future__ import annotations

import resource
import socket
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import threads

from eth_twisted.link.netstring import NetstringDecoder, encode
from eth_twisted.model import sha256_hex
from eth_twisted.server.limits import ReceiverLimits
from tests.support.live import GoodClient, rss_kib, sqlite_storage, start_server

pytestmark = [pytest.mark.live, pytest.mark.slow]

LIMITS = ReceiverLimits(
    max_length=4096,
    frame_timeout=1.5,
    idle_timeout=12.0,
    write_stall=2.0,
    max_per_ip=40,
    max_connections=400,
    rate=20000.0,
    burst=20000,
)


def attack(
    port: int, data: bytes, read_for: float = 4.0, half_close: bool = False
) -> tuple[list[bytes], str]:
    """Send ``data`` from 127.0.0.1; return the replies and how the connection ended."""
    s = socket.create_connection(("127.0.0.1", port), timeout=read_for)
    try:
        if data:
            s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        decoder = NetstringDecoder(1 << 20)
        got: list[bytes] = []
        deadline = time.monotonic() + read_for
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return got, "reset"
            except TimeoutError:
                return got, "open"
            if not chunk:
                return got, "closed"
            got += decoder.feed(chunk)
        return got, "open"
    finally:
        s.close()


BATTERY: list[tuple[str, bytes, list[bytes] | None, str]] = [
    # (row, input, expected replies (None: check last only), expected end)
    ("01 probe", b"0:,", None, "open"),
    ("02 leading zero", b"1:a,007:abcdefg,", [b"a", b"ERR - bad-frame"], "closed"),
    ("03 signed length", b"-1:a,", [b"ERR - bad-frame"], "closed"),
    ("04 missing comma", b"3:abcX", [b"ERR - bad-frame"], "closed"),
    ("05 comma never arrives", b"3:abc", [], "reset"),
    ("06 partial length then silence", b"12", [], "reset"),
    ("07 max length", encode(b"m" * 4096), [b"m" * 4096], "open"),
    ("08 too long", b"4097:" + b"x" * 100, [b"ERR - too-long"], "closed"),
    ("08 ten-digit length", b"9999999999:", [b"ERR - too-long"], "closed"),
    ("11 garbage after frames", b"1:b,2:cc,xyz", [b"b", b"cc", b"ERR - bad-frame"], "closed"),
    ("12 trailing CRLF", b"1:d,\r\n", [b"d", b"ERR - bad-frame"], "closed"),
    ("13 binary payload", encode(b"\xff\x00\xfe"), [b"\xff\x00\xfe"], "open"),
    (
        "16 TLS ClientHello",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 32,
        [b"ERR - bad-frame"],
        "closed",
    ),
    ("17 HTTP request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", [b"ERR - bad-frame"], "closed"),
    ("17 NUL bytes", b"\x00" * 64, [b"ERR - bad-frame"], "closed"),
]


def expected_reply(item: bytes) -> bytes:
    if item.startswith(b"ERR - "):
        return item
    return b"OK " + sha256_hex(item).encode()


@pytest_twisted.inlineCallbacks
def test_battery_on_loopback_while_a_good_client_is_served(tmp_path: Path) -> None:
    """Every battery row ends as expected on real sockets, and the client on 127.0.0.2 gets OK throughout."""
    server, port = yield start_server(sqlite_storage(str(tmp_path / "s.sqlite3")), limits=LIMITS)
    good = GoodClient(port)
    good.start()
    try:
        for row, data, expected, end in BATTERY:
            got, how = yield threads.deferToThread(
                attack, port, data, 4.0 if end != "open" else 1.0
            )
            if expected is not None:
                assert got == [expected_reply(e) for e in expected], row
            else:
                assert got and got[-1].endswith(b" empty"), row
            assert how == end, f"{row}: connection {how}, expected {end}"
        # Row 9: payload shorter than declared, then FIN.
        got, how = yield threads.deferToThread(attack, port, b"10:abc", 3.0, True)
        assert (got, how) == ([b"ERR - truncated"], "closed")
        # Row 14: a duplicate is DUP.
        got, _ = yield threads.deferToThread(attack, port, encode(b"m" * 4096), 1.0)
        assert got == [b"DUP " + sha256_hex(b"m" * 4096).encode()]
    finally:
        yield good.finish()
        yield server.stopService()
    assert good.bad == [] and good.ok == good.sent and good.ok > 20
    errors = server.metrics.protocol_errors
    for reason in ("bad-frame", "too-long", "frame-timeout", "truncated"):
        assert errors.labels(reason=reason)._value.get() >= 1, reason


@pytest_twisted.inlineCallbacks
def test_slowloris_is_cut_by_the_frame_timer(tmp_path: Path) -> None:
    """Row 6: a byte every half second never completes a frame and is aborted after the frame timeout."""
    server, port = yield start_server(sqlite_storage(str(tmp_path / "s.sqlite3")), limits=LIMITS)

    def trickle() -> tuple[float, str]:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        started = time.monotonic()
        try:
            for byte in b"20:aaaaaaaaaaaaaaaaaaaa,":
                s.sendall(bytes([byte]))
                time.sleep(0.5)
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started, "cut"
        finally:
            s.close()
        return time.monotonic() - started, "completed"

    try:
        elapsed, how = yield threads.deferToThread(trickle)
    finally:
        yield server.stopService()
    assert how == "cut" and elapsed < 6


@pytest_twisted.inlineCallbacks
def test_peer_that_never_reads_is_bounded_and_dropped(tmp_path: Path) -> None:
    """Row 18: a peer that pipelines thousands of frames and never reads replies is paused, then aborted."""
    server, port = yield start_server(sqlite_storage(str(tmp_path / "s.sqlite3")), limits=LIMITS)

    def flood() -> tuple[str, float]:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.settimeout(0.5)
        chunk = b"0:," * 5000
        started = time.monotonic()
        try:
            while time.monotonic() - started < 30:
                try:
                    s.sendall(chunk)
                except TimeoutError:
                    continue  # the server stopped reading: keep pushing until it drops us
        except (BrokenPipeError, ConnectionResetError):
            return "cut", time.monotonic() - started
        finally:
            s.close()
        return "never cut", time.monotonic() - started

    before = rss_kib()
    try:
        how, elapsed = yield threads.deferToThread(flood)
        after = rss_kib()
    finally:
        yield server.stopService()
    assert how == "cut" and elapsed < 20
    assert server.metrics.protocol_errors.labels(reason="write-stall")._value.get() == 1
    assert after - before < 50_000


@pytest_twisted.inlineCallbacks
def test_connection_flood_caps_hold_and_others_are_served(tmp_path: Path) -> None:
    """Row 19: thousands of connections from one address hit the per-address cap.

    127.0.0.2 is still served.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
    server, port = yield start_server(
        sqlite_storage(str(tmp_path / "s.sqlite3")),
        limits=LIMITS,
        listen="tcp:0:interface=127.0.0.1:backlog=4096",
    )
    before = rss_kib()

    def flood(n: int) -> list[socket.socket]:
        held = []
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.3", 0))
            try:
                s.connect(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
        return held

    def served_by_server(socks: list[socket.socket]) -> int:
        """How many of the held sockets are still open after the server had time to refuse."""
        time.sleep(1.0)
        alive = 0
        for s in socks:
            s.setblocking(False)
            try:
                data = s.recv(1)
                alive += 0 if data == b"" else 1
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        return alive

    try:
        socks = yield threads.deferToThread(flood, 3000)
        alive = yield threads.deferToThread(served_by_server, socks)
        assert alive == LIMITS.max_per_ip
        assert len(socks) >= 2000
        refused = server.metrics.refused_connections.labels(reason="max-per-ip")._value.get()
        # The rest were reset by the kernel when the accept queue overflowed: never served either.
        assert refused >= 0.9 * (len(socks) - LIMITS.max_per_ip)
        good = GoodClient(port)
        good.start()
        yield threads.deferToThread(time.sleep, 1.0)
        yield good.finish(10)
        assert good.bad == [] and good.ok >= 10
        for s in socks:
            s.close()
        after = rss_kib()
    finally:
        yield server.stopService()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print(f"RSS before flood {before} KiB, after {after} KiB")
    assert after - before < 50_000
