"""ServerStats: running totals seeded from the record and kept by the router's batches."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from twisted.internet.task import Clock

from eth_twisted.link.payload import render_html
from eth_twisted.model import Message, Outcome, Record, Totals
from eth_twisted.sinks.memory import MemorySink
from eth_twisted.web.stats import OTHER, TOP_CLIENTS, ServerStats


def msg(
    n: int | None, ip: str = "10.0.0.1", at: float = 1000.0, payload: bytes | None = None
) -> Message:
    body = payload if payload is not None else render_html(n if n is not None else 0)
    return Message.build(body, ip, at, n)


def fresh(now: float = 5000.0) -> tuple[Clock, ServerStats]:
    clock = Clock()
    clock.advance(now)
    return clock, ServerStats(clock)


def test_seed_without_redis_counts_records_as_messages() -> None:
    """Seeded from SQL alone, each client's message count starts at its record count."""
    _, stats = fresh()
    stats.seed(
        Totals(
            records=5,
            first_by_ip={"a": 3, "b": 2},
            latest_block=9,
            latest_block_at=4000.0,
            latest_block_by_ip={"a": 9},
            first_received_at=10.0,
            last_received_at=4000.0,
        )
    )
    snap = stats.snapshot()
    assert snap["totals"] == {"records": 5, "messages": 5, "duplicates": 0, "clients": 2}
    assert snap["messages_source"] == "sql"
    assert snap["latest_block"] == {"number": 9, "received_at": 4000.0, "age_seconds": 1000.0}
    assert {c["ip"]: c["latest_block"] for c in snap["clients"]} == {"a": 9, "b": None}


def test_seed_with_redis_message_counts() -> None:
    """Redis's per-client message counts (duplicates included) are used when given."""
    _, stats = fresh()
    stats.seed(Totals(records=3, first_by_ip={"a": 3}), {"a": 7, "c": 2})
    snap = stats.snapshot()
    assert snap["messages_source"] == "redis"
    assert snap["totals"] == {"records": 3, "messages": 9, "duplicates": 6, "clients": 2}
    assert [(c["ip"], c["records"], c["messages"]) for c in snap["clients"]] == [
        ("a", 3, 7),
        ("c", 0, 2),
    ]


def test_seed_never_shows_fewer_messages_than_records() -> None:
    """A Redis that lags SQL (restarted empty) cannot make messages < records."""
    _, stats = fresh()
    stats.seed(Totals(records=4, first_by_ip={"a": 4}), {})
    assert stats.snapshot()["clients"][0]["messages"] == 4


def test_observe_counts_stored_duplicate_and_errors() -> None:
    """OK counts a record and a message, DUP a message only, an ERR code nothing."""
    clock, stats = fresh()
    stats.seed(Totals())
    a, b, c, d = msg(1, "x"), msg(1, "y"), msg(2, "y"), msg(3, "z")
    stats.observe([a, b, c, d], [Outcome.STORED, "DUP", "unavailable", Outcome.REJECTED])
    clock.advance(1)
    snap = stats.snapshot()
    assert snap["totals"] == {"records": 1, "messages": 2, "duplicates": 1, "clients": 2}
    by_ip = {row["ip"]: row for row in snap["clients"]}
    assert (by_ip["x"]["records"], by_ip["x"]["messages"]) == (1, 1)
    assert (by_ip["y"]["records"], by_ip["y"]["messages"]) == (0, 1)
    assert "z" not in by_ip
    assert by_ip["y"]["last_seen"] == 5000.0


def test_observe_accepts_outcome_strings() -> None:
    """The router passes reply codes as strings ('OK', 'DUP'); they count like the enum."""
    clock, stats = fresh()
    stats.observe([msg(1), msg(1, "b")], ["OK", "DUP"])
    clock.advance(2)
    assert stats.snapshot()["totals"]["records"] == 1
    assert stats.snapshot()["totals"]["messages"] == 2


def test_latest_block_follows_newest_stored_record() -> None:
    """The head is the newest STORED message with a block number, with its arrival time."""
    clock, stats = fresh()
    stats.observe([msg(10, at=100.0)], ["OK"])
    stats.observe([msg(None, at=200.0, payload=b"no block here")], ["OK"])
    stats.observe([msg(10, "other", at=300.0)], ["DUP"])
    stats.observe([msg(11, "other", at=400.0)], ["unavailable"])
    clock.advance(5)
    snap = stats.snapshot()
    assert snap["latest_block"]["number"] == 10
    assert snap["latest_block"]["received_at"] == 100.0
    assert snap["last_received_at"] == 200.0
    stats.observe([msg(12, "other", at=500.0)], ["OK"])
    clock.advance(5)
    snap = stats.snapshot()
    assert snap["latest_block"] == {"number": 12, "received_at": 500.0, "age_seconds": 4510.0}
    assert {c["ip"]: c["latest_block"] for c in snap["clients"]} == {"10.0.0.1": 10, "other": 12}


