"""The bad-input battery against the receiver on a StringTransport.

Each test names its battery row. E0 means: the connection closes without an
answer for the bad frame, every valid frame before it is answered once, the
violation is counted by reason, and nothing else is affected.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from eth_twisted.link.netstring import NetstringDecoder, encode
from eth_twisted.metrics import ServerMetrics
from eth_twisted.model import EMPTY_SHA256, Message, sha256_hex
from eth_twisted.server.limits import ReceiverLimits
from eth_twisted.server.receiver import TURN_FRAMES, ReceiverFactory, ReceiverProtocol

LIMITS = dict(max_length=1024, frame_timeout=30.0, idle_timeout=90.0, rate=1000.0, burst=2000)


class Harness:
    """A factory on a Clock whose router answers OK at once (or holds answers)."""

    def __init__(self, hold: bool = False, **limits: object) -> None:
        self.clock = Clock()
        self.hold = hold
        self.stored: list[bytes] = []
        self.pending: list[tuple[Message, Callable[[str], None]]] = []
        merged = {**LIMITS, **limits}
        self.factory = ReceiverFactory(
            self.submit, clock=self.clock, metrics=ServerMetrics(), limits=ReceiverLimits(**merged)
        )  # type: ignore[arg-type]

    def submit(self, message: Message, reply: Callable[[str], None]) -> None:
        if self.hold:
            self.pending.append((message, reply))
            return
        code = "DUP" if message.payload in self.stored else "OK"
        if code == "OK":
            self.stored.append(message.payload)
        reply(code)

    def connect(
        self, host: str = "10.0.0.1", port: int = 40000
    ) -> tuple[ReceiverProtocol | None, StringTransport]:
        addr = IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)
        proto = self.factory.buildProtocol(addr)
        transport = StringTransport(peerAddress=addr)
        if proto is not None:
            proto.makeConnection(transport)
        return proto, transport

    def errors(self, reason: str) -> float:
        return self.factory.metrics.protocol_errors.labels(reason=reason)._value.get()


def replies(transport: StringTransport) -> list[bytes]:
    return NetstringDecoder(1 << 16).feed(transport.value())


def ok(p: bytes) -> bytes:
    return b"OK " + sha256_hex(p).encode()


def aborted(t: StringTransport) -> bool:
    """Whether the receiver aborted ``t`` (StringTransport.abortConnection sets ``disconnected``)."""
    return bool(getattr(t, "aborting", False) or getattr(t, "disconnected", False)) or (
        t.disconnecting and t.producerState == "stopped"
    )


def test_row01_empty_frame() -> None:
    """Row 1: 0:, is a probe: answered `empty`, never stored, the connection stays open."""
    h = Harness()
    p, t = h.connect()
    p.dataReceived(b"0:,0:,")
    assert replies(t) == [f"ERR {EMPTY_SHA256} empty".encode()] * 2
    assert h.stored == [] and not t.disconnecting


@pytest.mark.parametrize(
    ("row", "bad", "code"),
    [
        ("02", b"007:abcdefg,", "bad-frame"),
        ("02", b"00:,", "bad-frame"),
        ("02", b"01:a,", "bad-frame"),
        ("03", b"abc:", "bad-frame"),
        ("03", b"-1:a,", "bad-frame"),
        ("03", b"+1:a,", "bad-frame"),
        ("03", b" 1:a,", "bad-frame"),
        ("03", b"1 :a,", "bad-frame"),
        ("03", b"0x10:", "bad-frame"),
        ("03", "٣:abc,".encode(), "bad-frame"),
        ("04", b"3:abcX", "bad-frame"),
        ("04", b"2:aaa,", "bad-frame"),
        ("08", b"1025:", "too-long"),
        ("08", b"9999999999:", "too-long"),
        ("08", b"9" * 1000, "too-long"),
        ("11", b"xyz", "bad-frame"),
        ("12", b"\r\n", "bad-frame"),
        ("16", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", "bad-frame"),
        ("17", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad-frame"),
        ("17", b"\x00\x00\x00\x00", "bad-frame"),
        ("17", bytes(range(256)), "bad-frame"),
    ],
)
def test_rows_bad_frames_E0(row: str, bad: bytes, code: str) -> None:
    """Rows 2-4, 8, 11, 12, 16, 17: frames before the bad bytes are answered, then ERR - code, then close."""
    h = Harness()
    p, t = h.connect()
    p.dataReceived(encode(b"good-1") + encode(b"good-2") + bad + encode(b"after"))
    assert replies(t) == [ok(b"good-1"), ok(b"good-2"), f"ERR - {code}".encode()]
    assert h.stored == [b"good-1", b"good-2"]
    assert t.disconnecting
    assert h.errors(code) == 1


def test_rows_bad_frames_byte_by_byte() -> None:
    """The same battery fed one byte at a time ends the same way (rows 2-4, 12)."""
    for bad in (b"007:abc,", b"3:abcX", b"1:a,\r\n", b"-1:a,"):
        h = Harness()
        p, t = h.connect()
        for i in range(len(bad)):
            p.dataReceived(bad[i : i + 1])
        assert replies(t)[-1] == b"ERR - bad-frame", bad
        assert t.disconnecting


def test_row05_comma_never_arrives() -> None:
    """Row 5: `3:abc` then silence: the whole-frame timer aborts the connection; nothing is answered."""
    h = Harness()
    p, t = h.connect()
    p.dataReceived(b"3:abc")
    h.clock.advance(29.9)
    assert not t.disconnecting
    h.clock.advance(0.2)
    assert t.disconnecting and replies(t) == [] and h.stored == []
    assert h.errors("frame-timeout") == 1


def test_row06_slowloris_one_byte_at_a_time() -> None:
    """Row 6: a byte every few seconds never resets the frame timer: cut 30 s after the first byte."""
    h = Harness()
    p, t = h.connect()
    for byte in b"12:abc":
        p.dataReceived(bytes([byte]))
        h.clock.advance(4)
    assert not t.disconnecting  # 24 s after the first byte
    h.clock.advance(6.1)
    assert t.disconnecting
    assert h.errors("frame-timeout") == 1


def test_row06_partial_length_then_silence() -> None:
    """Row 6: a partial length `12` and silence is cut by the frame timer, not held forever."""
    h = Harness()
    p, t = h.connect()
    p.dataReceived(b"12")
    h.clock.advance(31)
    assert t.disconnecting


def test_row07_max_length_is_accepted() -> None:
    """Row 7: a frame of exactly max_length bytes is stored and answered OK."""
    h = Harness()
    p, t = h.connect()
    big = b"x" * 1024
    p.dataReceived(encode(big))
    assert replies(t) == [ok(big)]


def test_row08_too_long_before_buffering() -> None:
    """Row 8: an over-long declared length is refused before any payload byte is buffered."""
    h = Harness()
    p, t = h.connect()
    p.dataReceived(b"1025:" + b"x" * 500)
    assert replies(t) == [b"ERR - too-long"]
    assert h.factory.partial_bytes == 0


def test_row09_truncated_by_fin() -> None:
    """Row 9: a declared payload cut short by the peer's half-close: ERR - truncated, nothing stored."""
    h = Harness()
    p, t = h.connect()
    p.dataReceived(b"10:abc")
    p.readConnectionLost()
    assert replies(t) == [b"ERR - truncated"] and h.stored == []
    assert h.errors("truncated") == 1


