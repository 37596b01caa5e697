"""The receiver protocol on a StringTransport: replies, order, framing errors, half-close."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from eth_twisted.link.netstring import NetstringDecoder, encode
from eth_twisted.link.payload import render_html
from eth_twisted.metrics import ServerMetrics
from eth_twisted.model import EMPTY_SHA256, Message, sha256_hex
from eth_twisted.server.limits import ReceiverLimits
from eth_twisted.server.receiver import ReceiverFactory, ReceiverProtocol
from tests.support import async_wait_until


class FakeRouter:
    """Collects submissions; the test decides when and how each is answered."""

    def __init__(self, auto: str | None = None) -> None:
        self.auto = auto
        self.submitted: list[tuple[Message, Callable[[str], None]]] = []

    def submit(self, message: Message, reply: Callable[[str], None]) -> None:
        self.submitted.append((message, reply))
        if self.auto is not None:
            reply(self.auto)


def connect(
    router: FakeRouter, limits: ReceiverLimits | None = None, host: str = "10.1.2.3"
) -> tuple[ReceiverProtocol, StringTransport, Clock, ReceiverFactory]:
    clock = Clock()
    factory = ReceiverFactory(router.submit, clock=clock, metrics=ServerMetrics(), limits=limits)
    proto = factory.buildProtocol(None)
    addr = IPv6Address("TCP", host, 5555) if ":" in host else IPv4Address("TCP", host, 5555)
    transport = StringTransport(peerAddress=addr)
    proto.makeConnection(transport)
    return proto, transport, clock, factory


def replies(transport: StringTransport) -> list[bytes]:
    return NetstringDecoder(1024).feed(transport.value())


def test_ok_after_commit() -> None:
    """A message is answered OK <sha> only when the router says it was committed."""
    router = FakeRouter()
    proto, transport, _, _ = connect(router)
    payload = render_html(19000000)
    proto.dataReceived(encode(payload))
    assert transport.value() == b""
    message, reply = router.submitted[0]
    assert message.payload == payload
    assert message.hash == sha256_hex(payload)
    assert message.client_ip == "10.1.2.3"
    assert message.block_number == 19000000
    reply("OK")
    assert replies(transport) == [b"OK " + sha256_hex(payload).encode()]


def test_replies_in_frame_order_when_answers_come_out_of_order() -> None:
    """Replies leave in frame order even when the router answers the later frame first."""
    router = FakeRouter()
    proto, transport, _, _ = connect(router)
    proto.dataReceived(encode(b"a") + encode(b"b") + encode(b"c"))
    (_, ra), (_, rb), (_, rc) = router.submitted
    rc("DUP")
    rb("OK")
    assert transport.value() == b""
    ra("unavailable")
    assert replies(transport) == [
        b"ERR " + sha256_hex(b"a").encode() + b" unavailable",
        b"OK " + sha256_hex(b"b").encode(),
        b"DUP " + sha256_hex(b"c").encode(),
    ]


def test_byte_by_byte() -> None:
    """Frames fed one byte at a time are received exactly as when fed whole."""
    router = FakeRouter(auto="OK")
    proto, transport, _, _ = connect(router)
    data = encode(b"hello") + encode(render_html(5))
    for i in range(len(data)):
        proto.dataReceived(data[i : i + 1])
    assert [m.payload for m, _ in router.submitted] == [b"hello", render_html(5)]
    assert len(replies(transport)) == 2
    assert not transport.disconnecting


def test_empty_frame_is_a_probe() -> None:
    """0:, is never submitted, is answered ERR <sha of nothing> empty, and the connection stays open."""
    router = FakeRouter()
    proto, transport, _, _ = connect(router)
    proto.dataReceived(b"0:,")
    assert router.submitted == []
    assert replies(transport) == [f"ERR {EMPTY_SHA256} empty".encode()]
    assert not transport.disconnecting


def test_out_of_range_block_is_rejected() -> None:
    """A payload naming a block number past 2**63-1 is answered rejected and never submitted."""
    router = FakeRouter()
    proto, transport, _, _ = connect(router)
    payload = render_html(2**64)
    proto.dataReceived(encode(payload))
    assert router.submitted == []
    assert replies(transport) == [f"ERR {sha256_hex(payload)} rejected".encode()]


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (b"007:abcdefg,", "bad-frame"),
        (b"3:abcX", "bad-frame"),
        (b"\r\n", "bad-frame"),
        (b"GET / HTTP/1.1\r\n", "bad-frame"),
        (b"70000:", "too-long"),
        (b"9" * 30, "too-long"),
    ],
)
def test_framing_error_answers_owed_replies_first(bad: bytes, code: str) -> None:
    """Frames before garbage are answered (after their commit), then ERR - <code>, then the close."""
    router = FakeRouter()
    proto, transport, _, factory = connect(router)
    proto.dataReceived(encode(b"one") + encode(b"two") + bad + encode(b"never"))
    assert [m.payload for m, _ in router.submitted] == [b"one", b"two"]
    assert transport.producerState == "paused"
    assert not transport.disconnecting  # still owes two replies
    router.submitted[0][1]("OK")
    router.submitted[1][1]("DUP")
    assert replies(transport) == [
        b"OK " + sha256_hex(b"one").encode(),
        b"DUP " + sha256_hex(b"two").encode(),
        f"ERR - {code}".encode(),
    ]
    assert transport.disconnecting
    reason = {"bad-frame": "bad-frame", "too-long": "too-long"}[code]
    assert factory.metrics.protocol_errors.labels(reason=reason)._value.get() == 1


def test_half_close_gets_its_reply() -> None:
    """A seed-style client that writes one frame and half-closes is answered, then closed."""
    router = FakeRouter()
    proto, transport, _, _ = connect(router)
    proto.dataReceived(encode(b"seed"))
    proto.readConnectionLost()
    assert not transport.disconnecting
    router.submitted[0][1]("OK")
    assert replies(transport) == [b"OK " + sha256_hex(b"seed").encode()]
    assert transport.disconnecting


def test_half_close_mid_frame_is_truncated() -> None:
    """A frame cut short by the peer's half-close is answered ERR - truncated."""
    router = FakeRouter(auto="OK")
    proto, transport, _, factory = connect(router)
    proto.dataReceived(encode(b"a") + b"10:abc")
    proto.readConnectionLost()
    assert replies(transport) == [b"OK " + sha256_hex(b"a").encode(), b"ERR - truncated"]
    assert transport.disconnecting
    assert factory.metrics.protocol_errors.labels(reason="truncated")._value.get() == 1


