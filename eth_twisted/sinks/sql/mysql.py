"""The MySQL/MariaDB record: rows encoded as literals once per distinct value, and its factory."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import pymysql
from zope.interface import implementer

from eth_twisted.interfaces import IRecord
from eth_twisted.model import (
    MAX_CLIENT_ID,
    ChainBlock,
    FinalityEvent,
    Message,
    storable_client_id,
    storable_client_ip,
)
from eth_twisted.sinks.sql.migrations import from_utc_datetime, to_utc_datetime
from eth_twisted.sinks.sql.pool import (
    ErrorKind,
    MySQLSettings,
    ReconnectingConnectionPool,
    classify_mysql_error,
    mysql_connect_kwargs,
)
from eth_twisted.sinks.sql.record import (
    MEDIUMBLOB_MAX,
    STATEMENT_OVERHEAD,
    SQLSink,
)


def _needs_no_escaping(value: str) -> bool:
    """ASCII letters and digits only (every hex hash): safe between quotes as it is."""
    return value.isascii() and value.isalnum()


def _sql_text(value: str) -> str:
    """A MySQL string literal (backslash escapes; our sessions never set NO_BACKSLASH_ESCAPES)."""
    escaped: str = pymysql.converters.escape_string(value)
    return "'" + escaped + "'"


def _sql_hash(value: str) -> str:
    """A hash as a literal: ASCII letters and digits (every hex hash) as is, anything else escaped."""
    return f"'{value}'" if _needs_no_escaping(value) else _sql_text(value)


def _sql_datetime(ts: float) -> str:
    """Unix time as a UTC DATETIME(6) literal, rounded exactly like :func:`to_utc_datetime`."""
    return "'" + datetime.fromtimestamp(ts, timezone.utc).isoformat(" ", "microseconds")[:26] + "'"


class MySQLRowEncoder:
    """Rows of ``ethereum_data`` as SQL literals, without PyMySQL's per-value mogrify.

    PyMySQL's ``executemany`` escapes every value through a chain of generic
    converters (microseconds a row, in the writer thread, holding the GIL the
    reactor needs: bench/README.md, "What was slow", item 1). Our rows have a fixed shape, so each column is
    encoded by one cheap function: the payload as a hex literal (exact size, no
    escaping: ``X'...'`` is binary for a MEDIUMBLOB), the hash as is when it is
    lowercase hex, IPs and client ids made storable (:func:`~eth_twisted.model.storable_client_ip`)
    and escaped once per distinct value, the time
    straight from the float, once per distinct receipt time (the messages of one
    read share theirs). The statement is the same multi-row ``INSERT ... VALUES``
    PyMySQL would have built.
    """

    def __init__(self) -> None:
        self._ips: dict[str, str] = {}
        self._ids: dict[str, str] = {}
        self._ts: float | None = None
        self._ts_sql = ""

    def row(self, m: Message) -> str:
        """One message as the row of :data:`INSERT_COLUMNS`.

        The chain columns come from the recogniser, whose hashes are ``0x`` and
        lowercase hex and whose kinds are a fixed set: safe as literals.
        """
        ip_sql = self._ips.get(m.client_ip)
        if ip_sql is None:
            ip_sql = _sql_text(storable_client_ip(m.client_ip))
            _remember(self._ips, m.client_ip, ip_sql)
        bn = m.block_number
        bn_sql = "NULL" if bn is None else int(bn)
        cid = m.client_id
        cid_sql = "NULL" if cid is None else self._ids.get(cid) or self._client_id_sql(cid)
        if m.received_at != self._ts:
            self._ts_sql = _sql_datetime(m.received_at)
            self._ts = m.received_at
        return (
            f"({_sql_hash(m.hash)},X'{m.payload.hex()}',{bn_sql},{ip_sql},{cid_sql},{self._ts_sql},"
            f"{chain_sql(m)})"
        )

    def _client_id_sql(self, client_id: str) -> str:
        literal = _sql_text(storable_client_id(client_id) or "")
        _remember(self._ids, client_id, literal)
        return literal


def chain_sql(m: Message) -> str:
    """``kind, chain_id, block_hash, parent_hash, canonical`` of ``m`` as SQL literals.

    A chain block is inserted not canonical (0): the chain step decides, by an
    UPDATE, so the insert never meets the one-canonical-per-height key (which
    ``ON DUPLICATE KEY`` would silently turn into "already stored").
    """
    c = m.chain
    if c is None:
        return f"'{m.kind}',NULL,NULL,NULL,NULL"
    if isinstance(c, ChainBlock):
        if m.block_number is None:
            return f"'{m.kind}',{int(c.chain_id)},NULL,NULL,NULL"
        return f"'block',{int(c.chain_id)},'{c.block_hash}','{c.parent_hash}',0"
    block_hash = f"'{c.block_hash}'" if isinstance(c, FinalityEvent) else "NULL"
    return f"'{c.kind}',{int(c.chain_id)},{block_hash},NULL,NULL"


_CACHE_ENTRIES = 4096


_CACHE_KEY_CHARS = 2 * MAX_CLIENT_ID
"""Encoder caches hold at most this many values, each no longer than this: bounded in bytes too."""


def _remember(cache: dict[str, str], key: str, literal: str) -> None:
    """Cache ``literal`` for ``key`` unless the cache is full or ``key`` is long (peer-chosen, rare)."""
    if len(cache) < _CACHE_ENTRIES and len(key) <= _CACHE_KEY_CHARS:
        cache[key] = literal


@implementer(IRecord)
class MySQLSink(SQLSink):
    """The record in MySQL/MariaDB through adbapi and PyMySQL."""

    name = "mysql"
    dialect = "mysql"
    placeholder = "%s"
    insert_sql = ""  # rows are literals: see insert_head
    # Not INSERT IGNORE: IGNORE also turns data errors (too long, CHECK) into warnings and
    # silently truncated or skipped rows; this only ignores the duplicate hash. PyMySQL does
    # not set CLIENT_FOUND_ROWS, so a no-op duplicate counts 0 affected rows.
    insert_head = (
        "INSERT INTO ethereum_data (hash, payload, block_number, client_ip, client_id, "
        "received_at, kind, chain_id, block_hash, parent_hash, canonical) VALUES "
    )
    insert_tail = " ON DUPLICATE KEY UPDATE hash = hash"
    in_chunk = 1000

    def __init__(
        self,
        connect_kwargs: dict[str, Any],
        reactor: Any = None,
        *,
        migrate: bool = True,
        pool_size: int = 3,
        writers: int = 2,
        retries: int = 3,
        ping_timeout: float = 5.0,
    ) -> None:
        super().__init__(reactor, migrate=migrate, ping_timeout=ping_timeout)
        self._connect_kwargs = connect_kwargs
        self.pool_size = pool_size
        self.writers = writers
        self.retries = retries
        self._encoder = MySQLRowEncoder()
        read_timeout = float(connect_kwargs.get("read_timeout") or 30.0)
        self._lock_wait = max(1, min(50, int(read_timeout // 2)))

    def _describe(self) -> str:
        kw = self._connect_kwargs
        return f"{kw['user']}@{kw['host']}:{kw['port']}/{kw['database']}"

    def _open(self, conn: Any) -> None:
        with conn.cursor() as c:
            c.execute(
                "SET SESSION time_zone = '+00:00', "
                "sql_mode = 'STRICT_TRANS_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,"
                "ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION', "
                "innodb_lock_wait_timeout = %s",
                (self._lock_wait,),
            )
            # The OK/DUP bookkeeping reads its own snapshot after inserting.
            c.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.commit()

    def _make_pools(self) -> tuple[ReconnectingConnectionPool, ReconnectingConnectionPool]:
        connect_timeout = float(self._connect_kwargs.get("connect_timeout") or 5.0)
        window = max(2.0, connect_timeout)

        def pool(name: str, size: int) -> ReconnectingConnectionPool:
            return ReconnectingConnectionPool(
                "pymysql",
                sink_name=self.name,
                classify=classify_mysql_error,
                retries=self.retries,
                retry_window=window,
                handshake_timeout=connect_timeout,
                cp_min=1,
                cp_max=size,
                cp_name=f"eth-{self.name}-{name}",
                cp_openfun=self._open,
                cp_reactor=self._reactor,
                **self._connect_kwargs,
            )

        return pool("writer", self.writers), pool("reader", self.pool_size)

    def _prepare(self, conn: Any) -> list[int]:
        applied = super()._prepare(conn)
        cur = conn.cursor()
        cur.execute("SELECT @@max_allowed_packet")
        packet = int(cur.fetchone()[0])
        cur.close()
        self.max_statement_bytes = max(64 * 1024, packet // 4)
        self.max_payload_bytes = min(MEDIUMBLOB_MAX, packet - 2 * STATEMENT_OVERHEAD)
        return applied

    def _payload_fits(self, payload: bytes) -> bool:
        return len(payload) <= MEDIUMBLOB_MAX and self._row_bytes(payload) <= self.max_payload_bytes

    def _row_bytes(self, payload: bytes) -> int:
        return 2 * len(payload) + 3 + STATEMENT_OVERHEAD  # X'<hex>'

    def _insert(self, txn: Any, rows: Sequence[Any], sizes: Sequence[int]) -> int:
        """One multi-row INSERT per ``max_statement_bytes`` (rows already encoded by :meth:`_row`)."""
        inserted = 0
        start = 0
        while start < len(rows):
            end, size = start, 0
            while end < len(rows) and (
                end == start or size + sizes[end] <= self.max_statement_bytes
            ):
                size += sizes[end]
                end += 1
            values = ",".join(rows[start:end])
            txn.execute(self.insert_head + values + self.insert_tail)
            inserted += max(txn.rowcount, 0)
            start = end
        return inserted

    def _execute_in(self, txn: Any, sql: str, hashes: Sequence[str]) -> None:
        # Hex hashes go in as literals (no mogrify); anything else through parameters.
        if all(map(_needs_no_escaping, hashes)):
            txn.execute(sql.format(",".join([f"'{h}'" for h in hashes])))
        else:
            super()._execute_in(txn, sql, hashes)

    def _classify(self, error: BaseException) -> ErrorKind:
        return classify_mysql_error(error)

    def _time_value(self, ts: float) -> Any:
        return to_utc_datetime(ts)

    def _time_float(self, value: Any) -> float | None:
        return None if value is None else from_utc_datetime(value)

    def _row(self, m: Message) -> Any:
        return self._encoder.row(m)


def make_mysql_sink(
    settings: MySQLSettings, *, reactor: Any = None, migrate: bool = True
) -> MySQLSink:
    """A MySQL/MariaDB record sink (not started)."""
    return MySQLSink(
        mysql_connect_kwargs(settings),
        reactor,
        migrate=migrate,
        pool_size=settings.pool_size,
        writers=settings.writers,
        retries=settings.retries,
        ping_timeout=settings.ping_timeout,
    )
