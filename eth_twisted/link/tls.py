"""TLS on the link: the cipher policy both ends use, server and client options, endpoints, and the TLS gates.

See docs/protocol.md for what each side checks (chain, host name, client certificates).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, serverFromString, wrapClientTLS
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    KeyPair,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from eth_twisted.errors import ConfigError
from eth_twisted.link.gate import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_PENDING_PER_GROUP,
    ClientGateFactory,
    GatedClientEndpoint,
    GateFactory,
    GateProtocol,
    OnFailure,
)
from eth_twisted.model import MAX_CLIENT_ID, bounded

EARLY_DATA_MAX = 64 * 1024
"""Bytes the TLS gate keeps that race its handshake's completion (times ``max_pending``: 64 MiB at most)."""
_TLS_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}

# -- TLS -----------------------------------------------------------------------


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {path}: {e.strerror}")


def _pem_certificates(data: bytes, path: str) -> list[Certificate]:
    """Every certificate in a PEM bundle, in order."""
    marker = b"-----END CERTIFICATE-----"
    blocks = [b + marker for b in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in b]
    if not blocks:
        raise ConfigError(f"{path} holds no PEM certificate")
    try:
        return [Certificate.loadPEM(block) for block in blocks]
    except Exception as e:  # noqa: BLE001 - pyOpenSSL raises several types
        raise ConfigError(f"{path}: not a valid PEM certificate ({e})")


def _tls_version(min_tls: str) -> TLSVersion:
    try:
        return _TLS_VERSIONS[min_tls]  # type: ignore[no-any-return]  # Twisted's enum, untyped
    except KeyError:
        raise ConfigError(
            f"minimum TLS version must be one of {sorted(_TLS_VERSIONS)}, got {min_tls!r}"
        )


def _private_certificate(
    cert_file: str, key_file: str | None
) -> tuple[PrivateCertificate, list[Certificate]]:
    """The leaf certificate with its key, and any chain certificates after it."""
    cert_pem = _read(cert_file, "certificate")
    key_pem = _read(key_file, "private key") if key_file else cert_pem
    certs = _pem_certificates(cert_pem, cert_file)
    try:
        key = KeyPair.load(key_pem, crypto.FILETYPE_PEM)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{key_file or cert_file}: not a valid PEM private key ({e})")
    try:
        private = PrivateCertificate.fromCertificateAndKeyPair(certs[0], key)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{cert_file}: the key does not match the certificate ({e})")
    return private, certs[1:]


LINK_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)
"""The TLS 1.2 cipher suites of both ends: Mozilla's "intermediate" list (Server Side TLS 5.7).

Forward-secret key exchange (ECDHE, DHE) with AEAD encryption (AES-GCM,
ChaCha20-Poly1305) only; no static-RSA key exchange (no forward secrecy, the
ROBOT family) and no CBC (LUCKY13). DHE uses the RFC 7919 groups OpenSSL 3
picks (2048 bits and up). TLS 1.3 uses OpenSSL's own suites (all AEAD).
Twisted's default list also allows ``RSA+AES`` and CBC.
"""

_LINK_ACCEPTABLE_CIPHERS = AcceptableCiphers.fromOpenSSLCipherString(LINK_CIPHERS)


def _alpn_select(connection: SSL.Connection, offered: list[bytes]) -> Any:
    """ALPN on the server: the first protocol we speak that the client offered, else "no overlap".

    Twisted 26.10 installs a select callback on every server context (even
    without protocols of its own) that answers ``b""`` when nothing matches;
    OpenSSL 3 treats an empty selection as an internal error and aborts the
    handshake with alert 80, so every client offering ALPN was refused.
    pyOpenSSL's ``NO_OVERLAPPING_PROTOCOLS`` makes OpenSSL carry on without
    ALPN instead (RFC 7301 allows a server to ignore the extension).
    """
    ours: tuple[bytes, ...] = ()
    tls_protocol = connection.get_app_data()
    factory = getattr(getattr(tls_protocol, "factory", None), "wrappedFactory", None)
    negotiation = interfaces.IProtocolNegotiationFactory(factory, None)
    if negotiation is not None:
        ours = tuple(negotiation.acceptableProtocols())
    for protocol in ours:
        if protocol in offered:
            return protocol
    return SSL.NO_OVERLAPPING_PROTOCOLS


