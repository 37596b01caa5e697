"""Rebuilding the Redis mirror from the record, and the loop that does it.

The loop is driven by a ``Clock`` against a sink on a fake client; what a
reconciliation writes is checked on the shared Redis under a test prefix.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from eth_twisted.errors import SinkError, SinkUnavailable
from eth_twisted.metrics import ServerMetrics
from eth_twisted.model import Record, RecordSummary, summary_bytes
from eth_twisted.sinks.memory import MemorySink
from eth_twisted.sinks.reconcile import Reconciler
from eth_twisted.sinks.redis import RedisSettings, RedisSink, make_redis_sink
from eth_twisted.sinks.redis_scripts import RECONCILE_PAGE
from tests.support import ROOT, PrivateRedis, async_wait_until, hash_count
from tests.support.redis import FakeRedis, hgetall, resp
from tests.support.sink_contract import T0, msg, numbered


def start_reconciler(sink: Any, record: Any, interval: float = 300.0, **kwargs: Any) -> Reconciler:
    """A Reconciler, started (it reconciles at once); the test stops it with stopService."""
    service = Reconciler(sink, record, interval=interval, **kwargs)
    service.startService()
    return service


class ScriptedRecord(MemorySink):
    """A memory record whose summary reads can fail, or be held open by the test (first page of a run).

    ``fetch_records`` (whole records, payloads included) must never be called by
    a reconciliation: it fails the test.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fetch_error: Exception | None = None
        self.hold: list[Deferred[None]] | None = None
        self.fetches = 0
        self.active = 0
        self.max_active = 0

    def fetch_records(self, after_id: int, limit: int) -> Deferred[list[Record]]:
        raise AssertionError("a reconciliation read whole records (payloads) out of the record")

    def fetch_summaries(
        self, after_id: int, limit: int, max_bytes: int = 1 << 20
    ) -> Deferred[list[RecordSummary]]:
        self.fetches += 1
        if self.fetch_error is not None:
            return defer.fail(self.fetch_error)
        if self.hold is None or after_id != 0:
            return super().fetch_summaries(after_id, limit, max_bytes)
        gate: Deferred[None] = Deferred()
        self.hold.append(gate)
        self.active += 1
        self.max_active = max(self.max_active, self.active)

        def release(_: None) -> Deferred[list[RecordSummary]]:
            self.active -= 1
            return super(ScriptedRecord, self).fetch_summaries(after_id, limit, max_bytes)

        return gate.addCallback(release)


