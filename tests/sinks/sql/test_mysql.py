"""The MySQL/MariaDB record sink against the machine's MariaDB (a database of each test's own).

Besides the contract: rows and schema_version as another client sees them,
killed and idle-reaped connections that cost no message, a server that went
away failing fast as SinkUnavailable, and recovery when it is back.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols import portforward
from twisted.python.failure import Failure

from eth_twisted.errors import ConfigError, SinkBusy, SinkError, SinkTimeout, SinkUnavailable
from eth_twisted.model import Message, Outcome
from eth_twisted.sinks.sql.migrations import (
    apply_migrations,
    from_utc_datetime,
    latest_version,
    migrate_mysql,
    to_utc_datetime,
)
from eth_twisted.sinks.sql.mysql import MySQLRowEncoder, MySQLSink, make_mysql_sink
from eth_twisted.sinks.sql.pool import DataRefused, MySQLSettings, ReconnectingConnectionPool
from tests.support import async_wait_until, free_port, wait_until
from tests.support.mysql import mysql_query, settings_for
from tests.support.sink_contract import T0, SinkContract, msg, numbered


def unreachable(port: int, password: str = "pw", **fields: Any) -> MySQLSink:
    """A sink for a server on 127.0.0.1:``port`` that is not a MariaDB the test set up."""
    settings = MySQLSettings(
        mysql_host="127.0.0.1",
        mysql_port=port,
        mysql_user="u",
        mysql_pass=password,
        mysql_db="db",
        **fields,
    )
    return make_mysql_sink(settings)


def tls_kwargs(ssl: dict[str, Any]) -> dict[str, Any]:
    """The connect keywords a sink with ``--mysql-ssl``-style options ``ssl`` passes PyMySQL."""
    settings = MySQLSettings(
        mysql_host="db.example",
        mysql_port=3306,
        mysql_user="u",
        mysql_pass="p",
        mysql_db="d",
        ssl=ssl,
    )
    kwargs: dict[str, Any] = make_mysql_sink(settings)._connect_kwargs
    return kwargs


def sink_for(db: dict[str, Any], migrate: bool = True, **fields: Any) -> MySQLSink:
    """A sink on the test's database (not started)."""
    return make_mysql_sink(settings_for(db, **fields), migrate=migrate)


@pytest_twisted.async_yield_fixture
async def sink(mysql_db: dict[str, Any]) -> AsyncIterator[MySQLSink]:
    """A started MySQL sink on this test's own database."""
    s = sink_for(mysql_db)
    await s.start()
    yield s
    await s.stop()


@pytest.mark.live
class TestMySQLSink(SinkContract):
    """The MySQL sink keeps the sink contract."""


def other_connection_ids(db: dict[str, Any]) -> list[int]:
    """Ids of the sink's server connections (every session on the test database but the asker)."""
    rows = mysql_query(
        db,
        "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s AND ID <> CONNECTION_ID()",
        (db["database"],),
    )
    return [int(r[0]) for r in rows]


def kill_all(db: dict[str, Any]) -> int:
    """KILL every connection the sink holds; answer how many were killed."""
    ids = other_connection_ids(db)
    for cid in ids:
        try:
            mysql_query(db, f"KILL {int(cid)}")
        except Exception:  # noqa: BLE001 - it may have gone already
            pass
    return len(ids)