def harden_server_context(context: SSL.Context, *, ciphers: bool = False) -> SSL.Context:
    """Apply the link's server policy to an OpenSSL context; returns it.

    The ALPN callback that answers "no overlap" (:func:`_alpn_select`), no
    client-initiated renegotiation (a CPU cost a peer could repeat at will),
    and with ``ciphers`` the :data:`LINK_CIPHERS` list (for contexts built
    elsewhere, e.g. by an ``ssl:`` endpoint string).
    """
    context.set_alpn_select_callback(_alpn_select)
    context.set_options(SSL.OP_NO_RENEGOTIATION)
    if ciphers:
        context.set_cipher_list(LINK_CIPHERS.encode("ascii"))
    return context


class _LinkServerOptions(CertificateOptions):
    """``CertificateOptions`` whose context gets :func:`harden_server_context` once."""

    _hardened: SSL.Context | None = None

    def getContext(self) -> SSL.Context:
        context = super().getContext()
        if context is not self._hardened:
            self._hardened = harden_server_context(context)
        return context


def server_tls_options(
    cert_file: str,
    key_file: str,
    client_ca_file: str | None = None,
    min_tls: str = "1.2",
) -> CertificateOptions:
    """TLS options for the server (an ``IOpenSSLServerConnectionCreator``).

    ``cert_file`` may hold the chain after the leaf. With ``client_ca_file``
    (one or more PEM CA certificates) every client must present a certificate
    issued by one of them: mutual TLS, which the ``ssl:`` endpoint string
    cannot express. ``min_tls`` is ``"1.2"`` (Twisted's default) or ``"1.3"``.
    The cipher list is :data:`LINK_CIPHERS`; the context is hardened with
    :func:`harden_server_context` (ALPN, renegotiation).
    """
    private, chain = _private_certificate(cert_file, key_file)
    kwargs: dict[str, Any] = {}
    if client_ca_file:
        cas = _pem_certificates(_read(client_ca_file, "client CA"), client_ca_file)
        kwargs["trustRoot"] = trustRootFromCertificates(cas)  # implies verify + requireCertificate
    return _LinkServerOptions(
        # cryptography objects: passing pyOpenSSL ones is deprecated in pyOpenSSL 26
        privateKey=private.privateKey.original.to_cryptography_key(),
        certificate=private.original.to_cryptography(),
        extraCertChain=[c.original.to_cryptography() for c in chain],
        raiseMinimumTo=_tls_version(min_tls),
        acceptableCiphers=_LINK_ACCEPTABLE_CIPHERS,
        **kwargs,
    )


@implementer(interfaces.IStreamServerEndpoint)
class _TLSServerEndpoint:
    """Any stream server endpoint, with TLS on every accepted connection."""

    def __init__(self, endpoint: interfaces.IStreamServerEndpoint, options: Any) -> None:
        self._endpoint = endpoint
        self._options = options

    def listen(self, protocolFactory: interfaces.IProtocolFactory) -> Deferred[Any]:
        return self._endpoint.listen(TLSMemoryBIOFactory(self._options, False, protocolFactory))


def listen_endpoint(
    reactor: Any, description: str, tls: Any | None = None
) -> interfaces.IStreamServerEndpoint:
    """A server endpoint for ``description``, with TLS from ``tls`` when given.

    Without ``tls`` this is ``serverFromString`` (so ``ssl:`` strings work for
    plain server TLS). With ``tls`` (e.g. :func:`server_tls_options`) the
    description names where to listen (``tcp:9999:interface=127.0.0.1``,
    ``tcp6:...``, ``unix:...``, ``systemd:...``) and every connection is
    wrapped in TLS, as ``reactor.listenSSL`` does; an ``ssl:`` description
    together with ``tls`` is a ConfigError (two sources of certificates).
    An ``ssl:`` listener gets the same cipher list and hardening as ``tls``.
    """
    kind = description.split(":", 1)[0].strip().lower()
    if tls is not None and kind in ("ssl", "tls"):
        raise ConfigError(
            f"{description!r}: give a tcp: endpoint with the TLS options (--tls-cert/--tls-key), "
            "not an ssl: one"
        )
    try:
        endpoint = serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"bad listen endpoint {description!r}: {e}")
    if tls is None:
        # An ssl: string builds its own CertificateOptions (Twisted's ciphers, its
        # ALPN callback): give its context the link's policy too. The options
        # cache that context, so changing it once covers every connection.
        options = getattr(endpoint, "_sslContextFactory", None)
        if isinstance(options, CertificateOptions):
            harden_server_context(options.getContext(), ciphers=True)
        return endpoint  # type: ignore[no-any-return]  # serverFromString is untyped
    return _TLSServerEndpoint(endpoint, tls)


