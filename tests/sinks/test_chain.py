"""The chain rule (sinks/chain.py) on the memory record and the SQLite record.

The rows are read back as the database holds them (SQLite: with its own connection), so
the one-canonical-per-height invariant is checked on the stored state after every batch.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from eth_twisted.sinks.memory import MemorySink
from eth_twisted.sinks.sql.sqlite import SQLiteSettings, SQLiteSink, make_sqlite_sink
from tests.support.chain_contract import ChainContract, RawRows, block, branch


class TestMemoryChain(ChainContract):
    """The memory record keeps the chain rule."""

    @pytest.fixture
    def sink(self) -> MemorySink:
        """A memory record."""
        return MemorySink()

    @pytest.fixture
    def raw_rows(self, sink: MemorySink) -> RawRows:
        """The memory record's block rows."""

        def rows() -> list[tuple[Any, ...]]:
            return [
                (r.chain_id, r.block_number, r.block_hash, int(bool(r.canonical)), int(r.finalized))
                for r in sink.order
                if r.kind == "block" and r.chain_id is not None
            ]

        return rows


class TestSQLiteChain(ChainContract):
    """The SQLite record keeps the chain rule."""

    @pytest_twisted.async_yield_fixture
    async def sink(self, tmp_path: Path) -> AsyncIterator[SQLiteSink]:
        """A started SQLite record on a file of this test's own."""
        s = make_sqlite_sink(SQLiteSettings(sqlite=str(tmp_path / "record.sqlite3")))
        await s.start()
        yield s
        await s.stop()

    @pytest.fixture
    def raw_rows(self, tmp_path: Path) -> RawRows:
        """The block rows, read with a connection of the test's own."""

        def rows() -> list[tuple[Any, ...]]:
            con = sqlite3.connect(str(tmp_path / "record.sqlite3"))
            try:
                return con.execute(
                    "SELECT chain_id, block_number, block_hash, canonical, finalized "
                    "FROM ethereum_data WHERE kind = 'block' AND chain_id IS NOT NULL"
                ).fetchall()
            finally:
                con.close()

        return rows


@pytest_twisted.ensureDeferred
async def test_sqlite_refuses_a_second_canonical_block_at_a_height(tmp_path: Path) -> None:
    """The partial unique index itself stops two canonical rows at one (chain, height)."""
    s = make_sqlite_sink(SQLiteSettings(sqlite=str(tmp_path / "r.sqlite3")))
    await s.start()
    try:
        await s.store_batch([block(5), block(5, "f")])
    finally:
        await s.stop()
    con = sqlite3.connect(str(tmp_path / "r.sqlite3"))
    with pytest.raises(sqlite3.IntegrityError):
        con.execute("UPDATE ethereum_data SET canonical = 1 WHERE kind = 'block'")
    plan = " ".join(
        str(r)
        for r in con.execute(
            "EXPLAIN QUERY PLAN SELECT block_number FROM ethereum_data WHERE chain_id = 1 "
            "AND canonical = 1 AND block_number IN (4, 5)"
        )
    )
    assert "uq_ethereum_data_canonical" in plan


@pytest_twisted.ensureDeferred
async def test_a_linear_batch_costs_a_few_statements(tmp_path: Path) -> None:
    """256 new blocks of one known chain cost the chain step a handful of statements, not 256."""
    s = make_sqlite_sink(SQLiteSettings(sqlite=str(tmp_path / "r.sqlite3")))
    await s.start()
    try:
        await s.store_batch(branch("a", 1, 10))
        counted: list[str] = []
        pool = s.writer
        assert pool is not None

        def trace(conn: Any) -> None:
            conn.set_trace_callback(counted.append)

        await pool.runWithConnection(trace)
        await s.store_batch(branch("a", 11, 266))
        await pool.runWithConnection(lambda conn: conn.set_trace_callback(None))
    finally:
        await s.stop()
    chain_statements = [q for q in counted if "INSERT INTO ethereum_data" not in q]
    assert len(chain_statements) <= 12, chain_statements