def test_datetime_round_trip() -> None:
    """Unix time survives the DATETIME(6) conversion to the microsecond, in UTC."""
    for ts in (0.0, T0, 1_700_000_000.123456, 2_000_000_000.999999):
        dt = to_utc_datetime(ts)
        assert from_utc_datetime(dt) == pytest.approx(ts, abs=1e-6)
    assert to_utc_datetime(0.0).isoformat() == "1970-01-01T00:00:00"


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_rows_and_schema_visible(sink: MySQLSink, mysql_db: dict[str, Any]) -> None:
    """Another client sees the rows, the UTC DATETIME(6), the schema version and the table shape."""
    await sink.store_batch(
        [msg(b"seen", ip="::ffff:192.0.2.1", at=1_700_000_000.654321, block=42, client_id="cli")]
    )
    [row] = mysql_query(
        mysql_db,
        "SELECT hash, payload, block_number, client_ip, client_id, received_at FROM ethereum_data",
    )
    assert row[0] == msg(b"seen").hash and row[1] == b"seen" and row[2] == 42
    assert row[3] == "192.0.2.1" and row[4] == "cli"
    assert row[5].isoformat() == "2023-11-14T22:13:20.654321"
    versions = [r[0] for r in mysql_query(mysql_db, "SELECT version FROM schema_version")]
    assert versions == list(range(1, latest_version("mysql") + 1))
    cols = dict(
        mysql_query(
            mysql_db,
            "SELECT COLUMN_NAME, COLUMN_TYPE FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'ethereum_data'",
            (mysql_db["database"],),
        )
    )
    assert cols["hash"] == "char(64)" and cols["payload"] == "mediumblob"
    assert cols["block_number"] == "bigint(20) unsigned" and cols["received_at"] == "datetime(6)"
    assert cols["client_ip"] == "varchar(45)" and cols["client_id"] == "varchar(255)"
    [(engine,)] = mysql_query(
        mysql_db,
        "SELECT ENGINE FROM information_schema.TABLES WHERE "
        "TABLE_SCHEMA = %s AND TABLE_NAME = 'ethereum_data'",
        (mysql_db["database"],),
    )
    assert engine == "InnoDB"


@pytest.mark.live
def test_migrate_mysql_idempotent(mysql_db: dict[str, Any]) -> None:
    """migrate_mysql applies every migration once, then nothing."""
    settings = settings_for(mysql_db)
    assert migrate_mysql(settings) == list(range(1, latest_version("mysql") + 1))
    assert migrate_mysql(settings) == []
    assert mysql_query(mysql_db, "SELECT COUNT(*) FROM schema_version") == [
        (latest_version("mysql"),)
    ]


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_migrate_false_behind_fails_naming_eth_migrate(mysql_db: dict[str, Any]) -> None:
    """With migrations off, an empty database stops start() with a message naming `eth migrate`."""
    s = sink_for(mysql_db, migrate=False)
    with pytest.raises(ConfigError, match="eth migrate"):
        await s.start()
    assert mysql_query(mysql_db, "SHOW TABLES") == []


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_start_twice_on_same_database(mysql_db: dict[str, Any]) -> None:
    """A second sink on a migrated database applies nothing and sees the first one's rows as DUP."""
    a = sink_for(mysql_db)
    await a.start()
    try:
        assert await a.store_batch([msg(b"shared")]) == [Outcome.STORED]
        b = sink_for(mysql_db)
        await b.start()
        try:
            assert b.migrations_applied == []
            assert await b.store_batch([msg(b"shared")]) == [Outcome.DUPLICATE]
        finally:
            await b.stop()
    finally:
        await a.stop()


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_bad_row_isolated(sink: MySQLSink) -> None:
    """Rows MariaDB refuses (a malformed hash) are REJECTED; the rest, overlong client id too, commit."""
    bad_hash = Message(b"bad", "not-a-sha256", "10.0.0.1", T0)
    long_id = msg(b"long-id", client_id="x" * 300)
    batch = numbered(5)[:2] + [bad_hash] + numbered(5)[2:] + [long_id]
    outcomes = await sink.store_batch(batch)
    assert outcomes == [Outcome.STORED] * 2 + [Outcome.REJECTED] + [Outcome.STORED] * 4
    assert (await sink.totals()).records == 6


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_metadata_the_column_charset_cannot_hold_is_stored_as_ascii(
    sink: MySQLSink, mysql_db: dict[str, Any]
) -> None:
    """An operator's utf8mb3/latin1 metadata columns cannot refuse a payload.

    The payload is stored, its metadata escaped.
    """
    mysql_query(
        mysql_db,
        "ALTER TABLE ethereum_data "
        "MODIFY client_id VARCHAR(255) CHARACTER SET utf8mb3 NULL, "
        "MODIFY client_ip VARCHAR(45) CHARACTER SET latin1 NOT NULL",
    )
    plain = msg(b"plain", ip="10.0.0.1", client_id="CN=J\u00fcrgen")
    emoji_id = msg(b"emoji-id", client_id="CN=\U0001f600 team")
    greek_ip = msg(b"greek-ip", ip="fe80::\u03b1")
    batch = [plain, emoji_id, greek_ip]
    assert await sink.store_batch(batch) == [Outcome.STORED] * 3
    rows = {r.hash: r for r in await sink.fetch_records(0, 10)}
    assert (rows[plain.hash].client_ip, rows[plain.hash].client_id) == (
        "10.0.0.1",
        "CN=J\u00fcrgen",
    )
    assert rows[emoji_id.hash].client_id == "CN=\\U0001f600 team"
    assert rows[greek_ip.hash].client_ip == "fe80::\\u03b1"
    assert await sink.store_batch(batch) == [Outcome.DUPLICATE] * 3


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_statements_split_under_max_allowed_packet(sink: MySQLSink) -> None:
    """A batch larger than a quarter of max_allowed_packet is split into several statements."""
    assert sink.max_statement_bytes >= 64 * 1024
    sink.max_statement_bytes = 200_000  # as if max_allowed_packet were 800 kB
    big = [msg(bytes([i]) * 60_000) for i in range(12)]  # 720 kB of payload
    assert await sink.store_batch(big) == [Outcome.STORED] * 12
    assert [r.payload for r in await sink.fetch_records(0, 20)] == [m.payload for m in big]


