"""Issue 13, items 1-5, against the real server on loopback sockets.

Each attack runs while a well-behaved client on 127.0.0.2 keeps sending and
must get OK for every message throughout (its socket times out after 10 s,
so a frozen reactor fails the test; nothing here times the server).
"""

from __future__ import annotations

import resource
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
import pytest_twisted
from twisted.internet import threads

from eth_twisted.link.netstring import NetstringDecoder, encode
from eth_twisted.model import sha256_hex
from eth_twisted.server.limits import ReceiverLimits
from eth_twisted.server.router import BatchSettings
from tests.support import async_wait_until, wait_until
from tests.support.live import GoodClient, mysql_storage, rss_kib, sqlite_storage, start_server

pytestmark = [pytest.mark.live, pytest.mark.slow]


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room for a few thousand sockets in this process (server and attackers both live here)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def sqlite(tmp_path: Path) -> dict[str, Any]:
    return sqlite_storage(tmp_path / "s.sqlite3")


def server_sockets_in(state: str, port: int) -> int:
    """Sockets on local ``port`` in TCP ``state`` (hex code of /proc/net/tcp, e.g. 08 = CLOSE_WAIT)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, st = fields[1], fields[3]
        if int(local.split(":")[1], 16) == port and st == state:
            count += 1
    return count


def two_read_client(port: int, payload: bytes, host: str = "127.0.0.3") -> bytes:
    """A frame sent in two writes 50 ms apart (every real network burst), then its reply."""
    frame = encode(payload)
    with socket.socket() as s:
        s.bind((host, 0))
        s.settimeout(15)
        s.connect(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(frame[: len(frame) // 2])
        time.sleep(0.05)
        s.sendall(frame[len(frame) // 2 :])
        decoder = NetstringDecoder(1024)
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return b"closed"
            got = decoder.feed(chunk)
            if got:
                return got[0]


@pytest_twisted.inlineCallbacks
def test_item1_a_backtracking_frame_does_not_freeze_the_server(tmp_path: Path) -> None:
    """64 KiB of '<title>' and repeated words is stored while others are served.

    That frame took minutes for the old regexes.
    """
    limits = ReceiverLimits(max_length=65536)
    server, port = yield start_server(sqlite(tmp_path), limits=limits)
    good = GoodClient(port)
    good.start()
    evil = (b"<title>" + b"ethereum block number " * 3000)[:65500]
    try:
        for _ in range(3):
            got = yield threads.deferToThread(
                two_read_client, port, evil + b"%f" % time.time(), "127.0.0.4"
            )
            assert got.startswith(b"OK ")
    finally:
        yield good.finish()
        yield server.stopService()
    assert good.bad == [] and good.ok == good.sent and good.ok > 0


def hold_partial_frames(
    port: int, addresses: int, per_address: int, held_bytes: int
) -> list[socket.socket]:
    """Connections from 127.0.1.10.. that each declare a 65,000-byte frame.

    Each sends ``held_bytes`` of it, in two steps.
    """
    held = []
    for i in range(addresses * per_address):
        s = socket.socket()
        s.bind((f"127.0.1.{10 + i % addresses}", 0))
        s.connect(("127.0.0.1", port))
        s.sendall(b"65000:" + b"z" * (held_bytes // 2))
        held.append(s)
    for s in held:  # frames that grow in steps: the second step finds most of them paused
        s.sendall(b"z" * (held_bytes - held_bytes // 2))
    return held


@pytest_twisted.inlineCallbacks
def test_item2_eleven_addresses_filling_the_budget_do_not_stall_anyone_else(
    tmp_path: Path,
    many_files: None,
) -> None:
    """440 large partial frames from 11 addresses fill their groups' shares; no one else stalls.

    A frame in two reads from another address is answered during the attack, and after it no
    socket is left in CLOSE-WAIT.
    """
    limits = ReceiverLimits(
        max_length=65536,
        partial_budget=4 * 1024 * 1024,
        frame_timeout=5.0,
        idle_timeout=30.0,
        max_per_ip=100,
        max_connections=2000,
    )
    server, port = yield start_server(
        sqlite(tmp_path), limits=limits, listen="tcp:0:interface=127.0.0.1:backlog=2048"
    )
    good = GoodClient(port)
    good.start()
    try:
        held = yield threads.deferToThread(hold_partial_frames, port, 11, 40, 16000)
        yield threads.deferToThread(
            wait_until,
            lambda: server.metrics.protocol_errors.labels(reason="partial-budget")._value.get() > 0,
            10,
            what="the groups' shares to fill",
        )
        for n in range(3):
            got = yield threads.deferToThread(two_read_client, port, b"during the attack %d" % n)
            assert got == b"OK " + sha256_hex(b"during the attack %d" % n).encode()
        for s in held:
            s.close()
        yield threads.deferToThread(
            wait_until,
            lambda: server_sockets_in("08", port) == 0 and server.factory.partial_bytes == 0,
            limits.frame_timeout * 3,
            what="every CLOSE-WAIT socket reaped and the budget drained",
        )
    finally:
        yield good.finish()
        yield server.stopService()
    assert good.bad == [] and good.ok == good.sent and good.ok > 0


@pytest_twisted.inlineCallbacks
def test_items2_3_a_full_budget_never_wedges_and_paused_peers_are_reaped(
    tmp_path: Path,
    many_files: None,
) -> None:
    """Attackers from 30 addresses fill the whole budget and hold on: nothing wedges.

    The oldest holder always reads, paused peers are cut by their frame timers, none stays in
    CLOSE-WAIT, and a frame in two reads is answered.
    """
    limits = ReceiverLimits(
        max_length=65536,
        partial_budget=1024 * 1024,
        frame_timeout=3.0,
        idle_timeout=30.0,
        max_per_ip=100,
        max_connections=2000,
    )
    server, port = yield start_server(
        sqlite(tmp_path), limits=limits, listen="tcp:0:interface=127.0.0.1:backlog=2048"
    )
    good = GoodClient(port)
    good.start()
    try:
        held = yield threads.deferToThread(hold_partial_frames, port, 30, 15, 16000)
        yield threads.deferToThread(
            wait_until,
            lambda: server.metrics.protocol_errors.labels(reason="partial-budget")._value.get() > 0,
            10,
            what="the budget to fill",
        )
        yield threads.deferToThread(
            wait_until,
            lambda: server.factory.partial_bytes == 0,
            limits.frame_timeout * 3,
            what="the frame timers to reap every holder, paused or not",
        )
        for s in held[: len(held) // 2]:
            s.close()  # half leave at once, half were cut already: nothing may linger
        yield threads.deferToThread(
            wait_until,
            lambda: server_sockets_in("08", port) == 0,
            limits.frame_timeout * 3,
            what="no socket left in CLOSE-WAIT",
        )
        for n in range(3):
            got = yield threads.deferToThread(two_read_client, port, b"after the attack %d" % n)
            assert got == b"OK " + sha256_hex(b"after the attack %d" % n).encode()
        for s in held[len(held) // 2 :]:
            s.close()
    finally:
        yield good.finish()
        yield server.stopService()
    assert good.bad == [] and good.ok == good.sent and good.ok > 0
    assert server.metrics.protocol_errors.labels(reason="frame-timeout")._value.get() >= 400


@pytest_twisted.inlineCallbacks
def test_item4_unread_replies_are_bounded_per_connection(tmp_path: Path, many_files: None) -> None:
    """200 peers write 64 KiB of probes in one burst and never read: the server's memory stays bounded."""
    limits = ReceiverLimits(
        max_length=65536,
        rate=1e9,
        burst=10**9,
        write_stall=60.0,
        idle_timeout=120.0,
        max_per_ip=1000,
        max_connections=2000,
    )
    server, port = yield start_server(
        sqlite(tmp_path), limits=limits, listen="tcp:0:interface=127.0.0.1:backlog=2048"
    )
    good = GoodClient(port)
    good.start()
    burst = b"0:," * 21845

    def attack() -> list[socket.socket]:
        held = []
        for _ in range(200):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.bind(("127.0.2.1", 0))
            s.connect(("127.0.0.1", port))
            s.sendall(burst)
            held.append(s)
        return held

    before = rss_kib()
    try:
        held = yield threads.deferToThread(attack)

        def stopped_reading() -> int:
            return sum(1 for p in server.factory.connections if p.paused & {"writes", "budget"})

        # Each connection reads its burst a turn at a time until its replies back up; on a
        # loaded machine that can take longer than the 2 s this once waited.
        yield threads.deferToThread(time.sleep, 2.0)
        yield async_wait_until(lambda: stopped_reading() >= 150, 30, 0.1, "reads paused")
        after = rss_kib()
        owed = max(len(p._slots) for p in server.factory.connections)
        paused = stopped_reading()
        print(
            "pauses:",
            sorted(Counter(tuple(sorted(p.paused)) for p in server.factory.connections).items()),
        )
        for s in held:
            s.close()
    finally:
        yield good.finish()
        yield server.stopService()
    print(
        f"RSS {before} -> {after} KiB for 200 connections ({(after - before) / 200:.0f} KiB each)"
    )
    assert good.bad == [] and good.ok == good.sent and good.ok > 0
    assert paused >= 150  # they stopped being read once their replies backed up
    assert owed <= 2 * limits.window
    # The old server queued ~1.7 MB of replies per connection (+340 MB here).
    assert after - before < 200 * 400