def is_tls(transport: Any) -> bool:
    """True when ``transport`` is a TLS connection."""
    return isinstance(transport, TLSMemoryBIOProtocol) or interfaces.ISSLTransport.providedBy(
        transport
    )


def peer_identity(transport: Any) -> str | None:
    r"""The peer certificate's subject as an RFC 4514 string, or None without one.

    Never raises for what a peer's certificate holds: characters that are not
    printable (control characters, bidirectional overrides) are escaped as
    RFC 4514 ``\XX`` hex pairs, so the string is safe in a log line; a
    subject that ``cryptography`` refuses to parse although OpenSSL verified
    the certificate (e.g. ``_`` or ``@`` in a PrintableString, which some
    CAs issue) is rebuilt from OpenSSL's own parse, and failing that the
    certificate's SHA-256 fingerprint (``sha256-fingerprint=<hex>``) names it.
    """
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        cert = get()
    except Exception:  # noqa: BLE001 - not TLS, or the handshake is not done
        return None
    if cert is None:
        return None
    try:
        return _escape_unprintable(cert.to_cryptography().subject.rfc4514_string())
    except Exception:  # noqa: BLE001 - a subject cryptography cannot decode
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", DeprecationWarning
            )  # X509.get_subject: the only parse left
            components = cert.get_subject().get_components()
        return ",".join(
            f"{_escape_value(key)}={_escape_value(value)}" for key, value in reversed(components)
        )
    except Exception:  # noqa: BLE001
        digest: str = cert.digest("sha256").decode("ascii").replace(":", "").lower()
        return f"sha256-fingerprint={digest}"


_RFC4514_SPECIAL = frozenset(b',+"\\<>;=')


def _escape_value(raw: bytes) -> str:
    r"""Raw attribute bytes as an RFC 4514 value: printable ASCII as is, specials and the rest as ``\XX``."""
    out = []
    for i, byte in enumerate(raw):
        if (
            byte in _RFC4514_SPECIAL
            or (byte in b"# " and i == 0)
            or (byte == 0x20 and i == len(raw) - 1)
        ):
            out.append("\\" + chr(byte))
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:02X}")
    return "".join(out)