@pytest.mark.live
@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_killed_connections_cost_no_message(mysql_db: dict[str, Any]) -> None:
    """KILLing the sink's connections while batches are in flight loses and duplicates nothing."""
    s = sink_for(mysql_db)
    await s.start()
    try:
        expected = 0
        for round_ in range(6):
            # both pools connected, then kill them while a batch is on its way
            assert await s.store_batch([msg(b"warm-%d" % round_)]) == [Outcome.STORED]
            await s.ping()
            batch = numbered(300, prefix=b"k%d" % round_)
            d = s.store_batch(batch)
            killed = await threads.deferToThread(kill_all, mysql_db)
            assert killed >= 1
            assert await d == [Outcome.STORED] * 300
            expected += 301
        await s.ping()
        assert s.retried >= 1
        assert mysql_query(
            mysql_db, "SELECT COUNT(*), COUNT(DISTINCT hash) FROM ethereum_data"
        ) == [(expected, expected)]
        assert (await s.totals()).records == expected
    finally:
        await s.stop()


@pytest.mark.live
@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_idle_reaped_connection_is_transparent(mysql_db: dict[str, Any]) -> None:
    """After the server reaps idle connections (wait_timeout=1), the next batch and read just work."""
    s = sink_for(mysql_db, init_command="SET SESSION wait_timeout = 1")
    await s.start()
    try:
        assert await s.store_batch([msg(b"before")]) == [Outcome.STORED]
        assert other_connection_ids(mysql_db)
        await async_wait_until(
            lambda: threads.deferToThread(lambda: not other_connection_ids(mysql_db)),
            timeout=15,
            what="the server to reap the sink",
        )
        before = s.retried
        assert await s.store_batch([msg(b"after"), msg(b"before")]) == [
            Outcome.STORED,
            Outcome.DUPLICATE,
        ]
        assert len(await s.fetch_records(0, 10)) == 2
        assert s.retried > before
    finally:
        await s.stop()


@pytest_twisted.ensureDeferred
async def test_nothing_listening_fails_fast() -> None:
    """start() against a port where nothing listens fails with SinkUnavailable within the connect timeout."""
    s = unreachable(free_port(), password="secret-password", mysql_connect_timeout=2)
    started = time.monotonic()
    with pytest.raises(SinkUnavailable) as e:
        await s.start()
    assert time.monotonic() - started < 2.5
    assert "secret-password" not in str(e.value)


class _Tracked(portforward.ProxyServer):
    """A proxied connection the test can cut."""

    def connectionMade(self) -> None:
        self.factory.live.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        self.factory.live.discard(self)
        super().connectionLost(reason)


class CuttableProxy:
    """A TCP proxy in front of MariaDB that the test can take down and bring back on the same port."""

    def __init__(self, host: str, port: int) -> None:
        self.factory = portforward.ProxyFactory(host, port)
        self.factory.protocol = _Tracked
        self.factory.live = set()
        self.port = free_port()
        self.listening: Any = None

    def up(self) -> None:
        self.listening = reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")

    def stall(self, stalled: bool) -> None:
        """Stop (or resume) moving bytes either way, keeping the connections open."""
        for p in self.factory.live:
            for t in (p.transport, p.peer.transport if p.peer else None):
                if t is not None:
                    (t.pauseProducing if stalled else t.resumeProducing)()

    @defer.inlineCallbacks
    def down(self) -> Any:
        yield self.listening.stopListening()
        for p in list(self.factory.live):
            p.transport.abortConnection()