@pytest.fixture
def locked_table(mysql_db: dict[str, Any]) -> Iterator[Any]:
    """A second MariaDB session that can hold a write lock on ethereum_data (a database stall)."""
    conn = pymysql.connect(
        host=mysql_db["host"],
        port=mysql_db["port"],
        user=mysql_db["user"],
        password=mysql_db["password"],
        database=mysql_db["database"],
        autocommit=True,
    )
    yield conn
    conn.close()


@pytest_twisted.inlineCallbacks
def test_item5_a_slow_database_bounds_the_queue_in_bytes_and_drops_timed_out_copies(
    mysql_db: dict[str, Any],
    locked_table: Any,
    many_files: None,
) -> None:
    """With the record stalled, one read of tiny frames per connection stops at the window.

    The queue stays under its byte budget (busy past it), timed-out messages leave the queue, and
    all is stored once.
    """
    limits = ReceiverLimits(
        max_length=65536,
        window=64,
        deadline=3.0,
        idle_timeout=60.0,
        rate=1e9,
        burst=10**9,
        max_per_ip=1000,
    )
    server, port = yield start_server(
        mysql_storage(mysql_db),
        limits=limits,
        batch=BatchSettings(pending_budget=256 * 1024, batch_size=50),
    )  # two stalled batches of 50: the rest waits in the queue
    with locked_table.cursor() as c:
        c.execute("LOCK TABLES ethereum_data WRITE")
    peak = {"pending": 0, "bytes": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak["pending"] = max(peak["pending"], server.router.pending)
            peak["bytes"] = max(peak["bytes"], server.router.pending_bytes)
            time.sleep(0.005)

    def flood() -> list[list[bytes]]:
        socks = []
        for c in range(20):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            frames = b"".join(encode(b"c%02d m%05d " % (c, i) + b"p" * 200) for i in range(300))
            s.sendall(frames)  # one write: ~64 KiB of small frames
            socks.append(s)
        time.sleep(limits.deadline + 1.0)
        with locked_table.cursor() as cur:
            cur.execute("UNLOCK TABLES")
        answers = []
        for s in socks:
            decoder = NetstringDecoder(1024)
            got: list[bytes] = []
            while len(got) < 300:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += decoder.feed(chunk)
            answers.append(got)
            s.close()
        return answers

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        answers = yield threads.deferToThread(flood)
    finally:
        stop.set()
        watcher.join(5)
        yield server.stopService()
    codes = [
        a.split()[0] + (a.split()[-1] if a.startswith(b"ERR") else b"")
        for got in answers
        for a in got
    ]
    print(
        f"peak queue {peak['pending']} messages, {peak['bytes']} bytes; withdrawn "
        f"{server.metrics.withdrawn._value.get():.0f}; replies {sorted(set(codes))}"
    )
    assert len(codes) == 20 * 300
    assert peak["pending"] <= 20 * limits.window  # the window held within each read
    assert peak["bytes"] <= 256 * 1024  # the byte budget held
    assert server.metrics.withdrawn._value.get() > 0  # timed-out copies left the queue
    rows = {r[0] for r in _rows(mysql_db)}
    ok = {a.split()[1].decode() for got in answers for a in got if a.startswith((b"OK ", b"DUP "))}
    assert ok <= rows  # every OK/DUP is in SQL
    assert len(rows) == len(set(rows))


def _rows(db: dict[str, Any]) -> list[tuple[Any, ...]]:
    from tests.support.mysql import mysql_query

    return mysql_query(db, "SELECT hash FROM ethereum_data")
