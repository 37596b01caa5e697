"""Unit tests of eth_twisted.link.security: the shared-secret gates, TLS helpers, secrets.

No network: the gates run on StringTransports and iosim pumps with a Clock.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import interfaces
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, KeyPair
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.basic import NetstringReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import directlyProvides

from eth_twisted.errors import ConfigError, HandshakeFailed
from eth_twisted.link import gate as link_gate
from eth_twisted.link import handshake, tls
from eth_twisted.link.handshake import (
    AuthClientEndpoint,
    AuthClientFactory,
    AuthServerFactory,
    client_proof,
    server_proof,
)
from eth_twisted.link.netstring import NetstringDecoder, encode
from eth_twisted.link.secret import check_secret_transport, load_secret
from eth_twisted.link.tls import (
    TLSGateFactory,
    client_tls_options,
    listen_endpoint,
    peer_identity,
    server_tls_options,
)
from eth_twisted.model import MAX_CLIENT_ID, Message, bounded
from eth_twisted.server.receiver import ReceiverFactory
from tests.certs import PKI, issue_into, long_subject, make_pki, write_lax_printable

SECRET = b"correct horse battery staple!"
WRONG = b"incorrect horse battery staple"
NAME = "client-1"
REAL_COMPARE = hmac.compare_digest


# -- helpers -----------------------------------------------------------------------


def frames_of(data: bytes) -> list[bytes]:
    """Every netstring in ``data`` (asserting it is well formed)."""
    decoder = NetstringDecoder(1 << 20)
    out = decoder.feed(data)
    assert decoder.error is None and decoder.buffered == 0, data
    return out


class Recorder(NetstringReceiver):
    """An inner protocol that records its life and every frame."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.raw = b""
        self.made = False
        self.lost: Failure | None = None
        self.client_id: str | None = None
        self.transport_seen: Any = None

    def connectionMade(self) -> None:
        self.made = True
        self.transport_seen = self.transport

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        super().dataReceived(data)

    def stringReceived(self, string: bytes) -> None:
        self.frames.append(string)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


class RecorderFactory(Factory):
    """Builds Recorders and keeps them."""

    def __init__(self) -> None:
        self.built: list[Recorder] = []

    def buildProtocol(self, addr: Any) -> Recorder:
        proto = Recorder()
        proto.factory = self
        self.built.append(proto)
        return proto


def tls_transport() -> StringTransport:
    """A StringTransport that says it is TLS."""
    t = StringTransport()
    directlyProvides(t, interfaces.ISSLTransport)
    return t


def server_gate(
    secret: bytes = SECRET, transport: StringTransport | None = None, **kwargs: Any
) -> tuple[Any, StringTransport, RecorderFactory, Clock, list[str]]:
    clock = Clock()
    inner = RecorderFactory()
    failures: list[str] = []
    factory = AuthServerFactory(inner, secret, clock, on_failure=failures.append, **kwargs)
    proto = factory.buildProtocol(None)
    transport = transport if transport is not None else tls_transport()
    proto.makeConnection(transport)
    return proto, transport, inner, clock, failures


def hello_nonce(transport: StringTransport) -> bytes:
    (hello,) = frames_of(transport.value())
    match = re.fullmatch(rb"HELLO eth/1 ([0-9a-f]{64})", hello)
    assert match, hello
    return match.group(1)


def auth_frame(
    server_nonce: bytes, secret: bytes = SECRET, name: str = NAME
) -> tuple[bytes, bytes]:
    client_nonce = os.urandom(32).hex().encode()
    proof = client_proof(secret, server_nonce, client_nonce, name.encode())
    return encode(b"AUTH " + name.encode() + b" " + client_nonce + b" " + proof), client_nonce


def client_gate(
    secret: bytes = SECRET, **kwargs: Any
) -> tuple[Any, StringTransport, RecorderFactory, AuthClientFactory, Clock, list[Any]]:
    clock = Clock()
    inner = RecorderFactory()
    factory = AuthClientFactory(inner, secret, NAME, clock, **kwargs)
    results: list[Any] = []
    factory.ready.addBoth(results.append)
    proto = factory.buildProtocol(None)
    transport = tls_transport()
    proto.makeConnection(transport)
    return proto, transport, inner, factory, clock, results


# -- server side of the handshake ------------------------------------------------------


def test_server_greets_with_hello_and_a_fresh_nonce() -> None:
    """Each connection is greeted with one HELLO eth/1 frame holding a new 64-hex nonce."""
    _, t1, inner, _, _ = server_gate()
    _, t2, _, _, _ = server_gate()
    assert hello_nonce(t1) != hello_nonce(t2)
    assert inner.built == []


def test_right_secret_connects_inner_with_exactly_the_frames_after_auth() -> None:
    """A valid AUTH gets AUTH-OK with the server's proof; the inner protocol gets only later bytes."""
    proto, t, inner, clock, failures = server_gate()
    nonce = hello_nonce(t)
    t.clear()
    auth, client_nonce = auth_frame(nonce)
    proto.dataReceived(auth + b"1:a,2:bb,3:cc")
    (ok,) = frames_of(t.value())
    assert ok == b"AUTH-OK " + server_proof(SECRET, nonce, client_nonce, NAME.encode())
    (rec,) = inner.built
    assert rec.made and rec.client_id == NAME and rec.transport_seen is t
    assert rec.raw == b"1:a,2:bb,3:cc" and rec.frames == [b"a", b"bb"]
    proto.dataReceived(b"c,")
    assert rec.frames == [b"a", b"bb", b"ccc"]
    assert failures == [] and not t.disconnecting
    clock.advance(60)
    assert not t.disconnecting, "the handshake timer must not outlive the handshake"


