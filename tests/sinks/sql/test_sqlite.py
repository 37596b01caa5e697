"""The SQLite record sink: the contract, plus WAL, readers beside the writer, reopen, migrations."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted

from eth_twisted.errors import ConfigError, SinkBusy, SinkError
from eth_twisted.model import Message, Outcome
from eth_twisted.sinks.sql.migrations import latest_version, migrate_sqlite
from eth_twisted.sinks.sql.sqlite import SQLiteSettings, SQLiteSink, make_sqlite_sink
from tests.support.sink_contract import T0, SinkContract, msg, numbered


@pytest_twisted.async_yield_fixture
async def sink(tmp_path: Path) -> AsyncIterator[SQLiteSink]:
    """A started SQLite sink on a file of this test's own."""
    s = make_sqlite_sink(SQLiteSettings(sqlite=str(tmp_path / "record.sqlite3")))
    await s.start()
    yield s
    await s.stop()


class TestSQLiteSink(SinkContract):
    """The SQLite sink keeps the sink contract."""


def raw(path: Path) -> sqlite3.Connection:
    """A plain connection to the sink's file, as another process would open it."""
    return sqlite3.connect(str(path), isolation_level=None, timeout=5)


@pytest_twisted.ensureDeferred
async def test_wal_and_full_sync(tmp_path: Path) -> None:
    """The file is in WAL mode once the sink has started."""
    path = tmp_path / "wal.sqlite3"
    s = make_sqlite_sink(SQLiteSettings(sqlite=str(path)))
    await s.start()
    try:
        assert s.journal_mode == "wal"
        assert raw(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        await s.stop()


@pytest_twisted.ensureDeferred
async def test_reader_not_blocked_by_open_write(tmp_path: Path) -> None:
    """While another connection holds the write lock, reads still answer with committed data."""
    path = tmp_path / "r.sqlite3"
    s = make_sqlite_sink(SQLiteSettings(sqlite=str(path), busy_timeout=0.2))
    await s.start()
    try:
        assert await s.store_batch(numbered(3)) == [Outcome.STORED] * 3
        writer = raw(path)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute(
            "INSERT INTO ethereum_data (hash, payload, client_ip, received_at) "
            "VALUES (?, x'00', '1.1.1.1', 0)",
            ("f" * 64,),
        )
        try:
            assert [r.payload for r in await s.fetch_records(0, 10)] == [b"m-0", b"m-1", b"m-2"]
            assert (await s.totals()).records == 3
            await s.ping()
        finally:
            writer.execute("COMMIT")
        assert (await s.totals()).records == 4
    finally:
        await s.stop()


@pytest_twisted.ensureDeferred
async def test_locked_by_other_process_is_busy_then_recovers(tmp_path: Path) -> None:
    """A write lock held elsewhere past the busy timeout fails the batch as SinkBusy; later it works."""
    path = tmp_path / "busy.sqlite3"
    s = make_sqlite_sink(SQLiteSettings(sqlite=str(path), busy_timeout=0.1))
    await s.start()
    try:
        other = raw(path)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(SinkBusy):
                await s.store_batch([msg(b"waiting")])
            assert s.retried >= 1
        finally:
            other.execute("ROLLBACK")
        assert await s.store_batch([msg(b"waiting")]) == [Outcome.STORED]
    finally:
        await s.stop()


@pytest_twisted.ensureDeferred
async def test_reopen_keeps_data(tmp_path: Path) -> None:
    """Stopping and starting a new sink on the same file keeps every record, and DUP still holds."""
    path = str(tmp_path / "keep.sqlite3")
    first = make_sqlite_sink(SQLiteSettings(sqlite=path))
    await first.start()
    await first.store_batch(numbered(10))
    await first.stop()
    second = make_sqlite_sink(SQLiteSettings(sqlite=path))
    await second.start()
    try:
        assert second.migrations_applied == []
        assert len(await second.fetch_records(0, 100)) == 10
        assert await second.store_batch(numbered(1)) == [Outcome.DUPLICATE]
    finally:
        await second.stop()


def test_migrations_idempotent(tmp_path: Path) -> None:
    """migrate_sqlite applies every migration once, a second run nothing; schema_version lists them."""
    path = str(tmp_path / "m.sqlite3")
    assert migrate_sqlite(path) == list(range(1, latest_version("sqlite") + 1))
    assert migrate_sqlite(path) == []
    versions = [r[0] for r in sqlite3.connect(path).execute("SELECT version FROM schema_version")]
    assert versions == list(range(1, latest_version("sqlite") + 1))


@pytest_twisted.ensureDeferred
async def test_migrate_false_on_empty_file_fails_naming_eth_migrate(tmp_path: Path) -> None:
    """With migrations off, a schema that is behind stops start() with a message naming `eth migrate`."""
    s = make_sqlite_sink(SQLiteSettings(sqlite=str(tmp_path / "empty.sqlite3")), migrate=False)
    with pytest.raises(ConfigError, match="eth migrate"):
        await s.start()


@pytest_twisted.ensureDeferred
async def test_migrate_false_on_current_schema_starts(tmp_path: Path) -> None:
    """With migrations off, a current schema is used as is."""
    path = str(tmp_path / "ready.sqlite3")
    migrate_sqlite(path)
    s = make_sqlite_sink(SQLiteSettings(sqlite=path), migrate=False)
    await s.start()
    try:
        assert await s.store_batch([msg(b"x")]) == [Outcome.STORED]
    finally:
        await s.stop()


def test_memory_path_refused() -> None:
    """':memory:' is refused: adbapi's threads would each get their own empty database."""
    with pytest.raises(ConfigError):
        make_sqlite_sink(SQLiteSettings(sqlite=":memory:"))


@pytest_twisted.ensureDeferred
async def test_bad_row_isolated(sink: SQLiteSink) -> None:
    """A row the database refuses (a malformed hash) is REJECTED; the rest, overlong client id too, commit."""
    bad_hash = Message(b"bad", "not-a-sha256", "10.0.0.1", T0)
    long_id = msg(b"long-id", client_id="x" * 300)
    batch = numbered(5)[:2] + [bad_hash] + numbered(5)[2:] + [long_id]
    outcomes = await sink.store_batch(batch)
    assert outcomes == [Outcome.STORED] * 2 + [Outcome.REJECTED] + [Outcome.STORED] * 4
    assert (await sink.totals()).records == 6


@pytest_twisted.ensureDeferred
async def test_ipv4_mapped_address_normalised(sink: SQLiteSink) -> None:
    """'::ffff:1.2.3.4' is stored as '1.2.3.4'."""
    await sink.store_batch([msg(b"v4", ip="::ffff:192.0.2.7")])
    [rec] = await sink.fetch_records(0, 1)
    assert rec.client_ip == "192.0.2.7"


@pytest_twisted.ensureDeferred
async def test_stopped_sink_refuses(tmp_path: Path) -> None:
    """After stop(), store_batch fails with a SinkError instead of touching closed pools."""
    from eth_twisted.errors import SinkUnavailable

    s = make_sqlite_sink(SQLiteSettings(sqlite=str(tmp_path / "s.sqlite3")))
    await s.start()
    await s.stop()
    with pytest.raises(SinkUnavailable):
        await s.store_batch([msg(b"late")])


@pytest_twisted.ensureDeferred
async def test_stop_after_a_failed_start(tmp_path: Path) -> None:
    """A sink whose start failed (no such directory) stops cleanly, twice, and can start later."""
    path = tmp_path / "later" / "record.sqlite3"
    s = make_sqlite_sink(SQLiteSettings(sqlite=str(path)))
    with pytest.raises(SinkError):
        await s.start()
    await s.stop()
    await s.stop()
    path.parent.mkdir()
    await s.start()
    try:
        assert await s.store_batch([msg(b"after")]) == [Outcome.STORED]
    finally:
        await s.stop()