@pytest.mark.live
@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_server_gone_fails_fast_then_recovers(mysql_db: dict[str, Any]) -> None:
    """When the server goes away, batches and pings fail fast as SinkUnavailable; when back, they work."""
    proxy = CuttableProxy(mysql_db["host"], mysql_db["port"])
    proxy.up()
    s = sink_for(
        mysql_db,
        mysql_host="127.0.0.1",
        mysql_port=proxy.port,
        mysql_connect_timeout=2,
    )
    await s.start()
    try:
        assert await s.store_batch([msg(b"one")]) == [Outcome.STORED]
        await proxy.down()
        started = time.monotonic()
        with pytest.raises(SinkUnavailable):
            await s.store_batch([msg(b"two")])
        with pytest.raises(SinkUnavailable):
            await s.ping()
        assert time.monotonic() - started < 4.0
        proxy.up()
        assert await s.store_batch([msg(b"two"), msg(b"one")]) == [
            Outcome.STORED,
            Outcome.DUPLICATE,
        ]
        await s.ping()
    finally:
        await s.stop()
        if proxy.listening is not None and proxy.listening.connected:
            await proxy.down()


# -- the retrying pool, on a scripted fake driver (no network) ------------------------


class FakeCursor:
    """Runs the next scripted step on execute()."""

    def __init__(self, conn: FakeConn) -> None:
        self.conn = conn

    def execute(self, sql: str, args: Any = None) -> None:
        self.conn.driver.executed += 1
        step = self.conn.driver.script.pop(0) if self.conn.driver.script else None
        if step is not None:
            raise step

    def fetchall(self) -> list[tuple[int]]:
        return [(1,)]

    def close(self) -> None:
        pass


class FakeConn:
    """A DB-API connection whose statements follow the driver's script."""

    def __init__(self, driver: FakeDriver) -> None:
        self.driver = driver
        self.closed = False

    def cursor(self) -> FakeCursor:
        return FakeCursor(self)

    def commit(self) -> None:
        if self.driver.commit_errors:
            raise self.driver.commit_errors.pop(0)

    def rollback(self) -> None:
        self.driver.rollbacks += 1

    def close(self) -> None:
        self.closed = True


class FakeDriver:
    """Stands in for the pymysql module: connect() and Error."""

    Error = pymysql.err.MySQLError

    def __init__(self, script: list[BaseException | None], connect_errors: int = 0) -> None:
        self.script = script
        self.connect_errors = connect_errors
        self.commit_errors: list[BaseException] = []
        self.connections: list[FakeConn] = []
        self.executed = 0
        self.rollbacks = 0
        self.held = 0
        """Connections the pool still held after the interaction."""

    def connect(self, *args: Any, **kw: Any) -> FakeConn:
        if self.connect_errors:
            self.connect_errors -= 1
            raise pymysql.err.OperationalError(2003, "Can't connect to MySQL server (refused)")
        conn = FakeConn(self)
        self.connections.append(conn)
        return conn


def fake_pool(driver: FakeDriver, sleeps: list[float]) -> ReconnectingConnectionPool:
    """A one-thread retrying pool on ``driver`` that records its back-off delays."""
    pool = ReconnectingConnectionPool(
        "pymysql", sink_name="fake", sleep=sleeps.append, cp_min=1, cp_max=1, cp_reactor=reactor
    )
    pool.dbapi = driver
    pool.start()
    return pool


def one_statement(txn: Any) -> str:
    """The interaction the pool tests run."""
    txn.execute("SELECT 1")
    return "done"


def lost(code: int = 2013) -> pymysql.err.OperationalError:
    """A lost-connection error as PyMySQL raises it."""
    return pymysql.err.OperationalError(code, "Lost connection to MySQL server during query")


async def run_fake(
    script: list[BaseException | None], **kw: Any
) -> tuple[Any, FakeDriver, list[float], Any]:
    """Run one interaction on a fake pool; answer (result or exception, driver, sleeps, pool)."""
    driver = FakeDriver(script, **kw)
    sleeps: list[float] = []
    pool = fake_pool(driver, sleeps)
    try:
        try:
            result: Any = await pool.runInteraction(one_statement)
        except Exception as e:  # noqa: BLE001 - returned for the test to inspect
            result = e
        driver.held = len(pool.connections)
    finally:
        pool.close()
    return result, driver, sleeps, pool