def test_deadline_answers_timeout_and_ignores_late_answer() -> None:
    """A message not answered within the deadline gets ERR timeout; a late answer is dropped."""
    router = FakeRouter()
    proto, transport, clock, _ = connect(router, ReceiverLimits(deadline=10.0))
    proto.dataReceived(encode(b"slow"))
    clock.advance(9.9)
    assert transport.value() == b""
    clock.advance(0.2)
    assert replies(transport) == [b"ERR " + sha256_hex(b"slow").encode() + b" timeout"]
    router.submitted[0][1]("OK")
    assert len(replies(transport)) == 1


def test_window_pauses_and_resumes_reading() -> None:
    """Reading pauses at `window` unanswered messages and resumes when answers come."""
    router = FakeRouter()
    proto, transport, _, _ = connect(router, ReceiverLimits(window=3))
    proto.dataReceived(encode(b"1") + encode(b"2"))
    assert transport.producerState == "producing"
    proto.dataReceived(encode(b"3"))
    assert transport.producerState == "paused"
    router.submitted[0][1]("OK")
    assert transport.producerState == "producing"


def test_internal_error_does_not_ack_and_closes() -> None:
    """A bug while handling a frame is logged, that frame gets no reply, earlier ones do."""
    calls = []

    def submit(message: Message, reply: Callable[[str], None]) -> None:
        calls.append(message.payload)
        if message.payload == b"boom":
            raise RuntimeError("bug")
        reply("OK")

    clock = Clock()
    factory = ReceiverFactory(submit, clock=clock, metrics=ServerMetrics())
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(encode(b"a") + encode(b"boom") + encode(b"b"))
    assert calls == [b"a", b"boom"]
    assert replies(transport) == [b"OK " + sha256_hex(b"a").encode()]
    assert transport.disconnecting
    assert factory.metrics.protocol_errors.labels(reason="internal")._value.get() == 1


def test_ipv4_mapped_address_is_normalised() -> None:
    """A client on ::ffff:127.0.0.1 is recorded as 127.0.0.1."""
    router = FakeRouter()
    proto, _, _, _ = connect(router, host="::ffff:127.0.0.1")
    proto.dataReceived(encode(b"x"))
    assert router.submitted[0][0].client_ip == "127.0.0.1"


def test_connection_lost_drops_pending_answers_quietly() -> None:
    """Answers arriving after the peer vanished are dropped without error."""
    router = FakeRouter()
    proto, transport, _, factory = connect(router)
    proto.dataReceived(encode(b"x"))
    proto.connectionLost(None)
    router.submitted[0][1]("OK")
    assert transport.value() == b""
    assert factory.metrics.open_connections._value.get() == 0


@pytest_twisted.ensureDeferred
async def test_accepted_sockets_send_replies_without_nagle() -> None:
    """Each accepted connection has TCP_NODELAY and keepalive.

    With TCP_NODELAY a small reply is not held for the peer's ACK.
    """
    from twisted.internet import reactor

    router = FakeRouter(auto="OK")
    factory = ReceiverFactory(router.submit, clock=reactor, metrics=ServerMetrics())
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        await async_wait_until(lambda: len(factory.connections) == 1)
        [proto] = factory.connections
        handle = proto.transport.getHandle()
        assert handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert handle.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
        client.sendall(encode(b"x"))
        client.setblocking(False)  # the reactor runs in this thread: never block it
        received = bytearray()

        def replied() -> bool:
            try:
                received.extend(client.recv(100))
            except BlockingIOError:
                pass
            return bytes(received) == encode(b"OK " + sha256_hex(b"x").encode())

        await async_wait_until(replied)
    finally:
        client.close()
        await port.stopListening()