def test_row10_ten_thousand_probes_in_one_segment() -> None:
    """Row 10: of 10,000 frames in one read, the burst is handled and all are answered.

    The rest waits for tokens.
    """
    h = Harness(rate=1000.0, burst=2000)
    p, t = h.connect()
    p.dataReceived(b"0:," * 10000)
    assert len(replies(t)) == TURN_FRAMES  # one turn's share; the rest on later turns
    run_turns(h)
    assert len(replies(t)) == 2000  # the bucket's burst; the rest stays in the decoder
    assert t.producerState == "paused" and "rate" in p.paused
    assert h.factory.partial_bytes == 3 * 8000  # counted against the budget while it waits
    for second in range(1, 9):
        h.clock.advance(1.0)  # 1,000 tokens a second
        run_turns(h)
        assert len(replies(t)) == 2000 + 1000 * second
    assert h.factory.partial_bytes == 0
    h.clock.advance(3.0)
    assert t.producerState == "producing" and not p.paused


def run_turns(h: Harness, most: int = 10000) -> None:
    """Let the reactor take its turns (calls due now) until none is left."""
    for _ in range(most):
        if not [c for c in h.clock.getDelayedCalls() if c.getTime() <= h.clock.seconds()]:
            return
        h.clock.advance(0)
    raise AssertionError("turns never ended")


