"""TLS on the link: the cipher policy, ALPN, options, the TLS gates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, KeyPair
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from eth_twisted.errors import ConfigError
from eth_twisted.link import gate as link_gate
from eth_twisted.link import tls
from eth_twisted.link.tls import (
    TLSGateFactory,
    client_tls_options,
    listen_endpoint,
    peer_identity,
    server_tls_options,
)
from tests.support.certs import PKI, issue_into
from tests.support.link import (
    CertTransport,
    Recorder,
    RecorderFactory,
    connect_from,
)


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
    """Bytes racing the TLS handshake are kept up to 64 KiB, then the peer is aborted.

    64 KiB x the table's 1,024 = 64 MiB.
    """
    failures: list[str] = []
    gate = TLSGateFactory(RecorderFactory(), clock=Clock(), on_failure=failures.append)
    proto, t = connect_from(gate, "192.0.2.1")
    proto.dataReceived(b"x" * (64 * 1024))
    assert failures == [] and not t.disconnected
    proto.dataReceived(b"x")
    assert failures == ["early-data"] and t.disconnected
    assert tls.EARLY_DATA_MAX * link_gate.DEFAULT_MAX_PENDING == 64 * 1024 * 1024


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
    tls = TLSPair(server_side, client_tls_options("127.0.0.1", pki.ca, hostname="localhost"))
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


def test_unprintable_subject_characters_are_escaped(pki: PKI) -> None:
    """Control and bidi-override characters in a subject are RFC 4514 hex escapes (safe in a log line)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil\n\x1b[31m\u202eok")])
    pair = issue_into(pki, "unprintable", "unused", subject=name)
    identity = peer_identity(CertTransport(pair.cert))
    assert identity == "CN=evil\\0A\\1B[31m\\E2\\80\\AEok"
    assert identity is not None and identity.isprintable()
