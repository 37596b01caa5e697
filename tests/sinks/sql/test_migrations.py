"""Migration 0002 on a record that 0001 made and filled: every row kept, kinds backfilled.

SQLite here; MariaDB in test_migrations_live.py. Rows are written as a server of the
previous release wrote them (the 0001 columns only), then the migration runs and the
current sink reads them back.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest_twisted

from eth_twisted.link.payload import render_html, render_json
from eth_twisted.model import sha256_hex
from eth_twisted.sinks.sql.migrations import apply_migrations, load_migrations
from eth_twisted.sinks.sql.sqlite import SQLiteSettings, make_sqlite_sink
from tests.support.chain_contract import bh, block

OLD_PAYLOADS = [
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


def version_1(path: Path) -> None:
    """A record at schema version 1 holding OLD_PAYLOADS, as the previous release wrote them."""
    con = sqlite3.connect(str(path), isolation_level=None)
    con.execute(
        "CREATE TABLE schema_version (version INTEGER NOT NULL PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    con.execute("BEGIN")
    for statement in load_migrations("sqlite")[0].statements:
        con.execute(statement)
    con.execute("INSERT INTO schema_version VALUES (1, 0)")
    for i, payload in enumerate(OLD_PAYLOADS):
        number = (7, 8, None)[i]
        con.execute(
            "INSERT INTO ethereum_data (hash, payload, block_number, client_ip, client_id, "
            "received_at) VALUES (?, ?, ?, '10.0.0.1', NULL, ?)",
            (sha256_hex(payload), payload, number, 100.0 + i),
        )
    con.execute("COMMIT")
    con.close()


def test_0002_keeps_every_row_and_backfills_kind(tmp_path: Path) -> None:
    """After 0002 the three old rows are there, byte for byte, with kind and unknown status."""
    path = tmp_path / "old.sqlite3"
    version_1(path)
    con = sqlite3.connect(str(path), isolation_level=None)
    assert apply_migrations(con, "sqlite") == [2]
    rows = con.execute(
        "SELECT payload, block_number, kind, chain_id, canonical, finalized FROM ethereum_data "
        "ORDER BY id"
    ).fetchall()
    assert [bytes(r[0]) for r in rows] == OLD_PAYLOADS
    assert [r[1:] for r in rows] == [
        (7, "block", None, None, 0),
        (8, "block", None, None, 0),
        (None, "other", None, None, 0),
    ]


@pytest_twisted.ensureDeferred
async def test_a_migrated_record_takes_chain_blocks(tmp_path: Path) -> None:
    """The sink starts on the migrated file, reads the old rows and follows a chain after them."""
    path = tmp_path / "old.sqlite3"
    version_1(path)
    sink = make_sqlite_sink(SQLiteSettings(sqlite=str(path)))
    await sink.start()
    try:
        assert sink.migrations_applied == [2]
        old = await sink.fetch_records(0, 10)
        assert [(r.kind, r.canonical) for r in old] == [
            ("block", None),
            ("block", None),
            ("other", None),
        ]
        await sink.store_batch([block(9), block(10)])
        assert [r.block_number for r in await sink.chain_blocks(1, 0, 100, 100)] == [9, 10]
    finally:
        await sink.stop()