def test_one_connection_gets_a_turn_share_and_the_others_theirs() -> None:
    """A read of thousands of frames is handled TURN_FRAMES at a time.

    So another connection is served between those turns.
    """
    h = Harness(rate=1e9, burst=10**9)
    flood, tf = h.connect("10.0.0.1")
    other, to = h.connect("10.0.0.2")
    assert flood is not None and other is not None
    flood.dataReceived(b"0:," * 5000)
    assert len(replies(tf)) == TURN_FRAMES and tf.producerState == "paused"
    other.dataReceived(encode(b"hello"))
    assert replies(to) == [ok(b"hello")]  # answered while the flood waits for its next turn
    run_turns(h)
    assert len(replies(tf)) == 5000 and tf.producerState == "producing" and not flood.paused


def test_row13_binary_payload_is_stored_as_bytes() -> None:
    """Row 13: a payload that is not UTF-8 or JSON is stored as bytes; no exception escapes."""
    h = Harness()
    p, t = h.connect()
    odd = b'\xff\xfe{"block_number": \x00'
    p.dataReceived(encode(odd))
    assert replies(t) == [ok(odd)] and h.stored == [odd]


def test_row14_duplicate_is_dup() -> None:
    """Row 14: the same bytes again (a resend after a lost ack) are answered DUP and stored once."""
    h = Harness()
    p, t = h.connect()
    p.dataReceived(encode(b"m") + encode(b"m"))
    assert replies(t) == [ok(b"m"), b"DUP " + sha256_hex(b"m").encode()]
    assert h.stored == [b"m"]


def test_row18_peer_never_reads_replies() -> None:
    """Row 18: when the write buffer fills, reading stops; a peer that never drains it is aborted."""
    h = Harness(write_stall=60.0, idle_timeout=90.0)
    p, t = h.connect()
    p.dataReceived(encode(b"a"))
    p.pauseProducing()  # what the transport does when its buffer is full
    assert t.producerState == "paused" and "writes" in p.paused
    h.clock.advance(59)
    p.resumeProducing()  # the peer read a little: the stall timer starts again next time
    p.pauseProducing()
    h.clock.advance(59)
    assert not t.disconnecting
    h.clock.advance(1.1)
    assert t.disconnecting
    assert h.errors("write-stall") == 1


def test_row19_per_ip_and_global_caps() -> None:
    """Row 19: past the per-address cap new connections are refused; other addresses still connect."""
    h = Harness(max_per_ip=3, max_connections=5)
    conns = [h.connect("10.0.0.9", 1000 + i) for i in range(5)]
    assert [c[0] is not None for c in conns] == [True, True, True, False, False]
    assert h.connect("10.0.0.10")[0] is not None
    assert h.connect("10.0.0.11")[0] is not None
    assert h.connect("10.0.0.12")[0] is None  # global cap of 5
    assert h.factory.metrics.refused_connections.labels(reason="max-per-ip")._value.get() == 2
    assert h.factory.metrics.refused_connections.labels(reason="max-connections")._value.get() == 1
    conns[0][0].connectionLost(None)
    assert h.connect("10.0.0.9", 2000)[0] is not None


def test_row19_ipv6_grouped_by_64() -> None:
    """Row 19: IPv6 peers in one /64 share the per-address cap; another /64 does not."""
    h = Harness(max_per_ip=2)
    assert h.connect("2001:db8:1:2::1")[0] is not None
    assert h.connect("2001:db8:1:2::ffff")[0] is not None
    assert h.connect("2001:db8:1:2:aaaa::1")[0] is None
    assert h.connect("2001:db8:1:3::1")[0] is not None


def test_row20_half_open_peer_idle_timeout() -> None:
    """Row 20: a peer that vanished without FIN is reaped by the idle timeout.

    Heartbeats keep a quiet one alive.
    """
    h = Harness(idle_timeout=90.0)
    quiet, tq = h.connect("10.0.0.1")
    alive, ta = h.connect("10.0.0.2")
    for _ in range(6):
        h.clock.advance(30)
        alive.dataReceived(b"0:,")
    assert tq.disconnecting and not ta.disconnecting
    assert h.errors("idle-timeout") == 1


def test_row21_rst_mid_frame_stores_nothing() -> None:
    """Row 21: a connection reset mid-frame stores nothing and releases the partial bytes."""
    h = Harness()
    p, t = h.connect()
    p.dataReceived(b"100:" + b"x" * 50)
    assert h.factory.partial_bytes > 0
    p.connectionLost(None)
    assert h.stored == [] and h.factory.partial_bytes == 0


