"""End to end: netstring frames to a real server over TCP, the canonical chain read back over HTTP.

A real server on SQLite (and one on MariaDB) with its stats site: json blocks, a reorg
record, the replacement blocks and a finality record are sent by a blocking netstring
client; /api/chains/<id>/blocks is then exactly the expected canonical chain.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.support.chain_contract import bh, branch, finalized, reorg
from tests.support.live import mysql_storage, sqlite_storage
from tests.support.web import send_from, start_with_stats

pytestmark = pytest.mark.live


def get_json(web: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{web}{path}", timeout=5) as response:
        return json.loads(response.read())


def frames() -> list[list[bytes]]:
    """Three connections: blocks 1..10; a reorg after 7 and its replacements; finality at 9."""
    return [
        [m.payload for m in branch("a", 1, 10, chain=1337)],
        [
            reorg(
                7,
                [bh("a", n, 1337) for n in (8, 9, 10)],
                [bh("b", n, 1337) for n in (8, 9, 10)],
                chain=1337,
            ).payload
        ]
        + [m.payload for m in branch("b", 8, 11, "a", chain=1337)],
        [finalized(9, "b", chain=1337, safe=10).payload],
    ]


def check(web: int, port: int) -> None:
    """Send everything (twice: the replay is all DUP) and compare the chain the API serves."""
    for batch in frames():
        assert all(r.startswith(b"OK ") for r in send_from("127.0.0.1", port, batch))
    for batch in frames():
        assert all(r.startswith(b"DUP ") for r in send_from("127.0.0.1", port, batch))
    body = get_json(web, "/api/chains/1337/blocks")
    expected = [bh("a", n, 1337) for n in range(1, 8)] + [bh("b", n, 1337) for n in range(8, 12)]
    assert [b["hash"] for b in body["blocks"]] == expected
    assert [b["number"] for b in body["blocks"] if b["finalized"]] == list(range(1, 10))
    (chain,) = get_json(web, "/api/chains")["chains"]
    assert chain["head"] == {"number": 11, "hash": bh("b", 11, 1337)}
    assert chain["finalized"]["number"] == 9 and (chain["reorgs"], chain["violations"]) == (1, 0)
    orphans = get_json(web, "/api/blocks/9")["records"]
    assert [(r["block_hash"], r["canonical"]) for r in orphans] == [
        (bh("a", 9, 1337), False),
        (bh("b", 9, 1337), True),
    ]


@pytest_twisted.inlineCallbacks
def test_sqlite_server_serves_the_canonical_chain(tmp_path: Path):
    """Over TCP into a server on SQLite: the chain after a reorg and finality is the expected one."""
    server, port, web = yield start_with_stats(sqlite_storage(str(tmp_path / "e2e.sqlite3")))
    try:
        yield threads.deferToThread(check, web, port)
    finally:
        yield server.stopService()


@pytest_twisted.inlineCallbacks
def test_mariadb_server_serves_the_canonical_chain(mysql_db: dict[str, Any]):
    """The same over TCP into a server on MariaDB."""
    server, port, web = yield start_with_stats(mysql_storage(mysql_db))
    try:
        yield threads.deferToThread(check, web, port)
    finally:
        yield server.stopService()
