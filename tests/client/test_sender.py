"""The sender link: reconnect and resend, window, ack matching, ERR handling, timeouts, heartbeat."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from eth_twisted.client.outbox import Cursor, Outbox, OutboxSettings, open_outbox
from eth_twisted.client.sender import DeliveryService, DeliverySettings
from eth_twisted.link.netstring import encode
from eth_twisted.link.payload import render_html
from eth_twisted.link.replies import ReplyError, parse_reply
from eth_twisted.metrics import ClientMetrics
from eth_twisted.model import EMPTY_SHA256, sha256_hex

NETSTRING = re.compile(rb"(\d+):")


def split_frames(data: bytes) -> list[bytes]:
    """Decode a run of netstrings (what the sender wrote)."""
    frames = []
    pos = 0
    while pos < len(data):
        m = NETSTRING.match(data, pos)
        assert m, data[pos : pos + 20]
        n = int(m.group(1))
        start = m.end()
        assert data[start + n : start + n + 1] == b","
        frames.append(data[start : start + n])
        pos = start + n + 1
    return frames


class FakeTransport(StringTransport):
    """A StringTransport whose close reaches the protocol on the next clock turn."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.protocol: Any = None
        self.keepalive = False
        self.nodelay = False
        self.aborted = False
        self.read_pos = 0

    def setTcpKeepAlive(self, enabled: int) -> None:
        self.keepalive = bool(enabled)

    def setTcpNoDelay(self, enabled: int) -> None:
        self.nodelay = bool(enabled)

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self.clock.callLater(0, self._lost)

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()

    def _lost(self) -> None:
        self.connected = False
        self.protocol.connectionLost(Failure(ConnectionDone("closed")))

    def take_frames(self) -> list[bytes]:
        """Frames written since the last call."""
        data = self.value()[self.read_pos :]
        self.read_pos = len(self.value())
        return split_frames(data)


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connects to a StringTransport, or refuses while ``refuse`` is true."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.refuse = False
        self.attempts: list[float] = []
        self.transports: list[FakeTransport] = []
        self.protocols: list[Any] = []

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        self.attempts.append(self.clock.seconds())
        if self.refuse:
            return defer.fail(ConnectionRefusedError())
        proto = factory.buildProtocol(None)
        transport = FakeTransport(self.clock)
        transport.protocol = proto
        proto.makeConnection(transport)
        self.transports.append(transport)
        self.protocols.append(proto)
        return defer.succeed(proto)

    @property
    def transport(self) -> FakeTransport:
        return self.transports[-1]

    def reply(self, *texts: str) -> None:
        """Deliver replies to the newest connection, in one read."""
        self.protocols[-1].dataReceived(b"".join(encode(t.encode()) for t in texts))


def cursor_at(n: int) -> Cursor:
    return Cursor(1, "0xg", n, f"0xh{n}")