class FakeCounter:
    """Counts inc() calls, by label."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self._label = ""

    def labels(self, **kw: str) -> FakeCounter:
        child = FakeCounter()
        child.values = self.values
        child._label = ",".join(f"{k}={v}" for k, v in kw.items())
        return child

    def inc(self, n: float = 1) -> None:
        self.values[self._label] = self.values.get(self._label, 0) + n


class FakeMetrics:
    """The two ServerMetrics hooks the reconciler uses."""

    def __init__(self) -> None:
        self.reconciliations = FakeCounter()
        self.reconciled_hashes = FakeCounter()


def clocked(
    record: MemorySink, **kwargs: Any
) -> tuple[Reconciler, RedisSink, FakeRedis, Clock, FakeMetrics]:
    """A reconciler on a fake-client sink, a Clock and fake metrics (not started)."""
    fake, clock, metrics = FakeRedis(), Clock(), FakeMetrics()
    # A reconciliation page script answers how many hashes it added: all of them, here.
    fake.replies["EVALSHA"] = lambda args: int(args[6]) // 2 if args[1] == RECONCILE_PAGE.sha else 0
    fake.replies["HSCAN"] = [b"0", []]
    fake.replies["INFO"] = b"# Server\r\nrun_id:aaaa\r\n"
    sink = RedisSink(fake, reactor=clock)
    rec = Reconciler(sink, record, interval=300, clock=clock, metrics=metrics, **kwargs)
    return rec, sink, fake, clock, metrics


# -- the loop (Clock-driven, no network) -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_loop_survives_failing_reconcile() -> None:
    """A record whose fetch fails is logged and counted; the loop keeps running and recovers."""
    record = ScriptedRecord()
    await record.store_batch(numbered(3))
    record.fetch_error = RuntimeError("database went away")
    rec, _, _, clock, metrics = clocked(record, watch_interval=None)
    rec.startService()
    assert (rec.runs, rec.failures) == (1, 1)
    clock.advance(300)
    assert (rec.runs, rec.failures) == (2, 2)
    record.fetch_error = SinkUnavailable("mysql", "lost connection")
    clock.advance(300)
    assert (rec.runs, rec.failures) == (3, 3)
    record.fetch_error = None
    clock.advance(300)
    assert (rec.runs, rec.failures) == (4, 3)
    assert rec.last_result is not None and rec.last_result.records == 3
    assert rec.last_success_at == 900
    assert metrics.reconciliations.values == {"result=error": 3, "result=ok": 1}
    assert metrics.reconciled_hashes.values == {"": 3}
    await rec.stopService()


@pytest_twisted.ensureDeferred
async def test_runs_never_overlap_and_triggers_coalesce() -> None:
    """Triggers during a run ask for exactly one more run after it, never a concurrent one."""
    record = ScriptedRecord()
    await record.store_batch(numbered(2))
    record.hold = []
    rec, _, _, clock, _ = clocked(record, watch_interval=None)
    rec.startService()
    assert len(record.hold) == 1
    rec.trigger()
    rec.trigger()
    clock.advance(300)  # the loop's tick is skipped while its call is still running
    assert len(record.hold) == 1 and record.max_active == 1
    record.hold[0].callback(None)  # first run ends, the coalesced one starts
    assert len(record.hold) == 2 and record.max_active == 1
    record.hold[1].callback(None)
    assert rec.runs == 2 and rec.failures == 0
    clock.advance(300)
    assert len(record.hold) == 3
    record.hold[2].callback(None)
    assert rec.runs == 3
    await rec.stopService()


@pytest_twisted.ensureDeferred
async def test_recovery_triggers_a_run() -> None:
    """When the sink sees Redis answer again after an outage, a reconciliation runs."""
    record = ScriptedRecord()
    rec, sink, fake, clock, _ = clocked(record, watch_interval=None)
    rec.startService()
    assert rec.runs == 1
    fake.replies["PING"] = ConnectionError("refused")
    with pytest.raises(SinkUnavailable):
        await sink.ping()
    fake.replies["PING"] = "PONG"
    await sink.ping()
    assert rec.runs == 1
    clock.advance(0)
    assert rec.runs == 2
    await rec.stopService()


@pytest_twisted.ensureDeferred
async def test_changed_run_id_triggers_a_run() -> None:
    """The watch loop asks for run_id every watch_interval; a change starts a reconciliation."""
    record = ScriptedRecord()
    rec, sink, fake, clock, _ = clocked(record, watch_interval=10)
    rec.startService()
    assert rec.runs == 1
    clock.advance(10)  # the first run_id seen is no change
    clock.advance(0)
    assert rec.runs == 1 and sink.run_id == "aaaa"
    fake.replies["INFO"] = b"# Server\r\nrun_id:bbbb\r\n"
    clock.advance(10)
    clock.advance(0)
    assert rec.runs == 2 and sink.run_id == "bbbb"
    fake.replies["INFO"] = ConnectionError("down")
    clock.advance(10)  # a failing watch does not stop the loop
    fake.replies["INFO"] = b"# Server\r\nrun_id:cccc\r\n"
    clock.advance(10)
    clock.advance(0)
    assert rec.runs == 3
    await rec.stopService()


@pytest_twisted.ensureDeferred
async def test_stop_service_waits_for_the_run_and_stops_the_loop() -> None:
    """stopService fires only after the run in progress ends; afterwards no run starts."""
    record = ScriptedRecord()
    record.hold = []
    rec, sink, _, clock, _ = clocked(record, watch_interval=10)
    rec.startService()
    stopped = rec.stopService()
    assert not stopped.called
    record.hold[0].callback(None)
    assert stopped.called
    clock.advance(3000)
    sink._notify()
    clock.advance(0)
    assert rec.runs == 1 and len(record.hold) == 1


@pytest_twisted.ensureDeferred
async def test_stop_service_does_not_wait_for_the_whole_rebuild() -> None:
    """A shutdown during a long reconciliation ends it at the next page, leaving ip_addresses alone."""
    record = ScriptedRecord()
    await record.store_batch(numbered(50))
    record.hold = []
    rec, _, fake, _, _ = clocked(record, watch_interval=None, page_size=5)
    rec.startService()
    stopped = rec.stopService()
    record.hold[0].callback(None)  # the first page is read and written, then the run sees the stop
    assert stopped.called
    assert record.fetches == 1 and rec.failures == 0 and rec.last_result is None
    scripts = [c[1] for c in fake.calls if c[0] == "EVALSHA"]
    assert scripts == [RECONCILE_PAGE.sha]
    assert [c for c in fake.calls if c[0] == "DEL"]  # the run's own count key is dropped


@pytest_twisted.ensureDeferred
async def test_run_once_on_a_service_never_started_reconciles_everything() -> None:
    """run_once() needs no running service: only stopService cancels a run."""
    record = ScriptedRecord()
    await record.store_batch(numbered(12))
    rec, _, _, _, _ = clocked(record, watch_interval=None, page_size=5)
    result = await rec.run_once()
    assert result is not None and result.records == 12 and record.fetches == 4


@pytest_twisted.ensureDeferred
async def test_reconcile_reads_bounded_pages_of_summaries_only() -> None:
    """Reconciliation reads summaries (never payloads) in pages bounded by rows and bytes.

    Each page is one script.
    """
    record = ScriptedRecord()
    await record.store_batch(
        [msg(b"p-%d" % i + b"x" * 65536, ip=f"10.0.0.{i % 3}", at=T0 + i) for i in range(30)]
    )
    asked: list[tuple[int, int, int]] = []
    answered: list[list[RecordSummary]] = []
    read = record.fetch_summaries

    def spy(after_id: int, limit: int, max_bytes: int = 1 << 20) -> Deferred[list[RecordSummary]]:
        asked.append((after_id, limit, max_bytes))
        return read(after_id, limit, max_bytes).addCallback(
            lambda page: answered.append(page) or page
        )

    record.fetch_summaries = spy  # type: ignore[method-assign]
    _, sink, fake, _, _ = clocked(record)
    one = summary_bytes((await read(0, 1))[0])
    result = await sink.reconcile(record, page_size=7, page_bytes=3 * one)
    assert result.records == 30 and result.hashes_added == 30
    assert all(limit == 7 and max_bytes == 3 * one for _, limit, max_bytes in asked)
    assert [len(p) for p in answered] == [3] * 10 + [0]
    assert all(sum(map(summary_bytes, p)) <= 3 * one for p in answered)
    pages = [c for c in fake.calls if c[0] == "EVALSHA" and c[1] == RECONCILE_PAGE.sha]
    assert len(pages) == 10
    assert (
        max(len(c) for c in pages) <= 7 + 2 * 3 + 2 * 3
    )  # command, keys, ttl, count; 3 pairs; <= 3 IPs


# -- what a reconciliation writes (shared Redis, own prefix) ------------------------------


@pytest_twisted.async_yield_fixture
async def sink(redis_server: dict[str, Any], redis_prefix: str) -> AsyncIterator[RedisSink]:
    """A started Redis sink on the shared Redis, under this test's prefix."""
    s = make_redis_sink(
        RedisSettings(
            redis_host=redis_server["host"],
            redis_port=redis_server["port"],
            redis_prefix=redis_prefix,
        )
    )
    await s.start()
    yield s
    await s.stop()


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_reconcile_restores_hashes_and_counts(
    sink: RedisSink, redis_server: dict[str, Any], redis_prefix: str
) -> None:
    """Missing hashes come back with their receipt time, ip_addresses is replaced, ip_messages raised."""
    port = redis_server["port"]
    record = MemorySink()
    await record.store_batch(numbered(30, ip="10.0.0.1") + numbered(20, prefix=b"n", ip="10.0.0.2"))
    present = await record.fetch_records(0, 5)
    # Redis knows 5 of the hashes, one with a later score that must be kept (NX),
    # holds a wrong count, an IP the record never saw, and too few messages.
    resp(
        port,
        "ZADD",
        redis_prefix + "hashes",
        *[x for r in present for x in (repr(r.received_at), r.hash)],
    )
    resp(port, "ZADD", redis_prefix + "hashes", "XX", T0 + 999, present[0].hash)
    resp(port, "HSET", redis_prefix + "ip_addresses", "10.0.0.1", 7, "10.9.9.9", 4)
    resp(port, "HSET", redis_prefix + "ip_messages", "10.0.0.1", 99, "10.0.0.2", 3, "10.9.9.9", 4)

    result = await sink.reconcile(record, page_size=7)
    assert (result.records, result.hashes_added, result.ips, result.ip_messages_raised) == (
        50,
        45,
        2,
        1,
    )
    assert await hash_count(sink) == 50
    assert float(resp(port, "ZSCORE", redis_prefix + "hashes", present[0].hash)) == T0 + 999
    last = (await record.fetch_records(49, 1))[0]
    assert float(resp(port, "ZSCORE", redis_prefix + "hashes", last.hash)) == last.received_at
    assert hgetall(port, redis_prefix + "ip_addresses") == {"10.0.0.1": 30, "10.0.0.2": 20}
    assert hgetall(port, redis_prefix + "ip_messages") == {
        "10.0.0.1": 99,
        "10.0.0.2": 20,
        "10.9.9.9": 4,
    }
    assert resp(port, "KEYS", sink.reconcile_tmp_key + "*") == []


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_concurrent_reconciliations_do_not_mix_counts(
    sink: RedisSink, redis_server: dict[str, Any], redis_prefix: str
) -> None:
    """Two servers rebuilding the same mirror at once (interleaved pages) both leave the right counts."""
    other = make_redis_sink(
        RedisSettings(
            redis_host=redis_server["host"],
            redis_port=redis_server["port"],
            redis_prefix=redis_prefix,
        )
    )
    await other.start()
    try:
        record = MemorySink()
        await record.store_batch(
            numbered(40, ip="10.0.0.1") + numbered(25, prefix=b"n", ip="10.0.0.2")
        )
        a, b = await defer.gatherResults(
            [sink.reconcile(record, page_size=4), other.reconcile(record, page_size=3)]
        )
        assert a.records == b.records == 65
        assert hgetall(redis_server["port"], redis_prefix + "ip_addresses") == {
            "10.0.0.1": 40,
            "10.0.0.2": 25,
        }
        assert resp(redis_server["port"], "KEYS", sink.reconcile_tmp_key + "*") == []
    finally:
        await other.stop()


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_reconcile_empty_record_clears_ip_addresses(
    sink: RedisSink, redis_server: dict[str, Any], redis_prefix: str
) -> None:
    """An empty record leaves no ip_addresses and adds nothing; hashes Redis holds are kept."""
    port = redis_server["port"]
    await sink.store_batch([msg(b"only-in-redis")])
    result = await sink.reconcile(MemorySink())
    assert (result.records, result.hashes_added, result.ips) == (0, 0, 0)
    assert resp(port, "EXISTS", redis_prefix + "ip_addresses") == 0
    assert await hash_count(sink) == 1


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_reconcile_many_ips(
    sink: RedisSink, redis_server: dict[str, Any], redis_prefix: str
) -> None:
    """1,300 IPs (more than one HSET chunk in the script) all land in ip_addresses and ip_messages."""
    record = MemorySink()
    await record.store_batch(
        [msg(b"ip-%d" % i, ip=f"10.{i // 256}.{i % 256}.1") for i in range(1300)]
    )
    result = await sink.reconcile(record)
    assert (result.ips, result.ip_messages_raised) == (1300, 1300)
    addresses = hgetall(redis_server["port"], redis_prefix + "ip_addresses")
    assert len(addresses) == 1300 and set(addresses.values()) == {1}
    assert hgetall(redis_server["port"], redis_prefix + "ip_messages") == addresses


