"""The Redis mirror sink: the sink contract, exact keys, EVALSHA fallback, outages.

Live tests use the machine's shared Redis under a key prefix of their own, or a
private redis-server when they flush scripts, kill or stop it. Unit tests drive
the sink's bounds and error mapping with a fake client and a ``Clock``.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
import pytest_twisted
import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from eth_twisted.errors import SinkBusy, SinkError, SinkTimeout, SinkUnavailable
from eth_twisted.model import Message, Outcome, storable_client_ip
from eth_twisted.sinks.memory import MemorySink
from eth_twisted.sinks.redis import RedisSettings, RedisSink, make_redis_sink, parse_run_id
from eth_twisted.sinks.redis_scripts import STORE_SCRIPT, pack_store_entries
from tests.support import PrivateRedis, async_wait_until, hash_count, redis_command
from tests.support.redis import FakeRedis, hgetall, resp
from tests.support.sink_contract import T0, SinkContract, msg, numbered

OK, DUP, REJECTED = Outcome.STORED, Outcome.DUPLICATE, Outcome.REJECTED


# -- helpers ------------------------------------------------------------------------------


class LogCapture:
    """Collects the log events of one namespace while installed."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == self.namespace:
            self.events.append(event)

    def at(self, level: LogLevel) -> list[dict[str, Any]]:
        """Events logged at ``level``."""
        return [e for e in self.events if e.get("log_level") == level]

    def formats(self, level: LogLevel) -> list[str]:
        """The format strings of events at ``level``."""
        return [e["log_format"] for e in self.at(level)]


@pytest.fixture
def sink_log() -> Iterator[LogCapture]:
    """Log events of the Redis sink."""
    cap = LogCapture("eth_twisted.sinks.redis.RedisSink")
    globalLogPublisher.addObserver(cap)
    yield cap
    globalLogPublisher.removeObserver(cap)


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


@pytest_twisted.async_yield_fixture
async def private_sink(private_redis: PrivateRedis) -> AsyncIterator[RedisSink]:
    """A started sink on a private Redis, with 1 s timeouts and a small in-flight bound."""
    s = make_redis_sink(
        RedisSettings(
            redis_host="127.0.0.1",
            redis_port=private_redis.port,
            redis_prefix="eth:",
            redis_timeout=1.0,
            max_in_flight=8,
            pool_size=2,
        )
    )
    await s.start()
    yield s
    private_redis.kill(signal.SIGCONT)
    await s.stop()


async def store_in_record(
    record: MemorySink, sink: RedisSink, batch: Sequence[Message]
) -> list[Outcome]:
    """What the router does: the record decides, the mirror follows with its verdicts."""
    verdicts = await record.store_batch(batch)
    return await sink.store_batch(batch, verdicts)


# -- the contract, twice -------------------------------------------------------------------


@pytest.mark.live
class TestRedisSinkStandalone(SinkContract):
    """Without verdicts the Redis sink decides by ZADD NX and keeps the whole contract."""

    is_record = False


@pytest.mark.live
class TestRedisSinkAsMirror(SinkContract):
    """Called like the router calls a mirror (with a record's verdicts), it answers them back."""

    is_record = False

    def store(self, sink: Any, messages: Sequence[Message]) -> Deferred[list[Outcome]]:
        record = self.__dict__.setdefault("record", MemorySink())
        return defer.ensureDeferred(store_in_record(record, sink, list(messages)))