def add_blocks(outbox: Outbox, first: int, last: int) -> list[str]:
    outbox.append([(render_html(n), n) for n in range(first, last + 1)], cursor_at(last))
    return [sha256_hex(render_html(n)) for n in range(first, last + 1)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def outbox(clock: Clock) -> Iterator[Outbox]:
    box = open_outbox(OutboxSettings(spool=":memory:", max_outbox=10_000), clock=clock)
    yield box
    box.close()


@pytest.fixture
def endpoint(clock: Clock) -> FakeEndpoint:
    return FakeEndpoint(clock)


def make_link(
    endpoint: FakeEndpoint,
    outbox: Outbox,
    clock: Clock,
    retry_policy: Callable[[int], float] | None = lambda attempt: 1.0,
    **settings: Any,
) -> DeliveryService:
    return DeliveryService(
        endpoint,
        outbox,
        DeliverySettings(**settings),
        clock=clock,
        metrics=ClientMetrics(),
        retry_policy=retry_policy,
    )


@pytest.fixture
def started(endpoint: FakeEndpoint, outbox: Outbox, clock: Clock) -> Iterator[DeliveryService]:
    link = make_link(endpoint, outbox, clock)
    link.startService()
    yield link
    if link.running:
        link.stopService()
        clock.advance(0)


def wait_for_messages(endpoint: FakeEndpoint, clock: Clock, step: float = 0.5) -> list[bytes]:
    """Advance the clock one step; answer heartbeat probes; return the message frames written."""
    clock.advance(step)
    frames = endpoint.transport.take_frames()
    for frame in frames:
        if frame == b"":
            endpoint.reply(f"ERR {EMPTY_SHA256} empty")
    return [f for f in frames if f]


def metric(link: DeliveryService, name: str, **labels: str) -> float:
    value = link.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


# -- replies ------------------------------------------------------------------

SHA = "ab" * 32


@pytest.mark.parametrize(
    "raw, kind, sha, code",
    [
        (f"OK {SHA}", "OK", SHA, None),
        (f"DUP {SHA}", "DUP", SHA, None),
        (f"ERR {SHA} unavailable", "ERR", SHA, "unavailable"),
        (f"ERR {SHA} too-long", "ERR", SHA, "too-long"),
        ("ERR - bad-frame", "ERR", "-", "bad-frame"),
    ],
)
def test_parse_reply_accepts_protocol_forms(
    raw: str, kind: str, sha: str, code: str | None
) -> None:
    """Every reply form of wire protocol version 1 parses into kind, hash and code."""
    reply = parse_reply(raw.encode())
    assert (reply.kind, reply.sha, reply.code) == (kind, sha, code)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"OK",
        b"ack:" + SHA.encode(),
        b"OK " + SHA.upper().encode(),
        b"OK " + SHA.encode() + b" x",
        b"ERR " + SHA.encode(),
        b"ERR - ",
        b"DUP -",
        b"OK  " + SHA.encode(),
        b"\xff\xfe",
        b"ERR - Bad Frame",
    ],
)
def test_parse_reply_rejects_anything_else(raw: bytes) -> None:
    """Anything but the fixed forms is a ReplyError."""
    with pytest.raises(ReplyError):
        parse_reply(raw)


# -- connecting and resending -------------------------------------------------


def test_connect_resends_outbox_oldest_first(
    started: DeliveryService, endpoint: FakeEndpoint, outbox: Outbox
) -> None:
    """On connecting, every waiting message is written, oldest first, as netstrings, with keepalive on."""
    add_blocks(outbox, 1, 3)
    started.wake()
    assert endpoint.transport.take_frames() == [render_html(n) for n in (1, 2, 3)]
    assert endpoint.transport.keepalive
    assert endpoint.transport.nodelay  # no Nagle: a frame behind an unanswered one goes at once
    assert started.connected
    assert metric(started, "eth_client_server_link_up") == 1
    assert metric(started, "eth_client_frames_sent_total") == 3


def test_existing_outbox_sent_on_start(
    endpoint: FakeEndpoint, outbox: Outbox, clock: Clock
) -> None:
    """Messages already waiting when the service starts are sent on the first connection."""
    add_blocks(outbox, 10, 11)
    link = make_link(endpoint, outbox, clock)
    link.startService()
    assert endpoint.transport.take_frames() == [render_html(10), render_html(11)]
    link.stopService()
    clock.advance(0)


def test_ok_and_dup_ack_in_any_order(
    started: DeliveryService, endpoint: FakeEndpoint, outbox: Outbox, clock: Clock
) -> None:
    """OK and DUP remove the message they name, matched by hash whatever the order."""
    h = add_blocks(outbox, 1, 3)
    started.wake()
    clock.advance(2)
    endpoint.reply(f"DUP {h[2]}", f"OK {h[0]}")
    assert [e.block_number for e in outbox.pending(10)] == [2]
    assert started.last_ack_at == 2
    assert started.in_flight == 1
    assert metric(started, "eth_client_replies_total", kind="OK") == 1
    assert metric(started, "eth_client_replies_total", kind="DUP") == 1
    assert not endpoint.transport.disconnecting


def test_unexpected_hash_is_a_protocol_error(
    started: DeliveryService, endpoint: FakeEndpoint, outbox: Outbox, clock: Clock
) -> None:
    """A reply for a hash not in flight drops the connection; nothing is acked; all is resent."""
    add_blocks(outbox, 1, 2)
    started.wake()
    endpoint.transport.take_frames()
    endpoint.reply(f"OK {'cd' * 32}")
    assert endpoint.transport.disconnecting
    assert outbox.depth() == 2
    clock.advance(0)
    assert not started.connected
    clock.advance(1)
    assert len(endpoint.transports) == 2
    assert endpoint.transport.take_frames() == [render_html(1), render_html(2)]


