"""Numbered schema migrations, the ``schema_version`` table, and ``eth migrate``.

The migrations are the files ``migrations/<dialect>/NNNN_name.sql``.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pymysql
from twisted.logger import Logger

from eth_twisted.errors import (
    ConfigError,
)
from eth_twisted.sinks.sql.pool import MySQLSettings, describe_error, mysql_connect_kwargs

log = Logger(namespace="eth_twisted.sinks.sql")
_EPOCH = datetime(1970, 1, 1)


def to_utc_datetime(ts: float) -> datetime:
    """Unix time as a naive UTC datetime with microseconds (for DATETIME(6))."""
    return datetime.fromtimestamp(ts, timezone.utc).replace(tzinfo=None)


def from_utc_datetime(dt: datetime) -> float:
    """A naive UTC datetime (from DATETIME(6)) as unix time."""
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc).replace(tzinfo=None)
    return (dt - _EPOCH) / timedelta(seconds=1)


MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


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
            line
            for line in path.read_text("utf-8").splitlines()
            if not line.lstrip().startswith("--")
        )
        statements = tuple(s.strip() for s in re.split(r";\s*$", text, flags=re.M) if s.strip())
        found.append(Migration(int(m.group(1)), m.group(2), statements))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise ConfigError(f"migrations for {dialect} are not numbered 1..n: {versions}")
    return found


def latest_version(dialect: str) -> int:
    """The schema version this code expects (what a configuration check compares the database with)."""
    return len(load_migrations(dialect))


_SCHEMA_VERSION_DDL = {
    "mysql": "CREATE TABLE IF NOT EXISTS schema_version ("
    "version INT NOT NULL PRIMARY KEY, applied_at DATETIME(6) NOT NULL"
    ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "sqlite": "CREATE TABLE IF NOT EXISTS schema_version ("
    "version INTEGER NOT NULL PRIMARY KEY, applied_at REAL NOT NULL)",
}


_MYSQL_PRIVILEGE_CODES = frozenset(
    {1044, 1142, 1227}
)  # db access denied, command denied, need privilege


def _is_missing_table(dialect: str, error: BaseException) -> bool:
    if dialect == "mysql":
        return (
            isinstance(error, pymysql.err.MySQLError) and bool(error.args) and error.args[0] == 1146
        )
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
        log.warn(
            "The {dialect} schema is at version {current}, newer than this code's {latest}; "
            "continuing",
            dialect=dialect,
            current=current,
            latest=latest,
        )
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
                cur.execute(
                    "SELECT COUNT(*) FROM schema_version WHERE version = "
                    + ("%s" if dialect == "mysql" else "?"),
                    (migration.version,),
                )
                if cur.fetchone()[0]:
                    conn.commit()
                    continue
                for statement in migration.statements:
                    _execute_ddl(cur, dialect, statement)
                now: Any = clock()
                if dialect == "mysql":
                    now = to_utc_datetime(now)
                    cur.execute(
                        "INSERT INTO schema_version (version, applied_at) VALUES (%s, %s)",
                        (migration.version, now),
                    )
                else:
                    cur.execute(
                        "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                        (migration.version, now),
                    )
                conn.commit()
                applied.append(migration.version)
                log.info(
                    "Applied {dialect} migration {version:04d}_{name}",
                    dialect=dialect,
                    version=migration.version,
                    name=migration.name,
                )
        except Exception as e:
            conn.rollback()
            denied = (
                isinstance(e, pymysql.err.MySQLError)
                and bool(e.args)
                and e.args[0] in _MYSQL_PRIVILEGE_CODES
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


_MYSQL_ALREADY_THERE = frozenset({1060, 1061})  # duplicate column name, duplicate key name


def _execute_ddl(cur: Any, dialect: str, statement: str) -> None:
    """Run one migration statement; on MySQL, an ALTER that an interrupted run applied is skipped.

    MySQL commits each DDL statement by itself, so a migration cut short leaves
    its first ALTERs applied without its ``schema_version`` row; when it runs
    again, a column or key that is already there is not an error.
    """
    try:
        cur.execute(statement)
    except pymysql.err.MySQLError as e:
        if not (dialect == "mysql" and e.args and e.args[0] in _MYSQL_ALREADY_THERE):
            raise
        log.info("Migration statement already applied ({reason}); skipped", reason=e.args[1])


def _quote_identifier(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def migrate_mysql(settings: MySQLSettings, *, create_database: bool = True) -> list[int]:
    """Blocking: apply pending MySQL migrations (for `eth migrate`); return the versions applied.

    Creates the database (utf8mb4) first when it does not exist and
    ``create_database`` is true. Migrations may take longer than a batch: the
    read timeout is at least a minute.
    """
    kw = mysql_connect_kwargs(settings, read_timeout=max(60.0, settings.mysql_read_timeout))
    database = str(settings.mysql_db)
    try:
        conn = pymysql.connect(**kw)
    except pymysql.err.OperationalError as e:
        if not (create_database and e.args and e.args[0] == 1049):
            raise
        server = pymysql.connect(**dict(kw, database=None, autocommit=True))
        try:
            with server.cursor() as c:
                c.execute(
                    f"CREATE DATABASE IF NOT EXISTS {_quote_identifier(database)} "
                    "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
                )
        finally:
            server.close()
        conn = pymysql.connect(**kw)
    try:
        return apply_migrations(conn, "mysql")
    finally:
        conn.close()


def check_sqlite_path(path: str) -> str:
    """``path`` as a string, or ConfigError for an in-memory database (adbapi's threads cannot share one)."""
    path = str(path)
    if not path or path == ":memory:" or path.startswith("file::memory:") or "mode=memory" in path:
        raise ConfigError(
            "an SQLite sink needs a file: an in-memory database cannot be shared by "
            "adbapi's threads (use the memory sink in tests)"
        )
    return path


def migrate_sqlite(path: str) -> list[int]:
    """Blocking: apply pending SQLite migrations to the file at ``path``; return the versions applied."""
    conn = sqlite3.connect(check_sqlite_path(path), timeout=30.0, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        return apply_migrations(conn, "sqlite")
    finally:
        conn.close()
