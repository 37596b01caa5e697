"""The oracle catches each way the promise can break (on hand-made SQL, Redis, wire and outbox states)."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from eth_twisted.link.payload import render_html
from eth_twisted.model import sha256_hex
from tests.faults.oracle import Oracle, parse_wire_replies
from tests.faults.services import FaultRedis, PrivateMariaDB

pytestmark = [pytest.mark.fault]

PREFIX = "eth:"


def make_table(db: PrivateMariaDB) -> None:
    db.query(
        "CREATE TABLE ethereum_data (id BIGINT AUTO_INCREMENT PRIMARY KEY, hash CHAR(64) NOT NULL UNIQUE, "
        "payload MEDIUMBLOB NOT NULL, block_number BIGINT UNSIGNED NULL, client_ip VARCHAR(45) NOT NULL)"
    )


def store(
    db: PrivateMariaDB, redis: FaultRedis | None, block: int, payload: bytes | None = None
) -> str:
    payload = render_html(block) if payload is None else payload
    h = sha256_hex(payload)
    db.query(
        "INSERT INTO ethereum_data (hash, payload, block_number, client_ip) VALUES (%s, %s, %s, %s)",
        (h, payload, block, "127.0.0.1"),
    )
    if redis is not None:
        redis.command("ZADD", PREFIX + "hashes", 1, h)
        redis.command("HINCRBY", PREFIX + "ip_addresses", "127.0.0.1", 1)
    return h


@pytest.fixture
def world(private_mariadb: PrivateMariaDB, fault_redis: FaultRedis) -> Any:
    make_table(private_mariadb)
    oracle = Oracle(None, private_mariadb.info, redis=("127.0.0.1", fault_redis.port, PREFIX))  # type: ignore[arg-type]
    return private_mariadb, fault_redis, oracle


def test_a_complete_range_passes(world: Any) -> None:
    """Every block once in SQL, Redis equal, OKs all committed: no problems."""
    db, redis, oracle = world
    oks = [f"OK {store(db, redis, n)}" for n in range(100, 110)]
    oracle.begin(100)
    oracle.last = 109
    v = oracle.check(wire_replies=oks + ["ERR " + "0" * 64 + " unavailable"])
    assert v.ok, v.summary()
    assert (v.produced, v.stored, v.lost, v.duplicates, v.wire_ok) == (10, 10, 0, 0, 10)
    assert v.wire_err == {"unavailable": 1}
    assert oracle.redis_converged()


def test_missing_and_duplicated_blocks_are_reported(world: Any) -> None:
    """A gap in the range and a block stored twice (different bytes) are both problems."""
    db, redis, oracle = world
    for n in (1, 2, 4):
        store(db, redis, n)
    store(db, redis, 2, render_html(2) + b" ")
    oracle.begin(1)
    oracle.last = 4
    v = oracle.check()
    assert v.missing == [3]
    assert v.duplicated == {2: 2}
    assert v.bad_payloads == [2]
    assert v.lost == 1 and v.duplicates == 1 and not v.ok


def test_redis_disagreeing_with_sql_is_reported(world: Any) -> None:
    """A hash missing from Redis and a wrong per-IP sum are problems until Redis is fixed."""
    db, redis, oracle = world
    store(db, redis, 7)
    store(db, None, 8)
    oracle.begin(7)
    oracle.last = 8
    v = oracle.check()
    assert v.redis_missing == 1 and v.redis_ip_sum == 1
    assert not oracle.redis_converged()
    assert any("Redis" in p for p in v.problems) and any(
        "sum(ip_addresses)" in p for p in v.problems
    )


def test_ok_on_the_wire_for_an_uncommitted_hash_is_reported(world: Any) -> None:
    """An OK recorded on the wire whose hash has no row is the worst case: reported."""
    db, redis, oracle = world
    store(db, redis, 5)
    oracle.begin(5)
    oracle.last = 5
    phantom = sha256_hex(render_html(6))
    v = oracle.check(wire_replies=[f"OK {phantom}"])
    assert v.acked_not_stored == [phantom] and not v.ok


def test_outbox_drop_without_a_row_is_reported(world: Any, tmp_path: Any) -> None:
    """A block the client no longer holds (acked) but SQL lacks, and a dead letter in range, are problems."""
    db, redis, oracle = world
    store(db, redis, 10)
    store(db, redis, 12)
    path = str(tmp_path / "spool.sqlite3")
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE outbox (hash TEXT); CREATE TABLE dead_letters (hash TEXT);"
        "CREATE TABLE cursor (block_number INTEGER); "
        "CREATE TABLE gaps (first_block INTEGER, last_block INTEGER, reason TEXT);"
    )
    conn.execute("INSERT INTO dead_letters VALUES (?)", (sha256_hex(render_html(13)),))
    conn.execute("INSERT INTO outbox VALUES (?)", (sha256_hex(render_html(14)),))
    conn.commit()
    conn.close()
    oracle.begin(10)
    oracle.last = 14
    v = oracle.check(outbox=path)
    assert v.missing == [11, 13, 14]
    assert v.outbox_pending == 1 and v.dead_letters == 1
    assert any("gone from the outbox" in p and "11" in p for p in v.problems)
    assert any("dead-lettered" in p for p in v.problems)


def test_wire_reply_parsing() -> None:
    """Recorded reply lines split into OK, DUP and ERR codes; junk lines are ignored."""
    ok, dup, err = parse_wire_replies(
        ["OK a", "DUP b", "ERR c busy", "ERR - bad-frame", "", "weird"]
    )
    assert ok == {"a"} and dup == {"b"} and err == {"busy": 1, "bad-frame": 1}