def test_row22_slow_backend_backpressure_and_no_timer_against_held_peer() -> None:
    """Row 22: with the backend slow, reading pauses at the window and no timeout fires against the peer."""
    h = Harness(hold=True, window=4, deadline=10.0, idle_timeout=90.0)
    p, t = h.connect()
    p.dataReceived(b"".join(encode(b"%d" % i) for i in range(4)))
    assert t.producerState == "paused" and "window" in p.paused
    h.clock.advance(10.1)  # deadline: ERR timeout for all four, reading resumes
    assert [r.split()[-1] for r in replies(t)] == [b"timeout"] * 4
    assert t.producerState == "producing"
    h.clock.advance(100)
    assert t.disconnecting  # idle now runs: nothing held up any more


def test_frame_timer_does_not_run_while_we_owe_replies() -> None:
    """A peer mid-frame while the server still owes it answers is not cut by the frame timer."""
    h = Harness(hold=True, deadline=10.0)
    p, t = h.connect()
    p.dataReceived(encode(b"a") + b"5:ab")
    h.clock.advance(9)
    h.pending[0][1]("OK")
    h.clock.advance(25)  # 34 s since the partial frame began, but it was held up until 9 s
    assert not t.disconnecting
    h.clock.advance(10)
    assert t.disconnecting


def test_partial_budget_pauses_newcomers_but_not_the_oldest() -> None:
    """Past the global partial-frame budget, connections growing a partial frame pause.

    The oldest keeps reading.
    """
    h = Harness(max_length=60000, partial_budget=10000)
    first, t1 = h.connect("10.0.0.1")
    second, t2 = h.connect("10.0.0.2")
    first.dataReceived(b"50000:" + b"a" * 6000)
    second.dataReceived(b"50000:" + b"b" * 6000)
    assert "budget" in second.paused and "budget" not in first.paused
    first.dataReceived(b"a" * 44000 + b",")
    assert h.stored == [b"a" * 50000]
    assert "budget" not in second.paused


def test_row23_handler_bug_is_contained() -> None:
    """Row 23: a bug handling one frame closes that connection only; the frame is not acknowledged."""
    h = Harness()
    p, t = h.connect("10.0.0.1")
    other, t_other = h.connect("10.0.0.2")
    original = h.submit

    def buggy(message: Message, reply: Callable[[str], None]) -> None:
        if message.payload == b"boom":
            raise RuntimeError("bug")
        original(message, reply)

    h.factory.submit = buggy
    p.dataReceived(encode(b"a") + encode(b"boom") + encode(b"b"))
    assert replies(t) == [ok(b"a")] and t.disconnecting
    other.dataReceived(encode(b"c"))
    assert replies(t_other) == [ok(b"c")]


def test_violations_logged_once_per_address_and_reason(capsys: pytest.CaptureFixture[str]) -> None:
    """Violations are counted every time but logged at most once per address and reason per interval."""
    h = Harness()
    logged: list[str] = []

    def observer(event: dict) -> None:
        if event.get("log_format", "").startswith("Protocol violation"):
            logged.append(f"{event['peer']} {event['reason']}")

    globalLogPublisher.addObserver(observer)
    try:
        for port in range(5):
            p, _ = h.connect("10.0.0.1", 50000 + port)
            p.dataReceived(b"x")
        p, _ = h.connect("10.0.0.2", 50000)
        p.dataReceived(b"x")
        h.clock.advance(61)
        p, _ = h.connect("10.0.0.1", 50000)
        p.dataReceived(b"x")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert h.errors("bad-frame") == 7
    assert [line.split()[1] for line in logged] == ["bad-frame"] * 3
    assert [line.split(":")[0] for line in logged] == ["10.0.0.1", "10.0.0.2", "10.0.0.1"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(st.binary(max_size=40), max_size=12),
    garbage=st.binary(max_size=30),
    cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=20),
)
def test_fuzz_arbitrary_streams(frames: list[bytes], garbage: bytes, cuts: list[int]) -> None:
    """Any byte stream in any chunking: no exception escapes and buffers stay bounded.

    Frames before the first error are answered exactly once.
    """
    h = Harness(max_length=64)
    p, t = h.connect()
    stream = b"".join(encode(f) for f in frames) + garbage
    pos = 0
    for cut in cuts + [len(stream)]:
        if pos >= len(stream):
            break
        p.dataReceived(stream[pos : pos + cut])
        pos += cut
        assert p._decoder is not None and p._decoder.buffered <= 64 + 8
    expected = NetstringDecoder(64).feed(stream)
    got = replies(t)
    non_empty = [f for f in expected if f]
    answered = [r for r in got if not r.startswith(b"ERR - ")]
    assert len(answered) == len(expected)
    for frame, reply in zip(expected, answered, strict=True):
        assert sha256_hex(frame).encode() in reply
    assert sorted(set(h.stored)) == sorted(set(non_empty))