def test_unknown_reply_drops_connection(
    started: DeliveryService, endpoint: FakeEndpoint, outbox: Outbox
) -> None:
    """Reply text outside the protocol closes the connection and keeps the messages."""
    add_blocks(outbox, 1, 1)
    started.wake()
    endpoint.protocols[-1].dataReceived(encode(b"ack:hello"))
    assert endpoint.transport.disconnecting
    assert outbox.depth() == 1
    assert metric(started, "eth_client_replies_total", kind="invalid") == 1


class SenderLines:
    """Warning and error lines of the delivery service."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        from twisted.logger import LogLevel, formatEvent

        level = event.get("log_level")
        if (
            "DeliveryService" in str(event.get("log_namespace"))
            and level is not None
            and level >= LogLevel.warn
        ):
            self.texts.append(formatEvent(event))


@pytest.fixture
def sender_lines() -> Iterator[SenderLines]:
    from twisted.logger import globalLogPublisher

    observer = SenderLines()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


def test_garbage_burst_costs_one_line(
    started: DeliveryService, endpoint: FakeEndpoint, outbox: Outbox, sender_lines: SenderLines
) -> None:
    """Ten thousand invalid replies in one read are one protocol error, not ten thousand.

    That is one line and one count.
    """
    add_blocks(outbox, 1, 1)
    started.wake()
    endpoint.protocols[-1].dataReceived(encode(b"ack:hello") * 10_000)
    assert endpoint.transport.disconnecting
    assert metric(started, "eth_client_replies_total", kind="invalid") == 1
    assert len([t for t in sender_lines.texts if "Protocol error" in t]) == 1


def test_replies_after_a_protocol_error_are_not_believed(
    started: DeliveryService, endpoint: FakeEndpoint, outbox: Outbox, clock: Clock
) -> None:
    """Once a connection said something invalid, its later replies in the same read are not read.

    All is resent.
    """
    (h,) = add_blocks(outbox, 1, 1)
    started.wake()
    endpoint.transport.take_frames()
    endpoint.reply("nonsense", f"OK {h}")
    assert outbox.depth() == 1
    clock.advance(0)
    clock.advance(1)
    assert endpoint.transport.take_frames() == [render_html(1)]


def test_unknown_err_code_logged_once_per_connection(
    started: DeliveryService,
    endpoint: FakeEndpoint,
    outbox: Outbox,
    clock: Clock,
    sender_lines: SenderLines,
) -> None:
    """Two hundred messages answered with an ERR code outside the vocabulary write one line; all are kept."""
    hashes = add_blocks(outbox, 1, 200)
    started.wake()
    endpoint.transport.take_frames()
    endpoint.reply(*[f"ERR {h} weird-code" for h in hashes])
    assert outbox.depth() == 200 and outbox.dead_letters() == []
    assert len([t for t in sender_lines.texts if "Unknown ERR code" in t]) == 1


def test_oversized_reply_breaks_the_connection(
    started: DeliveryService, endpoint: FakeEndpoint
) -> None:
    """A reply longer than the sender's MAX_LENGTH is a broken peer: the connection closes."""
    endpoint.protocols[-1].dataReceived(b"5000:")
    assert endpoint.transport.disconnecting


def test_reconnects_with_backoff_and_resends_unanswered(
    endpoint: FakeEndpoint, outbox: Outbox, clock: Clock
) -> None:
    """After the server goes away, the link retries with capped backoff and resends what was unanswered."""
    h = add_blocks(outbox, 1, 3)
    link = make_link(endpoint, outbox, clock, retry_policy=None)
    link.startService()
    endpoint.transport.take_frames()
    endpoint.reply(f"OK {h[0]}")
    endpoint.refuse = True
    endpoint.transport.loseConnection()
    clock.advance(0)
    assert not link.connected
    assert metric(link, "eth_client_server_link_up") == 0
    # Refused for 10 minutes: no retry ever waits more than 30 s + jitter.
    for _ in range(600):
        clock.advance(1)
    gaps = [b - a for a, b in zip(endpoint.attempts[1:], endpoint.attempts[2:], strict=False)]
    assert len(endpoint.attempts) > 20
    assert max(gaps) <= 31
    endpoint.refuse = False
    before = len(endpoint.transports)
    for _ in range(32):
        clock.advance(1)
    assert len(endpoint.transports) == before + 1
    assert link.connected
    assert endpoint.transport.take_frames() == [render_html(2), render_html(3)]
    assert metric(link, "eth_client_reconnects_total") == 2
    link.stopService()
    clock.advance(0)


