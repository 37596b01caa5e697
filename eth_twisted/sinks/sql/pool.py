"""The SQL sinks' connection pool: adbapi that reconnects and retries, and how database errors are classed."""

from __future__ import annotations

import enum
import sqlite3
import ssl as ssl_module
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pymysql
from twisted.enterprise import adbapi
from twisted.logger import Logger

from eth_twisted.errors import (
    ConfigError,
    SinkBusy,
    SinkError,
    SinkTimeout,
    SinkUnavailable,
)
from eth_twisted.options import int_in, positive_float, setting

log = Logger(namespace="eth_twisted.sinks.sql")


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


_MYSQL_LOST = frozenset(
    {
        1040 + 13,  # 1053 ER_SERVER_SHUTDOWN
        1152,
        1153,
        1154,
        1156,
        1158,
        1159,
        1160,
        1161,  # aborted connection, network read/write errors
        1927,  # ER_CONNECTION_KILLED (MariaDB)
        2002,
        2003,
        2006,
        2013,
        2014,
        2055,  # client: can't connect, gone away, lost, out of sync
        4031,  # disconnected for inactivity (MySQL 8)
    }
)


_MYSQL_CONFLICT = frozenset({1205, 1213, 1040})  # lock wait timeout, deadlock, too many connections


_MYSQL_DATA = frozenset(
    {
        1048,
        1264,
        1265,
        1292,
        1366,
        1367,
        1406,  # null, out of range, truncated, wrong value, too long
        3819,
        4025,  # CHECK constraint failed (MySQL, MariaDB)
    }
)


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
                try:  # type: ignore[unreachable]  # adbapi declares openfun = None
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
            log.debug(
                "Closing a {sink} connection failed: {reason}",
                sink=self.sink_name,
                reason=describe_error(e),
            )

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
                    log.info(
                        "{sink}: {failure}; retried away ({attempts} retries)",
                        sink=self.sink_name,
                        failure=first_failure,
                        attempts=attempt,
                    )
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
                if (
                    kind in (ErrorKind.LOST, ErrorKind.CONFLICT)
                    and attempt < self.retries
                    and elapsed + delay < self.retry_window
                ):
                    attempt += 1
                    with self._counter_lock:
                        self.retried += 1
                    # Debug only: work that fails for good is logged once per outage by
                    # its caller (the router, the server's start loop), work retried
                    # away once, above.
                    if not first_failure:
                        first_failure = f"{kind.value} ({describe_error(e)})"
                    log.debug(
                        "{sink}: {kind} ({reason}); retry {attempt} of {retries}",
                        sink=self.sink_name,
                        kind=kind.value,
                        reason=describe_error(e),
                        attempt=attempt,
                        retries=self.retries,
                    )
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


@dataclass(slots=True)
class MySQLSettings:
    """Where and how the MySQL/MariaDB record connects.

    The option fields are the server options of their names.
    """

    mysql_host: str | None = setting(None, "MySQL host (required with --use-mysql)")
    mysql_port: int = setting(3306, "MySQL port", int_in(1, 65535))
    mysql_user: str | None = setting(None, "MySQL user (required with --use-mysql)")
    mysql_pass: str | None = setting(
        None,
        "MySQL password (prefer ETH_MYSQL_PASS, --mysql-pass-file or $CREDENTIALS_DIRECTORY/mysql-pass)",
    )
    mysql_db: str | None = setting(None, "MySQL database (required with --use-mysql)")
    mysql_ssl_ca: str | None = setting(
        None, "CA file: connect to MySQL over TLS and verify its certificate"
    )
    mysql_connect_timeout: float = setting(
        5.0, "Seconds to connect and log in to MySQL", positive_float
    )
    mysql_read_timeout: float = setting(30.0, "Seconds to wait for a MySQL reply", positive_float)
    ssl: dict[str, Any] | None = None
    """TLS beyond a CA (``ca``, ``cert``, ``key``, ``verify``); ``mysql_ssl_ca`` alone fills ``ca``."""
    write_timeout: float = 30.0
    pool_size: int = 3
    """Connections of the read pool (the API's reads); the writer pool has ``writers``."""
    writers: int = 2
    init_command: str | None = None
    """SQL run on every new connection, after ours."""
    retries: int = 3
    ping_timeout: float = 5.0

    def tls(self) -> dict[str, Any] | None:
        """The TLS settings to connect with, or None for plaintext."""
        if self.ssl is not None:
            return self.ssl
        return {"ca": self.mysql_ssl_ca} if self.mysql_ssl_ca else None


def mysql_connect_kwargs(
    settings: MySQLSettings,
    *,
    database: str | None | bool = True,
    read_timeout: float | None = None,
) -> dict[str, Any]:
    """PyMySQL's ``connect`` arguments for ``settings`` (``database=None``: connect without one)."""
    tls = settings.tls()
    kw: dict[str, Any] = dict(
        host=settings.mysql_host,
        port=int(settings.mysql_port),
        user=settings.mysql_user,
        password=settings.mysql_pass or "",
        database=settings.mysql_db if database is True else database,
        charset="utf8mb4",
        autocommit=False,
        connect_timeout=settings.mysql_connect_timeout,
        read_timeout=read_timeout if read_timeout is not None else settings.mysql_read_timeout,
        write_timeout=settings.write_timeout,
        init_command=settings.init_command,
    )
    if tls:
        kw["ssl"] = mysql_tls_context(tls)
    return kw


def mysql_tls_context(settings: dict[str, Any]) -> ssl_module.SSLContext:
    """A client TLS context from ``ca``, ``cert``, ``key`` and ``verify`` (default true)."""
    unknown = set(settings) - {"ca", "cert", "key", "verify"}
    if unknown:
        raise ConfigError(
            f"unknown MySQL TLS settings: {sorted(unknown)} (use ca, cert, key, verify)"
        )
    ctx = ssl_module.create_default_context(cafile=settings.get("ca") or None)
    if settings.get("cert"):
        ctx.load_cert_chain(settings["cert"], settings.get("key") or None)
    if not settings.get("verify", True):
        ctx.check_hostname = False
        ctx.verify_mode = ssl_module.CERT_NONE
    return ctx