@pytest.mark.live
@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_reconcile_rate(sink: RedisSink) -> None:
    """20,000 records reconcile into an empty Redis in well under the default interval (rate printed)."""
    record = MemorySink()
    for k in range(4):
        await record.store_batch(numbered(5000, prefix=b"r%d" % k, ip=f"10.0.0.{k}"))
    started = time.perf_counter()
    result = await sink.reconcile(record)
    seconds = time.perf_counter() - started
    print(f"\nreconcile: {result.records} records, {result.records / seconds:.0f} records/s")
    assert result.hashes_added == 20_000
    assert seconds < 30


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_start_reconciler_with_server_metrics(sink: RedisSink) -> None:
    """start_reconciler reconciles at once and counts it in ServerMetrics."""
    record = MemorySink()
    await record.store_batch(numbered(12, ip="10.0.0.5"))
    metrics = ServerMetrics(CollectorRegistry())
    rec = start_reconciler(sink, record, interval=300, metrics=metrics)
    try:
        await async_wait_until(
            lambda: rec.last_result is not None, timeout=10, what="the first run"
        )
        assert await hash_count(sink) == 12
        assert (await sink.read_counts())[0] == {"10.0.0.5": 12}
        reg = metrics.registry
        assert reg.get_sample_value("eth_server_redis_reconciliations_total", {"result": "ok"}) == 1
        assert reg.get_sample_value("eth_server_redis_reconciled_hashes_total") == 12
    finally:
        await rec.stopService()


