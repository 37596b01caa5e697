"""The embedded SQLite record: one writer thread, WAL, separate readers, and its factory."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zope.interface import implementer

from eth_twisted.errors import (
    ConfigError,
)
from eth_twisted.interfaces import IRecord
from eth_twisted.model import (
    ChainBlock,
    FinalityEvent,
    Message,
    storable_client_id,
    storable_client_ip,
)
from eth_twisted.options import setting
from eth_twisted.sinks.sql.migrations import check_sqlite_path
from eth_twisted.sinks.sql.pool import ErrorKind, ReconnectingConnectionPool, classify_sqlite_error
from eth_twisted.sinks.sql.record import SQLSink


@implementer(IRecord)
class SQLiteSink(SQLSink):
    """The record in an SQLite file: one writer thread, WAL, separate reader connections.

    ``synchronous=FULL``: with WAL, NORMAL does not sync the log at each
    commit, so a power cut could lose a batch already answered OK, and the
    client would have dropped it. FULL costs one fsync per batch (group commit
    amortises it) and makes "acknowledged" mean "on disk".
    """

    name = "sqlite"
    dialect = "sqlite"
    placeholder = "?"
    insert_sql = (
        "INSERT INTO ethereum_data (hash, payload, block_number, client_ip, client_id, received_at, "
        "kind, chain_id, block_hash, parent_hash, canonical) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (hash) DO NOTHING"
    )
    # Not INSERT OR IGNORE: that also drops rows failing a CHECK; this ignores only the hash.

    def __init__(
        self,
        path: str,
        reactor: Any = None,
        *,
        migrate: bool = True,
        busy_timeout: float = 5.0,
        readers: int = 2,
        synchronous: str = "FULL",
        retries: int = 3,
        ping_timeout: float = 5.0,
    ) -> None:
        super().__init__(reactor, migrate=migrate, ping_timeout=ping_timeout)
        self.path = check_sqlite_path(path)
        self.busy_timeout = busy_timeout
        self.readers = readers
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigError(f"unknown SQLite synchronous mode {synchronous!r}")
        self.synchronous = synchronous.upper()
        self.retries = retries
        self.journal_mode: str | None = None

    def _describe(self) -> str:
        return self.path

    def _open_writer(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(
                f"cannot switch {self.path} to WAL (journal_mode={mode})"
            )
        self.journal_mode = str(mode).lower()
        conn.execute(f"PRAGMA synchronous={self.synchronous}")

    def _open_reader(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA query_only=ON")

    def _make_pools(self) -> tuple[ReconnectingConnectionPool, ReconnectingConnectionPool]:
        def pool(
            name: str, size: int, openfun: Callable[[Any], None]
        ) -> ReconnectingConnectionPool:
            return ReconnectingConnectionPool(
                "sqlite3",
                self.path,
                sink_name=self.name,
                classify=classify_sqlite_error,
                retries=self.retries,
                retry_window=max(2.0, 3 * self.busy_timeout),
                timeout=self.busy_timeout,
                check_same_thread=False,
                isolation_level=None,
                cp_min=1,
                cp_max=size,
                cp_name=f"eth-{self.name}-{name}",
                cp_openfun=openfun,
                cp_reactor=self._reactor,
            )

        return pool("writer", 1, self._open_writer), pool("reader", self.readers, self._open_reader)

    def _ping_txn(self, txn: Any) -> None:
        txn.execute("SELECT MAX(version) FROM schema_version")
        txn.fetchall()

    def _begin_write(self, txn: Any) -> None:
        txn.execute("BEGIN IMMEDIATE")

    def _begin_read(self, txn: Any) -> None:
        txn.execute("BEGIN")

    def _classify(self, error: BaseException) -> ErrorKind:
        return classify_sqlite_error(error)

    def _time_value(self, ts: float) -> Any:
        return float(ts)

    def _time_float(self, value: Any) -> float | None:
        return None if value is None else float(value)

    def _row(self, m: Message) -> tuple[Any, ...]:
        return (
            m.hash,
            m.payload,
            m.block_number,
            storable_client_ip(m.client_ip),
            storable_client_id(m.client_id),
            float(m.received_at),
            *chain_values(m),
        )


def chain_values(m: Message) -> tuple[Any, ...]:
    """``kind, chain_id, block_hash, parent_hash, canonical`` of ``m`` (a chain block starts at 0)."""
    c = m.chain
    if c is None:
        return (m.kind, None, None, None, None)
    if isinstance(c, ChainBlock):
        if m.block_number is None:
            return (m.kind, c.chain_id, None, None, None)
        return ("block", c.chain_id, c.block_hash, c.parent_hash, 0)
    return (c.kind, c.chain_id, c.block_hash if isinstance(c, FinalityEvent) else None, None, None)


SQLITE_FILE = "eth-server.sqlite3"
"""The record's file when ``--sqlite`` is not given (in ``$STATE_DIRECTORY`` when set)."""


@dataclass(slots=True)
class SQLiteSettings:
    """The embedded SQLite record; ``sqlite`` is the server option of that name."""

    sqlite: str | None = setting(
        None,
        f"SQLite file used without MySQL [default: {SQLITE_FILE} in $STATE_DIRECTORY, else the working "
        "directory]",
    )
    busy_timeout: float = 5.0
    readers: int = 2
    synchronous: str = "FULL"
    ping_timeout: float = 5.0


def make_sqlite_sink(
    settings: SQLiteSettings, *, reactor: Any = None, migrate: bool = True
) -> SQLiteSink:
    """An SQLite record sink on the file ``settings.sqlite`` (not started; never ``:memory:``)."""
    if not settings.sqlite:
        raise ConfigError("the SQLite record needs a file (the tap resolves --sqlite's default)")
    return SQLiteSink(
        settings.sqlite,
        reactor,
        migrate=migrate,
        busy_timeout=settings.busy_timeout,
        readers=settings.readers,
        synchronous=settings.synchronous,
        ping_timeout=settings.ping_timeout,
    )
