"""Storage behind :class:`~eth_twisted.interfaces.ISink`: the SQL record, the Redis mirror, the memory sink.

The memory sink is for tests. :func:`create_sinks` builds exactly the configured ones from a
:class:`StorageSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from eth_twisted.interfaces import IRecord, ISink
from eth_twisted.options import mask, setting
from eth_twisted.sinks.redis import RedisSettings
from eth_twisted.sinks.sql.pool import MySQLSettings
from eth_twisted.sinks.sql.sqlite import SQLiteSettings


@dataclass(slots=True)
class StorageSettings:
    """Which sinks the server stores to, and each one's settings.

    The flags are the server options of their names.
    """

    use_mysql: bool = setting(False, "Store to MySQL/MariaDB (else to the embedded SQLite file)")
    use_redis: bool = setting(False, "Mirror counts and hashes to Redis")
    no_migrate: bool = setting(
        False, "Do not apply schema migrations at start (run `eth migrate` instead)"
    )
    sqlite: SQLiteSettings = field(default_factory=SQLiteSettings)
    mysql: MySQLSettings = field(default_factory=MySQLSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)

    def summary(self) -> str:
        """Where messages go, for start-up lines (the password masked)."""
        m = self.mysql
        sql = (
            f"mysql://{m.mysql_user}:{mask(m.mysql_pass)}@{m.mysql_host}:{m.mysql_port}/{m.mysql_db}"
            if self.use_mysql
            else f"sqlite:{self.sqlite.sqlite}"
        )
        if self.use_redis:
            r = self.redis
            return f"{sql} + redis://{r.redis_host}:{r.redis_port}/{r.redis_db} prefix {r.redis_prefix}"
        return sql


def create_sinks(storage: StorageSettings, reactor: Any) -> tuple[IRecord, list[ISink]]:
    """The record sink and the mirrors ``storage`` names, none started."""
    migrate = not storage.no_migrate
    record: IRecord
    if storage.use_mysql:
        from eth_twisted.sinks.sql.mysql import make_mysql_sink

        record = make_mysql_sink(storage.mysql, reactor=reactor, migrate=migrate)
    else:
        from eth_twisted.sinks.sql.sqlite import make_sqlite_sink

        record = make_sqlite_sink(storage.sqlite, reactor=reactor, migrate=migrate)
    mirrors: list[ISink] = []
    if storage.use_redis:
        from eth_twisted.sinks.redis import make_redis_sink

        mirrors.append(make_redis_sink(storage.redis, reactor=reactor))
    return record, mirrors
