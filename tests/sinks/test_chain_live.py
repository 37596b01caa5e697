"""The chain rule on the MySQL/MariaDB record (a database of each test's own).

The rows are read back over another connection, so the invariants hold for what is
committed; the unique key on the generated column is checked to refuse a second
canonical block by itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pymysql
import pytest
import pytest_twisted
from twisted.internet import defer

from eth_twisted.sinks.sql.mysql import MySQLSink, make_mysql_sink
from tests.support.chain_contract import ChainContract, RawRows, bh, block, branch, reorg
from tests.support.mysql import mysql_query, settings_for

pytestmark = pytest.mark.live


@pytest_twisted.async_yield_fixture
async def sink(mysql_db: dict[str, Any]) -> AsyncIterator[MySQLSink]:
    """A started MySQL record on this test's own database."""
    s = make_mysql_sink(settings_for(mysql_db))
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
def raw_rows(mysql_db: dict[str, Any]) -> RawRows:
    """The block rows, read over a connection of the test's own."""

    def rows() -> list[tuple[Any, ...]]:
        return [
            (int(c), int(n), h, canonical, fin)
            for c, n, h, canonical, fin in mysql_query(
                mysql_db,
                "SELECT chain_id, block_number, block_hash, canonical, finalized "
                "FROM ethereum_data WHERE kind = 'block' AND chain_id IS NOT NULL",
            )
        ]

    return rows


class TestMySQLChain(ChainContract):
    """The MySQL record keeps the chain rule."""


@pytest_twisted.ensureDeferred
async def test_the_unique_key_refuses_a_second_canonical_block(
    sink: MySQLSink, mysql_db: dict[str, Any]
) -> None:
    """The generated column's unique key stops two canonical rows at one (chain, height)."""
    await sink.store_batch([block(5), block(5, "f")])
    with pytest.raises(pymysql.err.IntegrityError):
        mysql_query(mysql_db, "UPDATE ethereum_data SET canonical = 1 WHERE kind = 'block'")


@pytest_twisted.ensureDeferred
async def test_concurrent_batches_of_one_chain_keep_the_invariant(
    sink: MySQLSink, raw_rows: RawRows
) -> None:
    """Two batches of one chain in the record at once (two writers) end linear and unique."""
    await sink.store_batch(branch("a", 1, 5))
    for start in range(6, 206, 40):
        await defer.gatherResults(
            [
                defer.ensureDeferred(sink.store_batch(branch("a", start, start + 19))),
                defer.ensureDeferred(sink.store_batch(branch("a", start + 20, start + 39))),
            ]
        )
    ChainContract().check_invariants(raw_rows())
    rows = await sink.chain_blocks(1, 0, 1000, 1000)
    assert [r.block_number for r in rows] == list(range(1, 206))


@pytest_twisted.ensureDeferred
async def test_a_reorg_racing_its_replacements_ends_on_the_new_branch(
    sink: MySQLSink, raw_rows: RawRows
) -> None:
    """The record and the replacements in concurrent batches end on the new branch either way."""
    await sink.store_batch(branch("a", 1, 20))
    old = [bh("a", n) for n in range(16, 21)]
    new = [bh("b", n) for n in range(16, 21)]
    await defer.gatherResults(
        [
            defer.ensureDeferred(sink.store_batch([reorg(15, old, new)])),
            defer.ensureDeferred(sink.store_batch(branch("b", 16, 20, "a"))),
        ]
    )
    ChainContract().check_invariants(raw_rows())
    hashes = [r.block_hash for r in await sink.chain_blocks(1, 0, 100, 1000)]
    assert hashes == [bh("a", n) for n in range(1, 16)] + new