# -- round 2 (issue 13): no limit may wedge, no read may overrun a bound -------------


class BufferedTransport(StringTransport):
    """A StringTransport that pauses its registered producer past ``high`` bytes written.

    A real TCP transport does so too (``producerPaused``: separate from whether the transport
    itself reads).
    """

    def __init__(self, high: int, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.high = high
        self.producer_paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) > self.high and self.producer is not None and not self.producer_paused:
            self.producer_paused = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        """The peer reads everything: empty the buffer and resume the producer."""
        data = self.value()
        self.clear()
        if self.producer is not None and self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()
        return data


def connect_with(
    h: Harness, transport: StringTransport, host: str = "10.0.0.1"
) -> ReceiverProtocol:
    addr = IPv4Address("TCP", host, 40000)
    proto = h.factory.buildProtocol(addr)
    assert proto is not None
    transport.peerAddress = addr  # type: ignore[attr-defined]
    proto.makeConnection(transport)
    return proto


def test_budget_wedge_the_next_oldest_holder_is_resumed_when_the_oldest_leaves() -> None:
    """Over the budget, when the oldest holder leaves, the next oldest reads again.

    The budget still drains.
    """
    h = Harness(max_length=60000, partial_budget=10000)
    conns = [h.connect(f"10.0.0.{i}") for i in range(1, 5)]
    for p, _ in conns:
        assert p is not None
        p.dataReceived(b"50000:" + b"x" * 6000)
    first, second, third, fourth = (p for p, _ in conns)
    assert "budget" not in first.paused
    assert all("budget" in p.paused for p in (second, third, fourth))
    first.connectionLost(None)  # 18,000 bytes still held: over the budget
    assert h.factory.partial_bytes == 3 * len(b"50000:" + b"x" * 6000)
    assert "budget" not in second.paused and conns[1][1].producerState == "producing"
    assert "budget" in third.paused and "budget" in fourth.paused
    second.dataReceived(b"x" * 44000 + b",")  # it can finish its frame
    assert h.stored == [b"x" * 50000]


def test_budget_paused_peers_still_time_out_and_release_the_budget() -> None:
    """A peer paused for the budget keeps its frame deadline: it is aborted, and its bytes come back."""
    h = Harness(max_length=60000, partial_budget=10000, frame_timeout=30.0, idle_timeout=90.0)
    holders = [h.connect(f"10.0.0.{i}") for i in range(1, 4)]
    for p, _ in holders:
        assert p is not None
        p.dataReceived(b"50000:" + b"x" * 6000)
    h.clock.advance(30.1)
    assert all(aborted(t) for _, t in holders)
    for p, _ in holders:
        p.connectionLost(None)  # what the abort leads to
    assert h.factory.partial_bytes == 0
    assert h.errors("frame-timeout") == 3


def test_after_a_budget_attack_a_frame_in_two_reads_is_answered() -> None:
    """Once the attackers are gone, a frame that spans two reads is answered.

    The attackers are reaped by their frame timers.
    """
    h = Harness(max_length=60000, partial_budget=10000, frame_timeout=30.0)
    attackers = [h.connect(f"10.0.1.{i}") for i in range(20)]
    for p, _ in attackers:
        assert p is not None
        p.dataReceived(b"50000:" + b"y" * 5000)
    h.clock.advance(31)
    for p, t in attackers:
        if aborted(t):
            p.connectionLost(None)  # what an abort leads to
    good, t = h.connect("10.0.0.200")
    assert good is not None
    good.dataReceived(b"5:hel")
    good.dataReceived(b"lo,")
    assert replies(t) == [ok(b"hello")]


