"""Fixtures for the real services on this machine: MariaDB, Redis, anvil.

The tests connect over TCP as their own MariaDB user with a password, like a
real deployment. That user is created here, as root over the local socket,
when it does not exist yet. A missing service fails the test with a message
saying how to start it; nothing is silently skipped.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest

from tests.support import Anvil, PrivateRedis, redis_command
from tests.support.mysql import (
    MYSQL_HOST,
    MYSQL_PASS,
    MYSQL_PORT,
    MYSQL_SOCKET,
    MYSQL_USER,
    connect_test_user,
    provision_test_user,
)

REDIS_HOST = os.environ.get("ETH_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("ETH_TEST_REDIS_PORT", "6379"))

HOW_TO_START = (
    "start the services with ./scripts/test (it starts MariaDB and Redis when they do not answer)"
)


@pytest.fixture(scope="session")
def mysql_server() -> dict[str, Any]:
    """Connection facts for the machine's MariaDB, with the test user ready."""
    try:
        connect_test_user().close()
    except pymysql.err.OperationalError as first:
        if first.args and first.args[0] == 2003:
            pytest.fail(
                f"MariaDB is not answering on {MYSQL_HOST}:{MYSQL_PORT}: {first}; {HOW_TO_START}"
            )
        try:
            provision_test_user()
            connect_test_user().close()
        except pymysql.err.MySQLError as e:
            pytest.fail(
                f"cannot log in to MariaDB as {MYSQL_USER} over TCP and could not create that user "
                f"as root over {MYSQL_SOCKET}: {e}; {HOW_TO_START}"
            )
    return {"host": MYSQL_HOST, "port": MYSQL_PORT, "user": MYSQL_USER, "password": MYSQL_PASS}


@pytest.fixture
def mysql_db(mysql_server: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A fresh database of this test's own, dropped afterwards."""
    name = "eth_test_" + secrets.token_hex(6)
    conn = connect_test_user()
    with conn.cursor() as c:
        c.execute(f"CREATE DATABASE `{name}`")
    try:
        yield dict(mysql_server, database=name)
    finally:
        with conn.cursor() as c:
            c.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


@pytest.fixture(scope="session")
def redis_server() -> dict[str, Any]:
    """The machine's shared Redis (tests use their own key prefix on it)."""
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=2) as s:
            s.sendall(b"PING\r\n")
            if not s.recv(16).startswith(b"+PONG"):
                raise OSError("no PONG")
    except OSError as e:
        pytest.fail(f"Redis is not answering on {REDIS_HOST}:{REDIS_PORT}: {e}; {HOW_TO_START}")
    return {"host": REDIS_HOST, "port": REDIS_PORT}


@pytest.fixture
def redis_prefix(redis_server: dict[str, Any]) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"ethtest:{secrets.token_hex(6)}:"
    yield prefix
    script = "for _,k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end return 1"
    redis_command(redis_server["host"], redis_server["port"], "EVAL", script, 0, prefix + "*")


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A Redis of the test's own on a free port, which the test may kill and restart."""
    r = PrivateRedis()
    r.start()
    yield r
    r.stop()


@pytest.fixture
def anvil() -> Iterator[Anvil]:
    """A real anvil dev node mining a block every second, on a free port."""
    node = Anvil(block_time=1)
    node.start()
    yield node
    node.stop()