@pytest_twisted.ensureDeferred
async def test_pool_retries_lost_connection_on_new_connection() -> None:
    """A 2006/2013 drops the connection and re-runs the interaction on a fresh one."""
    result, driver, sleeps, pool = await run_fake([lost(2006), lost(2013), None])
    assert result == "done"
    assert len(driver.connections) == 3 and [c.closed for c in driver.connections[:2]] == [
        True,
        True,
    ]
    assert pool.retried == 2 and sleeps == [0.05, 0.2]


@pytest.fixture
def sql_log() -> Iterator[list[dict[str, Any]]]:
    """Log events of the SQL sinks' namespace at info level and above."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if (
            event.get("log_namespace") == "eth_twisted.sinks.sql"
            and event["log_level"] >= LogLevel.info
        ):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_pool_logs_an_outage_not_each_retry(sql_log: list[dict[str, Any]]) -> None:
    """Retries that fail for good log nothing here; one retried away logs one line.

    The caller logs the outage once.
    """
    result, _, _, _ = await run_fake([pymysql.err.InterfaceError(0, "")] * 10)
    assert isinstance(result, SinkUnavailable)
    assert sql_log == []
    result, _, _, _ = await run_fake([lost(2006), lost(2013), None])
    assert result == "done"
    [line] = sql_log
    assert line["attempts"] == 2 and "2006" in line["failure"]


@pytest_twisted.ensureDeferred
async def test_pool_interface_error_exhausts_to_unavailable() -> None:
    """A connection that stays broken fails as SinkUnavailable after the bounded retries."""
    result, driver, sleeps, _ = await run_fake([pymysql.err.InterfaceError(0, "")] * 10)
    assert isinstance(result, SinkUnavailable)
    assert driver.executed == 4 and sleeps == [0.05, 0.2, 0.8]


@pytest_twisted.ensureDeferred
async def test_pool_deadlock_rolls_back_and_retries_on_same_connection() -> None:
    """1213 and 1205 roll back and retry without reconnecting; when they persist: SinkBusy."""
    result, driver, _, _ = await run_fake(
        [pymysql.err.OperationalError(1213, "Deadlock found"), None]
    )
    assert result == "done" and len(driver.connections) == 1 and driver.rollbacks == 1
    assert driver.held == 1
    result, _, _, _ = await run_fake([pymysql.err.OperationalError(1205, "Lock wait timeout")] * 10)
    assert isinstance(result, SinkBusy)


@pytest_twisted.ensureDeferred
async def test_pool_read_timeout_is_not_retried() -> None:
    """A read timeout drops the connection and fails at once as SinkTimeout (the write may land)."""
    timed_out = pymysql.err.OperationalError(
        2013, "Lost connection to MySQL server during query (timed out)"
    )
    result, driver, sleeps, _ = await run_fake([timed_out, None])
    assert isinstance(result, SinkTimeout)
    assert driver.executed == 1 and sleeps == [] and driver.held == 0


@pytest_twisted.ensureDeferred
async def test_pool_data_error_is_not_retried() -> None:
    """A data error comes out as DataRefused after one attempt, connection kept."""
    result, driver, _, _ = await run_fake([pymysql.err.DataError(1406, "Data too long for column")])
    assert isinstance(result, DataRefused) and driver.executed == 1
    assert driver.rollbacks == 1 and driver.held == 1


@pytest_twisted.ensureDeferred
async def test_pool_other_errors_fail_once() -> None:
    """A privilege error is not retried and becomes SinkUnavailable naming the code."""
    result, driver, _, _ = await run_fake(
        [pymysql.err.OperationalError(1142, "INSERT command denied")]
    )
    assert isinstance(result, SinkUnavailable) and "1142" in str(result) and driver.executed == 1


@pytest_twisted.ensureDeferred
async def test_pool_cannot_connect_is_bounded() -> None:
    """Refused connections are retried a bounded number of times, then SinkUnavailable."""
    result, driver, sleeps, _ = await run_fake([None], connect_errors=100)
    assert isinstance(result, SinkUnavailable) and "2003" in str(result)
    assert len(sleeps) == 3 and driver.connections == []


@pytest_twisted.ensureDeferred
async def test_pool_lost_commit_is_retried() -> None:
    """A connection lost during COMMIT re-runs the (idempotent) interaction."""
    driver = FakeDriver([None, None])
    driver.commit_errors = [lost(2013)]
    sleeps: list[float] = []
    pool = fake_pool(driver, sleeps)
    try:
        assert await pool.runInteraction(one_statement) == "done"
    finally:
        pool.close()
    assert driver.executed == 2 and len(driver.connections) == 2


class ScriptedMigrationConn:
    """A connection whose account may read but not create tables."""

    def __init__(self, have: list[int]) -> None:
        self.have = have
        self.rows: list[tuple[Any, ...]] = []

    def cursor(self) -> ScriptedMigrationConn:
        return self

    def execute(self, sql: str, args: Any = None) -> None:
        if sql.startswith("SELECT version"):
            if not self.have:
                raise pymysql.err.ProgrammingError(1146, "Table 'schema_version' doesn't exist")
            self.rows = [(v,) for v in self.have]
        elif sql.startswith("SELECT GET_LOCK") or sql.startswith("SELECT RELEASE_LOCK"):
            self.rows = [(1,)]
        elif sql.startswith("CREATE"):
            raise pymysql.err.OperationalError(
                1142, "CREATE command denied to user 'ro'@'localhost'"
            )

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self.rows

    def fetchone(self) -> tuple[Any, ...]:
        return self.rows[0]

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_migrations_without_privilege() -> None:
    """An account that may not create tables: a current schema proceeds, one behind names `eth migrate`."""
    assert (
        apply_migrations(
            ScriptedMigrationConn(list(range(1, latest_version("mysql") + 1))), "mysql"
        )
        == []
    )
    with pytest.raises(ConfigError, match="eth migrate"):
        apply_migrations(ScriptedMigrationConn([]), "mysql")


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_ambiguous_commit_answers_stored(sink: MySQLSink, mysql_db: dict[str, Any]) -> None:
    """When the COMMIT reply is lost after the rows landed, the retry answers OK (not DUP) and stores once."""
    assert sink.writer is not None
    pool = sink.writer
    real_factory = pool.connectionFactory
    state = {"lose": 1}

    class LosesOneCommitReply(real_factory):  # type: ignore[misc,valid-type]
        def commit(self) -> None:
            self._connection.commit()
            if state["lose"]:
                state["lose"] -= 1
                raise pymysql.err.OperationalError(
                    2013, "Lost connection to MySQL server during query"
                )

    pool.connectionFactory = LosesOneCommitReply
    try:
        batch = [msg(b"a1"), msg(b"a2"), msg(b"a1")]
        assert await sink.store_batch(batch) == [Outcome.STORED, Outcome.STORED, Outcome.DUPLICATE]
    finally:
        pool.connectionFactory = real_factory
    assert state["lose"] == 0 and sink.retried >= 1
    assert mysql_query(mysql_db, "SELECT COUNT(*) FROM ethereum_data") == [(2,)]
    assert await sink.store_batch([msg(b"a1", at=T0 + 1)]) == [Outcome.DUPLICATE]


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_ping_times_out_on_stalled_server(mysql_db: dict[str, Any]) -> None:
    """A server that stops answering fails ping() with SinkTimeout after ping_timeout, not a hang."""
    proxy = CuttableProxy(mysql_db["host"], mysql_db["port"])
    proxy.up()
    s = sink_for(
        mysql_db,
        mysql_host="127.0.0.1",
        mysql_port=proxy.port,
        mysql_read_timeout=5,
        ping_timeout=0.5,
    )
    await s.start()
    try:
        await s.ping()
        proxy.stall(True)
        started = time.monotonic()
        with pytest.raises(SinkTimeout):
            await s.ping()
        # It was the ping's own timeout (0.5 s), not the 5 s read timeout, that ended the wait.
        assert 0.4 < time.monotonic() - started < 5.0
        proxy.stall(False)
        await s.ping()
    finally:
        proxy.stall(False)
        await s.stop()
        await proxy.down()


def test_tls_settings() -> None:
    """TLS settings become an SSLContext; verify=false turns checks off; unknown keys are refused."""
    import ssl

    kw = tls_kwargs({"verify": False})
    assert isinstance(kw["ssl"], ssl.SSLContext) and kw["ssl"].verify_mode == ssl.CERT_NONE
    kw = tls_kwargs({})
    assert "ssl" not in kw
    kw = tls_kwargs({"verify": True})
    assert kw["ssl"].check_hostname and kw["ssl"].verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ConfigError, match="capath"):
        tls_kwargs({"capath": "/x"})


def test_row_encoder_reuses_a_receipt_time_only_for_the_same_time() -> None:
    """Rows sharing a receipt time share its literal; a different time gets its own, exactly rounded."""
    enc = MySQLRowEncoder()
    times = [T0 + 0.1234565, T0 + 0.1234565, T0 + 7.5, T0 + 0.1234565, 0.0]
    rows = [enc.row(msg(b"r%d" % i, "::ffff:10.0.0.9", t)) for i, t in enumerate(times)]
    for row, t in zip(rows, times, strict=True):
        expected = to_utc_datetime(t).isoformat(" ", "microseconds")
        assert row.endswith(f",'10.0.0.9',NULL,'{expected}','other',NULL,NULL,NULL,NULL)")


def test_row_encoder_caches_are_bounded_in_bytes() -> None:
    """Peers choosing a new 60 KiB client name per message cannot grow the encoder's caches past a bound."""
    enc = MySQLRowEncoder()
    for i in range(5000):
        row = enc.row(
            msg(b"n%d" % i, f"10.{i // 256 % 256}.{i % 256}.1", client_id=f"{i:06d}" + "n" * 60_000)
        )
        assert row.count("~") == 1  # stored bounded, with its digest
    for cache in (enc._ips, enc._ids):
        assert len(cache) <= 4096
        assert sum(len(k) + len(v) for k, v in cache.items()) <= 4096 * 2 * (2 * 255 + 2)


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_concurrent_batches_sharing_hashes_answer_each_hash_ok_once(
    sink: MySQLSink, mysql_db: dict[str, Any]
) -> None:
    """Batches stored at once that share hashes: every hash is OK exactly once, DUP otherwise.

    The batches are stored at once as with the router's --concurrent-batches, and share hashes in
    opposite orders (a deadlock when both lock their first rows).
    """
    base = numbered(300, prefix=b"conc")
    batches = [base[0:200], list(reversed(base[100:300])), base[50:250:2], base[::3]]
    results = await defer.gatherResults([sink.store_batch(b) for b in batches], consumeErrors=True)
    ok: dict[str, int] = {}
    for batch, outcomes in zip(batches, results, strict=True):
        assert set(outcomes) <= {Outcome.STORED, Outcome.DUPLICATE}
        for m, o in zip(batch, outcomes, strict=True):
            ok[m.hash] = ok.get(m.hash, 0) + (o is Outcome.STORED)
    assert ok == {m.hash: 1 for m in base}
    [(rows,)] = mysql_query(mysql_db, "SELECT COUNT(*) FROM ethereum_data")
    assert rows == 300