# -- answers held for a batch ---------------------------------------------------


class CountingTransport(StringTransport):
    """A StringTransport that counts ``write`` calls."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


def connect_counting(
    factory: ReceiverFactory, host: str
) -> tuple[ReceiverProtocol, CountingTransport]:
    proto = factory.buildProtocol(None)
    transport = CountingTransport(peerAddress=IPv4Address("TCP", host, 5555))
    proto.makeConnection(transport)
    return proto, transport


def test_answers_given_while_holding_leave_in_one_write_per_connection() -> None:
    """Inside the batcher's hold() nothing is written; then one write per connection.

    When it ends each connection gets its replies, in frame order, in one write, and the reply
    counter counts every one.
    """
    router = FakeRouter()
    factory = ReceiverFactory(router.submit, clock=Clock(), metrics=ServerMetrics())
    one, t1 = connect_counting(factory, "10.0.0.1")
    two, t2 = connect_counting(factory, "10.0.0.2")
    one.dataReceived(encode(b"a") + encode(b"b") + encode(b"c"))
    two.dataReceived(encode(b"x"))
    (_, ra), (_, rb), (_, rc), (_, rx) = router.submitted
    with factory.batcher.hold():
        rc("DUP")
        rx("busy")
        ra("OK")
        rb("OK")
        assert t1.value() == b"" and t2.value() == b""
    assert replies(t1) == [b"OK " + sha256_hex(p).encode() for p in (b"a", b"b")] + [
        b"DUP " + sha256_hex(b"c").encode()
    ]
    assert replies(t2) == [b"ERR " + sha256_hex(b"x").encode() + b" busy"]
    assert (t1.writes, t2.writes) == (1, 1)
    counted = {k: factory.metrics.replies.labels(kind=k)._value.get() for k in ("OK", "DUP", "ERR")}
    assert counted == {"OK": 2, "DUP": 1, "ERR": 1}
    assert not factory.batcher.holding and factory.batcher._held == {}


def test_held_answers_still_wait_for_an_earlier_unanswered_frame() -> None:
    """Holding never reorders: later frames answered in the scope wait for the first one's answer."""
    router = FakeRouter()
    proto, transport, _, factory = connect(router)
    proto.dataReceived(encode(b"a") + encode(b"b") + encode(b"c"))
    (_, ra), (_, rb), (_, rc) = router.submitted
    with factory.batcher.hold():
        rb("OK")
        rc("OK")
    assert transport.value() == b""
    ra("DUP")  # outside any scope: written at once, with the two behind it
    assert replies(transport) == [b"DUP " + sha256_hex(b"a").encode()] + [
        b"OK " + sha256_hex(p).encode() for p in (b"b", b"c")
    ]


def test_held_answers_are_written_even_when_the_scope_fails() -> None:
    """An exception inside the scope (a bug in whoever answers) does not strand the answers given."""
    router = FakeRouter()
    proto, transport, _, factory = connect(router)
    proto.dataReceived(encode(b"a"))
    with pytest.raises(RuntimeError), factory.batcher.hold():
        router.submitted[0][1]("OK")
        raise RuntimeError("boom")
    assert replies(transport) == [b"OK " + sha256_hex(b"a").encode()]
    assert not factory.batcher.holding


def test_a_connection_lost_while_held_gets_nothing_and_breaks_nothing() -> None:
    """A peer that goes away between its answer and the end of the scope is skipped.

    Others still get theirs.
    """
    router = FakeRouter()
    factory = ReceiverFactory(router.submit, clock=Clock(), metrics=ServerMetrics())
    gone, t1 = connect_counting(factory, "10.0.0.1")
    stays, t2 = connect_counting(factory, "10.0.0.2")
    gone.dataReceived(encode(b"a"))
    stays.dataReceived(encode(b"b"))
    with factory.batcher.hold():
        router.submitted[0][1]("OK")
        router.submitted[1][1]("OK")
        gone.connectionLost(None)
    assert t1.writes == 0
    assert replies(t2) == [b"OK " + sha256_hex(b"b").encode()]


def test_a_closing_connection_closes_once_its_held_replies_are_out() -> None:
    """A half-closed peer answered inside a scope is answered, then closed, when the scope ends."""
    router = FakeRouter()
    proto, transport, _, factory = connect(router)
    proto.dataReceived(encode(b"seed"))
    proto.readConnectionLost()
    with factory.batcher.hold():
        router.submitted[0][1]("OK")
        assert not transport.disconnecting
    assert replies(transport) == [b"OK " + sha256_hex(b"seed").encode()]
    assert transport.disconnecting
