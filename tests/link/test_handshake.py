"""The eth/1 shared-secret handshake, both ends, on StringTransport and iosim."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from typing import Any

import pytest
from twisted.internet import interfaces
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import directlyProvides

from eth_twisted.errors import ConfigError, HandshakeFailed
from eth_twisted.link import handshake
from eth_twisted.link.handshake import (
    AuthClientEndpoint,
    AuthClientFactory,
    AuthServerFactory,
    client_proof,
    server_proof,
)
from eth_twisted.link.netstring import NetstringDecoder, encode
from eth_twisted.link.tls import (
    TLSGateFactory,
)
from eth_twisted.model import MAX_CLIENT_ID, Message, bounded
from eth_twisted.server.receiver import ReceiverFactory
from tests.support.certs import PKI, issue_into, long_subject, write_lax_printable
from tests.support.link import (
    NAME,
    SECRET,
    CertTransport,
    RecorderFactory,
    connect_from,
    pair,
)

WRONG = b"incorrect horse battery staple"


REAL_COMPARE = hmac.compare_digest


def frames_of(data: bytes) -> list[bytes]:
    """Every netstring in ``data`` (asserting it is well formed)."""
    decoder = NetstringDecoder(1 << 20)
    out = decoder.feed(data)
    assert decoder.error is None and decoder.buffered == 0, data
    return out


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
