"""The real server on a loopback port with real sinks, driven by raw socket clients."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pymysql
import pytest
import pytest_twisted
from twisted.internet import defer

from eth_twisted.link.payload import render_html
from eth_twisted.model import EMPTY_SHA256, sha256_hex
from tests.support import (
    ROOT,
    async_wait_until,
    free_port,
    redis_command,
    redis_host_for,
    wait_for_port,
    wait_until,
)
from tests.support.live import (
    exchange,
    exchange_in_thread,
    mysql_storage,
    sqlite_storage,
    start_server,
)
from tests.support.mysql import mysql_query

pytestmark = pytest.mark.live

VENV_BIN = Path(sys.executable).parent


def ok(payload: bytes) -> bytes:
    return b"OK " + sha256_hex(payload).encode()


def dup(payload: bytes) -> bytes:
    return b"DUP " + sha256_hex(payload).encode()


def redis_cmd(port: int, *args: str) -> Any:
    """One blocking command against the Redis on ``port`` (the shared one's host, or loopback)."""
    return redis_command(redis_host_for(port), port, *args)


@pytest_twisted.inlineCallbacks
def test_sqlite_seed_style_half_closed_client(tmp_path: Path) -> None:
    """A client that sends one frame and half-closes (the seed, `nc -N`) gets OK, then DUP on resend."""
    path = tmp_path / "eth-server.sqlite3"
    server, port = yield start_server(sqlite_storage(str(path)))
    try:
        page = render_html(19000000)
        assert (yield exchange_in_thread(port, [page])) == [ok(page)]
        assert (yield exchange_in_thread(port, [page])) == [dup(page)]
        assert (yield exchange_in_thread(port, [b""])) == [f"ERR {EMPTY_SHA256} empty".encode()]
    finally:
        yield server.stopService()
    rows = (
        sqlite3.connect(path)
        .execute("SELECT hash, block_number, client_ip, payload FROM ethereum_data")
        .fetchall()
    )
    assert rows == [(sha256_hex(page), 19000000, "127.0.0.1", page)]


@pytest_twisted.inlineCallbacks
def test_mysql_and_redis_pipelined(
    mysql_db: dict[str, Any], redis_server: dict[str, Any], redis_prefix: str
) -> None:
    """500 pipelined frames on one connection are answered OK in order.

    They are stored once in MySQL and counted in Redis.
    """
    server, port = yield start_server(
        mysql_storage(mysql_db, dict(redis_server, prefix=redis_prefix))
    )
    assert (
        server.router.answering == server.factory.batcher.hold
    )  # both built with one ReplyBatcher
    scopes: list[None] = []

    def counted_scope() -> Any:
        scopes.append(None)
        return server.factory.batcher.hold()

    server.router.answering = counted_scope
    try:
        pages = [render_html(n) for n in range(1000, 1500)]
        replies = yield exchange_in_thread(port, pages, half_close=False)
        assert replies == [ok(p) for p in pages]
        assert (
            1 <= len(scopes) < 500
        )  # answered a batch at a time, each batch's writes held together
        again = yield exchange_in_thread(port, pages[:10], half_close=False)
        assert again == [dup(p) for p in pages[:10]]
    finally:
        yield server.stopService()
    assert mysql_query(
        mysql_db,
        "SELECT COUNT(*), COUNT(DISTINCT hash), MIN(block_number), MAX(block_number) "
        "FROM ethereum_data",
    )[0] == (500, 500, 1000, 1499)
    port_r = redis_server["port"]
    assert redis_cmd(port_r, "ZCARD", redis_prefix + "hashes") == 500
    assert redis_cmd(port_r, "HGET", redis_prefix + "ip_addresses", "127.0.0.1") == b"500"
    assert redis_cmd(port_r, "HGET", redis_prefix + "ip_messages", "127.0.0.1") == b"510"


@pytest_twisted.inlineCallbacks
def test_garbage_after_frames_live(tmp_path: Path) -> None:
    """Frames before garbage are stored and answered, then ERR - bad-frame, then the server closes."""
    server, port = yield start_server(sqlite_storage(str(tmp_path / "s.sqlite3")))
    try:
        raw = b"1:a,1:b,GET / HTTP/1.1\r\n"
        replies = yield exchange_in_thread(port, [], raw=raw, half_close=False, expect=10)
        assert replies == [ok(b"a"), ok(b"b"), b"ERR - bad-frame"]
    finally:
        yield server.stopService()


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_mariadb_kill_connection_costs_nothing(mysql_db: dict[str, Any]) -> None:
    """KILLing the server's MariaDB connections between batches costs no message."""
    server, port = yield start_server(mysql_storage(mysql_db))
    try:
        first = [render_html(n) for n in range(100)]
        assert (yield exchange_in_thread(port, first, half_close=False)) == [ok(p) for p in first]
        conn = pymysql.connect(
            host=mysql_db["host"],
            port=mysql_db["port"],
            user=mysql_db["user"],
            password=mysql_db["password"],
            autocommit=True,
        )
        with conn.cursor() as c:
            c.execute(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE DB=%s AND ID<>CONNECTION_ID()",
                (mysql_db["database"],),
            )
            ids = [row[0] for row in c.fetchall()]
            assert ids, "the server should hold MariaDB connections"
            for i in ids:
                c.execute(f"KILL {int(i)}")
        conn.close()
        second = [render_html(n) for n in range(100, 200)]
        assert (yield exchange_in_thread(port, second, half_close=False)) == [ok(p) for p in second]
    finally:
        yield server.stopService()
    assert mysql_query(mysql_db, "SELECT COUNT(*) FROM ethereum_data")[0][0] == 200


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_private_redis_restart_empty_converges(
    mysql_db: dict[str, Any], private_redis: Any
) -> None:
    """A Redis that restarts empty answers ERR (never a false OK) while down, then converges from SQL."""
    prefix = "eth:"
    redis = {"host": "127.0.0.1", "port": private_redis.port, "prefix": prefix}
    server, port = yield start_server(mysql_storage(mysql_db, redis), reconcile_interval=3600.0)
    try:
        first = [render_html(n) for n in range(50)]
        assert (yield exchange_in_thread(port, first, half_close=False)) == [ok(p) for p in first]
        private_redis.restart_empty()
        second = [render_html(n) for n in range(50, 100)]
        pending = list(second)

        @defer.inlineCallbacks
        def deliver() -> Any:
            replies = yield exchange_in_thread(port, pending, half_close=False)
            for page, reply in zip(list(pending), replies, strict=True):
                assert reply.startswith((b"OK ", b"DUP ", b"ERR ")), reply
                if not reply.startswith(b"ERR"):
                    pending.remove(page)
                else:
                    assert reply.endswith((b" unavailable", b" timeout", b" busy")), reply
            return not pending

        yield async_wait_until(
            deliver, 30, interval=0.5, what="every message acknowledged after the restart"
        )
        yield async_wait_until(
            lambda: redis_cmd(private_redis.port, "ZCARD", prefix + "hashes") == 100,
            30,
            interval=0.5,
            what="Redis to converge to SQL",
        )
    finally:
        yield server.stopService()
    assert mysql_query(mysql_db, "SELECT COUNT(*) FROM ethereum_data")[0][0] == 100
    firsts = redis_cmd(private_redis.port, "HGET", prefix + "ip_addresses", "127.0.0.1")
    assert firsts == b"100"


@pytest.mark.slow
def test_twistd_plugin_smoke(tmp_path: Path) -> None:
    """`twistd -n eth-server` starts, stores and acknowledges a message, and stops cleanly on SIGTERM."""
    port = free_port()
    db = tmp_path / "eth-server.sqlite3"
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "twistd"),
            "-n",
            "--pidfile=",
            "eth-server",
            "--port",
            str(port),
            "--stats",
            "none",
            "--sqlite",
            str(db),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )
    try:
        wait_for_port("127.0.0.1", port, 30)
        page = render_html(7)
        wait_until(
            lambda: exchange(port, [page]) in ([ok(page)], [dup(page)]),
            20,
            what="an acknowledgement",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    # twistd re-raises the signal it stopped for, so the exit status says SIGTERM.
    assert proc.returncode in (0, -signal.SIGTERM), out.decode(errors="replace")
    assert b"Server Shut Down" in out
    assert b"eth-server listening on" in out
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM ethereum_data").fetchone()[0] == 1
    assert not (tmp_path / "twistd.pid").exists()


def test_eth_server_bad_option_exits_nonzero() -> None:
    """`eth server --use-mysql` without --mysql-host exits non-zero naming the missing flag."""
    proc = subprocess.run(
        [str(VENV_BIN / "eth"), "server", "--use-mysql"], capture_output=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 2
    assert b"--mysql-host" in proc.stderr


@pytest_twisted.inlineCallbacks
def test_netcat_half_close(tmp_path: Path) -> None:
    """`printf '5:hello,' | nc -N host port` (the seed's habit) gets its OK before the server closes."""
    from twisted.internet import threads

    server, port = yield start_server(sqlite_storage(str(tmp_path / "s.sqlite3")))
    try:
        proc = yield threads.deferToThread(
            subprocess.run,
            ["sh", "-c", f"printf '5:hello,' | nc -N 127.0.0.1 {port}"],
            capture_output=True,
            timeout=20,
        )
    finally:
        yield server.stopService()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"67:OK " + sha256_hex(b"hello").encode() + b","