def _escape_unprintable(text: str) -> str:
    """``text`` with every non-printable character as RFC 4514 hex pairs of its UTF-8 bytes."""
    if text.isprintable():
        return text
    return "".join(
        ch
        if ch.isprintable()
        else "".join(f"\\{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
        for ch in text
    )


def client_tls_options(
    host: str,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    hostname: str | None = None,
    *,
    min_tls: str = "1.2",
) -> Any:
    """The client's TLS options (an ``IOpenSSLClientConnectionCreator``) for :func:`client_tls_endpoint`.

    The server's chain is checked against ``ca_file`` (PEM, one or more CAs;
    default: the platform's trust store) and its name against ``hostname``
    (default ``host``; an IP address is matched against IP SANs). With
    ``cert_file`` (and ``key_file``, default: the same file) the client
    presents a certificate. It offers only :data:`LINK_CIPHERS` (and TLS
    1.3's), so a server that allows only CBC or static-RSA suites is refused.
    """
    trust: Any = (
        trustRootFromCertificates(_pem_certificates(_read(ca_file, "CA"), ca_file))
        if ca_file
        else platformTrust()
    )
    extra: dict[str, Any] = {
        "raiseMinimumTo": _tls_version(min_tls),
        "acceptableCiphers": _LINK_ACCEPTABLE_CIPHERS,
    }
    if cert_file:
        # What clientCertificate= would do, with cryptography objects (pyOpenSSL
        # 26 deprecates passing its own X509/PKey).
        client_cert = _private_certificate(cert_file, key_file)[0]
        extra["privateKey"] = client_cert.privateKey.original.to_cryptography_key()
        extra["certificate"] = client_cert.original.to_cryptography()
    return optionsForClientTLS(hostname or host, trustRoot=trust, extraCertificateOptions=extra)


def client_tls_endpoint(
    reactor: Any,
    host: str,
    port: int,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    hostname: str | None = None,
    *,
    min_tls: str = "1.2",
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    connect_timeout: float = 30.0,
) -> interfaces.IStreamClientEndpoint:
    """A client endpoint to ``host:port`` over verified TLS (:func:`client_tls_options`).

    ``connect`` fires only after the handshake and the checks succeeded,
    with the protocol the factory built; any TLS failure or a handshake
    longer than ``timeout`` fails it, so the connection never carries a byte
    in plaintext.
    """
    options = client_tls_options(host, ca_file, cert_file, key_file, hostname, min_tls=min_tls)
    tcp = HostnameEndpoint(reactor, host, port, timeout=connect_timeout)
    server = f"{host}:{port}"

    def gate(factory: interfaces.IProtocolFactory) -> ClientGateFactory:
        return _TLSClientGateFactory(factory, clock=reactor, timeout=timeout, server=server)

    return GatedClientEndpoint(wrapClientTLS(options, tcp), gate)


# -- TLS gates -----------------------------------------------------------------


@implementer(interfaces.IHandshakeListener)
class _TLSGateProtocol(GateProtocol):
    """Opens when the TLS handshake (and certificate checks) completed."""

    def __init__(self, addr: Any) -> None:
        super().__init__(addr)
        self._early = bytearray()

    def handshakeCompleted(self) -> None:
        """Called by the TLS layer once the peer is verified."""
        if self.state != "waiting":
            return
        rest, self._early = bytes(self._early), bytearray()
        self._open(self.identity(), rest)

    def identity(self) -> str | None:
        """The client id to give the inner protocol."""
        return None

    def handshake_data(self, data: bytes) -> None:
        # The TLS layer delivers application data only after the handshake;
        # keep anything that races handshakeCompleted, bounded.
        self._early += data
        if len(self._early) > EARLY_DATA_MAX:
            self._fail(
                "early-data", "too much data before the TLS handshake completed", close="abort"
            )

    def timeout_detail(self) -> str:
        return f"TLS handshake not complete within {self.factory.timeout:g} s"

    def lost_detail(self, reason: Failure | None) -> tuple[str, str]:
        why = reason.getErrorMessage() if reason is not None else "closed"
        return "tls", f"TLS handshake failed: {why}"


class _TLSServerGateProtocol(_TLSGateProtocol):
    def identity(self) -> str | None:
        """The client certificate's subject, bounded to the record's ``client_id`` column.

        A subject longer than ``MAX_CLIENT_ID`` characters (an ordinary
        corporate DN) becomes its prefix plus a digest of the whole
        (:func:`eth_twisted.model.bounded`), so it can never cost a message its
        row; the full subject is in the log line written here.
        """
        subject = peer_identity(self.transport)
        if subject is None:
            return None
        client_id = bounded(subject, MAX_CLIENT_ID)
        self.factory.log.info(
            "TLS client {subject} connected from {peer}{stored}",
            subject=subject,
            peer=self.peer,
            client_id=client_id,
            stored="" if client_id == subject else f" (stored as client_id {client_id})",
        )
        return client_id


class TLSGateFactory(GateFactory):
    """Server side: connect ``inner_factory``'s protocol only after the TLS handshake.

    Put it directly under the TLS layer (the factory given to a
    :func:`listen_endpoint` with ``tls``). It aborts a handshake that takes
    longer than ``timeout`` seconds, logs (rate-limited) and counts failed
    handshakes (``on_failure("tls")``, ``on_failure("timeout")``), and sets
    ``client_id`` on the inner protocol to the client certificate's subject
    when there is one (mutual TLS), bounded to ``MAX_CLIENT_ID`` characters.
    Like the shared-secret gate it holds at most ``max_pending`` handshakes,
    ``max_pending_per_group`` per address group, evicting the oldest of the
    largest group rather than refusing (``on_failure("evicted")``).
    """

    gate_protocol = _TLSServerGateProtocol
    gate_name = "TLS"

    def __init__(
        self,
        inner_factory: interfaces.IProtocolFactory,
        *,
        clock: interfaces.IReactorTime,
        timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        on_failure: OnFailure | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_pending_per_group: int = DEFAULT_MAX_PENDING_PER_GROUP,
    ) -> None:
        super().__init__(
            inner_factory,
            clock=clock,
            timeout=timeout,
            on_failure=on_failure,
            max_pending=max_pending,
            max_pending_per_group=max_pending_per_group,
        )


class _TLSClientGateFactory(ClientGateFactory):
    gate_protocol = _TLSGateProtocol
    gate_name = "TLS"