# -- lifecycle: a database that never answered ---------------------------------------


class SilentServer:
    """A port that completes TCP handshakes and never says a word: a SIGSTOPped MariaDB.

    The socket listens and never accepts; the kernel completes connections into
    the backlog, so a client connects at once and then waits for the greeting.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    """A silent MariaDB stand-in on a free port, closed afterwards."""
    server = SilentServer()
    yield server
    server.close()


def pool_threads(sink: MySQLSink) -> list[str]:
    """Names of the sink's pool threads still alive."""
    return [t.name for t in threading.enumerate() if f"eth-{sink.name}-" in t.name and t.is_alive()]


@pytest_twisted.ensureDeferred
async def test_stop_after_starts_that_never_succeeded() -> None:
    """A sink whose every start failed stops cleanly: each pool is closed once, no AlreadyQuit."""
    s = unreachable(free_port(), mysql_connect_timeout=1)
    for _ in range(2):
        with pytest.raises(SinkUnavailable):
            await s.start()
    await s.stop()
    await s.stop()
    assert s.writer is None and s.reader is None
    assert pool_threads(s) == []


@pytest_twisted.ensureDeferred
async def test_stop_during_start_waits_for_the_connect_timeout_only(
    silent_server: SilentServer,
) -> None:
    """stop() while start() waits for a greeting that never comes ends after the connect timeout.

    The read timeout (60 s) is for queries; the greeting and login are bounded by
    connect_timeout (1 s), so neither start nor a shutdown during it can hang on a
    stopped server. Afterwards no pool thread is left.
    """
    s = unreachable(
        silent_server.port, mysql_connect_timeout=1, mysql_read_timeout=60, write_timeout=60
    )
    started: list[Any] = []
    s.start().addBoth(started.append)
    began = time.monotonic()
    await s.stop()
    stopped_after = time.monotonic() - began
    assert len(started) == 1 and isinstance(started[0], Failure) and started[0].check(SinkError)
    assert stopped_after < 60 / 4, f"stop took {stopped_after:.1f}s: it waited for the read timeout"
    assert s.writer is None and s.reader is None
    assert pool_threads(s) == []


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_queries_keep_the_read_timeout_after_a_bounded_login(
    mysql_db: dict[str, Any],
) -> None:
    """Login is bounded by connect_timeout, but a query may take up to read_timeout as before."""
    s = sink_for(mysql_db, mysql_connect_timeout=1, mysql_read_timeout=30)
    await s.start()
    try:

        def slow(txn: Any) -> Any:
            txn.execute("SELECT SLEEP(1.5)")
            return txn.fetchall()

        assert s.reader is not None
        assert await s.reader.runInteraction(slow) == ((0,),)
        conn = next(iter(s.reader.connections.values()))
        assert (conn._read_timeout, conn._write_timeout) == (30, 30)
    finally:
        await s.stop()