def test_handshake_fed_one_byte_at_a_time() -> None:
    """The gate parses AUTH across arbitrary read boundaries and forwards the rest intact."""
    proto, t, inner, _, _ = server_gate()
    nonce = hello_nonce(t)
    auth, _ = auth_frame(nonce)
    for byte in auth + b"5:hello,":
        proto.dataReceived(bytes([byte]))
    (rec,) = inner.built
    assert rec.frames == [b"hello"]


def test_wrong_secret_with_pipelined_frames_never_reaches_inner() -> None:
    """A wrong proof is answered ERR - auth and closed; frames pipelined behind it are never delivered."""
    proto, t, inner, _, failures = server_gate()
    nonce = hello_nonce(t)
    t.clear()
    auth, _ = auth_frame(nonce, secret=WRONG)
    proto.dataReceived(auth + b"5:msg-1,5:msg-2,")
    proto.dataReceived(b"5:msg-3,")
    assert frames_of(t.value()) == [b"ERR - auth"]
    assert t.disconnecting
    assert inner.built == []
    assert failures == ["bad-proof"]


def test_wrong_name_for_the_proof_is_refused() -> None:
    """A proof computed for another name does not authenticate this one."""
    proto, t, inner, _, failures = server_gate()
    nonce = hello_nonce(t)
    t.clear()
    client_nonce = os.urandom(32).hex().encode()
    proof = client_proof(SECRET, nonce, client_nonce, b"client-2")
    proto.dataReceived(encode(b"AUTH client-1 " + client_nonce + b" " + proof))
    assert frames_of(t.value()) == [b"ERR - auth"] and inner.built == []


def test_first_frame_not_auth_gets_err_sha_auth() -> None:
    """A data frame before AUTH is answered ERR <its sha256> auth and the connection closes."""
    proto, t, inner, _, failures = server_gate()
    t.clear()
    payload = b"<p>19000000</p>"
    proto.dataReceived(encode(payload) + encode(b"more"))
    sha = hashlib.sha256(payload).hexdigest().encode()
    assert frames_of(t.value()) == [b"ERR " + sha + b" auth"]
    assert t.disconnecting and inner.built == [] and failures == ["not-auth"]


@pytest.mark.parametrize(
    "frame",
    [
        b"AUTH",
        b"AUTH client-1",
        b"AUTH client-1 " + b"a" * 64,
        b"AUTH client 1 " + b"a" * 64 + b" " + b"b" * 64,
        b"AUTH client-1 " + b"A" * 64 + b" " + b"b" * 64,
        b"AUTH client-1 " + b"a" * 63 + b" " + b"b" * 64,
        b"AUTH -x " + b"a" * 64 + b" " + b"b" * 64,
        b"AUTH client-1 " + b"a" * 64 + b" " + b"b" * 64 + b" extra",
    ],
)
def test_malformed_auth_gets_err_dash_auth(frame: bytes) -> None:
    """An AUTH frame of the wrong shape is answered ERR - auth and closed."""
    proto, t, inner, _, failures = server_gate()
    t.clear()
    proto.dataReceived(encode(frame))
    assert frames_of(t.value()) == [b"ERR - auth"]
    assert t.disconnecting and inner.built == [] and failures == ["malformed"]