def test_snapshot_is_cached_for_one_second() -> None:
    """Within a second the same snapshot is served; after it, new batches show."""
    clock, stats = fresh()
    first = stats.snapshot()
    stats.observe([msg(1)], ["OK"])
    clock.advance(0.5)
    assert stats.snapshot() is first
    assert stats.snapshot()["totals"]["records"] == 0
    clock.advance(0.6)
    assert stats.snapshot()["totals"]["records"] == 1


def test_chart_ring_is_bounded_and_in_arrival_order() -> None:
    """The chart keeps the newest N stored blocks as [received_at, number] pairs."""
    clock = Clock()
    stats = ServerStats(clock, chart_points=5)
    for i in range(8):
        stats.observe([msg(100 + i, at=float(i))], ["OK"])
    stats.observe([msg(100, "dup", at=9.0)], ["DUP"])
    chart = stats.snapshot()["chart"]
    assert chart == [[float(i), 100 + i] for i in range(3, 8)]


def test_seed_chart_merges_history_with_live_points() -> None:
    """History from the record merges with blocks seen since start, sorted, each once."""
    clock = Clock()
    stats = ServerStats(clock, chart_points=4)
    stats.observe([msg(7, at=70.0)], ["OK"])
    records = [
        Record(i, f"h{i}", b"", n, "a", None, float((n or 9) * 10))
        for i, n in enumerate([3, 5, 4, 7, None], start=1)
    ]
    stats.seed_chart(records)
    assert stats.chart_seeded
    assert list(stats.chart) == [(30.0, 3), (40.0, 4), (50.0, 5), (70.0, 7)]


def test_snapshot_is_strict_json() -> None:
    """The snapshot serialises as strict JSON (no NaN) with every documented key."""
    clock, stats = fresh()
    stats.observe([msg(1, at=4999.0)], ["OK"])
    clock.advance(1)
    text = json.dumps(stats.snapshot(), allow_nan=False)
    assert set(json.loads(text)) == {
        "now",
        "started_at",
        "uptime_seconds",
        "messages_source",
        "totals",
        "first_received_at",
        "last_received_at",
        "first_received_at_iso",
        "last_received_at_iso",
        "latest_block",
        "clients",
        "clients_omitted",
        "chart",
    }


def test_age_never_negative_when_the_clock_is_behind() -> None:
    """A record stamped after the clock's now (clock skew) shows age 0, not negative."""
    _, stats = fresh(100.0)
    stats.observe([msg(1, at=200.0)], ["OK"])
    assert stats.snapshot()["latest_block"]["age_seconds"] == 0.0


@pytest_twisted.inlineCallbacks
def test_load_seeds_totals_and_chart_from_a_record():
    """load() reads totals and recent records from the record's read path."""
    sink = MemorySink()
    batch = [msg(n, f"10.0.0.{n % 2}", at=float(n)) for n in range(1, 6)]
    yield sink.store_batch(batch)
    clock, stats = fresh()
    yield stats.load(sink)
    snap = stats.snapshot()
    assert snap["totals"]["records"] == 5
    assert snap["latest_block"]["number"] == 5
    assert snap["chart"] == [[float(n), n] for n in range(1, 6)]


class PayloadlessReads(MemorySink):
    """A record whose payload-carrying reads fail: what only needs summaries must not use them."""

    def recent(self, limit: int, before: int | None = None) -> Any:
        raise AssertionError("the chart read whole records (payloads)")

    def fetch_records(self, after_id: int, limit: int) -> Any:
        raise AssertionError("the chart read whole records (payloads)")


@pytest_twisted.inlineCallbacks
def test_load_reads_the_chart_without_payloads():
    """load() seeds the chart from payload-free summaries of the newest records."""
    sink = PayloadlessReads()
    yield sink.store_batch(
        [msg(n, at=float(n), payload=render_html(n) + b"x" * 65536) for n in range(1, 4)]
    )
    _, stats = fresh()
    yield stats.load(sink)
    assert stats.snapshot()["chart"] == [[float(n), n] for n in range(1, 4)]


def test_seed_chart_does_not_double_a_record_read_back_with_rounded_time() -> None:
    """A block seen live and read back from SQL (time rounded to microseconds) is one point."""
    stats = ServerStats(Clock())
    stats.observe([msg(9, at=1700000000.1234567)], ["OK"])
    stats.seed_chart([Record(1, "h", b"", 9, "a", None, 1700000000.123456)])
    assert [n for _, n in stats.chart] == [9]


def test_seed_chart_merges_a_batch_sharing_one_receipt_time() -> None:
    """Blocks received together and read back from SQL a microsecond off stay one point each.

    Blocks received together share one timestamp.
    """
    stats = ServerStats(Clock())
    now = 1_700_000_000.1234567
    messages = [Message.build(render_html(n), "10.0.0.1", now, n) for n in (7, 8, 9)]
    stats.observe(messages, [Outcome.STORED] * 3)
    read_back = [
        Record(i, m.hash, m.payload, m.block_number, m.client_ip, None, round(now, 6))
        for i, m in enumerate(messages, 1)
    ]
    stats.seed_chart(read_back)
    assert sorted(n for _, n in stats.chart) == [7, 8, 9]