@pytest.mark.live
@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_redis_restarted_empty_converges_without_traffic(private_redis: PrivateRedis) -> None:
    """With the reconciler running, a Redis restarted empty gets every hash and count back by itself."""
    record = MemorySink()
    await record.store_batch(numbered(40, ip="10.0.0.7"))
    s = make_redis_sink(
        RedisSettings(redis_host="127.0.0.1", redis_port=private_redis.port, redis_timeout=1.0)
    )
    await s.start()
    rec = start_reconciler(s, record, interval=300, watch_interval=0.2)
    try:
        await async_wait_until(
            lambda: rec.runs == 1 and rec.last_result is not None, timeout=10, what="the first run"
        )
        assert await hash_count(s) == 40
        private_redis.restart_empty()
        assert resp(private_redis.port, "DBSIZE") == 0

        async def restored() -> bool:
            try:
                return await hash_count(s) == 40
            except SinkError:
                return False

        await async_wait_until(restored, timeout=30, what="the mirror to be rebuilt")
        assert (await s.read_counts())[0] == {"10.0.0.7": 40}
        assert rec.runs >= 2
    finally:
        await rec.stopService()
        await s.stop()


def _rss_bench() -> Any:
    """bench/reconcile_rss.py as a module (its children measure one process each)."""
    path = ROOT / "bench" / "reconcile_rss.py"
    spec = importlib.util.spec_from_file_location("reconcile_rss", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.live
@pytest.mark.slow
def test_reconcile_memory_does_not_grow_with_payloads(
    mysql_db: dict[str, Any], redis_server: dict[str, Any]
) -> None:
    """Reconciling 400 rows of 64 KiB from MariaDB costs a small fraction of reading their payloads once.

    Both are measured in this run, each in a fresh process (peak RSS growth): the
    baseline reads every record with its payload, as reconciliation used to.
    """
    rss = _rss_bench()
    rss.fill(mysql_db, 400, 65536)
    payloads = rss.measure("payloads", mysql_db)
    rebuilt = rss.measure("reconcile", mysql_db)
    print(
        f"\nRSS growth: reading the payloads {payloads['growth_kib']} KiB, "
        f"reconciling {rebuilt['growth_kib']} KiB"
    )
    assert payloads["records"] == rebuilt["records"] == rebuilt["hashes_added"] == 400
    assert payloads["payload_bytes"] == 400 * 65536
    assert (
        payloads["growth_kib"] * 1024 > payloads["payload_bytes"] / 2
    )  # the baseline did load them
    assert rebuilt["growth_kib"] < payloads["growth_kib"] / 4