# -- ERR codes ----------------------------------------------------------------


def test_retryable_err_keeps_message_and_backs_off(
    started: DeliveryService, endpoint: FakeEndpoint, outbox: Outbox, clock: Clock
) -> None:
    """ERR unavailable keeps the message, pauses sends for 1 s, then resends it first."""
    h = add_blocks(outbox, 1, 2)
    started.wake()
    endpoint.transport.take_frames()
    endpoint.reply(f"ERR {h[0]} unavailable", f"ERR {h[1]} unavailable")
    assert outbox.depth() == 2
    add_blocks(outbox, 3, 3)
    started.wake()
    assert endpoint.transport.take_frames() == []  # paused
    clock.advance(1)
    assert endpoint.transport.take_frames() == [render_html(1), render_html(2), render_html(3)]
    assert outbox.dead_letters() == []


def test_retry_pause_doubles_to_thirty_seconds_and_resets_on_ok(
    started: DeliveryService, endpoint: FakeEndpoint, outbox: Outbox, clock: Clock
) -> None:
    """Consecutive retryable errors pause 1, 2, 4, 8, 16, 30, 30 s; an OK resets the pause to 1 s."""
    (h,) = add_blocks(outbox, 1, 1)
    started.wake()
    endpoint.transport.take_frames()
    pauses = []
    for _ in range(7):
        start = clock.seconds()
        endpoint.reply(f"ERR {h} busy")
        while not wait_for_messages(endpoint, clock):
            pass
        pauses.append(clock.seconds() - start)
    assert pauses == [1, 2, 4, 8, 16, 30, 30]
    endpoint.reply(f"OK {h}")
    (h2,) = add_blocks(outbox, 2, 2)
    started.wake()
    endpoint.transport.take_frames()
    start = clock.seconds()
    endpoint.reply(f"ERR {h2} timeout")
    while not wait_for_messages(endpoint, clock):
        pass
    assert clock.seconds() - start == 1


@pytest.mark.parametrize("code", ["empty", "too-long", "rejected", "auth"])
def test_final_err_dead_letters_and_never_resends(
    code: str, started: DeliveryService, endpoint: FakeEndpoint, outbox: Outbox, clock: Clock
) -> None:
    """A final ERR moves the message to the dead letters, counts it, and it is never sent again."""
    h = add_blocks(outbox, 1, 2)
    started.wake()
    endpoint.transport.take_frames()
    endpoint.reply(f"ERR {h[0]} {code}")
    assert [d.hash for d in outbox.dead_letters()] == [h[0]]
    assert outbox.dead_letters()[0].code == code
    assert metric(started, "eth_client_dead_letters_total", code=code) == 1
    endpoint.transport.loseConnection()
    clock.advance(0)
    clock.advance(1)
    assert endpoint.transport.take_frames() == [render_html(2)]


def test_err_bad_frame_closes_and_resends_on_reconnect(
    started: DeliveryService, endpoint: FakeEndpoint, outbox: Outbox, clock: Clock
) -> None:
    """ERR - bad-frame: the answered frames are settled, the rest is resent on a new connection."""
    h = add_blocks(outbox, 1, 3)
    started.wake()
    endpoint.transport.take_frames()
    endpoint.reply(f"OK {h[0]}", "ERR - bad-frame")
    assert endpoint.transport.disconnecting
    assert outbox.dead_letters() == []
    clock.advance(0)
    clock.advance(1)
    assert endpoint.transport.take_frames() == [render_html(2), render_html(3)]


