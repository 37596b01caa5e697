"""The stats API of a real server (loopback ports, real sinks), fed by raw netstring clients.

SQLite and MariaDB+Redis: the API answers what was stored, the stats survive a
restart (seeded from SQL, message counts from Redis), /readyz names a sink
that stopped answering.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from eth_twisted.link.payload import render_html
from eth_twisted.model import sha256_hex
from eth_twisted.sinks import StorageSettings
from eth_twisted.sinks.redis import RedisSettings
from tests.support import PrivateRedis, async_wait_until
from tests.support.live import mysql_storage, sqlite_storage
from tests.support.web import get, send_from, start_with_stats

pytestmark = pytest.mark.live


@defer.inlineCallbacks
def exercise(storage: StorageSettings, sinks: set[str], source: str) -> Any:
    """Store blocks, check every endpoint, restart on the same storage, check the seeded stats."""
    blocks = [render_html(n) for n in (19000000, 19000001, 19000002)]
    server, port, web = yield start_with_stats(storage, stats_token="tok")
    try:
        replies = yield threads.deferToThread(send_from, "127.0.0.1", port, blocks)
        assert [r.split()[0] for r in replies] == [b"OK"] * 3
        replies = yield threads.deferToThread(send_from, "127.0.0.2", port, [blocks[0]])
        assert replies == [b"DUP " + sha256_hex(blocks[0]).encode()]

        def stats_settled() -> Any:
            return get(web, "/api/stats", "tok").addCallback(
                lambda r: r[1] if r[1]["totals"]["messages"] == 4 else None
            )

        stats = yield async_wait_until(stats_settled, 10, what="stats to count 4 messages")
        assert stats["totals"] == {"records": 3, "messages": 4, "duplicates": 1, "clients": 2}
        assert stats["latest_block"]["number"] == 19000002
        assert [p[1] for p in stats["chart"]] == [19000000, 19000001, 19000002]
        clients = {c["ip"]: c for c in stats["clients"]}
        assert (clients["127.0.0.1"]["records"], clients["127.0.0.2"]["messages"]) == (3, 1)

        status, page = yield get(web, "/api/messages?limit=2", "tok")
        assert status == 200 and len(page["messages"]) == 2
        status, older = yield get(web, f"/api/messages?before={page['next_before']}", "tok")
        listed = page["messages"] + older["messages"]
        # Newest id first, every record once over the two pages. Ids are insertion order,
        # which concurrent batches need not keep in frame order (docs/protocol.md, Storage).
        ids = [m["id"] for m in listed]
        assert ids == sorted(ids, reverse=True) and len(set(ids)) == 3
        assert sorted(m["block_number"] for m in listed) == [19000000, 19000001, 19000002]
        by_number = {m["block_number"]: m for m in listed}
        assert by_number[19000002]["payload"] == blocks[2].decode()
        status, block = yield get(web, "/api/blocks/19000001", "tok")
        assert status == 200 and block["records"][0]["hash"] == sha256_hex(blocks[1])
        assert (yield get(web, "/api/blocks/5", "tok"))[0] == 404
        assert (yield get(web, "/api/stats"))[0] == 401

        status, ready = yield get(web, "/readyz")
        assert status == 200, ready
        assert set(ready["sinks"]) == sinks
        status, metrics = yield get(web, "/metrics", "tok")
        assert 'eth_server_messages_total{outcome="stored"} 3.0' in metrics
        assert 'eth_server_messages_total{outcome="duplicate"} 1.0' in metrics
    finally:
        yield server.stopService()

    # A restart seeds the stats from the record (and Redis), chart history included.
    server, port, web = yield start_with_stats(storage)
    try:

        def seeded() -> Any:
            return get(web, "/api/stats").addCallback(
                lambda r: r[1] if r[1]["totals"]["records"] == 3 else None
            )

        stats = yield async_wait_until(seeded, 15, what="stats seeded after restart")
        assert stats["latest_block"]["number"] == 19000002
        assert stats["messages_source"] == source
        assert stats["totals"]["messages"] == (4 if source == "redis" else 3)
        assert [p[1] for p in stats["chart"]] == [19000000, 19000001, 19000002]
    finally:
        yield server.stopService()


@pytest_twisted.inlineCallbacks
def test_sqlite_server_stats_api(tmp_path: Path):
    """On SQLite the API answers what was stored and is seeded from SQL after a restart."""
    yield exercise(sqlite_storage(str(tmp_path / "eth-server.sqlite3")), {"sqlite"}, "sql")


@pytest_twisted.inlineCallbacks
def test_mysql_redis_server_stats_api(
    mysql_db: dict[str, Any], redis_server: dict[str, Any], redis_prefix: str
):
    """On MariaDB+Redis the API answers, and message counts after a restart come from Redis."""
    storage = mysql_storage(mysql_db, dict(redis_server, prefix=redis_prefix))
    yield exercise(storage, {"mysql", "redis"}, "redis")


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_readyz_names_redis_when_it_dies(tmp_path: Path, private_redis: PrivateRedis):
    """Killing Redis turns /readyz into a 503 naming redis; /healthz stays 200."""
    storage = sqlite_storage(tmp_path / "eth-server.sqlite3")
    storage.use_redis = True
    storage.redis = RedisSettings(
        redis_host="127.0.0.1", redis_port=private_redis.port, redis_timeout=1.0
    )
    server, _port, web = yield start_with_stats(storage)
    try:
        status, ready = yield get(web, "/readyz")
        assert status == 200 and set(ready["sinks"]) == {"sqlite", "redis"}
        private_redis.kill()

        def unready() -> Any:
            return get(web, "/readyz").addCallback(lambda r: r if r[0] == 503 else None)

        status, ready = yield async_wait_until(unready, 15, what="/readyz to report redis down")
        assert ready["failing"] == ["redis"]
        assert ready["sinks"]["sqlite"]["ok"] is True
        assert (yield get(web, "/healthz"))[0] == 200
    finally:
        yield server.stopService()
