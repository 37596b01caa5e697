"""The private services behave as the scenarios rely on: kill, restart, stop, reap."""

from __future__ import annotations

import time

import pymysql
import pytest

from tests.faults.services import EthProcess, FaultRedis, PrivateMariaDB, PrivateRedis
from tests.support import wait_until

pytestmark = [pytest.mark.fault]


def test_mariadb_is_private_and_reachable_over_tcp_as_its_user(
    private_mariadb: PrivateMariaDB,
) -> None:
    """The private MariaDB listens on its own port, and its user logs in over TCP with a password."""
    assert private_mariadb.port != 3306
    assert private_mariadb.query("SELECT CURRENT_USER()")[0][0].startswith(
        private_mariadb.user + "@"
    )
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(
            host="127.0.0.1",
            port=private_mariadb.port,
            user=private_mariadb.user,
            password="wrong",
            connect_timeout=3,
        )
    assert private_mariadb.start_seconds and private_mariadb.start_seconds[0] < 30


def test_mariadb_sigkill_and_restart_keeps_committed_rows(private_mariadb: PrivateMariaDB) -> None:
    """A committed row survives SIGKILL + restart on the same port (crash recovery)."""
    private_mariadb.query("CREATE TABLE t (id INT PRIMARY KEY) ENGINE=InnoDB")
    private_mariadb.query("INSERT INTO t VALUES (1), (2)")
    old_pid = private_mariadb.pid
    took = private_mariadb.restart()
    assert private_mariadb.pid != old_pid
    assert private_mariadb.query("SELECT COUNT(*) FROM t")[0][0] == 2
    assert took < 30


def test_mariadb_sigstop_makes_reads_time_out(private_mariadb: PrivateMariaDB) -> None:
    """While SIGSTOPped, a query with read_timeout=1 fails with 2013 after about a second.

    SIGCONT heals it.
    """
    conn = private_mariadb.connect(read_timeout=1)
    private_mariadb.pause()
    try:
        begun = time.monotonic()
        with pytest.raises(pymysql.err.OperationalError) as info:
            with conn.cursor() as c:
                c.execute("SELECT 1")
        assert info.value.args[0] == 2013
        assert 0.8 < time.monotonic() - begun < 5
    finally:
        private_mariadb.resume()
    assert private_mariadb.query("SELECT 1") == [(1,)]


def test_mariadb_wait_timeout_reaps_idle_sessions(private_mariadb: PrivateMariaDB) -> None:
    """With wait_timeout=1 an idle session is closed by the server, and its next query fails."""
    private_mariadb.set_global("wait_timeout", 1)
    try:
        conn = private_mariadb.connect()
        session = conn.thread_id()
        wait_until(
            lambda: session not in [row[0] for row in private_mariadb.processlist()],
            15,
            what="MariaDB to reap the idle session",
        )
        with pytest.raises((pymysql.err.OperationalError, pymysql.err.InterfaceError)):
            with conn.cursor() as c:
                c.execute("SELECT 1")
    finally:
        private_mariadb.set_global("wait_timeout", 28800)


def test_redis_down_refuses_and_comes_back_empty(fault_redis: FaultRedis) -> None:
    """A killed private Redis refuses connections; started again on the same port it is empty."""
    fault_redis.command("SET", "k", "v")
    assert fault_redis.command("GET", "k") == b"v"
    port = fault_redis.port
    fault_redis.down()
    with pytest.raises(OSError):
        fault_redis.command("PING")
    fault_redis.start()
    assert fault_redis.port == port
    assert fault_redis.command("GET", "k") is None


def test_redis_sigstop_stalls_commands(fault_redis: FaultRedis) -> None:
    """A SIGSTOPped Redis accepts the TCP connection (kernel backlog) but answers nothing."""
    fault_redis.pause()
    try:
        with pytest.raises(TimeoutError):
            from tests.faults.services import redis_command

            redis_command("127.0.0.1", fault_redis.port, "PING", timeout=0.5)
    finally:
        fault_redis.resume()
    assert fault_redis.command("PING") == "PONG"
    assert isinstance(fault_redis, PrivateRedis)


def test_eth_process_wrapper_reports_exit_status(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """EthProcess runs a command, captures its output in the log, and reports how it ended."""
    p = EthProcess(
        ["-c", "import sys; print('hello'); sys.exit(3)"],
        str(tmp_path / "p.log"),
        executable="/usr/bin/python3",
    )
    p.start()
    assert p.proc is not None
    p.proc.wait(10)
    assert p.returncode == 3
    assert "hello" in p.log_text()
