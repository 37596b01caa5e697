"""The SQL record: MySQL/MariaDB through adbapi + PyMySQL, or an embedded SQLite file.

Both sinks implement :class:`~eth_twisted.model.IRecord`. Writes go through a
small writer pool (SQLite: exactly one thread), reads through a separate read
pool, so the stats API never queues behind a batch.

One batch is one transaction (group commit): hashes repeated inside the batch
are DUP after their first occurrence, hashes already stored are DUP, the rest
are inserted and answer OK. Inserts are idempotent (``UNIQUE(hash)`` with a
duplicate-ignoring insert), so an interaction retried after a lost connection,
even one lost during ``COMMIT``, never stores a row twice.

The common batch holds only new hashes, so it is inserted first, in one
statement: when the insert reports every row added, all are OK and the
``SELECT ... IN`` is never sent. Otherwise the transaction is rolled back and
redone SELECT-first. MySQL rows are encoded by :class:`MySQLRowEncoder` rather
than PyMySQL's per-value escaping. Both halve the writer's cost per row
(bench/README.md has the numbers).

:class:`ReconnectingConnectionPool` is adbapi's pool with the retry adbapi
lacks (twisted/twisted#10841, RELIABILITY.md 2.1): a lost connection is
dropped and the interaction re-run a bounded number of times; what is left
after that becomes :class:`~eth_twisted.errors.SinkUnavailable`,
:class:`~eth_twisted.errors.SinkBusy` or :class:`~eth_twisted.errors.SinkTimeout`.

Schema changes are numbered SQL files under ``migrations/<dialect>/``, applied
in order by :func:`apply_migrations` and recorded in ``schema_version``.
"""

from __future__ import annotations

import enum
import re
import sqlite3
import ssl as ssl_module
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pymysql
from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from eth_twisted.errors import (
    ConfigError,
    SinkBusy,
    SinkError,
    SinkTimeout,
    SinkUnavailable,
)
from eth_twisted.model import (
    DEFAULT_SUMMARY_PAGE_BYTES,
    MAX_BLOCK_NUMBER,
    MAX_CLIENT_ID,
    MAX_CLIENT_IP,
    SUMMARY_FIXED_BYTES,
    IRecord,
    Message,
    Outcome,
    Record,
    RecordSummary,
    Totals,
    ascii_metadata,
    storable_client_id,
    storable_client_ip,
    take_page,
)

log = Logger(namespace="eth_twisted.sinks.sql")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
MEDIUMBLOB_MAX = 2**24 - 1
"""The largest payload a MEDIUMBLOB holds; larger messages are REJECTED."""

IN_CHUNK = 500
"""Hashes per ``WHERE hash IN (...)`` query (SQLite's variable limit is 999 in old builds)."""

_EPOCH = datetime(1970, 1, 1)
_STATEMENT_OVERHEAD = 400
"""Bytes of SQL per inserted row besides the escaped payload (hash, ip, id, time, separators)."""


# -- time --------------------------------------------------------------------------


def to_utc_datetime(ts: float) -> datetime:
    """Unix time as a naive UTC datetime with microseconds (for DATETIME(6))."""
    return datetime.fromtimestamp(ts, timezone.utc).replace(tzinfo=None)


def from_utc_datetime(dt: datetime) -> float:
    """A naive UTC datetime (from DATETIME(6)) as unix time."""
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc).replace(tzinfo=None)
    return (dt - _EPOCH) / timedelta(seconds=1)


# -- errors ------------------------------------------------------------------------


class ErrorKind(enum.Enum):
    """How the pool treats a driver exception."""

    LOST = "lost"
    """The connection is gone: drop it and retry on a fresh one."""

    TIMEOUT = "timeout"
    """The server did not answer within read/write_timeout: drop it, do not retry."""

    CONFLICT = "conflict"
    """Deadlock, lock wait timeout, locked database, too many connections: retry."""

    DATA = "data"
    """The server refused a value: not retried; the sink isolates the bad row."""

    OTHER = "other"
    """Anything else (privileges, missing table, syntax): fail the batch."""


_MYSQL_LOST = frozenset({
    1040 + 13,  # 1053 ER_SERVER_SHUTDOWN
    1152, 1153, 1154, 1156, 1158, 1159, 1160, 1161,  # aborted connection, network read/write errors
    1927,  # ER_CONNECTION_KILLED (MariaDB)
    2002, 2003, 2006, 2013, 2014, 2055,  # client: can't connect, gone away, lost, out of sync
    4031,  # disconnected for inactivity (MySQL 8)
})
_MYSQL_CONFLICT = frozenset({1205, 1213, 1040})  # lock wait timeout, deadlock, too many connections
_MYSQL_DATA = frozenset({
    1048, 1264, 1265, 1292, 1366, 1367, 1406,  # null, out of range, truncated, wrong value, too long
    3819, 4025,  # CHECK constraint failed (MySQL, MariaDB)
})


def classify_mysql_error(error: BaseException) -> ErrorKind:
    """Sort a PyMySQL/adbapi exception into an :class:`ErrorKind`."""
    if isinstance(error, adbapi.ConnectionLost | pymysql.err.InterfaceError):
        return ErrorKind.LOST
    if isinstance(error, pymysql.err.MySQLError):
        code = error.args[0] if error.args and isinstance(error.args[0], int) else None
        text = str(error.args[1]) if len(error.args) > 1 else ""
        if code == 2013 and "timed out" in text:
            return ErrorKind.TIMEOUT
        if code in _MYSQL_LOST:
            return ErrorKind.LOST
        if code in _MYSQL_CONFLICT:
            return ErrorKind.CONFLICT
        if code in _MYSQL_DATA or isinstance(error, pymysql.err.DataError):
            return ErrorKind.DATA
        if isinstance(error, pymysql.err.IntegrityError) and code != 1062:
            return ErrorKind.DATA
        return ErrorKind.OTHER
    if isinstance(error, TimeoutError):
        return ErrorKind.TIMEOUT
    if isinstance(error, OSError):
        return ErrorKind.LOST
    if isinstance(error, OverflowError | UnicodeEncodeError):
        return ErrorKind.DATA
    return ErrorKind.OTHER


def classify_sqlite_error(error: BaseException) -> ErrorKind:
    """Sort an sqlite3 exception into an :class:`ErrorKind`."""
    if isinstance(error, sqlite3.OperationalError):
        text = str(error).lower()
        if "locked" in text or "busy" in text:
            return ErrorKind.CONFLICT
        return ErrorKind.OTHER
    if isinstance(error, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.InterfaceError):
        return ErrorKind.DATA
    if isinstance(error, sqlite3.ProgrammingError) and "binding" in str(error).lower():
        return ErrorKind.DATA
    if isinstance(error, OverflowError | UnicodeEncodeError):
        return ErrorKind.DATA
    return ErrorKind.OTHER


