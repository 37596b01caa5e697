"""The SQL record: MySQL/MariaDB through adbapi and PyMySQL, or an embedded SQLite file.

One module per concern: :mod:`.pool` (the retrying connection pool and error classes),
:mod:`.migrations` (numbered schema files and ``eth migrate``), :mod:`.record` (one batch in
one transaction, exact OK/DUP, the read paths), :mod:`.mysql` and :mod:`.sqlite` (the dialects).
"""

from __future__ import annotations

from eth_twisted.sinks.sql.migrations import migrate_mysql, migrate_sqlite
from eth_twisted.sinks.sql.mysql import MySQLSink, make_mysql_sink
from eth_twisted.sinks.sql.sqlite import SQLiteSink, make_sqlite_sink

__all__ = [
    "MySQLSink",
    "SQLiteSink",
    "make_mysql_sink",
    "make_sqlite_sink",
    "migrate_mysql",
    "migrate_sqlite",
]