def _serve(argv: list[str], tmp_path: Path) -> tuple[subprocess.Popen[str], list[str]]:
    """Start ``eth server`` with ``argv``; answer the process and the list its output lines go to."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETH_")}
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "eth"),
            "server",
            "--port",
            str(free_port()),
            "--stats",
            "none",
            *argv,
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _assert_clean_shutdown(proc: subprocess.Popen[str], lines: list[str], within: float) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(
            f"eth server did not stop within {within}s of SIGTERM:\n" + "".join(lines)
        )
    wait_until(
        lambda: any("Main loop terminated" in line for line in lines), 5, what="the last line"
    )
    log = "".join(lines)
    assert proc.returncode == 0, log
    for bad in ("Traceback", "AlreadyQuit", "#critical]", "Unhandled"):
        assert bad not in log, log
    after = log[log.index("Received SIGTERM") :]
    assert "could not start" not in after, log


@pytest.mark.live
@pytest.mark.slow
def test_server_whose_database_never_answered_stops_cleanly(tmp_path: Path) -> None:
    """`eth server --use-mysql` at a port where nothing listens: SIGTERM between start attempts is clean."""
    proc, lines = _serve(
        [
            "--use-mysql",
            "--mysql-host",
            "127.0.0.1",
            "--mysql-port",
            str(free_port()),
            "--mysql-user",
            "u",
            "--mysql-db",
            "d",
            "--mysql-connect-timeout",
            "1",
        ],
        tmp_path,
    )
    try:
        # SIGTERM right after a failed attempt: the sink's pools are closed, a retry is waiting.
        wait_until(
            lambda: any("could not start" in line for line in lines),
            60,
            what="a failed start attempt",
        )
    finally:
        _assert_clean_shutdown(proc, lines, within=30)


@pytest.mark.live
@pytest.mark.slow
def test_server_on_a_stopped_database_stops_cleanly(
    tmp_path: Path, silent_server: SilentServer
) -> None:
    """`eth server` on a MariaDB that accepts and never answers: SIGTERM mid-connect exits cleanly, promptly.

    The read timeout is 120 s; shutdown waits at most for the connect timeout (1 s).
    """
    proc, lines = _serve(
        [
            "--use-mysql",
            "--mysql-host",
            "127.0.0.1",
            "--mysql-port",
            str(silent_server.port),
            "--mysql-user",
            "u",
            "--mysql-db",
            "d",
            "--mysql-connect-timeout",
            "1",
            "--mysql-read-timeout",
            "120",
        ],
        tmp_path,
    )
    try:
        wait_until(
            lambda: any("eth-server listening on" in line for line in lines),
            30,
            what="the listener",
        )
    finally:
        _assert_clean_shutdown(proc, lines, within=30)
