"""`eth migrate`: numbered migrations applied on demand, idempotent, on SQLite and MariaDB."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.mysql import mysql_query

VENV_BIN = Path(sys.executable).parent


def eth(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "eth"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_migrate_sqlite(tmp_path: Path) -> None:
    """The first run applies migrations 1 and 2 and records them; the second finds nothing to do."""
    db = tmp_path / "eth-server.sqlite3"
    first = eth("migrate", "--sqlite", str(db))
    assert first.returncode == 0, first.stderr
    assert "applied 1, 2" in first.stdout
    second = eth("migrate", "--sqlite", str(db))
    assert second.returncode == 0 and "up to date" in second.stdout
    con = sqlite3.connect(db)
    assert [r[0] for r in con.execute("SELECT version FROM schema_version")] == [1, 2]
    assert con.execute("SELECT COUNT(*) FROM ethereum_data").fetchone() == (0,)


@pytest.mark.live
def test_migrate_mysql_password_from_environment(mysql_db: dict[str, Any]) -> None:
    """Against MariaDB, with the password from ETH_MYSQL_PASS (never on argv), and idempotent."""
    args = [
        "migrate",
        "--use-mysql",
        "--mysql-host",
        mysql_db["host"],
        "--mysql-port",
        str(mysql_db["port"]),
        "--mysql-user",
        mysql_db["user"],
        "--mysql-db",
        mysql_db["database"],
    ]
    env = {"ETH_MYSQL_PASS": mysql_db["password"]}
    first = eth(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert (
        "applied 1, 2" in first.stdout and mysql_db["password"] not in first.stdout + first.stderr
    )
    assert "up to date" in eth(*args, env=env).stdout
    assert mysql_query(mysql_db, "SELECT version FROM schema_version ORDER BY version") == [
        (1,),
        (2,),
    ]


@pytest.mark.live
def test_migrate_reports_a_wrong_password(mysql_db: dict[str, Any]) -> None:
    """A refused login exits 1 with a message that names the database but not the password."""
    result = eth(
        "migrate",
        "--use-mysql",
        "--mysql-host",
        mysql_db["host"],
        "--mysql-user",
        mysql_db["user"],
        "--mysql-db",
        mysql_db["database"],
        env={"ETH_MYSQL_PASS": "wrong-password-123"},
    )
    assert result.returncode == 1
    assert mysql_db["database"] in result.stderr and "wrong-password-123" not in result.stderr