def describe_error(error: BaseException) -> str:
    """A one-line, secret-free reason for logs and SinkError (driver code and message)."""
    if isinstance(error, pymysql.err.MySQLError) and error.args:
        return " ".join(str(a) for a in error.args[:2])
    return f"{type(error).__name__}: {error}"


def translate_error(sink: str, kind: ErrorKind, error: BaseException) -> SinkError:
    """The SinkError the router answers with for an error that was not retried away."""
    reason = describe_error(error)
    if kind is ErrorKind.TIMEOUT:
        return SinkTimeout(sink, reason)
    if kind is ErrorKind.CONFLICT:
        return SinkBusy(sink, reason)
    return SinkUnavailable(sink, reason)


class DataRefused(Exception):
    """Raised out of the pool when the database refused a value (wraps the driver error)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(describe_error(error))
        self.error = error


# -- the pool ----------------------------------------------------------------------


class ReconnectingConnectionPool(adbapi.ConnectionPool):
    """An adbapi pool that survives lost connections and lock conflicts.

    ``cp_reconnect`` is forced on. Every interaction (and ``runWithConnection``)
    runs in a loop: on a lost connection the thread's connection is dropped
    (``self.disconnect``) and the work re-run on a new one; on a deadlock or
    lock wait timeout it is rolled back and re-run; at most ``retries`` times,
    with a short growing delay, and never past ``retry_window`` seconds since
    the first attempt. Then it raises a :class:`SinkError`. Data errors come
    out as :class:`DataRefused`. Only idempotent work may run here.
    """

    def __init__(
        self,
        dbapi_name: str,
        *connargs: Any,
        sink_name: str = "sql",
        classify: Callable[[BaseException], ErrorKind] = classify_mysql_error,
        retries: int = 3,
        retry_delay: float = 0.05,
        retry_window: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        handshake_timeout: float | None = None,
        **connkw: Any,
    ) -> None:
        connkw["cp_reconnect"] = True
        self.handshake_timeout = handshake_timeout
        self.sink_name = sink_name
        self.classify = classify
        self.retries = retries
        self.retry_delay = retry_delay
        self.retry_window = retry_window
        self._sleep = sleep
        self._monotonic = monotonic
        self._counter_lock = threading.Lock()
        self.retried = 0
        """How many times work was re-run after a lost connection or a conflict."""
        super().__init__(dbapi_name, *connargs, **connkw)

    def __repr__(self) -> str:
        return f"<ReconnectingConnectionPool {self.sink_name} {self.dbapiName}>"

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("ReconnectingConnectionPool holds credentials and is not picklable")

    def connect(self) -> Any:
        """The thread's connection; a connection whose open hook fails is closed, not leaked."""
        tid = self.threadID()
        conn = self.connections.get(tid)
        if conn is None:
            conn = self._open_connection()
            if self.openfun is not None:
                try:
                    self.openfun(conn)
                except BaseException:
                    self._close(conn)
                    raise
            self.connections[tid] = conn
        return conn

    def _open_connection(self) -> Any:
        """A new driver connection; with ``handshake_timeout``, login is bounded by it.

        PyMySQL reads the server's greeting and the login replies with
        ``read_timeout`` (``Connection.connect`` sets it on the socket), so a
        stopped server whose kernel still accepts connections held every
        connect, and a shutdown joining the pool's threads, for the whole read
        timeout (30 s) rather than the connect timeout. The connection is opened
        with both I/O timeouts at most ``handshake_timeout``, then given its
        own back: PyMySQL applies ``_read_timeout``/``_write_timeout`` to the
        socket before each read and write.
        """
        if self.handshake_timeout is None:
            return self.dbapi.connect(*self.connargs, **self.connkw)
        kw = dict(self.connkw)
        read, write = kw.get("read_timeout"), kw.get("write_timeout")
        kw["read_timeout"] = min(read or self.handshake_timeout, self.handshake_timeout)
        kw["write_timeout"] = min(write or self.handshake_timeout, self.handshake_timeout)
        conn = self.dbapi.connect(*self.connargs, **kw)
        conn._read_timeout, conn._write_timeout = read, write
        return conn

    def _close(self, conn: Any) -> None:
        try:
            conn.close()
        except Exception as e:  # a dead socket cannot say goodbye; nothing to do
            log.debug("Closing a {sink} connection failed: {reason}", sink=self.sink_name,
                      reason=describe_error(e))

    def _drop(self, raw: Any) -> None:
        """Forget this thread's connection (it is broken)."""
        if raw is not None and self.connections.get(self.threadID()) is raw:
            self.disconnect(raw)

    def _rollback(self, raw: Any) -> None:
        """Roll back; a connection that cannot roll back is dropped."""
        if raw is None:
            return
        try:
            raw.rollback()
        except Exception:
            self._drop(raw)

    def _run_with_retries(self, body: Callable[[adbapi.Connection], Any]) -> Any:
        attempt = 0
        started = self._monotonic()
        first_failure = ""
        while True:
            raw = None
            try:
                conn = self.connectionFactory(self)
                raw = conn._connection
                result = body(conn)
                conn.commit()
                if attempt:
                    log.info("{sink}: {failure}; retried away ({attempts} retries)",
                             sink=self.sink_name, failure=first_failure, attempts=attempt)
                return result
            except Exception as e:
                kind = self.classify(e)
                if kind in (ErrorKind.LOST, ErrorKind.TIMEOUT):
                    self._drop(raw)
                else:
                    self._rollback(raw)
                if kind is ErrorKind.DATA:
                    raise DataRefused(e) from e
                elapsed = self._monotonic() - started
                delay = self.retry_delay * (4**attempt)
                if (kind in (ErrorKind.LOST, ErrorKind.CONFLICT) and attempt < self.retries
                        and elapsed + delay < self.retry_window):
                    attempt += 1
                    with self._counter_lock:
                        self.retried += 1
                    # Debug only: work that fails for good is logged once per outage by
                    # its caller (the router, the server's start loop), work retried
                    # away once, above.
                    if not first_failure:
                        first_failure = f"{kind.value} ({describe_error(e)})"
                    log.debug("{sink}: {kind} ({reason}); retry {attempt} of {retries}",
                              sink=self.sink_name, kind=kind.value, reason=describe_error(e),
                              attempt=attempt, retries=self.retries)
                    self._sleep(delay)
                    continue
                if kind is ErrorKind.OTHER and not self._is_driver_error(e):
                    raise  # ours (ConfigError) or a bug: not the database's fault
                raise translate_error(self.sink_name, kind, e) from e

    def _is_driver_error(self, error: BaseException) -> bool:
        return isinstance(error, self.dbapi.Error | OSError | adbapi.ConnectionLost)

    def _runInteraction(self, interaction: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        def body(conn: adbapi.Connection) -> Any:
            trans = self.transactionFactory(self, conn)
            result = interaction(trans, *args, **kw)
            trans.close()
            return result

        return self._run_with_retries(body)

    def _runWithConnection(self, func: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return self._run_with_retries(lambda conn: func(conn, *args, **kw))


# -- migrations --------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One numbered schema change."""

    version: int
    name: str
    statements: tuple[str, ...]


_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def load_migrations(dialect: str) -> list[Migration]:
    """The migrations shipped for ``dialect`` ('mysql' or 'sqlite'), in version order."""
    found = []
    for path in sorted((MIGRATIONS_DIR / dialect).iterdir()):
        m = _MIGRATION_FILE.match(path.name)
        if not m:
            continue
        text = "\n".join(
            line for line in path.read_text("utf-8").splitlines() if not line.lstrip().startswith("--")
        )
        statements = tuple(s.strip() for s in re.split(r";\s*$", text, flags=re.M) if s.strip())
        found.append(Migration(int(m.group(1)), m.group(2), statements))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise ConfigError(f"migrations for {dialect} are not numbered 1..n: {versions}")
    return found


def latest_version(dialect: str) -> int:
    """The schema version this code expects."""
    return len(load_migrations(dialect))


_SCHEMA_VERSION_DDL = {
    "mysql": "CREATE TABLE IF NOT EXISTS schema_version ("
             "version INT NOT NULL PRIMARY KEY, applied_at DATETIME(6) NOT NULL"
             ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "sqlite": "CREATE TABLE IF NOT EXISTS schema_version ("
              "version INTEGER NOT NULL PRIMARY KEY, applied_at REAL NOT NULL)",
}
_MYSQL_PRIVILEGE_CODES = frozenset({1044, 1142, 1227})  # db access denied, command denied, need privilege


def _is_missing_table(dialect: str, error: BaseException) -> bool:
    if dialect == "mysql":
        return isinstance(error, pymysql.err.MySQLError) and bool(error.args) and error.args[0] == 1146
    return isinstance(error, sqlite3.OperationalError) and "no such table" in str(error)


def applied_versions(conn: Any, dialect: str) -> set[int]:
    """Versions recorded in ``schema_version`` (empty when the table does not exist)."""
    cur = conn.cursor()
    try:
        cur.execute("SELECT version FROM schema_version")
        return {int(r[0]) for r in cur.fetchall()}
    except Exception as e:
        if _is_missing_table(dialect, e):
            conn.rollback()
            return set()
        raise
    finally:
        cur.close()


def apply_migrations(
    conn: Any, dialect: str, *, allow_create: bool = True, clock: Callable[[], float] = time.time
) -> list[int]:
    """Bring the schema behind a blocking DB-API connection up to date; return versions applied.

    Idempotent: versions already in ``schema_version`` are skipped and the DDL
    uses ``IF NOT EXISTS``. Each migration runs in its own transaction
    (SQLite: ``BEGIN IMMEDIATE``, so DDL and its ``schema_version`` row commit
    together; MySQL commits DDL implicitly, and a named lock keeps two
    migrators apart). With ``allow_create=False`` nothing is changed and a
    schema that is behind raises :class:`ConfigError`; so does one that is
    behind when the account may not create tables. A schema newer than the
    code is logged and accepted.
    """
    migrations = load_migrations(dialect)
    latest = len(migrations)
    have = applied_versions(conn, dialect)
    current = max(have, default=0)
    if current > latest:
        log.warn("The {dialect} schema is at version {current}, newer than this code's {latest}; "
                 "continuing", dialect=dialect, current=current, latest=latest)
    pending = [m for m in migrations if m.version not in have]
    if not pending:
        return []
    if not allow_create:
        raise ConfigError(
            f"the {dialect} schema is at version {current} but this code needs {latest}: "
            "run `eth migrate` (or start with migrations enabled)"
        )
    applied: list[int] = []
    cur = conn.cursor()
    locked = False
    try:
        if dialect == "mysql":
            cur.execute("SELECT GET_LOCK(CONCAT('eth_twisted.migrate.', DATABASE()), 60)")
            locked = bool(cur.fetchone()[0])
            if not locked:
                raise ConfigError("another `eth migrate` holds the migration lock for 60 s")
        try:
            cur.execute(_SCHEMA_VERSION_DDL[dialect])
            conn.commit()
            for migration in migrations:
                if dialect == "sqlite":
                    cur.execute("BEGIN IMMEDIATE")
                cur.execute("SELECT COUNT(*) FROM schema_version WHERE version = "
                            + ("%s" if dialect == "mysql" else "?"), (migration.version,))
                if cur.fetchone()[0]:
                    conn.commit()
                    continue
                for statement in migration.statements:
                    cur.execute(statement)
                now: Any = clock()
                if dialect == "mysql":
                    now = to_utc_datetime(now)
                    cur.execute("INSERT INTO schema_version (version, applied_at) VALUES (%s, %s)",
                                (migration.version, now))
                else:
                    cur.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                                (migration.version, now))
                conn.commit()
                applied.append(migration.version)
                log.info("Applied {dialect} migration {version:04d}_{name}", dialect=dialect,
                         version=migration.version, name=migration.name)
        except Exception as e:
            conn.rollback()
            denied = (
                isinstance(e, pymysql.err.MySQLError) and bool(e.args) and e.args[0] in _MYSQL_PRIVILEGE_CODES
            ) or (isinstance(e, sqlite3.OperationalError) and "readonly" in str(e))
            if denied:
                raise ConfigError(
                    f"the {dialect} schema is at version {current} but this code needs {latest}, and "
                    f"this account may not change it ({describe_error(e)}): run `eth migrate` with an "
                    "account that may create tables"
                ) from e
            raise
    finally:
        if locked:
            cur.execute("SELECT RELEASE_LOCK(CONCAT('eth_twisted.migrate.', DATABASE()))")
            cur.fetchall()
        cur.close()
    return applied


def _mysql_connect_kwargs(
    host: str, port: int, user: str, password: str | None, database: str | None, *,
    ssl: dict[str, Any] | None, connect_timeout: float, read_timeout: float, write_timeout: float,
    init_command: str | None = None,
) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        host=host, port=int(port), user=user, password=password or "", database=database,
        charset="utf8mb4", autocommit=False, connect_timeout=connect_timeout,
        read_timeout=read_timeout, write_timeout=write_timeout, init_command=init_command,
    )
    if ssl:
        kw["ssl"] = _mysql_tls_context(ssl)
    return kw


