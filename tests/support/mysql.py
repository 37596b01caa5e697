"""The test account on the machine's MariaDB: how the tests connect as it, and one-statement queries."""

from __future__ import annotations

import os
from typing import Any

import pymysql

from eth_twisted.sinks.sql.pool import MySQLSettings
from tests.support import provision_mysql_user

MYSQL_HOST = os.environ.get("ETH_TEST_MYSQL_HOST", "127.0.0.1")
MYSQL_PORT = int(os.environ.get("ETH_TEST_MYSQL_PORT", "3306"))
MYSQL_USER = os.environ.get("ETH_TEST_MYSQL_USER", "eth_test")
MYSQL_PASS = os.environ.get("ETH_TEST_MYSQL_PASS", "eth-test-password")
MYSQL_SOCKET = os.environ.get("ETH_TEST_MYSQL_SOCKET", "/run/mysqld/mysqld.sock")


def connect_test_user(database: str | None = None) -> pymysql.connections.Connection:
    """A connection as the test user over TCP (to ``database`` when given)."""
    return pymysql.connect(
        host=MYSQL_HOST,
        port=MYSQL_PORT,
        user=MYSQL_USER,
        password=MYSQL_PASS,
        database=database,
        connect_timeout=5,
        autocommit=True,
    )


def provision_test_user() -> None:
    """Create the test user, as root over the local socket."""
    provision_mysql_user(MYSQL_SOCKET, MYSQL_USER, MYSQL_PASS)


def mysql_query(db: dict[str, Any], sql: str, args: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement as the test user in ``db`` and return every row."""
    conn = connect_test_user(db["database"])
    try:
        with conn.cursor() as c:
            c.execute(sql, args)
            return list(c.fetchall())
    finally:
        conn.close()


def settings_for(db: dict[str, Any], **fields: Any) -> MySQLSettings:
    """MySQL settings for the test's database (``fields``: any MySQLSettings field, host included)."""
    return MySQLSettings(
        **{
            "mysql_host": db["host"],
            "mysql_port": db["port"],
            "mysql_user": db["user"],
            "mysql_pass": db["password"],
            "mysql_db": db["database"],
            **fields,
        }
    )