# -- exact keys -----------------------------------------------------------------------------


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_keys_after_batches_with_verdicts(
    sink: RedisSink, redis_server: dict[str, Any], redis_prefix: str
) -> None:
    """With verdicts, ip_addresses counts only STORED, ip_messages every delivery, hashes the first time."""
    port = redis_server["port"]
    record = MemorySink()
    first = [
        msg(b"a", "10.0.0.1", T0),
        msg(b"b", "10.0.0.2", T0 + 1),
        msg(b"a", "10.0.0.2", T0 + 2),
        msg(b"bad", "10.0.0.3", T0 + 3, block=-1),
    ]
    assert await store_in_record(record, sink, first) == [OK, OK, DUP, REJECTED]
    second = [msg(b"b", "10.0.0.1", T0 + 10), msg(b"c", "10.0.0.1", T0 + 11)]
    assert await store_in_record(record, sink, second) == [DUP, OK]

    addresses = hgetall(port, redis_prefix + "ip_addresses")
    assert addresses == {"10.0.0.1": 2, "10.0.0.2": 1}
    assert sum(addresses.values()) == len(record.order) == 3
    assert hgetall(port, redis_prefix + "ip_messages") == {"10.0.0.1": 3, "10.0.0.2": 2}
    scores = resp(port, "ZRANGE", redis_prefix + "hashes", 0, -1, "WITHSCORES")
    got = {scores[i].decode(): float(scores[i + 1]) for i in range(0, len(scores), 2)}
    assert got == {msg(b"a").hash: T0, msg(b"b").hash: T0 + 1, msg(b"c").hash: T0 + 11}
    assert await sink.read_counts() == (addresses, {"10.0.0.1": 3, "10.0.0.2": 2})
    assert await hash_count(sink) == 3


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_hostile_addresses_counted_as_the_record_stores_them(
    sink: RedisSink, redis_server: dict[str, Any], redis_prefix: str
) -> None:
    """Addresses with spaces, newlines, NUL or lone surrogates are mirrored, under the record's form.

    The live counts and the counts reconciliation rebuilds from the record are the same keys.
    """
    port = redis_server["port"]
    record = MemorySink()
    hostile = ["a b", "1.2.3.4\n5.6.7.8 1 1\n", "", "\x00", "fe80::1%\udc80", "y" * 100, "10.0.0.1"]
    batch = [msg(b"h-%d" % i, ip=ip, at=T0 + i) for i, ip in enumerate(hostile)]
    assert await store_in_record(record, sink, batch) == [OK] * len(batch)
    assert await store_in_record(record, sink, batch[:2]) == [DUP, DUP]
    expected = {storable_client_ip(ip): 1 for ip in hostile}
    assert len(expected) == len(hostile)
    live = hgetall(port, redis_prefix + "ip_addresses")
    assert live == expected
    assert live == (await record.totals()).first_by_ip
    await sink.reconcile(record)
    assert hgetall(port, redis_prefix + "ip_addresses") == live
    messages = hgetall(port, redis_prefix + "ip_messages")
    assert messages == dict(expected, **{storable_client_ip(ip): 2 for ip in hostile[:2]})


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_standalone_counts_first_by_zadd(
    sink: RedisSink, redis_prefix: str, redis_server: dict[str, Any]
) -> None:
    """Without verdicts a hash already in Redis is DUP and does not count as a first delivery."""
    await sink.store_batch([msg(b"x", "10.0.0.1"), msg(b"y", "10.0.0.1")])
    out = await sink.store_batch(
        [msg(b"x", "10.0.0.2"), msg(b"z", "10.0.0.2"), msg(b"w", block=2**63)]
    )
    assert out == [DUP, OK, REJECTED]
    assert await sink.read_counts() == (
        {"10.0.0.1": 2, "10.0.0.2": 1},
        {"10.0.0.1": 2, "10.0.0.2": 2},
    )


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_all_rejected_batch_touches_nothing(
    sink: RedisSink, redis_prefix: str, redis_server: dict[str, Any]
) -> None:
    """A batch the record rejected entirely writes no key at all."""
    out = await sink.store_batch([msg(b"n", block=-5)], [REJECTED])
    assert out == [REJECTED]
    assert resp(redis_server["port"], "KEYS", redis_prefix + "*") == []


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_verdicts_must_match_messages(sink: RedisSink) -> None:
    """A verdict list of the wrong length is a programming error, not a Redis call."""
    with pytest.raises(ValueError):
        await sink.store_batch([msg(b"a"), msg(b"b")], [OK])