def test_err_too_long_dead_letters_first_unanswered(
    started: DeliveryService, endpoint: FakeEndpoint, outbox: Outbox, clock: Clock
) -> None:
    """ERR - too-long names the first unanswered frame: it is dead-lettered so it cannot block the queue."""
    outbox.append([(render_html(1), 1), (b"x" * 5000, None), (render_html(3), 3)], cursor_at(3))
    started.wake()
    endpoint.transport.take_frames()
    endpoint.reply(f"OK {sha256_hex(render_html(1))}", "ERR - too-long")
    assert [d.payload for d in outbox.dead_letters()] == [b"x" * 5000]
    assert outbox.dead_letters()[0].code == "too-long"
    clock.advance(0)
    clock.advance(1)
    assert endpoint.transport.take_frames() == [render_html(3)]


# -- window -------------------------------------------------------------------


def test_window_never_exceeded(endpoint: FakeEndpoint, outbox: Outbox, clock: Clock) -> None:
    """At most ``window`` frames are unanswered; each ack lets exactly one more out."""
    hashes = add_blocks(outbox, 1, 600)
    link = make_link(endpoint, outbox, clock, window=256)
    link.startService()
    sent = endpoint.transport.take_frames()
    assert len(sent) == 256
    answered = 0
    while answered < 600:
        batch = hashes[answered : answered + 37]
        endpoint.reply(*(f"OK {h}" for h in batch))
        answered += len(batch)
        sent += endpoint.transport.take_frames()
        assert len(sent) - answered <= 256
        assert link.in_flight <= 256
    assert [sha256_hex(p) for p in sent] == hashes
    assert outbox.depth() == 0
    link.stopService()
    clock.advance(0)


def test_window_is_bounded_by_the_server_limit(
    endpoint: FakeEndpoint, outbox: Outbox, clock: Clock
) -> None:
    """A window above the server's per-connection bound (256) is refused."""
    with pytest.raises(ValueError):
        make_link(endpoint, outbox, clock, window=257)
    with pytest.raises(ValueError):
        make_link(endpoint, outbox, clock, window=0)


@pytest.mark.parametrize(
    "bad, named",
    [
        ({"window": 257}, "--window"),
        ({"ack_timeout": 19.0}, "--ack-timeout"),
        ({"heartbeat": 30.0}, "--heartbeat"),
        ({"heartbeat": 0.0}, "--heartbeat"),
    ],
)
def test_settings_check_names_the_option(bad: dict[str, Any], named: str) -> None:
    """DeliverySettings.check() names the option that is out of bounds.

    The ack timeout is at least twice the server's 10 s deadline, the heartbeat shorter than it.
    """
    with pytest.raises(ValueError, match=named):
        DeliverySettings(**bad).check()
    DeliverySettings(window=1, ack_timeout=20.0, heartbeat=19.9).check()


def test_wake_sends_new_messages(
    started: DeliveryService, endpoint: FakeEndpoint, outbox: Outbox
) -> None:
    """wake() after an append writes the new messages at once."""
    assert endpoint.transport.take_frames() == []
    add_blocks(outbox, 5, 5)
    started.wake()
    assert endpoint.transport.take_frames() == [render_html(5)]
    assert outbox.pending(1)[0].attempts == 1


# -- timeouts and heartbeat ---------------------------------------------------


def test_ack_timeout_aborts_and_resends(
    started: DeliveryService, endpoint: FakeEndpoint, outbox: Outbox, clock: Clock
) -> None:
    """An unanswered frame for ack_timeout (30 s) aborts the connection; the reconnect resends it."""
    add_blocks(outbox, 1, 1)
    started.wake()
    endpoint.transport.take_frames()
    clock.advance(29)
    assert not endpoint.transport.aborted
    clock.advance(1)
    assert endpoint.transport.aborted
    assert metric(started, "eth_client_ack_timeouts_total") == 1
    clock.advance(0)
    clock.advance(1)
    assert len(endpoint.transports) == 2
    assert endpoint.transport.take_frames() == [render_html(1)]


def test_ack_timer_follows_the_oldest_frame(
    started: DeliveryService, endpoint: FakeEndpoint, outbox: Outbox, clock: Clock
) -> None:
    """Answering the oldest frame restarts the clock from the next oldest one."""
    h1 = add_blocks(outbox, 1, 1)
    started.wake()
    clock.advance(20)
    add_blocks(outbox, 2, 2)
    started.wake()
    clock.advance(5)
    endpoint.reply(f"OK {h1[0]}")
    clock.advance(20)  # t=45: block 2 waited 20 s
    assert not endpoint.transport.aborted
    clock.advance(5)  # t=50: 30 s
    assert endpoint.transport.aborted