def _mysql_tls_context(settings: dict[str, Any]) -> ssl_module.SSLContext:
    """A client TLS context from ``ca``, ``cert``, ``key`` and ``verify`` (default true)."""
    unknown = set(settings) - {"ca", "cert", "key", "verify"}
    if unknown:
        raise ConfigError(f"unknown MySQL TLS settings: {sorted(unknown)} (use ca, cert, key, verify)")
    ctx = ssl_module.create_default_context(cafile=settings.get("ca") or None)
    if settings.get("cert"):
        ctx.load_cert_chain(settings["cert"], settings.get("key") or None)
    if not settings.get("verify", True):
        ctx.check_hostname = False
        ctx.verify_mode = ssl_module.CERT_NONE
    return ctx


def _quote_identifier(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def migrate_mysql(
    host: str = "127.0.0.1", port: int = 3306, user: str = "root", password: str | None = None,
    database: str = "ethereum", *, ssl: dict[str, Any] | None = None, connect_timeout: float = 5.0,
    read_timeout: float = 60.0, write_timeout: float = 60.0, create_database: bool = True,
) -> list[int]:
    """Blocking: apply pending MySQL migrations (for `eth migrate`); return the versions applied.

    Creates the database (utf8mb4) first when it does not exist and
    ``create_database`` is true.
    """
    kw = _mysql_connect_kwargs(host, port, user, password, database, ssl=ssl,
                               connect_timeout=connect_timeout, read_timeout=read_timeout,
                               write_timeout=write_timeout)
    try:
        conn = pymysql.connect(**kw)
    except pymysql.err.OperationalError as e:
        if not (create_database and e.args and e.args[0] == 1049):
            raise
        server = pymysql.connect(**dict(kw, database=None, autocommit=True))
        try:
            with server.cursor() as c:
                c.execute(f"CREATE DATABASE IF NOT EXISTS {_quote_identifier(database)} "
                          "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
        finally:
            server.close()
        conn = pymysql.connect(**kw)
    try:
        return apply_migrations(conn, "mysql")
    finally:
        conn.close()


def _check_sqlite_path(path: str) -> str:
    path = str(path)
    if not path or path == ":memory:" or path.startswith("file::memory:") or "mode=memory" in path:
        raise ConfigError("an SQLite sink needs a file: an in-memory database cannot be shared by "
                          "adbapi's threads (use the memory sink in tests)")
    return path


def migrate_sqlite(path: str) -> list[int]:
    """Blocking: apply pending SQLite migrations to the file at ``path``; return the versions applied."""
    conn = sqlite3.connect(_check_sqlite_path(path), timeout=30.0, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        return apply_migrations(conn, "sqlite")
    finally:
        conn.close()


# -- the sinks ---------------------------------------------------------------------


_COLUMNS = "id, hash, payload, block_number, client_ip, client_id, received_at"
_SUMMARY_COLUMNS = "id, hash, block_number, client_ip, received_at"
_SUMMARY_MIN_BYTES = SUMMARY_FIXED_BYTES + 64
"""The least a summary counts (its hash is always 64 characters): bounds the rows a page asks for."""


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _needs_no_escaping(value: str) -> bool:
    """ASCII letters and digits only (every hex hash): safe between quotes as it is."""
    return value.isascii() and value.isalnum()


def _sql_text(value: str) -> str:
    """A MySQL string literal (backslash escapes; our sessions never set NO_BACKSLASH_ESCAPES)."""
    return "'" + pymysql.converters.escape_string(value) + "'"


def _sql_hash(value: str) -> str:
    """A hash as a literal: ASCII letters and digits (every hex hash) need no escaping, anything else is escaped."""
    return f"'{value}'" if _needs_no_escaping(value) else _sql_text(value)


def _sql_datetime(ts: float) -> str:
    """Unix time as a UTC DATETIME(6) literal, rounded exactly like :func:`to_utc_datetime`."""
    return "'" + datetime.fromtimestamp(ts, timezone.utc).isoformat(" ", "microseconds")[:26] + "'"


class MySQLRowEncoder:
    """Rows of ``ethereum_data`` as SQL literals, without PyMySQL's per-value mogrify.

    PyMySQL's ``executemany`` escapes every value through a chain of generic
    converters (about 10 µs a row on this machine, in the writer thread, holding
    the GIL the reactor needs). Our rows have a fixed shape, so each column is
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
        """One message as ``(hash, payload, block_number, client_ip, client_id, received_at)``."""
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
        return f"({_sql_hash(m.hash)},X'{m.payload.hex()}',{bn_sql},{ip_sql},{cid_sql},{self._ts_sql})"

    def _client_id_sql(self, client_id: str) -> str:
        literal = _sql_text(storable_client_id(client_id) or "")
        _remember(self._ids, client_id, literal)
        return literal


_CACHE_ENTRIES = 4096
_CACHE_KEY_CHARS = 2 * MAX_CLIENT_ID
"""Encoder caches hold at most this many values, each no longer than this: bounded in bytes too."""


def _remember(cache: dict[str, str], key: str, literal: str) -> None:
    """Cache ``literal`` for ``key`` unless the cache is full or ``key`` is long (peer-chosen, rare)."""
    if len(cache) < _CACHE_ENTRIES and len(key) <= _CACHE_KEY_CHARS:
        cache[key] = literal


class _StoreState:
    """Shared between the attempts of one store interaction (the pool may re-run it)."""

    __slots__ = ("attempted",)

    def __init__(self) -> None:
        self.attempted: set[str] = set()


@implementer(IRecord)
class SQLSink:
    """The dialect-neutral part of the SQL record; see :class:`MySQLSink`, :class:`SQLiteSink`."""

    name = "sql"
    dialect = "mysql"
    placeholder = "%s"
    insert_sql = ""
    in_chunk = IN_CHUNK

    def __init__(self, reactor: Any = None, *, migrate: bool = True, ping_timeout: float = 5.0) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self._reactor = reactor
        self.migrate = migrate
        self.ping_timeout = ping_timeout
        self.writer: ReconnectingConnectionPool | None = None
        self.reader: ReconnectingConnectionPool | None = None
        self.max_statement_bytes = 4 * 2**20
        self.max_payload_bytes = MEDIUMBLOB_MAX
        self.migrations_applied: list[int] = []
        self._inflight: set[Deferred[Any]] = set()
        self._running = False
        self._stopping = False
        self._starting: Deferred[None] | None = None

    # pools are built by the subclasses
    def _make_pools(self) -> tuple[ReconnectingConnectionPool, ReconnectingConnectionPool]:
        raise NotImplementedError

    def _prepare(self, conn: Any) -> list[int]:
        """Writer-side start: migrations (or the version check) and server limits."""
        return apply_migrations(conn, self.dialect, allow_create=self.migrate,
                                clock=self._reactor.seconds)

    def _describe(self) -> str:
        return self.name

    def _q(self, sql: str) -> str:
        return sql if self.placeholder == "%s" else sql.replace("%s", self.placeholder)

    @property
    def retried(self) -> int:
        """Interactions re-run after a lost connection or conflict, over both pools."""
        return sum(p.retried for p in (self.writer, self.reader) if p is not None)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Open the pools, migrate (or check the schema version), learn the server's limits.

        A failed start closes the pools it opened (each exactly once); the sink
        may be started again. :meth:`stop` during a start makes it fail with
        :class:`~eth_twisted.errors.SinkUnavailable` once its attempt ends
        (bounded by the connect timeout), and waits for that.
        """
        if self._starting is not None:
            return defer.fail(SinkUnavailable(self.name, "already starting"))
        self._stopping = False
        d: Deferred[None] = self._start()
        self._starting = d

        def done(result: Any) -> Any:
            self._starting = None
            return result

        return d.addBoth(done)

    @defer.inlineCallbacks
    def _start(self) -> Any:
        self._close_pools()  # a running sink started again gets fresh pools
        self._running = False
        self.writer, self.reader = self._make_pools()
        try:
            applied = yield self.writer.runWithConnection(self._prepare)
            if not self._stopping:
                yield self.reader.runInteraction(self._ping_txn)
            if self._stopping:
                raise SinkUnavailable(self.name, "stopped while starting")
        except BaseException as e:
            self._close_pools()
            if isinstance(e, DataRefused):
                raise SinkUnavailable(self.name, str(e)) from e
            raise
        self.migrations_applied = applied
        self._running = True
        log.info("SQL sink {sink} ready ({where}); migrations applied now: {applied}",
                 sink=self.name, where=self._describe(), applied=self.migrations_applied or "none")

    def _close_pools(self) -> None:
        """Close the pools, each once (adbapi's second close raises ``AlreadyQuit``), and forget them."""
        pools = (self.reader, self.writer)
        self.reader = self.writer = None
        for pool in pools:
            if pool is not None:
                pool.close()

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Wait for a start in progress and in-flight work (bounded by the driver timeouts), then close.

        Safe to call at any time, any number of times: after a start that never
        succeeded, during a start, twice.
        """
        self._running = False
        self._stopping = True
        if self._starting is not None:
            # Last in the start's chain: its caller sees the outcome first. A
            # failed start has closed its own pools by then.
            waiter: Deferred[None] = Deferred()

            def release(result: Any) -> Any:
                waiter.callback(None)
                return result

            self._starting.addBoth(release)
            yield waiter
        while self._inflight:
            yield defer.DeferredList(list(self._inflight), consumeErrors=True)
        self._close_pools()

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        self._inflight.add(d)

        def done(result: Any) -> Any:
            self._inflight.discard(d)
            return result

        d.addBoth(done)
        return d

    def _run(self, pool: ReconnectingConnectionPool | None, fn: Callable[..., Any],
             *args: Any) -> Deferred[Any]:
        if not self._running or pool is None:
            return defer.fail(SinkUnavailable(self.name, "the sink is not running"))
        d = pool.runInteraction(fn, *args)
        d.addErrback(self._as_sink_error)
        return self._track(d)

    def _as_sink_error(self, failure: Failure) -> Failure | None:
        if failure.check(SinkError, DataRefused, defer.CancelledError):
            return failure  # ours, or a caller's timeout (addTimeout turns it into TimeoutError)
        log.failure("Unexpected error from {sink}", failure, sink=self.name)
        raise SinkUnavailable(self.name, describe_error(failure.value))

    # -- ping ------------------------------------------------------------------

    def _ping_txn(self, txn: Any) -> None:
        txn.execute("SELECT 1")
        txn.fetchall()

    def ping(self) -> Deferred[None]:
        """``SELECT 1`` on the read pool; SinkTimeout after ``ping_timeout`` seconds."""
        d = self._run(self.reader, self._ping_txn)

        def timed_out(failure: Failure) -> Failure:
            failure.trap(defer.TimeoutError, defer.CancelledError)
            raise SinkTimeout(self.name, f"no answer to ping in {self.ping_timeout}s")

        d.addTimeout(self.ping_timeout, self._reactor)
        d.addErrback(timed_out)
        return d

    # -- writes ----------------------------------------------------------------

    def _row(self, m: Message) -> tuple[Any, ...]:
        raise NotImplementedError

    def _time_value(self, ts: float) -> Any:
        raise NotImplementedError

    def _time_float(self, value: Any) -> float | None:
        raise NotImplementedError

    def _payload_fits(self, payload: bytes) -> bool:
        return len(payload) <= self.max_payload_bytes

    def _row_bytes(self, payload: bytes) -> int:
        return len(payload) + _STATEMENT_OVERHEAD

    def _begin_write(self, txn: Any) -> None:
        """Start the write transaction (SQLite: take the write lock now)."""

    def _select_existing(self, txn: Any, hashes: Sequence[str]) -> dict[str, tuple[str, Any]]:
        found: dict[str, tuple[str, Any]] = {}
        for chunk in _chunks(hashes, self.in_chunk):
            self._execute_in(txn, "SELECT hash, client_ip, received_at FROM ethereum_data WHERE hash IN ({})",
                             chunk)
            for h, ip, at in txn.fetchall():
                found[h] = (ip, at)
        return found

    def _execute_in(self, txn: Any, sql: str, hashes: Sequence[str]) -> None:
        """Run ``sql`` with ``{}`` replaced by the placeholders for ``hashes``."""
        txn.execute(sql.format(",".join([self.placeholder] * len(hashes))), tuple(hashes))

    def _insert(self, txn: Any, rows: Sequence[tuple[Any, ...]], sizes: Sequence[int]) -> int:
        """executemany in chunks no bigger than ``max_statement_bytes``; rows inserted."""
        inserted = 0
        start = 0
        while start < len(rows):
            end, size = start, 0
            while end < len(rows) and (end == start or size + sizes[end] <= self.max_statement_bytes):
                size += sizes[end]
                end += 1
            txn.executemany(self.insert_sql, rows[start:end])
            inserted += max(txn.rowcount, 0)
            start = end
        return inserted

    def _insert_isolating(self, txn: Any, messages: Sequence[Message], idx: list[int],
                          rows: list[tuple[Any, ...]], sizes: list[int], rejected: set[int],
                          depth: int = 0) -> None:
        """Insert ``rows``; on a data error split in halves under savepoints to find the bad rows.

        A single row refused is tried once more with its client metadata as
        ASCII (:meth:`_insert_ascii_metadata`): metadata never costs a payload.
        """
        savepoint = f"eth_sp{depth}"
        txn.execute(f"SAVEPOINT {savepoint}")
        try:
            self._insert(txn, rows, sizes)
        except Exception as e:
            if self._classify(e) is not ErrorKind.DATA:
                raise
            txn.execute(f"ROLLBACK TO SAVEPOINT {savepoint}")
            txn.execute(f"RELEASE SAVEPOINT {savepoint}")
            if len(rows) == 1:
                if self._insert_ascii_metadata(txn, messages[idx[0]], sizes[0], depth + 1, e):
                    return
                rejected.add(idx[0])
                log.warn("{sink} refused one message ({reason}); answering rejected",
                         sink=self.name, reason=describe_error(e))
                return
            half = len(rows) // 2
            self._insert_isolating(txn, messages, idx[:half], rows[:half], sizes[:half], rejected,
                                   depth + 1)
            self._insert_isolating(txn, messages, idx[half:], rows[half:], sizes[half:], rejected,
                                   depth + 1)
        else:
            txn.execute(f"RELEASE SAVEPOINT {savepoint}")

    def _insert_ascii_metadata(self, txn: Any, m: Message, size: int, depth: int,
                               refusal: BaseException) -> bool:
        """Insert ``m`` with ASCII-only client metadata; False when that changes nothing or fails too.

        For a column that cannot hold the characters the storable form keeps
        (an operator's ``utf8mb3`` or ``latin1`` column and a non-BMP or
        non-Latin character): ASCII fits every charset in play.
        """
        ip, cid = storable_client_ip(m.client_ip), storable_client_id(m.client_id)
        plain_ip = ascii_metadata(ip, MAX_CLIENT_IP)
        plain_id = None if cid is None else ascii_metadata(cid, MAX_CLIENT_ID)
        if (plain_ip, plain_id) == (ip, cid):
            return False  # the metadata was ASCII already: something else was refused
        savepoint = f"eth_sp{depth}"
        txn.execute(f"SAVEPOINT {savepoint}")
        try:
            self._insert(txn, [self._row(m._replace(client_ip=plain_ip, client_id=plain_id))], [size])
        except Exception as e:
            if self._classify(e) is not ErrorKind.DATA:
                raise
            txn.execute(f"ROLLBACK TO SAVEPOINT {savepoint}")
            txn.execute(f"RELEASE SAVEPOINT {savepoint}")
            return False
        txn.execute(f"RELEASE SAVEPOINT {savepoint}")
        log.warn("{sink} could not hold a message's client metadata ({reason}); stored it with the "
                 "metadata as ASCII escapes", sink=self.name, reason=describe_error(refusal))
        return True

    def _classify(self, error: BaseException) -> ErrorKind:
        raise NotImplementedError

    def _insert_all_new(self, txn: Any, messages: Sequence[Message], candidates: list[int],
                        state: _StoreState) -> bool:
        """Insert every candidate at once; True when every one was new (the common case).

        The duplicate-ignoring insert reports how many rows it added. When that
        is all of them, each is this delivery's: OK, and the ``SELECT ... IN``
        round is saved. Otherwise the transaction is rolled back (it has done
        nothing else), a new one begins, and the caller takes the SELECT-first
        path, so OK/DUP stay exact. A data error propagates (the batch is then
        re-run isolating the bad rows).
        """
        hashes = [messages[i].hash for i in candidates]
        rows = [self._row(messages[i]) for i in candidates]
        sizes = [self._row_bytes(messages[i].payload) for i in candidates]
        state.attempted.update(hashes)  # a lost COMMIT reply must find these on the re-run
        try:
            inserted = self._insert(txn, rows, sizes)
        except Exception:
            state.attempted.difference_update(hashes)
            raise
        if inserted == len(candidates):
            return True
        txn.execute("ROLLBACK")
        state.attempted.difference_update(hashes)
        self._begin_write(txn)
        return False

    def _store_txn(self, txn: Any, messages: Sequence[Message], careful: bool,
                   state: _StoreState) -> list[Outcome]:
        """One batch, one transaction. Runs in a writer thread; may be re-run by the pool."""
        self._begin_write(txn)
        outcomes: list[Outcome | None] = [None] * len(messages)
        first: dict[str, int] = {}
        candidates: list[int] = []
        for i, m in enumerate(messages):
            if m.hash in first:
                prior = outcomes[first[m.hash]]
                outcomes[i] = Outcome.REJECTED if prior is Outcome.REJECTED else Outcome.DUPLICATE
                continue
            first[m.hash] = i
            bn = m.block_number
            if bn is not None and not (isinstance(bn, int) and 0 <= bn <= MAX_BLOCK_NUMBER):
                outcomes[i] = Outcome.REJECTED
            elif not self._payload_fits(m.payload):
                log.warn("{sink}: a {size}-byte payload is larger than this database takes; "
                         "answering rejected", sink=self.name, size=len(m.payload))
                outcomes[i] = Outcome.REJECTED
            else:
                candidates.append(i)
        if candidates and not careful and not state.attempted and self._insert_all_new(
                txn, messages, candidates, state):
            for i in candidates:
                outcomes[i] = Outcome.STORED
            return [o if o is not None else Outcome.DUPLICATE for o in outcomes]
        existing = self._select_existing(txn, [messages[i].hash for i in candidates])
        new: list[int] = []
        for i in candidates:
            m = messages[i]
            row = existing.get(m.hash)
            if row is None:
                new.append(i)
            elif m.hash in state.attempted and self._same_delivery(m, row):
                # An earlier attempt of this very interaction inserted it and its COMMIT
                # reply was lost: the row is this delivery's.
                outcomes[i] = Outcome.STORED
            else:
                outcomes[i] = Outcome.DUPLICATE
        if new:
            state.attempted.update(messages[i].hash for i in new)
            rows = [self._row(messages[i]) for i in new]
            sizes = [self._row_bytes(messages[i].payload) for i in new]
            rejected: set[int] = set()
            if careful:
                self._insert_isolating(txn, messages, new, rows, sizes, rejected)
                inserted = -1
            else:
                inserted = self._insert(txn, rows, sizes)
            for i in rejected:
                outcomes[i] = Outcome.REJECTED
            kept = [i for i in new if i not in rejected]
            if inserted == len(kept):
                for i in kept:
                    outcomes[i] = Outcome.STORED
            elif kept:
                # Someone else inserted some of these since our SELECT (or the careful
                # path ran): a snapshot read shows exactly the rows this transaction wrote.
                mine = self._select_existing(txn, [messages[i].hash for i in kept])
                for i in kept:
                    outcomes[i] = Outcome.STORED if messages[i].hash in mine else Outcome.DUPLICATE
        return [o if o is not None else Outcome.DUPLICATE for o in outcomes]

    def _same_delivery(self, m: Message, row: tuple[str, Any]) -> bool:
        ip, at = row
        stored = self._time_float(at)
        return ip == storable_client_ip(m.client_ip) and stored is not None and abs(
            stored - self._time_float(self._time_value(m.received_at))  # type: ignore[operator]
        ) < 1e-6

    def store_batch(
        self, messages: Sequence[Message], verdicts: Sequence[Outcome] | None = None
    ) -> Deferred[list[Outcome]]:
        """Store a batch in one transaction; one Outcome per message, in order.

        ``verdicts`` is ignored: the record decides. A batch the database
        refuses for a data error is re-run with the bad rows isolated (REJECTED).
        """
        batch = list(messages)
        if not batch:
            return defer.succeed([])
        if not self._running:
            return defer.fail(SinkUnavailable(self.name, "the sink is not running"))
        state = _StoreState()
        d = self._run(self.writer, self._store_txn, batch, False, state)

        def isolate(failure: Failure) -> Deferred[list[Outcome]]:
            failure.trap(DataRefused)
            log.warn("{sink} refused a value in a batch of {n} ({reason}); isolating it",
                     sink=self.name, n=len(batch), reason=str(failure.value))
            d2 = self._run(self.writer, self._store_txn, batch, True, state)
            d2.addErrback(self._data_to_unavailable)
            return d2

        d.addErrback(isolate)
        return d

    def _data_to_unavailable(self, failure: Failure) -> None:
        failure.trap(DataRefused)
        raise SinkUnavailable(self.name, str(failure.value))

    # -- reads -----------------------------------------------------------------

    def _record(self, row: Sequence[Any]) -> Record:
        rid, h, payload, bn, ip, cid, at = row
        return Record(int(rid), h, bytes(payload), None if bn is None else int(bn), ip, cid,
                      self._time_float(at) or 0.0)

    def _select_records(self, txn: Any, sql: str, args: tuple[Any, ...]) -> list[Record]:
        txn.execute(self._q(sql), args)
        return [self._record(r) for r in txn.fetchall()]

    def _read(self, sql: str, *args: Any) -> Deferred[list[Record]]:
        d = self._run(self.reader, self._select_records, sql, args)
        d.addErrback(self._data_to_unavailable)
        return d

    def fetch_records(self, after_id: int, limit: int) -> Deferred[list[Record]]:
        """Records with ``id > after_id`` in id order, at most ``limit``."""
        return self._read(f"SELECT {_COLUMNS} FROM ethereum_data WHERE id > %s ORDER BY id LIMIT %s",
                          int(after_id), max(0, int(limit)))

    def recent(self, limit: int, before: int | None = None) -> Deferred[list[Record]]:
        """Newest first (by id), at most ``limit``, only ids below ``before`` if given."""
        if before is None:
            return self._read(f"SELECT {_COLUMNS} FROM ethereum_data ORDER BY id DESC LIMIT %s",
                              max(0, int(limit)))
        return self._read(
            f"SELECT {_COLUMNS} FROM ethereum_data WHERE id < %s ORDER BY id DESC LIMIT %s",
            int(before), max(0, int(limit)))

    def _summary(self, row: Sequence[Any]) -> RecordSummary:
        rid, h, bn, ip, at = row
        return RecordSummary(int(rid), h, None if bn is None else int(bn), ip,
                             self._time_float(at) or 0.0)

    def _select_summaries(self, txn: Any, sql: str, args: tuple[Any, ...], limit: int,
                          max_bytes: int) -> list[RecordSummary]:
        txn.execute(self._q(sql), args)

        def rows() -> Iterator[Sequence[Any]]:
            while True:
                chunk = txn.fetchmany(256)
                if not chunk:
                    return
                yield from chunk

        return take_page(map(self._summary, rows()), limit, max_bytes)

    def _summaries(self, sql: str, args: tuple[Any, ...], limit: int,
                   max_bytes: int) -> Deferred[list[RecordSummary]]:
        # Never ask for more rows than the page can hold: the payload column is not
        # selected, and the driver buffers at most this many small rows.
        rows = max(0, min(int(limit), int(max_bytes) // _SUMMARY_MIN_BYTES + 1))
        d = self._run(self.reader, self._select_summaries, sql, (*args, rows), rows, int(max_bytes))
        d.addErrback(self._data_to_unavailable)
        return d

    def fetch_summaries(
        self, after_id: int, limit: int, max_bytes: int = DEFAULT_SUMMARY_PAGE_BYTES
    ) -> Deferred[list[RecordSummary]]:
        """One page of summaries (no payloads) with ``id > after_id``, in id order (keyset pagination)."""
        return self._summaries(
            f"SELECT {_SUMMARY_COLUMNS} FROM ethereum_data WHERE id > %s ORDER BY id LIMIT %s",
            (int(after_id),), limit, max_bytes)

    def recent_summaries(
        self, limit: int, before: int | None = None, max_bytes: int = DEFAULT_SUMMARY_PAGE_BYTES
    ) -> Deferred[list[RecordSummary]]:
        """One page of summaries newest first, ids below ``before`` if given."""
        if before is None:
            return self._summaries(
                f"SELECT {_SUMMARY_COLUMNS} FROM ethereum_data ORDER BY id DESC LIMIT %s",
                (), limit, max_bytes)
        return self._summaries(
            f"SELECT {_SUMMARY_COLUMNS} FROM ethereum_data WHERE id < %s ORDER BY id DESC LIMIT %s",
            (int(before),), limit, max_bytes)

    def by_block(self, block_number: int, limit: int | None = None,
                 after: int | None = None) -> Deferred[list[Record]]:
        """Records whose recognised block number is ``block_number``, in id order (above ``after``, at most ``limit``)."""
        if not 0 <= int(block_number) <= MAX_BLOCK_NUMBER:
            return defer.succeed([])
        sql, args = f"SELECT {_COLUMNS} FROM ethereum_data WHERE block_number = %s", [int(block_number)]
        if after is not None:
            sql, args = sql + " AND id > %s", [*args, int(after)]
        sql += " ORDER BY id"
        if limit is not None:
            sql, args = sql + " LIMIT %s", [*args, max(0, int(limit))]
        return self._read(sql, *args)

    def _begin_read(self, txn: Any) -> None:
        """Start a read transaction, so several queries see one snapshot."""

    def _totals_txn(self, txn: Any) -> Totals:
        self._begin_read(txn)
        t = Totals()
        txn.execute("SELECT COUNT(*), MIN(received_at), MAX(received_at) FROM ethereum_data")
        count, lo, hi = txn.fetchone()
        t.records = int(count)
        t.first_received_at = None if lo is None else self._time_float(lo)
        t.last_received_at = None if hi is None else self._time_float(hi)
        txn.execute("SELECT client_ip, COUNT(*) FROM ethereum_data GROUP BY client_ip")
        t.first_by_ip = {ip: int(n) for ip, n in txn.fetchall()}
        txn.execute("SELECT block_number, received_at FROM ethereum_data "
                    "WHERE block_number IS NOT NULL ORDER BY id DESC LIMIT 1")
        row = txn.fetchone()
        if row is not None:
            t.latest_block, t.latest_block_at = int(row[0]), self._time_float(row[1])
        txn.execute("SELECT d.client_ip, d.block_number FROM ethereum_data d JOIN ("
                    "SELECT MAX(id) AS id FROM ethereum_data WHERE block_number IS NOT NULL "
                    "GROUP BY client_ip) m ON d.id = m.id")
        t.latest_block_by_ip = {ip: int(bn) for ip, bn in txn.fetchall()}
        return t

    def totals(self) -> Deferred[Totals]:
        """Aggregate counts over every record (a handful of aggregate queries, one snapshot)."""
        d = self._run(self.reader, self._totals_txn)
        d.addErrback(self._data_to_unavailable)
        return d


@implementer(IRecord)
class MySQLSink(SQLSink):
    """The record in MySQL/MariaDB through adbapi and PyMySQL."""

    name = "mysql"
    dialect = "mysql"
    placeholder = "%s"
    insert_sql = (
        "INSERT INTO ethereum_data (hash, payload, block_number, client_ip, client_id, received_at) "
        "VALUES (%s, %s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE hash = hash"
    )
    # Not INSERT IGNORE: IGNORE also turns data errors (too long, CHECK) into warnings and
    # silently truncated or skipped rows; this only ignores the duplicate hash. PyMySQL does
    # not set CLIENT_FOUND_ROWS, so a no-op duplicate counts 0 affected rows.
    insert_head = "INSERT INTO ethereum_data (hash, payload, block_number, client_ip, client_id, received_at) VALUES "
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
            c.execute("SET SESSION time_zone = '+00:00', "
                      "sql_mode = 'STRICT_TRANS_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,"
                      "ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION', "
                      "innodb_lock_wait_timeout = %s", (self._lock_wait,))
            # The OK/DUP bookkeeping reads its own snapshot after inserting.
            c.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.commit()

    def _make_pools(self) -> tuple[ReconnectingConnectionPool, ReconnectingConnectionPool]:
        connect_timeout = float(self._connect_kwargs.get("connect_timeout") or 5.0)
        window = max(2.0, connect_timeout)

        def pool(name: str, size: int) -> ReconnectingConnectionPool:
            return ReconnectingConnectionPool(
                "pymysql", sink_name=self.name, classify=classify_mysql_error,
                retries=self.retries, retry_window=window, handshake_timeout=connect_timeout,
                cp_min=1, cp_max=size, cp_name=f"eth-{self.name}-{name}", cp_openfun=self._open,
                cp_reactor=self._reactor, **self._connect_kwargs,
            )

        return pool("writer", self.writers), pool("reader", self.pool_size)

    def _prepare(self, conn: Any) -> list[int]:
        applied = super()._prepare(conn)
        cur = conn.cursor()
        cur.execute("SELECT @@max_allowed_packet")
        packet = int(cur.fetchone()[0])
        cur.close()
        self.max_statement_bytes = max(64 * 1024, packet // 4)
        self.max_payload_bytes = min(MEDIUMBLOB_MAX, packet - 2 * _STATEMENT_OVERHEAD)
        return applied

    def _payload_fits(self, payload: bytes) -> bool:
        return len(payload) <= MEDIUMBLOB_MAX and self._row_bytes(payload) <= self.max_payload_bytes

    def _row_bytes(self, payload: bytes) -> int:
        return 2 * len(payload) + 3 + _STATEMENT_OVERHEAD  # X'<hex>'

    def _insert(self, txn: Any, rows: Sequence[Any], sizes: Sequence[int]) -> int:
        """One multi-row INSERT per ``max_statement_bytes`` (rows already encoded by :meth:`_row`)."""
        inserted = 0
        start = 0
        while start < len(rows):
            end, size = start, 0
            while end < len(rows) and (end == start or size + sizes[end] <= self.max_statement_bytes):
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
        "INSERT INTO ethereum_data (hash, payload, block_number, client_ip, client_id, received_at) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (hash) DO NOTHING"
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
        self.path = _check_sqlite_path(path)
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
            raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL (journal_mode={mode})")
        self.journal_mode = str(mode).lower()
        conn.execute(f"PRAGMA synchronous={self.synchronous}")

    def _open_reader(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA query_only=ON")

    def _make_pools(self) -> tuple[ReconnectingConnectionPool, ReconnectingConnectionPool]:
        def pool(name: str, size: int, openfun: Callable[[Any], None]) -> ReconnectingConnectionPool:
            return ReconnectingConnectionPool(
                "sqlite3", self.path, sink_name=self.name, classify=classify_sqlite_error,
                retries=self.retries, retry_window=max(2.0, 3 * self.busy_timeout),
                timeout=self.busy_timeout, check_same_thread=False, isolation_level=None,
                cp_min=1, cp_max=size, cp_name=f"eth-{self.name}-{name}", cp_openfun=openfun,
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
        return (m.hash, m.payload, m.block_number, storable_client_ip(m.client_ip),
                storable_client_id(m.client_id), float(m.received_at))


# -- factories ---------------------------------------------------------------------


def make_mysql_sink(
    host: str,
    port: int,
    user: str,
    password: str | None,
    database: str,
    *,
    reactor: Any = None,
    ssl: dict[str, Any] | None = None,
    migrate: bool = True,
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
    write_timeout: float = 30.0,
    pool_size: int = 3,
    writers: int = 2,
    init_command: str | None = None,
    retries: int = 3,
    ping_timeout: float = 5.0,
) -> MySQLSink:
    """A MySQL/MariaDB record sink (not started).

    ``pool_size`` is the read pool's size; the writer pool has ``writers``
    connections. ``ssl`` takes ``ca``, ``cert``, ``key`` and ``verify`` (default
    true). ``init_command`` runs on every new connection (after ours).
    """
    kw = _mysql_connect_kwargs(host, port, user, password, database, ssl=ssl,
                               connect_timeout=connect_timeout, read_timeout=read_timeout,
                               write_timeout=write_timeout, init_command=init_command)
    return MySQLSink(kw, reactor, migrate=migrate, pool_size=pool_size, writers=writers,
                     retries=retries, ping_timeout=ping_timeout)


def make_sqlite_sink(
    path: str,
    *,
    reactor: Any = None,
    migrate: bool = True,
    busy_timeout: float = 5.0,
    readers: int = 2,
    synchronous: str = "FULL",
    ping_timeout: float = 5.0,
) -> SQLiteSink:
    """An SQLite record sink on the file at ``path`` (not started; never ``:memory:``)."""
    return SQLiteSink(path, reactor, migrate=migrate, busy_timeout=busy_timeout, readers=readers,
                      synchronous=synchronous, ping_timeout=ping_timeout)


__all__ = [
    "DataRefused",
    "ErrorKind",
    "MySQLSink",
    "ReconnectingConnectionPool",
    "SQLSink",
    "SQLiteSink",
    "apply_migrations",
    "classify_mysql_error",
    "classify_sqlite_error",
    "from_utc_datetime",
    "latest_version",
    "load_migrations",
    "make_mysql_sink",
    "make_sqlite_sink",
    "migrate_mysql",
    "migrate_sqlite",
    "to_utc_datetime",
]