@pytest.mark.live
@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_large_batches_count_exactly(
    sink: RedisSink, redis_prefix: str, redis_server: dict[str, Any]
) -> None:
    """40 batches of 500 (one packed script argument each) leave exact keys; the rate is bench/'s job."""
    batches = [
        [msg(b"big-%d-%d" % (k, i), f"10.1.{i % 4}.{i % 50}", T0 + i) for i in range(500)]
        for k in range(40)
    ]
    for k, batch in enumerate(batches):
        verdicts = [OK if i % 10 else DUP for i in range(500)] if k else [OK] * 500
        assert await sink.store_batch(batch, verdicts) == verdicts
    assert await hash_count(sink) == 20_000
    first, every = await sink.read_counts()
    assert sum(every.values()) == 20_000
    assert sum(first.values()) == 500 + 39 * 450
    assert len(every) == 100 and set(every.values()) == {200}


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_store_script_refuses_a_batch_it_cannot_parse(
    sink: RedisSink, redis_prefix: str, redis_server: dict[str, Any]
) -> None:
    """The script checks the packed lines against the announced count and writes nothing on a mismatch."""
    port = redis_server["port"]
    keys = [redis_prefix + k for k in ("hashes", "ip_addresses", "ip_messages")]
    line = f"{msg(b'p').hash} 1.5 10.0.0.1 1\n"
    for n, packed in (("2", line), ("1", line.replace(" 1\n", " 7\n")), ("1", line.rstrip("\n"))):
        with pytest.raises(Exception, match="entries parsed"):
            redis_command("127.0.0.1", port, "EVAL", STORE_SCRIPT.strip(), 3, *keys, n, packed)
    assert resp(port, "KEYS", redis_prefix + "*") == []
    out = redis_command("127.0.0.1", port, "EVAL", STORE_SCRIPT.strip(), 3, *keys, "1", line)
    assert out == b"1"
    assert hgetall(port, keys[1]) == {"10.0.0.1": 1}


# -- scripts --------------------------------------------------------------------------------


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_evalsha_after_script_flush_falls_back_to_eval(
    private_sink: RedisSink, private_redis: PrivateRedis, sink_log: LogCapture
) -> None:
    """After SCRIPT FLUSH the batch still runs (EVAL on NOSCRIPT), and EVALSHA works again after."""
    assert await private_sink.store_batch([msg(b"before")]) == [OK]
    assert resp(private_redis.port, "SCRIPT", "FLUSH") == "OK"
    assert await private_sink.store_batch([msg(b"after"), msg(b"before")]) == [OK, DUP]
    assert any("EVAL" in f for f in sink_log.formats(LogLevel.info))
    # EVAL cached the script again, so the next call needs no fallback.
    fallbacks = len(sink_log.at(LogLevel.info))
    assert await private_sink.store_batch([msg(b"third")]) == [OK]
    assert len(sink_log.at(LogLevel.info)) == fallbacks
    assert await hash_count(private_sink) == 3


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_start_warns_when_redis_has_no_persistence(
    private_redis: PrivateRedis, sink_log: LogCapture
) -> None:
    """The private Redis runs with save "" and appendonly no: start() warns once and says so."""
    s = make_redis_sink(
        RedisSettings(redis_host="127.0.0.1", redis_port=private_redis.port, redis_timeout=2.0)
    )
    try:
        await s.start()
        assert s.persistent is False
        warnings = sink_log.formats(LogLevel.warn)
        assert len(warnings) == 1 and "no persistence" in warnings[0]
        assert s.run_id == parse_run_id(resp(private_redis.port, "INFO", "server"))
    finally:
        await s.stop()


@pytest.mark.live
@pytest_twisted.ensureDeferred
async def test_persistence_unknown_when_config_is_refused(
    private_redis: PrivateRedis, sink_log: LogCapture
) -> None:
    """A user whose ACL refuses CONFIG starts anyway and logs that persistence is unknown."""
    resp(private_redis.port, "ACL", "SETUSER", "mirror", "on", ">pw", "~*", "+@all", "-config")
    s = make_redis_sink(
        RedisSettings(
            redis_host="127.0.0.1",
            redis_port=private_redis.port,
            redis_username="mirror",
            redis_password="pw",
            redis_timeout=2.0,
        )
    )
    try:
        await s.start()
        assert s.persistent is None
        assert any("persistence unknown" in f for f in sink_log.formats(LogLevel.info))
        assert sink_log.at(LogLevel.error) == []
        assert await s.store_batch([msg(b"acl")]) == [OK]
    finally:
        await s.stop()


# -- outages on a private Redis ----------------------------------------------------------