def test_a_budget_paused_peer_that_closed_is_reaped_within_the_frame_timeout() -> None:
    """Item 3: a paused transport never reports the peer's FIN, so the frame timer must reap it."""
    h = Harness(max_length=60000, partial_budget=10000, frame_timeout=30.0, idle_timeout=90.0)
    oldest, _ = h.connect("10.0.0.1")
    assert oldest is not None
    oldest.dataReceived(b"50000:" + b"x" * 12000)
    paused, t = h.connect("10.0.0.2")
    assert paused is not None
    paused.dataReceived(b"50000:" + b"x" * 100)
    assert "budget" in paused.paused
    h.clock.advance(10)
    assert not aborted(t)
    h.clock.advance(20.1)
    assert aborted(t)


def test_a_closing_connection_whose_peer_never_takes_its_replies_is_aborted() -> None:
    """Every pause has a way out: a close waiting on an unread reply is aborted.

    It is aborted after deadline + write_stall.
    """
    h = Harness(hold=True, deadline=10.0, write_stall=60.0)
    p, t = h.connect()
    assert p is not None
    p.dataReceived(encode(b"a"))
    p.readConnectionLost()  # half-closed: answer, then close
    h.clock.advance(10.1)  # the deadline answers ERR timeout ...
    t.loseConnection = lambda: None  # type: ignore[method-assign]  # ... but the close never completes
    h.clock.advance(60)
    assert aborted(t)
    assert h.errors("close-timeout") == 1


def test_window_is_enforced_within_one_read() -> None:
    """Item 5: one read holding 100 messages submits only a window's worth; the rest waits in the decoder."""
    h = Harness(hold=True, window=4, deadline=10.0)
    p, t = h.connect()
    assert p is not None
    p.dataReceived(b"".join(encode(b"m%d" % i) for i in range(100)))
    assert len(h.pending) == 4 and "window" in p.paused
    assert h.factory.partial_bytes > 0  # the other 96 frames, held and counted
    for message, reply in h.pending[:]:
        h.pending.remove((message, reply))
        reply("OK")
    h.clock.advance(0)  # reading resumes from the decoder, on the reactor
    assert len(h.pending) == 4
    assert [r.split()[0] for r in replies(t)] == [b"OK"] * 4


def test_frames_stop_when_the_transport_pauses_us() -> None:
    """Item 4: replies to a peer that never reads stop a turn after the write buffer's mark.

    The peer sends 64 KiB of probes.
    """
    h = Harness(rate=1e9, burst=10**9)
    t = BufferedTransport(high=4096)
    p = connect_with(h, t)
    p.dataReceived(b"0:," * 21845)
    run_turns(h)
    written = len(t.value())
    assert "writes" in p.paused
    assert (
        written <= 4096 + TURN_FRAMES * 84
    )  # at most one turn's replies past the mark, not 1.8 MB
    assert h.factory.partial_bytes > 60000  # the rest is held in the decoder, counted
    total = b""
    for _ in range(1000):  # the peer reads, the server goes on, until everything is answered
        total += t.drain()
        run_turns(h)
        if not h.factory.partial_bytes:
            break
    total += t.drain()
    assert len(replies_of(total)) == 21845


def replies_of(data: bytes) -> list[bytes]:
    return NetstringDecoder(1 << 16).feed(data)


def test_replies_owed_behind_an_unanswered_message_are_bounded() -> None:
    """Item 4: behind one message the sinks have not answered, probes stop at 2 x window owed replies."""
    h = Harness(hold=True, window=8, rate=1e9, burst=10**9)
    p, t = h.connect()
    assert p is not None
    p.dataReceived(encode(b"slow") + b"0:," * 20000)
    assert len(p._slots) <= 2 * 8 and "owed" in p.paused
    assert t.value() == b""  # everything waits for the first answer, in order
    _, reply = h.pending.pop()
    reply("OK")
    h.clock.advance(0)
    got = replies(t)
    assert got[0] == ok(b"slow") and len(got) == 20001
    assert not p.paused


def test_a_timed_out_message_is_withdrawn_from_the_queue() -> None:
    """Item 5: when a message's deadline passes, its ticket is cancelled (the client resends it)."""
    cancelled: list[bytes] = []

    class Ticket:
        def __init__(self, payload: bytes) -> None:
            self.payload = payload

        def cancel(self) -> None:
            cancelled.append(self.payload)

    h = Harness(deadline=10.0)
    h.factory.submit = lambda message, reply: Ticket(message.payload)  # type: ignore[assignment,misc,return-value]
    p, t = h.connect()
    assert p is not None
    p.dataReceived(encode(b"a") + encode(b"b"))
    h.clock.advance(10.1)
    assert cancelled == [b"a", b"b"]
    assert [r.split()[-1] for r in replies(t)] == [b"timeout", b"timeout"]
    p.dataReceived(encode(b"c"))
    p.connectionLost(None)  # gone before an answer: withdrawn too
    assert cancelled == [b"a", b"b", b"c"]