def test_heartbeat_after_quiet_period(
    started: DeliveryService, endpoint: FakeEndpoint, outbox: Outbox, clock: Clock
) -> None:
    """After 10 s without writing, the empty frame goes out; its ERR empty is expected, not a dead letter."""
    endpoint.transport.take_frames()
    clock.advance(9.9)
    assert endpoint.transport.take_frames() == []
    clock.advance(0.1)
    assert endpoint.transport.take_frames() == [b""]
    endpoint.reply(f"ERR {EMPTY_SHA256} empty")
    assert not endpoint.transport.disconnecting
    assert outbox.dead_letters() == []
    clock.advance(10)
    assert endpoint.transport.take_frames() == [b""]


def test_heartbeat_waits_while_writing(
    started: DeliveryService, endpoint: FakeEndpoint, outbox: Outbox, clock: Clock
) -> None:
    """A write resets the quiet period: no probe until 10 s after the last write."""
    clock.advance(6)
    h = add_blocks(outbox, 1, 1)
    started.wake()
    endpoint.reply(f"OK {h[0]}")
    endpoint.transport.take_frames()
    clock.advance(9)  # t=15: 9 s after the write
    assert endpoint.transport.take_frames() == []
    clock.advance(1)
    assert endpoint.transport.take_frames() == [b""]


def test_unanswered_probe_times_out(
    started: DeliveryService, endpoint: FakeEndpoint, clock: Clock
) -> None:
    """A dead link with nothing to send is found by the probe's ack timeout."""
    clock.advance(10)
    assert endpoint.transport.take_frames() == [b""]
    clock.advance(29)
    assert not endpoint.transport.aborted
    clock.advance(1)
    assert endpoint.transport.aborted


def test_empty_reply_without_probe_is_a_protocol_error(
    started: DeliveryService, endpoint: FakeEndpoint
) -> None:
    """An ERR empty that answers no probe of ours drops the connection."""
    endpoint.reply(f"ERR {EMPTY_SHA256} empty")
    assert endpoint.transport.disconnecting


# -- drain and stop -----------------------------------------------------------


def test_drain_fires_true_when_outbox_empties(
    started: DeliveryService, endpoint: FakeEndpoint, outbox: Outbox, clock: Clock
) -> None:
    """drain() fires True once the last message is acked."""
    h = add_blocks(outbox, 1, 2)
    started.wake()
    results: list[bool] = []
    started.drain(5).addCallback(results.append)
    endpoint.reply(f"OK {h[0]}")
    assert results == []
    endpoint.reply(f"DUP {h[1]}")
    assert results == [True]


def test_drain_fires_false_at_deadline(
    started: DeliveryService, outbox: Outbox, clock: Clock
) -> None:
    """drain() fires False when the deadline passes with messages still waiting."""
    add_blocks(outbox, 1, 1)
    results: list[bool] = []
    started.drain(5).addCallback(results.append)
    clock.advance(4.9)
    assert results == []
    clock.advance(0.1)
    assert results == [False]


def test_drain_of_empty_outbox_is_immediate(started: DeliveryService) -> None:
    """drain() on an empty outbox fires True at once."""
    results: list[bool] = []
    started.drain(5).addCallback(results.append)
    assert results == [True]


def test_stop_closes_link_and_leaves_no_timers(
    endpoint: FakeEndpoint, outbox: Outbox, clock: Clock
) -> None:
    """stopService closes the connection, keeps the outbox, and cancels every timer."""
    add_blocks(outbox, 1, 1)
    link = make_link(endpoint, outbox, clock)
    link.startService()
    link.drain(60)
    d = link.stopService()
    clock.advance(0)
    assert d.called
    assert endpoint.transport.disconnecting
    assert not link.connected
    assert outbox.depth() == 1
    assert clock.getDelayedCalls() == []