@pytest.mark.live
@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_sigkill_fails_fast_then_recovers_and_reconcile_restores(
    private_sink: RedisSink, private_redis: PrivateRedis, sink_log: LogCapture
) -> None:
    """Redis SIGKILLed: calls fail within the timeout.

    Restarted empty: batches work, reconcile restores all.
    """
    record = MemorySink()
    ips = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    for k in range(3):
        batch = numbered(100, prefix=b"k%d" % k, ip=ips[k])
        assert await store_in_record(record, private_sink, batch) == [OK] * 100

    private_redis.kill(signal.SIGKILL)
    for i in range(3):
        started = time.monotonic()
        with pytest.raises((SinkUnavailable, SinkTimeout)):
            await private_sink.store_batch([msg(b"during-%d" % i)])
        assert time.monotonic() - started < private_sink.call_timeout + 0.5
    with pytest.raises((SinkUnavailable, SinkTimeout)):
        await private_sink.ping()
    errors = sink_log.at(LogLevel.error)
    assert len(errors) == 1, "an outage is logged once, not per call"

    private_redis.start()  # empty: no persistence
    fresh = [msg(b"after-restart", ips[0])]

    async def stored() -> bool:
        try:
            return await store_in_record(record, private_sink, fresh) in ([OK], [DUP])
        except SinkError:
            return False

    await async_wait_until(stored, timeout=30, what="a batch to succeed after the restart")
    assert len(sink_log.at(LogLevel.error)) == 1
    assert any("answers again" in f for f in sink_log.formats(LogLevel.info))
    assert await hash_count(private_sink) == 1

    result = await private_sink.reconcile(record)
    assert (result.records, result.hashes_added, result.ips) == (301, 300, 3)
    assert await hash_count(private_sink) == 301
    addresses, messages = await private_sink.read_counts()
    totals = await record.totals()
    assert addresses == totals.first_by_ip == {ips[0]: 101, ips[1]: 100, ips[2]: 100}
    assert all(messages[ip] >= addresses[ip] for ip in addresses)
    # a second run finds nothing missing
    again = await private_sink.reconcile(record)
    assert again.hashes_added == 0 and again.ip_messages_raised == 0