def test_half_close_behind_held_frames_answers_them_all_then_closes() -> None:
    """A peer that half-closes behind held frames gets every answer, then the close.

    The window holds its later frames back when it half-closes.
    """
    h = Harness(hold=True, window=2)
    p, t = h.connect()
    assert p is not None
    p.dataReceived(b"".join(encode(b"f%d" % i) for i in range(5)))
    p.readConnectionLost()
    assert not t.disconnecting  # frames are still held: not the end of the input yet
    while h.pending:
        for message, reply in h.pending[:]:
            h.pending.remove((message, reply))
            reply("OK")
        h.clock.advance(0)
    assert replies(t) == [ok(b"f%d" % i) for i in range(5)]
    assert t.disconnecting and not aborted(t)


def test_one_address_filling_its_share_does_not_pause_other_addresses() -> None:
    """Past its group's share an address's newer holders pause; other addresses read.

    A group's share is a sixteenth of the budget.
    """
    h = Harness(max_length=4000, partial_budget=160000)
    assert h.factory.budget.share == 10000
    attackers = [h.connect("10.0.0.1", 40000 + i)[0] for i in range(6)]
    for p in attackers:
        assert p is not None
        p.dataReceived(b"3999:" + b"a" * 2995)
    assert [("budget" in p.paused) for p in attackers] == [False, False, False, True, True, True]
    good, t = h.connect("10.0.0.2")
    assert good is not None
    good.dataReceived(b"3999:" + b"g" * 2000)
    assert "budget" not in good.paused
    good.dataReceived(b"g" * 1999 + b",")
    assert replies(t) == [ok(b"g" * 3999)]
    attackers[0].connectionLost(
        None
    )  # 15,000 bytes still over the share: the group's oldest (1) reads
    assert "budget" not in attackers[1].paused and all("budget" in p.paused for p in attackers[3:])
    attackers[1].connectionLost(None)
    attackers[2].connectionLost(None)  # back under the share: the rest resume
    assert not any("budget" in p.paused for p in attackers[3:])


def test_an_aborted_holder_gives_its_bytes_back_before_its_connection_is_lost() -> None:
    """The abort's connectionLost comes a reactor turn later; the budget is released at once."""
    h = Harness(max_length=60000, partial_budget=10000, frame_timeout=30.0)
    first, _ = h.connect("10.0.0.1")
    assert first is not None
    first.dataReceived(b"50000:" + b"x" * 6000)
    h.clock.advance(15)
    second, _ = h.connect("10.0.0.2")
    assert second is not None
    second.dataReceived(b"50000:" + b"x" * 6000)
    assert "budget" in second.paused
    h.clock.advance(15.1)  # the first frame times out; its connection is not lost yet
    assert h.factory.partial_bytes == 6006
    assert "budget" not in second.paused  # the next oldest reads before its own timer fires


def _time_deadlines(n: int) -> float:
    """Seconds of CPU to answer ``timeout`` to ``n`` held messages whose deadlines fall 1 ms apart."""
    h = Harness(hold=True, window=n + 1, deadline=10.0, rate=1e9, burst=10**9, idle_timeout=60.0)
    p, t = h.connect()
    assert p is not None
    for i in range(n):
        p.dataReceived(encode(b"m%d" % i))
        h.clock.advance(0.001)
    h.clock.advance(10.0 - n * 0.001 - 0.0005)
    started = time.perf_counter()
    for _ in range(n):
        h.clock.advance(0.001)
    spent = time.perf_counter() - started
    assert len(replies(t)) == n
    return spent


def test_deadlines_cost_linear_work_in_the_window() -> None:
    """Each deadline looks only at the slots that expired: 8x the messages costs at most ~3x8 the time."""
    small = min(_time_deadlines(250) for _ in range(3))
    large = min(_time_deadlines(2000) for _ in range(2))
    assert large < 3 * 8 * small, f"{large:.4f}s for 2,000 against {small:.4f}s for 250"