@pytest.mark.parametrize(
    "data", [b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00", b"007:AUTH ab,", b"99999:"]
)
def test_framing_error_before_auth_gets_err_dash_auth(data: bytes) -> None:
    """Garbage or an over-long frame before AUTH is answered ERR - auth and closed."""
    proto, t, inner, _, failures = server_gate()
    t.clear()
    proto.dataReceived(data)
    assert frames_of(t.value()) == [b"ERR - auth"]
    assert t.disconnecting and inner.built == [] and failures == ["bad-frame"]


def test_handshake_timeout_aborts() -> None:
    """No AUTH within the timeout aborts the connection (not a graceful close)."""
    proto, t, inner, clock, failures = server_gate(timeout=5.0)
    proto.dataReceived(b"12")  # a partial frame, then silence
    clock.advance(4.9)
    assert not t.disconnecting
    clock.advance(0.2)
    assert t.disconnected, "abortConnection, not loseConnection"
    assert failures == ["timeout"] and inner.built == []


def test_refused_peer_that_never_reads_is_aborted_later() -> None:
    """After ERR - auth the connection is closed gracefully, then aborted if still open after the timeout."""
    proto, t, _, clock, _ = server_gate(timeout=3.0)
    proto.dataReceived(encode(b"AUTH nope"))
    assert t.disconnecting and not t.disconnected
    clock.advance(3.0)
    assert t.disconnected


def test_plaintext_transport_refused_unless_allowed() -> None:
    """Over a non-TLS transport the server aborts without HELLO, unless allow_plaintext."""
    proto, t, inner, _, failures = server_gate(transport=StringTransport())
    assert t.value() == b"" and t.disconnected and failures == ["plaintext"]
    proto, t, _, _, failures = server_gate(transport=StringTransport(), allow_plaintext=True)
    assert hello_nonce(t) and failures == []


def test_server_uses_constant_time_compare(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server checks the client's proof with hmac.compare_digest."""
    calls: list[tuple[bytes, bytes]] = []

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return REAL_COMPARE(a, b)

    monkeypatch.setattr(handshake.hmac, "compare_digest", recording)
    proto, t, inner, _, _ = server_gate()
    nonce = hello_nonce(t)
    auth, _ = auth_frame(nonce, secret=WRONG)
    proto.dataReceived(auth)
    assert len(calls) == 1 and inner.built == []


def peer_transport(host: str, port: int = 40000) -> StringTransport:
    """A TLS-flagged StringTransport whose peer is ``host`` (IPv4 or IPv6)."""
    from twisted.internet.address import IPv6Address

    address: Any = (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
    t = StringTransport(peerAddress=address)
    directlyProvides(t, interfaces.ISSLTransport)
    return t


def connect_from(factory: Any, host: str, port: int = 40000) -> tuple[Any, StringTransport]:
    """A new gate connection from ``host`` (its handshake not begun)."""
    t = peer_transport(host, port)
    proto = factory.buildProtocol(None)
    proto.makeConnection(t)
    return proto, t


def test_full_handshake_table_evicts_instead_of_refusing() -> None:
    """With max_pending held by silent peers, a client with the right secret still gets in and is served."""
    clock = Clock()
    failures: list[str] = []
    inner = RecorderFactory()
    factory = AuthServerFactory(inner, SECRET, clock, max_pending=4, on_failure=failures.append)
    silent = [connect_from(factory, f"192.0.2.{1 + n % 2}", 1000 + n) for n in range(4)]
    assert len(factory.pending) == 4 and failures == []
    proto, t = connect_from(factory, "198.51.100.9")
    assert failures == ["evicted"] and len(factory.pending) == 4
    assert silent[0][1].disconnected, "the oldest of the largest group makes room"
    assert [s[1].disconnected for s in silent[1:]] == [False, False, False]
    assert not t.disconnected
    proto.dataReceived(auth_frame(hello_nonce(t))[0] + encode(b"payload"))
    assert frames_of(t.value())[1].startswith(b"AUTH-OK ")
    assert inner.built[0].frames == [b"payload"] and proto not in factory.pending


def test_per_group_cap_evicts_the_groups_own_oldest() -> None:
    """One address past max_pending_per_group pushes out its own oldest handshake, not another's."""
    clock = Clock()
    failures: list[str] = []
    factory = AuthServerFactory(
        RecorderFactory(),
        SECRET,
        clock,
        max_pending=100,
        max_pending_per_group=2,
        on_failure=failures.append,
    )
    other, other_t = connect_from(factory, "198.51.100.1")
    mine = [connect_from(factory, "192.0.2.1", 1000 + n) for n in range(5)]
    assert [m[1].disconnected for m in mine] == [True, True, True, False, False]
    assert failures == ["evicted"] * 3 and not other_t.disconnected
    assert factory.pending.group_size("192.0.2.1") == 2 and len(factory.pending) == 3


def test_ipv6_peers_are_grouped_by_64() -> None:
    """Addresses in one IPv6 /64 share one group's cap; another /64 is its own group."""
    factory = AuthServerFactory(RecorderFactory(), SECRET, Clock(), max_pending_per_group=2)
    same = [connect_from(factory, f"2001:db8:1:2::{n:x}")[1] for n in range(1, 4)]
    other = connect_from(factory, "2001:db8:1:3::1")[1]
    assert [t.disconnected for t in same] == [True, False, False] and not other.disconnected
    assert factory.pending.group_size("2001:db8:1:2::/64") == 2


def test_tls_gate_has_the_same_eviction_policy() -> None:
    """The TLS gate's table (connections still in their TLS handshake) is capped and evicts too."""
    clock = Clock()
    failures: list[str] = []
    inner = RecorderFactory()
    factory = TLSGateFactory(
        inner, clock=clock, max_pending=3, max_pending_per_group=2, on_failure=failures.append
    )
    silent = [connect_from(factory, f"192.0.2.{1 + n % 2}", 1000 + n)[1] for n in range(4)]
    # the 4th finds the table full: the oldest of 192.0.2.1 (2 held, there first) goes
    assert [t.disconnected for t in silent] == [True, False, False, False]
    proto, t = connect_from(factory, "198.51.100.9")
    assert [t.disconnected for t in silent] == [True, True, False, False], (
        "now 192.0.2.2 holds most"
    )
    assert failures == ["evicted", "evicted"] and len(factory.pending) == 3 and not t.disconnected
    proto.handshakeCompleted()
    assert inner.built[-1].made and len(factory.pending) == 2
    assert link_gate.DEFAULT_MAX_PENDING == TLSGateFactory(inner, clock=clock).pending.max_total


def test_tls_gate_early_data_is_bounded_in_bytes() -> None:
    """Bytes racing the TLS handshake are kept up to 64 KiB (x the table's 1,024 = 64 MiB), then the peer is aborted."""
    failures: list[str] = []
    gate = TLSGateFactory(RecorderFactory(), clock=Clock(), on_failure=failures.append)
    proto, t = connect_from(gate, "192.0.2.1")
    proto.dataReceived(b"x" * (64 * 1024))
    assert failures == [] and not t.disconnected
    proto.dataReceived(b"x")
    assert failures == ["early-data"] and t.disconnected
    assert tls.EARLY_DATA_MAX * link_gate.DEFAULT_MAX_PENDING == 64 * 1024 * 1024


def test_pending_table_picks_the_largest_group_first_to_reach_its_size() -> None:
    """PendingHandshakes: full, it evicts the oldest of the largest group; sizes follow adds and discards."""
    table = link_gate.PendingHandshakes(max_total=5)
    for name, group in [("a1", "a"), ("b1", "b"), ("a2", "a"), ("b2", "b"), ("c1", "c")]:
        assert table.add(name, group) is None
    assert table.add("c2", "c") == "a1", "a and b both hold 2; a got there first"
    assert table.add("c3", "c") == "b1", "b and c hold 2; b got there first"
    assert table.add("d1", "d") == "c1", "c holds 3"
    table.discard("c2")
    table.discard("c3")
    assert table.group_size("c") == 0 and len(table) == 3
    assert table.add("e1", "e") is None and table.add("e2", "e") is None
    assert table.add("e3", "e") == "e1"
    assert set(table) == {"a2", "b2", "d1", "e2", "e3"}


@pytest.mark.parametrize("shape", ["many-groups", "one-group"])
def test_pending_table_work_is_linear(shape: str) -> None:
    """A full table costs the same per add however large: 10x the connections, well under 30x the time.

    many-groups: every add evicts from a table of one-connection groups (a
    scan for the largest group would be quadratic); one-group: one address
    past its cap evicts its own oldest each time (a scan of the group would
    be quadratic).
    """
    import time

    def run(n: int) -> float:
        if shape == "many-groups":
            table = link_gate.PendingHandshakes(max_total=n // 2, max_per_group=4)
            groups = [f"g{i}" for i in range(n)]
        else:
            table = link_gate.PendingHandshakes(max_total=None, max_per_group=n // 2)
            groups = ["g"] * n
        start = time.perf_counter()
        for i, group in enumerate(groups):
            table.add(i, group)
        for i in range(n // 2, n):
            table.discard(i)
        return time.perf_counter() - start

    run(4000)  # warm up
    small = min(run(4000) for _ in range(3))
    large = min(run(40000) for _ in range(3))
    assert large / small < 30, f"10x the connections cost {large / small:.1f}x the time"


def test_short_secret_rejected() -> None:
    """The factories refuse a secret shorter than 16 bytes."""
    with pytest.raises(ConfigError):
        AuthServerFactory(RecorderFactory(), b"short", Clock())
    with pytest.raises(ConfigError):
        AuthClientFactory(RecorderFactory(), b"short", NAME, Clock())


def test_inner_receiver_gets_client_id_and_half_close() -> None:
    """With the real receiver behind the gate, messages carry the name and a half-close is answered."""
    clock = Clock()
    got: list[Message] = []

    def submit(message: Message, reply: Any) -> None:
        got.append(message)
        reply("OK")

    factory = AuthServerFactory(ReceiverFactory(submit, clock=clock), SECRET, clock)
    proto = factory.buildProtocol(None)
    t = tls_transport()
    proto.makeConnection(t)
    nonce = hello_nonce(t)
    t.clear()
    auth, _ = auth_frame(nonce)
    proto.dataReceived(auth + encode(b"payload"))
    proto.readConnectionLost()
    replies = frames_of(t.value())
    assert replies[1] == b"OK " + hashlib.sha256(b"payload").hexdigest().encode()
    assert [m.client_id for m in got] == [NAME]
    assert t.disconnecting, "the receiver closes after answering a half-closed peer"


def test_connection_lost_forwarded_after_auth() -> None:
    """Once open, connectionLost reaches the inner protocol."""
    proto, t, inner, _, _ = server_gate()
    auth, _ = auth_frame(hello_nonce(t))
    proto.dataReceived(auth)
    proto.connectionLost(Failure(Exception("gone")))
    assert inner.built[0].lost is not None


# -- client side of the handshake -------------------------------------------------------


def server_says(proto: Any, *frames: bytes) -> None:
    proto.dataReceived(b"".join(encode(f) for f in frames))


def test_client_waits_for_hello_then_proves_itself() -> None:
    """The client writes nothing before HELLO, then one AUTH with a valid proof."""
    proto, t, inner, _, _, results = client_gate()
    assert t.value() == b""
    nonce = b"ab" * 32
    server_says(proto, b"HELLO eth/1 " + nonce)
    (auth,) = frames_of(t.value())
    word, name, client_nonce, proof = auth.split(b" ")
    assert (word, name) == (b"AUTH", NAME.encode())
    assert proof == client_proof(SECRET, nonce, client_nonce, name)
    assert inner.built == [] and results == []


def test_client_connects_inner_only_after_server_proof() -> None:
    """After a valid AUTH-OK the inner protocol is connected and ready fires with it."""
    proto, t, inner, _, clock, results = client_gate()
    nonce = b"cd" * 32
    server_says(proto, b"HELLO eth/1 " + nonce)
    client_nonce = frames_of(t.value())[0].split(b" ")[2]
    server_says(
        proto, b"AUTH-OK " + server_proof(SECRET, nonce, client_nonce, NAME.encode()), b"OK x"
    )
    (rec,) = inner.built
    assert rec.made and results == [rec]
    assert rec.frames == [b"OK x"], "frames after AUTH-OK reach the inner protocol"
    clock.advance(60)
    assert not t.disconnecting


def test_impostor_server_never_gets_a_message_frame() -> None:
    """A server whose proof is wrong is dropped; the inner protocol is never built."""
    proto, t, inner, factory, _, results = client_gate()
    nonce = b"ef" * 32
    server_says(proto, b"HELLO eth/1 " + nonce)
    client_nonce = frames_of(t.value())[0].split(b" ")[2]
    server_says(proto, b"AUTH-OK " + server_proof(WRONG, nonce, client_nonce, NAME.encode()))
    assert [f.split(b" ")[0] for f in frames_of(t.value())] == [b"AUTH"]
    assert t.disconnected and inner.built == []
    assert isinstance(results[0], Failure) and results[0].value.reason == "bad-proof"
    assert factory.failures == {"bad-proof": 1}


def test_impostor_replaying_a_proof_for_another_nonce_fails() -> None:
    """A server proof recorded from an earlier handshake does not fit this client nonce."""
    proto, t, inner, _, _, results = client_gate()
    nonce = b"01" * 32
    server_says(proto, b"HELLO eth/1 " + nonce)
    old = server_proof(SECRET, nonce, b"99" * 32, NAME.encode())
    server_says(proto, b"AUTH-OK " + old)
    assert inner.built == [] and results[0].value.reason == "bad-proof"


def test_client_times_out_without_hello() -> None:
    """No HELLO within the timeout: the client aborts having written nothing."""
    proto, t, inner, _, clock, results = client_gate(timeout=4.0)
    clock.advance(4.0)
    assert t.value() == b"" and t.disconnected and inner.built == []
    assert results[0].value.reason == "timeout" and "HELLO" in results[0].value.detail


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ((b"OK " + b"a" * 64,), "no-hello"),
        ((b"HELLO eth/2 " + b"a" * 64,), "version"),
        ((b"HELLO eth/1 xyz",), "no-hello"),
        ((b"HELLO eth/1 " + b"a" * 64, b"ERR - auth"), "refused"),
        ((b"HELLO eth/1 " + b"a" * 64, b"OK " + b"a" * 64), "unexpected"),
    ],
)
def test_client_refuses_unexpected_server_frames(frames: tuple[bytes, ...], reason: str) -> None:
    """Anything but HELLO then a valid AUTH-OK fails the handshake with a named reason."""
    proto, t, inner, _, _, results = client_gate()
    server_says(proto, *frames)
    assert inner.built == [] and t.disconnected
    assert isinstance(results[0].value, HandshakeFailed) and results[0].value.reason == reason


def test_client_uses_constant_time_compare(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client checks the server's proof with hmac.compare_digest."""
    calls: list[bytes] = []

    def recording(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return REAL_COMPARE(a, b)

    monkeypatch.setattr(handshake.hmac, "compare_digest", recording)
    proto, t, _, _, _, _ = client_gate()
    server_says(proto, b"HELLO eth/1 " + b"a" * 64, b"AUTH-OK " + b"b" * 64)
    assert calls == [b"b" * 64]


def test_client_refuses_plaintext_unless_allowed() -> None:
    """Without TLS the client aborts before reading HELLO unless allow_plaintext."""
    clock = Clock()
    factory = AuthClientFactory(RecorderFactory(), SECRET, NAME, clock)
    factory.ready.addErrback(lambda f: None)
    t = StringTransport()
    factory.buildProtocol(None).makeConnection(t)
    assert t.disconnected and factory.failures == {"plaintext": 1}


@pytest.mark.parametrize("name", ["", "has space", "-lead", "x" * 129, "caf\u00e9"])
def test_client_name_validated(name: str) -> None:
    """A client name that cannot go in an AUTH frame is a ConfigError at construction."""
    with pytest.raises(ConfigError):
        AuthClientFactory(RecorderFactory(), SECRET, name, Clock())


# -- both sides in memory ---------------------------------------------------------------


def pair(client_secret: bytes, server_secret: bytes = SECRET) -> tuple[Any, ...]:
    clock = Clock()
    got: list[Message] = []

    def submit(message: Message, reply: Any) -> None:
        got.append(message)
        reply("OK")

    receiver = ReceiverFactory(submit, clock=clock)
    server = AuthServerFactory(receiver, server_secret, clock, allow_plaintext=True)
    inner = RecorderFactory()
    client = AuthClientFactory(inner, client_secret, NAME, clock, allow_plaintext=True)
    results: list[Any] = []
    client.ready.addBoth(results.append)
    c, s, pump = iosim.connectedServerAndClient(
        lambda: server.buildProtocol(None), lambda: client.buildProtocol(None), clock=clock
    )
    return c, s, pump, got, receiver, inner, results


def test_iosim_mutual_handshake_then_messages() -> None:
    """Both gates with the same secret: the sender's frames reach the receiver with client_id set."""
    c, s, pump, got, receiver, inner, results = pair(SECRET)
    pump.flush()
    (rec,) = inner.built
    assert results == [rec]
    rec.transport.write(encode(b"block 1") + encode(b"block 2"))
    pump.flush()
    assert [(m.payload, m.client_id) for m in got] == [(b"block 1", NAME), (b"block 2", NAME)]
    assert [f.split(b" ")[0] for f in rec.frames] == [b"OK", b"OK"]


def test_iosim_wrong_secret_nothing_crosses() -> None:
    """Different secrets: the server refuses, the client never connects its inner protocol."""
    c, s, pump, got, receiver, inner, results = pair(WRONG)
    pump.flush()
    assert inner.built == [] and got == [] and receiver.connections == set()
    assert isinstance(results[0], Failure) and results[0].value.reason == "refused"


def test_auth_endpoint_fires_only_after_handshake() -> None:
    """AuthClientEndpoint.connect fires with the inner protocol after mutual auth."""
    reactor = MemoryReactorClock()
    server = AuthServerFactory(RecorderFactory(), SECRET, reactor, allow_plaintext=True)
    TCP4ServerEndpoint(reactor, 4321).listen(server)
    from twisted.internet.endpoints import TCP4ClientEndpoint

    endpoint = AuthClientEndpoint(
        TCP4ClientEndpoint(reactor, "127.0.0.1", 4321), SECRET, NAME, reactor, allow_plaintext=True
    )
    inner = RecorderFactory()
    results: list[Any] = []
    endpoint.connect(inner).addBoth(results.append)
    pump = iosim.ConnectionCompleter(reactor).succeedOnce(greet=False)
    assert pump is not None and results == []
    pump.flush()
    assert results == inner.built and len(inner.built) == 1


def test_auth_endpoint_fails_on_wrong_secret_and_cancel_aborts() -> None:
    """A refused handshake fails connect with HandshakeFailed; cancelling mid-handshake aborts."""
    reactor = MemoryReactorClock()
    TCP4ServerEndpoint(reactor, 4321).listen(
        AuthServerFactory(RecorderFactory(), SECRET, reactor, allow_plaintext=True)
    )
    from twisted.internet.endpoints import TCP4ClientEndpoint

    tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", 4321)
    endpoint = AuthClientEndpoint(tcp, WRONG, NAME, reactor, allow_plaintext=True)
    results: list[Any] = []
    endpoint.connect(RecorderFactory()).addBoth(results.append)
    pump = iosim.ConnectionCompleter(reactor).succeedOnce()
    assert pump is not None
    pump.flush()
    assert isinstance(results[0], Failure) and results[0].check(HandshakeFailed)

    inner = RecorderFactory()
    results2: list[Any] = []
    d = AuthClientEndpoint(tcp, SECRET, NAME, reactor, allow_plaintext=True).connect(inner)
    d.addBoth(results2.append)
    pump = iosim.ConnectionCompleter(reactor).succeedOnce(greet=False)
    assert pump is not None
    d.cancel()
    pump.flush()
    assert isinstance(results2[0], Failure) and inner.built == []


# -- TLS helpers and secrets --------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def rsa_server(pki: PKI) -> Any:
    """An RSA server certificate: static-RSA key exchange needs one."""
    return issue_into(
        pki, "rsa-server", server=True, dns=("localhost",), ips=("127.0.0.1",), rsa_bits=2048
    )


class TLSPair:
    """A TLS server and client (Recorders inside TLSMemoryBIOProtocols) joined by an iosim pump."""

    def __init__(self, server_options: Any, client_options: Any) -> None:
        self.clock = Clock()  # the TLS layer aggregates small writes until the next reactor turn
        server_inner, client_inner = RecorderFactory(), RecorderFactory()
        server_tls = TLSMemoryBIOFactory(server_options, False, server_inner, self.clock)
        client_tls = TLSMemoryBIOFactory(client_options, True, client_inner, self.clock)
        client, server, self.pump = iosim.connectedServerAndClient(
            lambda: server_tls.buildProtocol(None), lambda: client_tls.buildProtocol(None)
        )
        self.server_tls, self.client_tls = server, client
        self.server: Recorder = server_inner.built[0]
        self.client: Recorder = client_inner.built[0]
        self.flush()

    def flush(self) -> None:
        """Run writes and the pump until nothing moves."""
        for _ in range(10):
            self.clock.advance(0)
            self.pump.flush()

    @property
    def handshake_done(self) -> bool:
        """Both ends finished the TLS handshake."""
        return bool(self.server_tls._handshakeDone and self.client_tls._handshakeDone)


def client_options(
    pki: PKI, *, alpn: list[bytes] | None = None, ciphers: str | None = None, version: str = "1.2"
) -> Any:
    """A client trusting the test CA; optionally offering ALPN, or only ``ciphers`` over TLS 1.2."""
    from twisted.internet.ssl import AcceptableCiphers, TLSVersion, optionsForClientTLS

    ca = Certificate.loadPEM(Path(pki.ca).read_bytes())
    extra: dict[str, Any] = {}
    if ciphers is not None:
        extra["acceptableCiphers"] = AcceptableCiphers.fromOpenSSLCipherString(ciphers)
        extra["lowerMaximumSecurityTo"] = TLSVersion.TLSv1_2
    return optionsForClientTLS(
        "localhost", trustRoot=ca, acceptableProtocols=alpn, extraCertificateOptions=extra
    )


def test_client_offering_alpn_is_served_without_a_protocol(pki: PKI) -> None:
    """A client offering ALPN (h2, http/1.1, as curl does) completes the handshake; none is selected."""
    tls = TLSPair(
        server_tls_options(pki.server.cert, pki.server.key),
        client_options(pki, alpn=[b"h2", b"http/1.1"]),
    )
    assert tls.handshake_done, f"the handshake must complete (client saw {tls.client.lost})"
    assert tls.client.lost is None and tls.server.lost is None
    assert tls.client_tls.negotiatedProtocol is None
    tls.client.sendString(b"after alpn")
    tls.flush()
    assert tls.server.frames == [b"after alpn"]


def test_alpn_select_prefers_a_protocol_the_server_speaks() -> None:
    """With a negotiating factory behind TLS the first protocol both speak is chosen; else no-overlap."""
    from OpenSSL import SSL
    from twisted.internet.interfaces import IProtocolNegotiationFactory
    from zope.interface import alsoProvides

    inner = Factory()
    alsoProvides(inner, IProtocolNegotiationFactory)
    inner.acceptableProtocols = lambda: [b"eth/1"]  # type: ignore[attr-defined]

    class Conn:
        def __init__(self, wrapped: Any) -> None:
            self.app = type("TLS", (), {"factory": type("F", (), {"wrappedFactory": wrapped})()})()

        def get_app_data(self) -> Any:
            return self.app

    assert tls._alpn_select(Conn(inner), [b"h2", b"eth/1"]) == b"eth/1"  # type: ignore[arg-type]
    assert tls._alpn_select(Conn(inner), [b"h2"]) is SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[arg-type]
    assert tls._alpn_select(Conn(Factory()), [b"h2"]) is SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[arg-type]


def tls12_suites(options: Any) -> list[str]:
    """The TLS 1.2 cipher suites a context offers (TLS 1.3's are named TLS_*)."""
    from OpenSSL import SSL

    names = SSL.Connection(options.getContext(), None).get_cipher_list()
    return [n for n in names if not n.startswith("TLS_")]


def forward_secret_aead(name: str) -> bool:
    """ECDHE/DHE key exchange and AES-GCM or ChaCha20-Poly1305: what Mozilla intermediate allows."""
    return name.startswith(("ECDHE-", "DHE-")) and ("-GCM-" in name or "CHACHA20-POLY1305" in name)


def test_server_offers_only_forward_secret_aead_suites(pki: PKI) -> None:
    """The server's TLS 1.2 list is non-empty and every suite is ECDHE/DHE with GCM or ChaCha20."""
    suites = tls12_suites(server_tls_options(pki.server.cert, pki.server.key))
    assert "ECDHE-ECDSA-AES128-GCM-SHA256" in suites
    assert [s for s in suites if not forward_secret_aead(s)] == []


@pytest.mark.parametrize(
    ("ciphers", "accepted"),
    [
        ("AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA256:AES128-SHA", False),  # static RSA
        ("ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA384:ECDHE-RSA-AES128-SHA256", False),  # CBC
        ("ECDHE-RSA-AES128-GCM-SHA256", True),
        ("ECDHE-RSA-CHACHA20-POLY1305", True),
    ],
)
def test_server_refuses_static_rsa_and_cbc_clients(
    pki: PKI, rsa_server: Any, ciphers: str, accepted: bool
) -> None:
    """Over TLS 1.2 with an RSA certificate: static-RSA-only and CBC-only clients fail, AEAD ECDHE passes."""
    tls = TLSPair(
        server_tls_options(rsa_server.cert, rsa_server.key), client_options(pki, ciphers=ciphers)
    )
    assert tls.handshake_done is accepted
    if not accepted:
        assert (
            tls.client.lost is not None and "handshake failure" in tls.client.lost.getErrorMessage()
        )


def test_client_refuses_a_cbc_only_server(pki: PKI, rsa_server: Any) -> None:
    """The link's client offers the same list: a server that allows only CBC suites cannot talk to it."""
    from twisted.internet.ssl import AcceptableCiphers, TLSVersion

    server_side = CertificateOptions(
        privateKey=KeyPair.load(
            Path(rsa_server.key).read_bytes(), 1
        ).original.to_cryptography_key(),
        certificate=Certificate.loadPEM(
            Path(rsa_server.cert).read_bytes()
        ).original.to_cryptography(),
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(
            "ECDHE-RSA-AES128-SHA:AES128-SHA"
        ),
        lowerMaximumSecurityTo=TLSVersion.TLSv1_2,
    )
    tls = TLSPair(
        server_side, client_tls_options("127.0.0.1", pki.ca, hostname="localhost")
    )
    assert not tls.handshake_done and tls.client.lost is not None


def test_client_suites_match_the_server_policy(pki: PKI) -> None:
    """The link's client offers only forward-secret AEAD suites in TLS 1.2, and connects to the server."""
    tls = TLSPair(
        server_tls_options(pki.server.cert, pki.server.key),
        client_tls_options("127.0.0.1", pki.ca),
    )
    assert tls.handshake_done
    names = [n for n in tls.client_tls.getHandle().get_cipher_list() if not n.startswith("TLS_")]
    assert names and [n for n in names if not forward_secret_aead(n)] == []


def test_ssl_endpoint_string_gets_the_same_policy(pki: PKI) -> None:
    """An ssl: listen string is hardened too: its suites are the link's, ALPN clients are served."""
    reactor = MemoryReactorClock()
    endpoint = listen_endpoint(
        reactor, f"ssl:9443:privateKey={pki.server.key}:certKey={pki.server.cert}"
    )
    options = endpoint._sslContextFactory  # type: ignore[attr-defined]
    assert [s for s in tls12_suites(options) if not forward_secret_aead(s)] == []
    tls = TLSPair(options, client_options(pki, alpn=[b"h2", b"http/1.1"]))
    assert tls.handshake_done


def test_client_initiated_renegotiation_is_off(pki: PKI) -> None:
    """The server context refuses renegotiation (a CPU cost a peer could repeat at will)."""
    from OpenSSL import SSL

    context = server_tls_options(pki.server.cert, pki.server.key).getContext()
    assert context.set_options(0) & SSL.OP_NO_RENEGOTIATION


def test_server_tls_options_mutual_requires_client_certs(pki: Any) -> None:
    """With a client CA the options verify and require a client certificate; without, they do not."""
    plain = server_tls_options(pki.server.cert, pki.server.key)
    mutual = server_tls_options(
        pki.server.cert, pki.server.key, client_ca_file=pki.ca, min_tls="1.3"
    )
    assert not plain.verify
    assert mutual.verify and mutual.requireCertificate
    assert mutual.getContext() is not None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_tls": "1.1"},
        {"key": "other"},
        {"cert": "/nonexistent.crt"},
        {"client_ca_file": "/nonexistent"},
    ],
)
def test_server_tls_options_config_errors(pki: Any, kwargs: dict[str, str]) -> None:
    """Bad versions, unreadable files and a key that does not match are ConfigErrors."""
    cert = kwargs.pop("cert", pki.server.cert)
    key = pki.client.key if kwargs.pop("key", None) else pki.server.key
    with pytest.raises(ConfigError):
        server_tls_options(cert, key, **kwargs)


def test_listen_endpoint_wraps_tls(pki: Any) -> None:
    """With TLS options the endpoint listens on the tcp: address through a TLS factory."""
    reactor = MemoryReactorClock()
    tls = server_tls_options(pki.server.cert, pki.server.key)
    listen_endpoint(reactor, "tcp:9443:interface=127.0.0.1", tls=tls).listen(
        Factory.forProtocol(Protocol)
    )
    port, factory, _, interface = reactor.tcpServers[0]
    assert (port, interface) == (9443, "127.0.0.1")
    assert isinstance(factory, TLSMemoryBIOFactory)
    listen_endpoint(reactor, "tcp:9999").listen(Factory.forProtocol(Protocol))
    assert not isinstance(reactor.tcpServers[1][1], TLSMemoryBIOFactory)
    with pytest.raises(ConfigError):
        listen_endpoint(reactor, f"ssl:9443:privateKey={pki.server.key}", tls=tls)


def test_peer_identity(pki: Any) -> None:
    """peer_identity is the certificate subject in RFC 4514, None without a certificate."""
    from OpenSSL import crypto

    cert = crypto.load_certificate(crypto.FILETYPE_PEM, Path(pki.client.cert).read_bytes())

    class WithCert(StringTransport):
        def getPeerCertificate(self) -> Any:
            return cert

    assert peer_identity(WithCert()) == pki.client_subject
    assert peer_identity(StringTransport()) is None


def test_tls_gate_sets_client_id_on_handshake() -> None:
    """The server TLS gate connects the inner protocol on handshakeCompleted with the subject."""
    clock = Clock()
    inner = RecorderFactory()
    failures: list[str] = []
    gate = TLSGateFactory(inner, clock=clock, timeout=5, on_failure=failures.append)
    proto = gate.buildProtocol(None)
    t = StringTransport()
    t.getPeerCertificate = lambda: None  # type: ignore[attr-defined]
    proto.makeConnection(t)
    assert inner.built == []
    proto.handshakeCompleted()
    assert inner.built[0].made and inner.built[0].client_id is None
    proto2 = gate.buildProtocol(None)
    t2 = StringTransport()
    proto2.makeConnection(t2)
    clock.advance(5)
    assert t2.disconnected and failures == ["timeout"]


class CertTransport(StringTransport):
    """A StringTransport whose peer presented ``cert_file`` (a PEM certificate), as a TLS one would."""

    def __init__(self, cert_file: str) -> None:
        from OpenSSL import crypto

        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.7", 4242))
        self.cert = crypto.load_certificate(crypto.FILETYPE_PEM, Path(cert_file).read_bytes())

    def getPeerCertificate(self) -> Any:
        return self.cert


def tls_gate_with(transport: StringTransport) -> tuple[Any, RecorderFactory, list[str]]:
    """A server TLS gate connection on ``transport`` whose handshake has just completed."""
    inner = RecorderFactory()
    failures: list[str] = []
    gate = TLSGateFactory(inner, clock=Clock(), timeout=5, on_failure=failures.append)
    proto = gate.buildProtocol(None)
    proto.makeConnection(transport)
    proto.handshakeCompleted()
    return proto, inner, failures


def test_tls_gate_bounds_a_long_subject_and_logs_it_whole(pki: PKI) -> None:
    """A 300+ character subject becomes a 255-character client_id (model.bounded); the log has it all."""
    from twisted.logger import capturedLogs

    pair = issue_into(pki, "long-client", "unused", subject=long_subject())
    subject = long_subject().rfc4514_string()
    assert len(subject) > 300
    with capturedLogs() as events:
        _, inner, failures = tls_gate_with(CertTransport(pair.cert))
    client_id = inner.built[0].client_id
    assert client_id == bounded(subject, MAX_CLIENT_ID) and len(client_id) == MAX_CLIENT_ID
    assert client_id.startswith(subject[:100]) and failures == []
    connected = [e for e in events if e.get("subject") == subject]
    assert len(connected) == 1 and connected[0]["client_id"] == client_id
    assert "192.0.2.7" in connected[0]["peer"]


def test_tls_gate_keeps_a_short_subject_as_is(pki: PKI) -> None:
    """A subject that fits its column is the client_id unchanged."""
    _, inner, _ = tls_gate_with(CertTransport(pki.client.cert))
    assert inner.built[0].client_id == pki.client_subject


def test_subject_cryptography_cannot_parse_still_names_the_client(pki: PKI) -> None:
    """A CA-signed PrintableString CN with _ and @ (OpenSSL verifies it) is a client_id, not a traceback."""
    pair = write_lax_printable(pki, "lax-client", "svc_eth@corp")
    proto, inner, failures = tls_gate_with(CertTransport(pair.cert))
    assert proto.state == "open" and failures == []
    assert inner.built[0].client_id == "CN=svc_eth@corp,O=eth-twisted test"


def test_unprintable_subject_characters_are_escaped(pki: PKI) -> None:
    """Control and bidi-override characters in a subject are RFC 4514 hex escapes (safe in a log line)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil\n\x1b[31m\u202eok")])
    pair = issue_into(pki, "unprintable", "unused", subject=name)
    identity = peer_identity(CertTransport(pair.cert))
    assert identity == "CN=evil\\0A\\1B[31m\\E2\\80\\AEok"
    assert identity is not None and identity.isprintable()


def test_load_secret_sources(tmp_path: Path) -> None:
    """load_secret reads the value, a file, $ETH_SECRET, then $CREDENTIALS_DIRECTORY, in that order."""
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(b"file-secret-0123456789\n")
    secret_file.chmod(0o600)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "link-secret").write_bytes(b"credential-secret-0123\r\n")
    env = {"ETH_SECRET": "env-secret-0123456789", "CREDENTIALS_DIRECTORY": str(creds)}
    assert (
        load_secret("value-secret-0123456", str(secret_file), environ=env)
        == b"value-secret-0123456"
    )
    assert load_secret(None, str(secret_file), environ=env) == b"file-secret-0123456789"
    assert load_secret(environ=env) == b"env-secret-0123456789"
    assert load_secret(environ={"CREDENTIALS_DIRECTORY": str(creds)}) == b"credential-secret-0123"
    assert load_secret(environ={}) is None


def test_load_secret_rejects_short_and_unreadable(tmp_path: Path) -> None:
    """A secret under 16 bytes or an unreadable file is a ConfigError that says why."""
    with pytest.raises(ConfigError, match="at least 16"):
        load_secret("too-short", environ={})
    short = tmp_path / "s"
    short.write_bytes(b"0123456789abcde\n")
    with pytest.raises(ConfigError, match="15 bytes"):
        load_secret(file=str(short), environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_secret(file=str(tmp_path / "missing"), environ={})


def test_check_secret_transport() -> None:
    """A secret over plaintext is a ConfigError unless allowed; TLS or no secret is fine."""
    with pytest.raises(ConfigError, match="allow-plaintext-secret"):
        check_secret_transport(SECRET, tls=False)
    check_secret_transport(SECRET, tls=False, allow_plaintext=True)
    check_secret_transport(SECRET, tls=True)
    check_secret_transport(None, tls=False)
