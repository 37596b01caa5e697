"""TLS and mutual TLS on the link over real loopback sockets (live).

Covered: certificates, ciphers, ALPN, the TLS gate.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint

from eth_twisted.errors import HandshakeFailed
from eth_twisted.link.netstring import NetstringDecoder, encode
from eth_twisted.link.tls import (
    client_tls_endpoint,
    listen_endpoint,
)
from eth_twisted.model import sha256_hex
from eth_twisted.server.receiver import ReceiverFactory
from tests.support import async_wait_until
from tests.support.certs import PKI, PemPair, write_lax_printable
from tests.support.link import (
    HOSTS,
    ClientFactory,
    LinkServer,
    abort_all,
    connect_fails,
    silent_connections,
    tool,
)

pytestmark = pytest.mark.live


def forward_secret_aead(name: str) -> bool:
    """ECDHE/DHE key exchange with AES-GCM or ChaCha20-Poly1305 (OpenSSL names)."""
    return name.startswith(("ECDHE-", "DHE-")) and ("-GCM-" in name or "CHACHA20-POLY1305" in name)


def python_tls_exchange(
    port: int,
    ca: str,
    payload: bytes,
    *,
    alpn: list[str] | None = None,
    ciphers: str | None = None,
    client_cert: PemPair | None = None,
) -> tuple[str | None, str, str | None, list[bytes]]:
    """Blocking: connect with Python's ssl, send one netstring, read one reply.

    Returns (TLS version, cipher, selected ALPN protocol, replies). With
    ``ciphers`` the client speaks TLS 1.2 only, offering just those suites;
    with ``client_cert`` it presents that certificate.
    """
    context = ssl.create_default_context(cafile=ca)
    if client_cert is not None:
        context.load_cert_chain(client_cert.cert, client_cert.key)
    if alpn:
        context.set_alpn_protocols(alpn)
    if ciphers:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(ciphers)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(encode(payload))
            decoder = NetstringDecoder(1024)
            replies: list[bytes] = []
            while not replies:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                replies += decoder.feed(chunk)
            cipher = tls.cipher()
            return tls.version(), cipher[0] if cipher else "", tls.selected_alpn_protocol(), replies


@pytest_twisted.inlineCallbacks
def test_tls_link_delivers(pki: PKI, server: LinkServer) -> Generator[Any, Any, None]:
    """A client trusting the CA connects by IP (IP SAN) and gets OK for a payload."""
    port = yield server.start(pki)
    endpoint = client_tls_endpoint(reactor, "127.0.0.1", port, ca_file=pki.ca)
    proto = yield endpoint.connect(ClientFactory())
    assert proto.made
    proto.sendString(b"payload over tls")
    yield async_wait_until(lambda: proto.replies, timeout=5)
    assert proto.replies == [b"OK " + sha256_hex(b"payload over tls").encode()]
    assert server.got[0].client_id is None, "plain TLS: no client identity"
    assert server.got[0].client_ip == "127.0.0.1", "the receiver sees the peer through the gate"
    proto.transport.loseConnection()


@pytest_twisted.inlineCallbacks
def test_tls_by_dns_name(pki: PKI, server: LinkServer) -> Generator[Any, Any, None]:
    """Connecting by address with hostname=localhost is checked against the DNS SAN."""
    port = yield server.start(pki)
    endpoint = client_tls_endpoint(reactor, "127.0.0.1", port, ca_file=pki.ca, hostname="localhost")
    proto = yield endpoint.connect(ClientFactory())
    assert proto.made
    proto.transport.loseConnection()


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("wrong-ca", "certificate verify failed"),
        ("wrong-hostname", "other.example"),
        ("expired", "certificate verify failed"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_client_refuses_bad_server_certificates(
    pki: PKI, server: LinkServer, case: str, expect: str
) -> Generator[Any, Any, None]:
    """Wrong CA, wrong host name and an expired certificate fail the connection.

    Nothing reaches the receiver.
    """
    cert = pki.expired_server if case == "expired" else pki.server
    port = yield server.start(pki, cert=cert)
    ca = pki.other_ca if case == "wrong-ca" else pki.ca
    hostname = "other.example" if case == "wrong-hostname" else None
    endpoint = client_tls_endpoint(reactor, "127.0.0.1", port, ca_file=ca, hostname=hostname)
    error = yield connect_fails(endpoint)
    assert error.reason == "tls" and expect in error.detail
    yield async_wait_until(
        lambda: server.failures, timeout=5, what="the server to see the failed handshake"
    )
    assert server.failures == ["tls"]
    assert server.got == [] and server.receiver.connections == set()


@pytest_twisted.inlineCallbacks
def test_plaintext_to_tls_port_is_refused(
    pki: PKI, server: LinkServer
) -> Generator[Any, Any, None]:
    """A plaintext netstring sent to the TLS port never reaches the receiver."""
    port = yield server.start(pki)
    proto = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(ClientFactory())
    proto.sendString(b"plaintext payload")
    yield async_wait_until(lambda: proto.lost is not None, timeout=5, what="the server to close")
    assert server.got == [] and server.failures == ["tls"]


@pytest_twisted.inlineCallbacks
def test_mtls_records_client_subject(pki: PKI, server: LinkServer) -> Generator[Any, Any, None]:
    """A client certificate from the client CA is accepted and its subject becomes client_id."""
    port = yield server.start(pki, client_ca=pki.ca)
    endpoint = client_tls_endpoint(
        reactor,
        "127.0.0.1",
        port,
        ca_file=pki.ca,
        cert_file=pki.client.cert,
        key_file=pki.client.key,
    )
    proto = yield endpoint.connect(ClientFactory())
    proto.sendString(b"payload over mtls")
    yield async_wait_until(lambda: proto.replies, timeout=5)
    assert proto.replies[0].startswith(b"OK ")
    assert [m.client_id for m in server.got] == [pki.client_subject]
    assert pki.client_subject == "CN=client-1,O=eth-twisted test"
    proto.transport.loseConnection()


@pytest.mark.parametrize("case", ["no-cert", "other-ca-cert"])
@pytest_twisted.inlineCallbacks
def test_mtls_refuses_clients_without_a_good_certificate(
    pki: PKI, server: LinkServer, case: str
) -> Generator[Any, Any, None]:
    """No client certificate, or one from another CA: refused by the server; nothing is delivered."""
    port = yield server.start(pki, client_ca=pki.ca)
    pair = pki.other_client if case == "other-ca-cert" else None
    endpoint = client_tls_endpoint(
        reactor,
        "127.0.0.1",
        port,
        ca_file=pki.ca,
        cert_file=pair.cert if pair else None,
        key_file=pair.key if pair else None,
    )
    factory = ClientFactory()
    try:
        # TLS 1.3: the client may finish its side before the server rejects its certificate.
        proto = yield endpoint.connect(factory)
        proto.sendString(b"must not be stored")
        yield async_wait_until(
            lambda: proto.lost is not None, timeout=5, what="the server to close"
        )
        assert proto.replies == []
    except HandshakeFailed as e:
        assert e.reason == "tls"
    yield async_wait_until(lambda: server.failures, timeout=5)
    assert server.failures == ["tls"]
    assert server.got == [] and server.receiver.connections == set()


@pytest_twisted.inlineCallbacks
def test_mtls_client_whose_subject_cryptography_refuses_is_served(
    pki: PKI, server: LinkServer
) -> Generator[Any, Any, None]:
    """A CA-signed certificate with _ and @ in a PrintableString CN: answered OK, named by its subject."""
    pair = write_lax_printable(pki, "lax-client", "svc_eth@corp")
    port = yield server.start(pki, client_ca=pki.ca)
    _, _, _, replies = yield threads.deferToThread(
        python_tls_exchange, port, pki.ca, b"lax subject", client_cert=pair
    )
    assert replies == [b"OK " + sha256_hex(b"lax subject").encode()]
    assert [m.client_id for m in server.got] == ["CN=svc_eth@corp,O=eth-twisted test"]


@pytest_twisted.inlineCallbacks
def test_silent_tls_peers_cannot_fill_the_tls_gate(
    pki: PKI, server: LinkServer
) -> Generator[Any, Any, None]:
    """Silent TCP peers cannot fill the TLS gate: a TLS client is still answered.

    There are 60 silent TCP connections from 6 addresses; the table holds 32 (8 per address).
    """
    port = yield server.start(pki, timeout=120, max_pending=32, max_pending_per_group=8)
    (gate,) = server.gates
    silent = yield silent_connections(port, HOSTS, 10)
    try:
        yield async_wait_until(
            lambda: server.failures.count("evicted") >= 28,
            timeout=15,
            what="the gate to evict down to its table size",
        )
        assert len(gate.pending) == 32 and max(gate.pending.group_size(h) for h in HOSTS) <= 8
        endpoint = client_tls_endpoint(reactor, "127.0.0.1", port, ca_file=pki.ca)
        proto = yield endpoint.connect(ClientFactory())
        proto.sendString(b"through a full table")
        yield async_wait_until(lambda: proto.replies, timeout=10, what="the reply")
        assert proto.replies == [b"OK " + sha256_hex(b"through a full table").encode()]
        assert set(server.failures) == {"evicted"}, "nothing timed out: the table made the room"
        proto.transport.loseConnection()
    finally:
        abort_all(silent)


@pytest_twisted.inlineCallbacks
def test_python_client_offering_alpn_is_answered(
    pki: PKI, server: LinkServer
) -> Generator[Any, Any, None]:
    """Python ssl with set_alpn_protocols(h2, http/1.1) connects (no protocol chosen) and gets OK."""
    port = yield server.start(pki)
    version, _, selected, replies = yield threads.deferToThread(
        python_tls_exchange, port, pki.ca, b"alpn payload", alpn=["h2", "http/1.1"]
    )
    assert version == "TLSv1.3" and selected is None
    assert replies == [b"OK " + sha256_hex(b"alpn payload").encode()]
    assert server.failures == []


@pytest_twisted.inlineCallbacks
def test_openssl_s_client_with_alpn_completes_the_handshake(
    pki: PKI, server: LinkServer
) -> Generator[Any, Any, None]:
    """`openssl s_client -alpn h2,http/1.1` (what curl and HAProxy check-ssl offer) is not aborted."""
    openssl = tool("openssl", "openssl")
    port = yield server.start(pki)
    proc = yield threads.deferToThread(
        subprocess.run,
        [
            openssl,
            "s_client",
            "-alpn",
            "h2,http/1.1",
            "-connect",
            f"127.0.0.1:{port}",
            "-CAfile",
            pki.ca,
            "-verify_return_error",
        ],
        input=b"",
        capture_output=True,
        timeout=30,
    )
    out = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    assert "alert" not in out.lower(), out
    assert "No ALPN negotiated" in out and "Verify return code: 0 (ok)" in out, out
    assert "Cipher is TLS_" in out, out


@pytest_twisted.inlineCallbacks
def test_ssl_endpoint_string_listener_serves_alpn_clients(pki: PKI) -> Generator[Any, Any, None]:
    """A listener from an ssl: endpoint string gets the same ALPN answer and cipher list."""
    receiver = ReceiverFactory(lambda m, r: r("OK"), clock=reactor)
    description = f"ssl:0:interface=127.0.0.1:privateKey={pki.server.key}:certKey={pki.server.cert}"
    port = yield listen_endpoint(reactor, description).listen(receiver)
    try:
        number = port.getHost().port
        _, _, selected, replies = yield threads.deferToThread(
            python_tls_exchange, number, pki.ca, b"ssl string", alpn=["h2", "http/1.1"]
        )
        assert selected is None and replies[0].startswith(b"OK ")
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            yield threads.deferToThread(
                python_tls_exchange, number, pki.ca, b"cbc", ciphers="ECDHE-ECDSA-AES128-SHA"
            )
    finally:
        receiver.close_all()
        yield port.stopListening()


@pytest.mark.parametrize(
    "ciphers",
    [
        pytest.param(
            "AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA256:AES256-SHA", id="static-rsa"
        ),
        pytest.param(
            "ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA:ECDHE-RSA-AES128-SHA256:"
            "ECDHE-RSA-AES256-SHA384",
            id="cbc",
        ),
    ],
)
@pytest_twisted.inlineCallbacks
def test_static_rsa_or_cbc_only_client_is_refused(
    pki: PKI, rsa_server: PemPair, server: LinkServer, ciphers: str
) -> Generator[Any, Any, None]:
    """With an RSA certificate, a TLS 1.2 client offering only static-RSA or only CBC suites is refused."""
    port = yield server.start(pki, cert=rsa_server)
    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
        yield threads.deferToThread(python_tls_exchange, port, pki.ca, b"weak", ciphers=ciphers)
    yield async_wait_until(lambda: server.failures, timeout=5, what="the server to log the refusal")
    assert server.failures == ["tls"] and server.got == []


@pytest.mark.parametrize(
    "ciphers", [None, "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-CHACHA20-POLY1305"]
)
@pytest_twisted.inlineCallbacks
def test_normal_clients_are_accepted(
    pki: PKI, rsa_server: PemPair, server: LinkServer, ciphers: str | None
) -> Generator[Any, Any, None]:
    """A default client (TLS 1.3) and TLS 1.2 ECDHE AEAD clients are accepted and answered."""
    port = yield server.start(pki, cert=rsa_server)
    version, cipher, _, replies = yield threads.deferToThread(
        python_tls_exchange, port, pki.ca, b"good client", ciphers=ciphers
    )
    assert replies == [b"OK " + sha256_hex(b"good client").encode()]
    assert version == ("TLSv1.3" if ciphers is None else "TLSv1.2")
    assert ciphers is None or cipher == ciphers


@pytest_twisted.inlineCallbacks
def test_testssl_finds_nothing_weak(
    pki: PKI, rsa_server: PemPair, server: LinkServer, tmp_path: Path
) -> Generator[Any, Any, None]:
    """testssl.sh against a real RSA listener: no CBC, no static RSA, no LUCKY13, no weak finding."""
    testssl = tool("testssl", "testssl.sh")
    port = yield server.start(pki, cert=rsa_server)
    report = tmp_path / "testssl.json"
    # protocols, cipher categories, forward secrecy, every cipher per protocol,
    # LUCKY13, renegotiation: the checks about the suites (certificate checks
    # would only judge the test CA).
    proc = yield threads.deferToThread(
        subprocess.run,
        [
            testssl,
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "off",
            "--jsonfile",
            str(report),
            "-p",
            "-s",
            "-f",
            "-E",
            "-L",
            "-R",
            f"127.0.0.1:{port}",
        ],
        capture_output=True,
        timeout=300,
    )
    assert report.exists(), proc.stdout.decode("utf-8", "replace")[-2000:]
    findings = {f["id"]: f for f in json.loads(report.read_text())}
    weak = {
        i: (f["severity"], f["finding"])
        for i, f in findings.items()
        if f["severity"] in ("LOW", "MEDIUM", "HIGH", "CRITICAL")
    }
    assert weak == {}, weak
    assert findings["LUCKY13"]["severity"] == "OK", findings["LUCKY13"]
    for name in ("NULL", "aNULL", "EXPORT", "LOW", "3DES_IDEA", "AVERAGE"):
        assert findings[f"cipherlist_{name}"]["finding"] == "not offered", name
    assert (
        findings["TLS1"]["finding"] == "not offered"
        and findings["TLS1_1"]["finding"] == "not offered"
    )
    tls12 = [f["finding"].split() for i, f in findings.items() if i.startswith("cipher-tls1_2_")]
    assert tls12, "testssl listed no TLS 1.2 suite: the scan did not run"
    # columns: TLS 1.2 <hexcode> <OpenSSL name> <key exchange> <bits> <encryption> ...
    assert [row[3] for row in tls12 if not forward_secret_aead(row[3]) or row[4] == "RSA"] == []
    assert findings["secure_client_renego"]["severity"] == "OK", findings["secure_client_renego"]


@pytest_twisted.inlineCallbacks
def test_sslscan_accepts_only_forward_secret_aead(
    pki: PKI, rsa_server: PemPair, server: LinkServer
) -> Generator[Any, Any, None]:
    """sslscan against a real RSA listener: TLS 1.2 and 1.3 only, every accepted suite ECDHE/DHE AEAD."""
    sslscan = tool("sslscan", "sslscan")
    port = yield server.start(pki, cert=rsa_server)
    proc = yield threads.deferToThread(
        subprocess.run,
        [sslscan, "--no-colour", "--xml=-", f"127.0.0.1:{port}"],
        capture_output=True,
        timeout=120,
    )
    root = ET.fromstring(proc.stdout[proc.stdout.index(b"<?xml") :])
    accepted = [
        (c.get("sslversion"), c.get("cipher", ""))
        for c in root.iter("cipher")
        if c.get("status") in ("accepted", "preferred")
    ]
    assert {v for v, _ in accepted} == {"TLSv1.2", "TLSv1.3"}, accepted
    weak = [c for v, c in accepted if v == "TLSv1.2" and not forward_secret_aead(c)]
    assert weak == [], weak
    assert all(c.startswith("TLS_") for v, c in accepted if v == "TLSv1.3")