def test_metrics_track_outbox_depth_and_age(
    endpoint: FakeEndpoint, outbox: Outbox, clock: Clock
) -> None:
    """The depth and oldest-age gauges follow the outbox, even with the server down."""
    endpoint.refuse = True
    clock.advance(100)
    add_blocks(outbox, 1, 2)
    link = make_link(endpoint, outbox, clock)
    link.startService()
    clock.pump([1] * 7)
    assert metric(link, "eth_client_outbox_depth") == 2
    assert metric(link, "eth_client_outbox_oldest_age_seconds") == 5  # refreshed at t=105
    link.stopService()
    clock.advance(0)


# -- end to end over iosim with the real receiver -----------------------------


def test_end_to_end_with_receiver_over_iosim(outbox: Outbox, clock: Clock) -> None:
    """Through the real receiver, router and memory sink, every message is stored once and acked."""
    from eth_twisted.server.receiver import ReceiverFactory
    from eth_twisted.server.router import BatchSettings, Router
    from eth_twisted.sinks.memory import MemorySink

    sink = MemorySink()
    router = Router(
        sink, clock=clock, settings=BatchSettings(batch_delay=0.0, concurrent_batches=1)
    )
    server_factory = ReceiverFactory(router.submit, clock=clock)
    pumps: list[iosim.IOPump] = []

    @implementer(IStreamClientEndpoint)
    class PumpEndpoint:
        def connect(self, factory: Any) -> defer.Deferred[Any]:
            client = factory.buildProtocol(None)
            server = server_factory.buildProtocol(iosim.FakeAddress())
            pump = iosim.connect(
                server,
                iosim.makeFakeServer(server),
                client,
                iosim.makeFakeClient(client),
                greet=False,
                clock=clock,
            )
            pumps.append(pump)
            return defer.succeed(client)

    hashes = add_blocks(outbox, 1, 300)
    link = DeliveryService(PumpEndpoint(), outbox, DeliverySettings(window=100), clock=clock)
    link.startService()
    for _ in range(50):
        pumps[-1].flush()
        if outbox.depth() == 0:
            break
    assert outbox.depth() == 0
    assert [r.hash for r in sink.order] == hashes
    # A second copy of the same blocks (a resend) is DUP and stores nothing new.
    add_blocks(outbox, 1, 3)
    link.wake()
    pumps[-1].flush()
    assert outbox.depth() == 0
    assert len(sink.order) == 300
    assert link.metrics.registry.get_sample_value("eth_client_replies_total", {"kind": "DUP"}) == 3
    # A quiet link sends the probe; the real receiver answers ERR empty and the link stays up.
    clock.advance(10)
    pumps[-1].flush()
    assert (
        link.metrics.registry.get_sample_value("eth_client_replies_total", {"kind": "ERR:empty"})
        == 1
    )
    assert link.connected and outbox.dead_letters() == []
    clock.advance(40)
    pumps[-1].flush()
    assert link.connected
    assert link.metrics.registry.get_sample_value("eth_client_ack_timeouts_total") == 0
    link.stopService()
    pumps[-1].flush()


def test_outbox_failure_drops_connection_and_recovers(
    started: DeliveryService,
    endpoint: FakeEndpoint,
    outbox: Outbox,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An outbox write failing while sending aborts the connection; once it works again all is resent."""
    import sqlite3

    def broken(hashes: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    add_blocks(outbox, 1, 2)
    monkeypatch.setattr(outbox, "mark_sent", broken)
    started.wake()
    assert endpoint.transport.aborted
    assert endpoint.transport.take_frames() == []
    clock.advance(0)
    assert not started.connected
    monkeypatch.undo()
    clock.advance(1)
    assert started.connected
    assert endpoint.transport.take_frames() == [render_html(1), render_html(2)]


def test_failure_while_settling_replies_drops_connection(
    started: DeliveryService,
    endpoint: FakeEndpoint,
    outbox: Outbox,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If acks cannot be committed, nothing is forgotten: the connection drops and the messages are resent."""
    import sqlite3

    h = add_blocks(outbox, 1, 1)
    started.wake()
    endpoint.transport.take_frames()

    def broken(hash: str) -> bool:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(outbox, "ack", broken)
    endpoint.reply(f"OK {h[0]}")
    assert endpoint.transport.aborted
    assert outbox.depth() == 1
    monkeypatch.undo()
    clock.advance(0)
    clock.advance(1)
    assert endpoint.transport.take_frames() == [render_html(1)]
    endpoint.reply(f"DUP {h[0]}")
    assert outbox.depth() == 0