@pytest.mark.live
@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_sigstop_times_out_then_sigcont_recovers(
    private_sink: RedisSink, private_redis: PrivateRedis
) -> None:
    """A stopped Redis gives SinkTimeout within the reply timeout; after SIGCONT calls work again."""
    assert await private_sink.store_batch([msg(b"one")]) == [OK]
    private_redis.kill(signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(SinkTimeout):
        await private_sink.store_batch([msg(b"two")])
    assert time.monotonic() - started < private_sink.call_timeout + 0.5
    private_redis.kill(signal.SIGCONT)

    async def answers() -> bool:
        try:
            await private_sink.ping()
            return True
        except SinkError:
            return False

    await async_wait_until(answers, timeout=20, what="Redis to answer after SIGCONT")
    # "two" may or may not have been applied (timeouts are ambiguous); "three" is new either way.
    out = await private_sink.store_batch([msg(b"two"), msg(b"three")])
    assert out[1] == OK and out[0] in (OK, DUP)


@pytest.mark.live
@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_in_flight_bound_fails_fast_while_redis_is_stopped(
    private_sink: RedisSink, private_redis: PrivateRedis
) -> None:
    """Past max_in_flight calls a new call fails at once instead of queueing behind a stopped Redis."""
    await private_sink.ping()
    private_redis.kill(signal.SIGSTOP)
    pending = [
        private_sink.store_batch([msg(b"q-%d" % i)]) for i in range(private_sink.max_in_flight)
    ]
    for d in pending:
        d.addErrback(lambda f: f.trap(SinkError))
    extra = private_sink.store_batch([msg(b"one-too-many")])
    assert extra.called
    with pytest.raises((SinkBusy, SinkUnavailable)):
        await extra
    await defer.DeferredList(pending)
    assert private_sink.in_flight == 0
    private_redis.kill(signal.SIGCONT)


@pytest.mark.live
@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_restart_detected_by_run_id(
    private_sink: RedisSink, private_redis: PrivateRedis
) -> None:
    """check_restart answers True once after Redis restarted (run_id changed) and tells the listeners."""
    told: list[int] = []
    private_sink.add_recovery_listener(lambda: told.append(1))
    assert await private_sink.check_restart() is False
    private_redis.restart_empty()

    async def changed() -> bool:
        try:
            return await private_sink.check_restart()
        except SinkError:
            return False

    await async_wait_until(changed, timeout=30, what="the new run_id")
    await async_wait_until(lambda: told, timeout=5, what="the recovery listener")
    assert await private_sink.check_restart() is False


# -- unit tests: bounds and error mapping without a network -----------------------------


def fake_sink(**kwargs: Any) -> tuple[RedisSink, FakeRedis, Clock]:
    """A sink on a FakeRedis and a Clock."""
    fake, clock = FakeRedis(), Clock()
    return RedisSink(fake, reactor=clock, **kwargs), fake, clock


def test_call_times_out_on_the_clock() -> None:
    """A command that never answers fails with SinkTimeout exactly at call_timeout."""
    s, _, clock = fake_sink(call_timeout=3.0)
    d = s.ping()
    failures: list[Any] = []
    d.addErrback(failures.append)
    clock.advance(2.9)
    assert not failures
    clock.advance(0.2)
    assert failures and failures[0].check(SinkTimeout)
    assert s.in_flight == 0


def test_in_flight_bound_gives_busy_then_unavailable_during_outage() -> None:
    """Past max_in_flight a call fails at once: SinkBusy normally, SinkUnavailable in an outage."""
    s, fake, clock = fake_sink(call_timeout=5.0, max_in_flight=2)
    first, second = s.ping(), s.ping()
    third = s.ping()
    f3: list[Any] = []
    third.addErrback(f3.append)
    assert f3[0].check(SinkBusy)
    for d in (first, second):
        d.addErrback(lambda f: None)
    clock.advance(5)  # both time out: an outage begins
    assert s.outage_started is not None
    a, b = s.ping(), s.ping()
    c = s.ping()
    fc: list[Any] = []
    c.addErrback(fc.append)
    assert fc[0].check(SinkUnavailable)
    for d in (a, b):
        d.addErrback(lambda f: None)
    clock.advance(5)


@pytest.mark.parametrize(
    ("error", "expected", "outage"),
    [
        (
            txredisapi.ResponseError("MISCONF Redis is configured to save RDB snapshots"),
            SinkUnavailable,
            True,
        ),
        (
            txredisapi.ResponseError("LOADING Redis is loading the dataset in memory"),
            SinkUnavailable,
            True,
        ),
        (txredisapi.ResponseError("BUSY Redis is busy running a script"), SinkBusy, False),
        (txredisapi.ResponseError("NOPERM this user has no permissions"), SinkUnavailable, False),
        (txredisapi.ConnectionError("Lost connection"), SinkUnavailable, True),
        (txredisapi.TimeoutError("Not received Redis response in 1 seconds"), SinkTimeout, True),
        (ConnectionRefusedError(111, "refused"), SinkUnavailable, True),
    ],
)
def test_errors_are_mapped(error: Exception, expected: type[SinkError], outage: bool) -> None:
    """Each Redis/connection failure becomes the SinkError the server answers with; outages are noted."""
    s, fake, _ = fake_sink()
    fake.replies["PING"] = error
    failures: list[Any] = []
    s.ping().addErrback(failures.append)
    assert type(failures[0].value) is expected
    assert (s.outage_started is not None) is outage


def test_noscript_falls_back_to_eval_within_one_call() -> None:
    """EVALSHA answered NOSCRIPT is retried as EVAL with the script source, under the same call."""
    s, fake, _ = fake_sink()
    fake.replies["EVALSHA"] = txredisapi.ResponseError(
        "NOSCRIPT No matching script. Please use EVAL."
    )
    fake.replies["EVAL"] = lambda args: [1, 0]
    out: list[Any] = []
    s.store_batch([msg(b"a"), msg(b"a")]).addCallback(out.append)
    assert out == [[OK, DUP]]
    assert [c[0] for c in fake.calls] == ["EVALSHA", "EVAL"]
    assert b"ZADD" in fake.calls[1][1]
    assert s.in_flight == 0 and s.outage_started is None


def test_failed_eval_after_noscript_is_unavailable() -> None:
    """When the EVAL fallback fails too (e.g. MISCONF), the batch fails with SinkUnavailable."""
    s, fake, _ = fake_sink()
    fake.replies["EVALSHA"] = txredisapi.ResponseError("NOSCRIPT No matching script.")
    fake.replies["EVAL"] = txredisapi.ResponseError("MISCONF disk error")
    failures: list[Any] = []
    s.store_batch([msg(b"a")]).addErrback(failures.append)
    assert failures[0].check(SinkUnavailable)


def test_outage_logged_once_and_recovery_once(sink_log: LogCapture) -> None:
    """Many failed calls log one error; the first success logs one info and tells the listeners."""
    s, fake, clock = fake_sink()
    told: list[int] = []
    s.add_recovery_listener(lambda: told.append(1))
    fake.replies["PING"] = txredisapi.ConnectionError("Not connected")
    for _ in range(5):
        s.ping().addErrback(lambda f: None)
    clock.advance(12.5)
    fake.replies["PING"] = "PONG"
    s.ping()
    s.ping()
    assert len(sink_log.at(LogLevel.error)) == 1
    recovered = [e for e in sink_log.at(LogLevel.info) if "answers again" in e["log_format"]]
    assert len(recovered) == 1 and recovered[0]["seconds"] == 12.5 and recovered[0]["failed"] == 5
    assert told == []  # listeners run on the next reactor turn
    clock.advance(0)
    assert told == [1]


def test_store_script_arguments() -> None:
    """One EVALSHA carries hash, score, IP and flag per message; REJECTED verdicts are left out."""
    s, fake, _ = fake_sink(prefix="p:")
    fake.replies["EVALSHA"] = lambda args: [1, 0]
    batch = [msg(b"a", "1.1.1.1", 5.5), msg(b"r", "2.2.2.2"), msg(b"b", "3.3.3.3", 7.25)]
    out: list[Any] = []
    s.store_batch(batch, [OK, REJECTED, DUP]).addCallback(out.append)
    assert out == [[OK, REJECTED, DUP]]
    [call] = fake.calls
    assert call[2:6] == (3, "p:hashes", "p:ip_addresses", "p:ip_messages")
    assert call[6:] == ("2", f"{batch[0].hash} 5.5 1.1.1.1 1\n{batch[2].hash} 7.25 3.3.3.3 0\n")


def test_pack_store_entries_keeps_lines_parseable() -> None:
    """An address the line format cannot carry goes in the record's storable form: escaped, '-' when empty."""
    packed = pack_store_entries(
        [
            ("h1", 1.0, "::1", "?"),
            ("h2", 2.5, "", "1"),
            ("h3", 3.0, "a b", "0"),
            ("h4", 4.0, "x\ty", "1"),
            ("h5", 5.0, "fe80::1%eth0", "0"),
            ("h6", 6.0, "::ffff:10.0.0.1", "1"),
        ]
    )
    assert packed == (
        "h1 1.0 ::1 ?\nh2 2.5 - 1\nh3 3.0 a\\x20b 0\nh4 4.0 x\\x09y 1\n"
        "h5 5.0 fe80::1%eth0 0\nh6 6.0 10.0.0.1 1\n"
    )


def test_pack_store_entries_encodes_any_address() -> None:
    """A lone surrogate, a newline or an overlong address packs into lines the script parses, as UTF-8."""
    ips = ["fe80::1%\udc80", "1.2.3.4\n5.6.7.8 1 1", "x" * 100, "\x00"]
    packed = pack_store_entries([(f"h{i}", 1.0, ip, "1") for i, ip in enumerate(ips)])
    packed.encode("utf-8")
    lines = packed.splitlines()
    assert len(lines) == len(ips)
    assert [line.split(" ")[2] for line in lines] == [storable_client_ip(ip) for ip in ips]
    assert all(len(line.split(" ")) == 4 for line in lines)


def test_parse_run_id() -> None:
    """run_id is read out of an INFO server reply."""
    info = b"# Server\r\nredis_version:7.0.15\r\nrun_id:abc123\r\ntcp_port:6379\r\n"
    assert parse_run_id(info) == "abc123"
    assert parse_run_id(b"# Server\r\n") is None