# -- issue 13, item 18: the top clients, a count, IPv6 by /64, encoded once -------------------------


def test_snapshot_lists_the_busiest_clients_and_counts_the_rest() -> None:
    """5,000 addresses: the snapshot lists the 20 busiest (by messages), counts all 5,000, stays small."""
    clock, stats = fresh()
    stats.seed(Totals())
    for i in range(5000):
        ip = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
        stats.observe([msg(i, ip)] * (1 + i % 7), ["OK"] + ["DUP"] * (i % 7))
    clock.advance(1)
    snap = stats.snapshot()
    assert snap["totals"]["clients"] == 5000
    assert len(snap["clients"]) == TOP_CLIENTS and snap["clients_omitted"] == 5000 - TOP_CLIENTS
    ranked = sorted(stats.clients.items(), key=lambda kv: (-kv[1].messages, kv[0]))[:TOP_CLIENTS]
    assert [c["ip"] for c in snap["clients"]] == [ip for ip, _ in ranked]
    assert all(c["messages"] == 7 for c in snap["clients"])
    assert len(stats.snapshot_bytes()) < 64 * 1024


def test_ipv6_clients_are_grouped_by_slash_64() -> None:
    """Addresses in one IPv6 /64 are one client, live and when seeded from SQL and Redis."""
    clock, stats = fresh()
    stats.seed(
        Totals(
            records=3,
            first_by_ip={"2001:db8::1": 2, "2001:db8::2": 1, "10.0.0.1": 0},
            latest_block_by_ip={"2001:db8::1": 5, "2001:db8::2": 9},
        ),
        {"2001:db8::1": 4, "2001:db8::2": 3},
    )
    stats.observe([msg(10, "2001:db8::ffff:1"), msg(11, "2001:db8:0:1::1")], ["OK", "OK"])
    clock.advance(1)
    clients = {c["ip"]: c for c in stats.snapshot()["clients"]}
    assert set(clients) == {"2001:db8::/64", "2001:db8:0:1::/64", "10.0.0.1"}
    assert (clients["2001:db8::/64"]["records"], clients["2001:db8::/64"]["messages"]) == (4, 8)
    assert clients["2001:db8::/64"]["latest_block"] == 10
    assert stats.snapshot()["totals"]["clients"] == 3


def test_the_top_stays_exact_as_counts_grow() -> None:
    """Ranked from the last top plus the groups that delivered since, the top always equals a full ranking."""
    import random

    rng = random.Random(13)
    clock, stats = fresh()
    stats.seed(
        Totals(records=0, first_by_ip={f"10.0.0.{i}": 0 for i in range(60)}),
        {f"10.0.0.{i}": rng.randrange(50) for i in range(60)},
    )
    for _round in range(200):
        batch = [
            msg(None, f"10.0.0.{rng.randrange(80)}", payload=b"%d" % rng.randrange(10**9))
            for _ in range(rng.randrange(1, 12))
        ]
        stats.observe(batch, ["DUP"] * len(batch))
        clock.advance(1)
        full = sorted(stats.clients.items(), key=lambda kv: (-kv[1].messages, kv[0]))[:TOP_CLIENTS]
        assert [c["ip"] for c in stats.snapshot()["clients"]] == [ip for ip, _ in full]


def test_groups_past_the_cap_are_counted_together() -> None:
    """Past max_groups, new addresses are counted as one 'other' group; nothing is lost from the totals."""
    clock = Clock()
    stats = ServerStats(clock, max_groups=3)
    stats.seed(Totals())
    stats.observe([msg(i, f"10.0.0.{i}") for i in range(6)], ["OK"] * 6)
    clock.advance(1)
    snap = stats.snapshot()
    assert {c["ip"]: c["records"] for c in snap["clients"]} == {
        "10.0.0.0": 1,
        "10.0.0.1": 1,
        "10.0.0.2": 1,
        OTHER: 3,
    }
    assert snap["totals"]["records"] == 6


def test_snapshot_bytes_are_encoded_once_per_ttl() -> None:
    """However often the encoded snapshot is asked for within a second, it is built and encoded once."""
    clock, stats = fresh()
    stats.observe([msg(1)], ["OK"])
    first = stats.snapshot_bytes()
    assert all(stats.snapshot_bytes() is first for _ in range(100))
    assert json.loads(first) == stats.snapshot()
    clock.advance(1)
    assert stats.snapshot_bytes() is not first


def test_latest_block_is_the_newest_received_not_the_last_stored() -> None:
    """Two batches in flight may commit out of order: the head is the later-received block."""
    _, stats = fresh()
    stats.observe([msg(11, at=200.0)], ["OK"])
    stats.observe([msg(10, at=100.0)], ["OK"])  # received first, its batch committed second
    assert stats.snapshot()["latest_block"]["number"] == 11
