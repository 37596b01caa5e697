"""Migration 0002 on a MariaDB record that 0001 made and filled (a database of the test's own)."""

from __future__ import annotations

from typing import Any

import pytest

from eth_twisted.link.payload import render_html, render_json
from eth_twisted.model import sha256_hex
from eth_twisted.sinks.sql.migrations import apply_migrations, load_migrations
from tests.support.chain_contract import bh
from tests.support.mysql import connect_test_user

pytestmark = pytest.mark.live


def test_0002_keeps_every_row_and_backfills_kind(mysql_db: dict[str, Any]) -> None:
    """Rows written under 0001 (html, json, text) are all there after 0002, with their kind."""
    payloads = [
        render_html(7),
        render_json(
            {
                "block_hash": bh("a", 8),
                "block_number": 8,
                "chain_id": 1,
                "parent_hash": bh("a", 7),
                "timestamp": 1,
            }
        ),
        b"free text",
    ]
    conn = connect_test_user(mysql_db["database"])
    try:
        with conn.cursor() as c:
            c.execute(
                "CREATE TABLE schema_version (version INT NOT NULL PRIMARY KEY, "
                "applied_at DATETIME(6) NOT NULL)"
            )
            for statement in load_migrations("mysql")[0].statements:
                c.execute(statement)
            c.execute("INSERT INTO schema_version VALUES (1, NOW())")
            for payload, number in zip(payloads, (7, 8, None), strict=True):
                c.execute(
                    "INSERT INTO ethereum_data (hash, payload, block_number, client_ip, "
                    "received_at) VALUES (%s, %s, %s, '10.0.0.1', NOW())",
                    (sha256_hex(payload), payload, number),
                )
        conn.autocommit(False)
        assert apply_migrations(conn, "mysql") == [2]
        conn.autocommit(True)
        # An interrupted run is finished by the next one: the ALTERs already there are skipped.
        with conn.cursor() as c:
            c.execute("DELETE FROM schema_version WHERE version = 2")
        conn.autocommit(False)
        assert apply_migrations(conn, "mysql") == [2]
        conn.autocommit(True)
        with conn.cursor() as c:
            c.execute(
                "SELECT payload, block_number, kind, chain_id, canonical, finalized "
                "FROM ethereum_data ORDER BY id"
            )
            rows = c.fetchall()
    finally:
        conn.close()
    assert [bytes(r[0]) for r in rows] == payloads
    assert [r[1:] for r in rows] == [
        (7, "block", None, None, 0),
        (8, "block", None, None, 0),
        (None, "other", None, None, 0),
    ]
