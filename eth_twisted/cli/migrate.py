"""``eth migrate``: apply the numbered schema migrations to the configured SQL database."""

from __future__ import annotations

import sys

from eth_twisted.options import PRECEDENCE
from eth_twisted.server import tap as server_tap


class MigrateOptions(server_tap.StorageOptions):
    """Options of ``eth migrate``: the server's storage flags."""

    synopsis = "[storage options]"
    longdesc = "Apply the numbered schema migrations to the configured SQL database. " + PRECEDENCE


def migrate(config: server_tap.StorageOptions) -> int:
    """``eth migrate``: apply migrations and print what was applied."""
    from eth_twisted.sinks.sql.migrations import migrate_mysql, migrate_sqlite

    storage = config.storage
    where = storage.summary()
    try:
        if storage.use_mysql:
            applied = migrate_mysql(storage.mysql)
        else:
            assert storage.sqlite.sqlite is not None
            applied = migrate_sqlite(storage.sqlite.sqlite)
    except Exception as e:
        print(f"eth migrate: {where}: {e}", file=sys.stderr)
        return 1
    if applied:
        print(f"eth migrate: applied {', '.join(str(v) for v in applied)} to {where}")
    else:
        print(f"eth migrate: {where} is up to date")
    return 0


__all__ = ["MigrateOptions", "migrate"]
