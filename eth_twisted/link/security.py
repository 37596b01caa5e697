"""Transport security for the client-server link: TLS, mutual TLS, shared secret.

Nothing here changes the receiver or the sender. Every piece is a *gate*: a
protocol wrapper that holds a new connection until a check passes and only
then builds the inner protocol (``ReceiverProtocol`` on the server,
``SenderProtocol`` on the client) and calls ``inner.makeConnection`` with the
real transport. Until then the inner protocol does not exist, so it can never
see a byte that arrived before, or pipelined behind, a failed check
(RELIABILITY.md 1.4-4: the gate is protocol state, not ``loseConnection``).

Server side (wrap the receiver's factory, outermost first)::

    tls = server_tls_options(cert, key, client_ca_file=ca)      # mTLS when ca given
    factory = TLSGateFactory(AuthServerFactory(ReceiverFactory(...), secret, clock=reactor),
                             clock=reactor)
    listen_endpoint(reactor, "tcp:9999:interface=127.0.0.1", tls=tls).listen(factory)

Client side (wrap the endpoint the ``DeliveryService`` connects with; its
``connect`` fires only once every check passed, so a failed handshake is a
failed connection attempt and ``ClientService`` backs off)::

    endpoint = client_tls_endpoint(reactor, host, port, ca_file=ca, cert_file=c, key_file=k)
    endpoint = AuthClientEndpoint(endpoint, secret, name, clock=reactor)

TLS
    TLS >= 1.2 (``min_tls="1.3"`` to raise it) with Mozilla's "intermediate"
    cipher list on both ends (:data:`LINK_CIPHERS`: forward-secret AEAD only,
    no static-RSA key exchange, no CBC), client-initiated renegotiation off,
    and an ALPN answer that lets clients offering protocols we do not speak
    (curl, browsers, HAProxy ``check-ssl``) connect without one. The client
    checks the chain against ``ca_file`` (or the platform's trust store) and
    the host name or IP address with service_identity. There is no fallback
    to plaintext: a TLS failure is a connection failure. With
    ``client_ca_file`` the server requires a client certificate issued by
    that CA; :class:`TLSGateFactory` sets the inner protocol's ``client_id``
    to the certificate subject (RFC 4514, e.g. ``CN=client-1,O=eth``; one
    longer than the 255-character column is stored as a prefix plus a digest,
    and logged in full at connect). Caveat: with TLS 1.3 the client finishes
    its side of the handshake before the server has judged the client
    certificate, so a client refused for its certificate sees a connection
    that closes at once (nothing it wrote is delivered); the server logs the
    reason. Both server gates hold at most ``max_pending`` handshakes
    (``max_pending_per_group`` per address group) and evict rather than
    refuse (:class:`PendingHandshakes`).

Shared-secret handshake ("eth/1"), mutual HMAC-SHA256 challenge-response.
Every frame is a netstring; nonces are 32 random bytes as 64 lowercase hex
digits; ``name`` is 1-128 characters of ``[A-Za-z0-9._@:-]``, starting
with a letter or digit::

    server -> HELLO eth/1 <server_nonce>
    client -> AUTH <name> <client_nonce> <client_proof>
    server -> AUTH-OK <server_proof>                      (then normal traffic)
           or ERR - auth                                  (then close)

    client_proof = hex(HMAC-SHA256(secret, b"client\\0" + server_nonce + client_nonce + name))
    server_proof = hex(HMAC-SHA256(secret, b"server\\0" + server_nonce + client_nonce + name))

(nonces and name as their ASCII bytes; the nonces have a fixed length, so
the concatenation is unambiguous; the ``client``/``server`` prefixes stop a
proof from being reflected back.) Both sides compare with
``hmac.compare_digest``. The server answers any first frame that is not
``AUTH`` with ``ERR <sha256 of that frame> auth`` (a client that has no
secret configured sees a final ``auth`` code for that message), a malformed
or wrong ``AUTH`` and any framing error with ``ERR - auth``, and closes
either way. After ``AUTH-OK`` the connection is wire protocol version 1,
unchanged; the inner protocol's ``client_id`` is ``name``. The client sends
``AUTH`` only after a well-formed ``HELLO`` and hands the connection to the
sender only after checking ``server_proof``, so a server that does not know
the secret (an impostor) never receives a message frame and cannot
acknowledge anything away. A handshake that does not finish within
``timeout`` seconds (default 10) is aborted on either side. The secret never
crosses the wire and is never logged; the exchange is refused over
plaintext unless explicitly allowed, because an eavesdropper could test
guesses of a weak secret against a recorded proof, and without TLS nothing
binds the authenticated peer to the rest of the connection.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, serverFromString, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
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
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from eth_twisted.errors import ConfigError, HandshakeFailed
from eth_twisted.link.netstring import NetstringDecoder, encode
from eth_twisted.model import MAX_CLIENT_ID, bounded, normalise_ip, peer_group

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_PENDING_PER_GROUP",
    "LINK_CIPHERS",
    "MIN_SECRET_BYTES",
    "AuthClientEndpoint",
    "AuthClientFactory",
    "AuthServerFactory",
    "PendingHandshakes",
    "TLSGateFactory",
    "check_secret_transport",
    "client_proof",
    "client_tls_endpoint",
    "client_tls_options",
    "harden_server_context",
    "is_tls",
    "listen_endpoint",
    "load_secret",
    "peer_identity",
    "server_proof",
    "server_tls_options",
]

VERSION = b"eth/1"
NONCE_BYTES = 32
MIN_SECRET_BYTES = 16
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_MAX_PENDING = 1024
"""Handshakes a server gate holds at once; past it the newest connection evicts an old one."""
DEFAULT_MAX_PENDING_PER_GROUP = 64
"""Handshakes one address group (an IPv4 address, an IPv6 /64) holds at once in a server gate."""
EARLY_DATA_MAX = 64 * 1024
"""Bytes the TLS gate keeps that race its handshake's completion (times ``max_pending``: 64 MiB at most)."""
HANDSHAKE_MAX_LENGTH = 4096
"""Longest frame read before authentication (data frames up to this get ``ERR <sha> auth``)."""
CREDENTIALS_NAME = "link-secret"
SECRET_ENV = "ETH_SECRET"

_HEX64 = re.compile(rb"[0-9a-f]{64}\Z")
_NAME = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}\Z")
_TLS_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}

OnFailure = Callable[[str], None]


# -- secrets -------------------------------------------------------------------


def load_secret(
    value: str | bytes | None = None,
    file: str | None = None,
    credentials_name: str = CREDENTIALS_NAME,
    environ: Mapping[str, str] | None = None,
) -> bytes | None:
    """The link's shared secret, or None when none is configured.

    Looked up in this order: ``value`` (an option's value), the file
    ``file`` (``--secret-file``), ``$ETH_SECRET``, then
    ``$CREDENTIALS_DIRECTORY/<credentials_name>`` (systemd
    ``LoadCredential=``). Trailing newlines of a file are dropped. A secret
    shorter than 16 bytes, or a file that cannot be read, is a ConfigError; a
    secret file readable by group or others is logged as a warning.
    """
    environ = os.environ if environ is None else environ
    secret: bytes | None = None
    source = ""
    if value:
        secret = value if isinstance(value, bytes) else value.encode("utf-8")
        source = "the --secret option"
    elif file:
        secret = _read_secret_file(Path(file))
        source = f"secret file {file}"
    elif environ.get(SECRET_ENV):
        secret = environ[SECRET_ENV].encode("utf-8")
        source = f"${SECRET_ENV}"
    else:
        creds = environ.get("CREDENTIALS_DIRECTORY", "")
        if creds and (Path(creds) / credentials_name).exists():
            path = Path(creds) / credentials_name
            secret = _read_secret_file(path)
            source = f"credential {credentials_name}"
    if secret is None:
        return None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"the link secret from {source} is {len(secret)} bytes; it must be at least "
            f"{MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32`)"
        )
    return secret


def _read_secret_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as e:
        raise ConfigError(f"cannot read the secret file {path}: {e.strerror}")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        _log.warn(
            "The secret file {path} is readable by other users (mode {mode}); chmod 600 it",
            path=str(path),
            mode=oct(stat.S_IMODE(mode)),
        )
    return data.rstrip(b"\r\n")


def check_secret_transport(secret: bytes | None, tls: bool, allow_plaintext: bool = False) -> None:
    """Refuse to run the shared-secret handshake over plaintext TCP.

    Call it at start-up on both sides: ``tls`` says whether the link is TLS.
    Raises ConfigError when a secret is set, the link is plaintext and
    ``allow_plaintext`` (``--allow-plaintext-secret``) is not given.
    """
    if secret is not None and not tls and not allow_plaintext:
        raise ConfigError(
            "a link secret over plaintext TCP can be attacked offline and does not protect the "
            "connection after the handshake: enable TLS, or pass --allow-plaintext-secret"
        )


def client_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes, name: bytes) -> bytes:
    """The client's HMAC proof (64 hex digits, ASCII) for one handshake."""
    return _proof(secret, b"client\0", server_nonce, client_nonce, name)


def server_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes, name: bytes) -> bytes:
    """The server's HMAC proof (64 hex digits, ASCII) for one handshake."""
    return _proof(secret, b"server\0", server_nonce, client_nonce, name)


def _proof(
    secret: bytes, role: bytes, server_nonce: bytes, client_nonce: bytes, name: bytes
) -> bytes:
    mac = hmac.new(secret, role + server_nonce + client_nonce + name, hashlib.sha256)
    return mac.hexdigest().encode("ascii")


def _proof_matches(expected: bytes, given: bytes) -> bool:
    """Constant-time comparison of two proofs."""
    return hmac.compare_digest(expected, given)


def _nonce() -> bytes:
    return secrets.token_hex(NONCE_BYTES).encode("ascii")


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
        return _TLS_VERSIONS[min_tls]
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
        return endpoint
    return _TLSServerEndpoint(endpoint, tls)


def is_tls(transport: Any) -> bool:
    """True when ``transport`` is a TLS connection."""
    return isinstance(transport, TLSMemoryBIOProtocol) or interfaces.ISSLTransport.providedBy(
        transport
    )


def peer_identity(transport: Any) -> str | None:
    """The peer certificate's subject as an RFC 4514 string, or None without one.

    Never raises for what a peer's certificate holds: characters that are not
    printable (control characters, bidirectional overrides) are escaped as
    RFC 4514 ``\\XX`` hex pairs, so the string is safe in a log line; a
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
    """Raw attribute bytes as an RFC 4514 value: printable ASCII as is, specials and the rest as ``\\XX``."""
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

    def gate(factory: interfaces.IProtocolFactory) -> _ClientGateFactory:
        return _TLSClientGateFactory(factory, clock=reactor, timeout=timeout, server=server)

    return _GatedClientEndpoint(wrapClientTLS(options, tcp), gate)


# -- gates ---------------------------------------------------------------------


_log = Logger(namespace="eth_twisted.link.security")


class _LogLimiter:
    """At most ``burst`` lines per ``interval`` seconds per reason; counts the rest."""

    def __init__(
        self, clock: interfaces.IReactorTime, burst: int = 20, interval: float = 60.0
    ) -> None:
        self.clock = clock
        self.burst = burst
        self.interval = interval
        self._windows: dict[str, tuple[float, int, int]] = {}

    def allow(self, reason: str) -> tuple[bool, int]:
        """Whether to log now, and how many lines of this reason were suppressed before."""
        now = self.clock.seconds()
        start, count, suppressed = self._windows.get(reason, (now, 0, 0))
        if now - start >= self.interval:
            start, count = now, 0
        if count < self.burst:
            self._windows[reason] = (start, count + 1, 0)
            return True, suppressed
        self._windows[reason] = (start, count, suppressed + 1)
        return False, 0


def _peer_text(transport: Any) -> str:
    try:
        address = transport.getPeer()
    except Exception:  # noqa: BLE001
        return "-"
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_group(transport: Any) -> str:
    """The address group a connection counts against (``protocol.peer_group``), ``-`` without one."""
    try:
        host = getattr(transport.getPeer(), "host", None)
    except Exception:  # noqa: BLE001
        host = None
    return peer_group(normalise_ip(host)) if isinstance(host, str) and host else "-"


class PendingHandshakes:
    """Connections still in a handshake, by address group, oldest first; full means evict, not refuse.

    ``add`` never refuses the newcomer. When its group already holds
    ``max_per_group`` it evicts that group's oldest; else, when the table
    holds ``max_total``, it evicts the oldest of the group holding the most
    (the first to reach that size, on a tie). Silent connections from a few
    addresses can then never lock out a client that completes its handshake
    promptly: at worst they push each other out. Every operation is O(1)
    (groups are kept in buckets by size, like an LFU cache; OrderedDicts,
    because finding the first key of a plain dict whose front was deleted
    scans the deleted slots). ``None`` means no limit (the client side, which
    has one connection).
    """

    def __init__(self, max_total: int | None = None, max_per_group: int | None = None) -> None:
        if (max_total is not None and max_total < 1) or (
            max_per_group is not None and max_per_group < 1
        ):
            raise ValueError("pending handshake limits must be at least 1")
        self.max_total = max_total
        self.max_per_group = max_per_group
        self._groups: dict[
            str, OrderedDict[Any, None]
        ] = {}  # group -> its connections, oldest first
        self._group_of: dict[Any, str] = {}
        self._by_size: dict[
            int, OrderedDict[str, None]
        ] = {}  # size -> groups of that size, by arrival
        self._largest = 0

    def __len__(self) -> int:
        return len(self._group_of)

    def __contains__(self, proto: object) -> bool:
        return proto in self._group_of

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._group_of))

    def group_size(self, group: str) -> int:
        """How many handshakes ``group`` holds."""
        return len(self._groups.get(group, ()))

    def add(self, proto: Any, group: str) -> Any | None:
        """Hold ``proto`` under ``group``; returns the connection it evicted (already removed), if any."""
        victim = None
        if self.max_per_group is not None and self.group_size(group) >= self.max_per_group:
            victim = next(iter(self._groups[group]))
        elif self.max_total is not None and len(self) >= self.max_total:
            largest = next(iter(self._by_size[self._largest]))
            victim = next(iter(self._groups[largest]))
        if victim is not None:
            self.discard(victim)
        members = self._groups.get(group)
        if members is None:
            members = self._groups[group] = OrderedDict()
        self._move(group, len(members), len(members) + 1)
        members[proto] = None
        self._group_of[proto] = group
        return victim

    def discard(self, proto: Any) -> None:
        """Forget ``proto`` (it opened, failed or closed); nothing if it is not held."""
        group = self._group_of.pop(proto, None)
        if group is None:
            return
        members = self._groups[group]
        del members[proto]
        self._move(group, len(members) + 1, len(members))
        if not members:
            del self._groups[group]

    def _move(self, group: str, old: int, new: int) -> None:
        if old:
            previous = self._by_size[old]
            del previous[group]
            if not previous:
                del self._by_size[old]
        if new:
            bucket = self._by_size.get(new)
            if bucket is None:
                bucket = self._by_size[new] = OrderedDict()
            bucket[group] = None
        if new > self._largest:
            self._largest = new
        while self._largest and self._largest not in self._by_size:
            self._largest -= 1


class _GateFactory(Factory):
    """Wraps ``inner_factory``; its protocols hold each connection until a check passes."""

    noisy = False
    log = _log
    gate_name = "gate"
    gate_protocol: type[_GateProtocol]

    def __init__(
        self,
        inner_factory: interfaces.IProtocolFactory,
        *,
        clock: interfaces.IReactorTime,
        timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        on_failure: OnFailure | None = None,
        max_pending: int | None = None,
        max_pending_per_group: int | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.inner_factory = inner_factory
        self.clock = clock
        self.timeout = timeout
        self.on_failure = on_failure
        self.max_pending = max_pending
        self.max_pending_per_group = max_pending_per_group
        self.pending = PendingHandshakes(max_pending, max_pending_per_group)
        self.failures: dict[str, int] = {}
        self._limiter = _LogLimiter(clock)

    def buildProtocol(self, addr: Any) -> _GateProtocol:  # type: ignore[override]
        proto = self.gate_protocol(addr)
        proto.factory = self
        return proto

    def startFactory(self) -> None:
        start = getattr(self.inner_factory, "doStart", None)
        if start is not None:
            start()

    def stopFactory(self) -> None:
        stop = getattr(self.inner_factory, "doStop", None)
        if stop is not None:
            stop()

    def abort_pending(self) -> None:
        """Abort every connection still in its handshake (at shutdown)."""
        for proto in list(self.pending):
            proto.transport.abortConnection()

    # hooks for subclasses (the client side fires a Deferred)

    def gate_opened(self, proto: _GateProtocol, inner: Any) -> None:
        """A connection passed the check and ``inner`` is connected."""

    def gate_failed(self, proto: _GateProtocol, error: HandshakeFailed) -> None:
        """A connection failed the check: count it, log it (rate-limited), tell ``on_failure``."""
        self.failures[error.reason] = self.failures.get(error.reason, 0) + 1
        ok, suppressed = self._limiter.allow(error.reason)
        if ok:
            self.log.warn(
                "{gate} refused {peer}: {reason} ({detail}){more}",
                gate=self.gate_name,
                peer=proto.peer,
                reason=error.reason,
                detail=error.detail,
                more=f"; {suppressed} more like it not logged" if suppressed else "",
            )
        if self.on_failure is not None:
            try:
                self.on_failure(error.reason)
            except Exception:
                self.log.failure("on_failure hook raised")


@implementer(interfaces.IHalfCloseableProtocol)
class _GateProtocol(Protocol):
    """A connection held until a check passes; then a pass-through to the inner protocol."""

    factory: _GateFactory
    transport: Any

    def __init__(self, addr: Any) -> None:
        self.addr = addr
        self.inner: Any = None
        self.state = "waiting"  # waiting -> open | failed
        self.peer = "-"
        self.group = "-"  # the address group it counts against in the pending table
        self.client_id: str | None = None
        self._timer: Any = None

    # lifecycle

    def connectionMade(self) -> None:
        self.peer = _peer_text(self.transport)
        self.group = _peer_group(self.transport)
        f = self.factory
        victim = f.pending.add(self, self.group)
        self._timer = f.clock.callLater(f.timeout, self._timed_out)
        if victim is not None:
            victim._fail(
                "evicted",
                f"handshake table full ({len(f.pending)} pending, at most {f.max_pending}; "
                f"{f.pending.group_size(victim.group)} from its address group, at most "
                f"{f.max_pending_per_group}): the oldest of the largest group makes room",
                close="abort",
            )
        self.gate_started()

    def gate_started(self) -> None:
        """The connection is up and waiting for its check."""

    def _timed_out(self) -> None:
        self._timer = None
        if self.state == "waiting":
            self._fail("timeout", self.timeout_detail(), close="abort")
        elif self.state == "failed":
            self.transport.abortConnection()  # a refused peer that does not read our ERR

    def timeout_detail(self) -> str:
        """What the peer failed to do in time."""
        return f"no handshake within {self.factory.timeout:g} s"

    def _open(self, client_id: str | None, rest: bytes = b"") -> None:
        """The check passed: build and connect the inner protocol, hand it ``rest``."""
        self._cancel_timer()
        self.factory.pending.discard(self)
        inner: Any = self.factory.inner_factory.buildProtocol(self.addr)
        if inner is None:
            self._fail("refused", "the inner factory refused the connection", close="abort")
            return
        if client_id is not None:
            try:
                inner.client_id = client_id
            except AttributeError:
                pass
        self.inner = inner
        self.state = "open"
        inner.makeConnection(self.transport)
        self.factory.gate_opened(self, inner)
        if rest and self.state == "open":
            inner.dataReceived(rest)

    def _fail(
        self, reason: str, detail: str, *, reply: bytes | None = None, close: str = "lose"
    ) -> None:
        """The check failed: nothing more reaches anyone; optionally reply, then close.

        ``close`` is ``lose`` (flush ``reply``, close, abort after the
        timeout if the peer does not read), ``abort``, or ``none`` (already gone).
        """
        if self.state != "waiting":
            return
        self.state = "failed"
        self.factory.pending.discard(self)
        self._cancel_timer()
        self.factory.gate_failed(self, HandshakeFailed(reason, detail))
        if close == "abort":
            self.transport.abortConnection()
        elif close == "lose":
            if reply is not None:
                self.transport.write(encode(reply))
            self.transport.loseConnection()
            self._timer = self.factory.clock.callLater(self.factory.timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # data

    def dataReceived(self, data: bytes) -> None:
        if self.state == "open":
            self.inner.dataReceived(data)
        elif self.state == "waiting":
            self.handshake_data(data)
        # failed: dropped, whatever it is

    def handshake_data(self, data: bytes) -> None:
        """Bytes that arrived before the check passed."""
        self._fail("early-data", "data before the handshake completed", close="abort")

    # closing

    def readConnectionLost(self) -> None:
        if self.state == "open" and interfaces.IHalfCloseableProtocol.providedBy(self.inner):
            self.inner.readConnectionLost()
            return
        if self.state == "waiting":
            self._fail("closed", "the peer closed its side during the handshake")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self.state == "open" and interfaces.IHalfCloseableProtocol.providedBy(self.inner):
            self.inner.writeConnectionLost()
            return
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._cancel_timer()
        self.factory.pending.discard(self)
        if self.state == "open":
            self.inner.connectionLost(reason)
        elif self.state == "waiting":
            reason_word, detail = self.lost_detail(reason)
            self._fail(reason_word, detail, close="none")

    def lost_detail(self, reason: Failure | None) -> tuple[str, str]:
        """How to report a connection lost during the handshake."""
        why = reason.getErrorMessage() if reason is not None else "closed"
        return "closed", f"connection lost during the handshake ({why})"

    def logPrefix(self) -> str:
        return self.factory.gate_name


# -- TLS gates -----------------------------------------------------------------


@implementer(interfaces.IHandshakeListener)
class _TLSGateProtocol(_GateProtocol):
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


class TLSGateFactory(_GateFactory):
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


class _ClientGateFactory(_GateFactory):
    """A client-side gate for one connection: ``ready`` fires with the inner protocol."""

    def __init__(
        self,
        inner_factory: interfaces.IProtocolFactory,
        *,
        clock: interfaces.IReactorTime,
        timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        on_failure: OnFailure | None = None,
        server: str = "server",
    ) -> None:
        super().__init__(inner_factory, clock=clock, timeout=timeout, on_failure=on_failure)
        self.server = server
        self.ready: Deferred[Any] = Deferred()

    def gate_opened(self, proto: _GateProtocol, inner: Any) -> None:
        if not self.ready.called:
            self.ready.callback(inner)

    def gate_failed(self, proto: _GateProtocol, error: HandshakeFailed) -> None:
        self.failures[error.reason] = self.failures.get(error.reason, 0) + 1
        self.log.error(
            "{gate} handshake with {server} failed: {reason} ({detail}); nothing was sent",
            gate=self.gate_name,
            server=self.server,
            reason=error.reason,
            detail=error.detail,
        )
        if self.on_failure is not None:
            try:
                self.on_failure(error.reason)
            except Exception:
                self.log.failure("on_failure hook raised")
        if not self.ready.called:
            self.ready.errback(error)

    def cancel(self) -> None:
        """Stop waiting: abort the connection still in its handshake."""
        for proto in list(self.pending):
            proto.transport.abortConnection()
        self.ready.addErrback(lambda _: None)


class _TLSClientGateFactory(_ClientGateFactory):
    gate_protocol = _TLSGateProtocol
    gate_name = "TLS"


@implementer(interfaces.IStreamClientEndpoint)
class _GatedClientEndpoint:
    """Connects through ``endpoint`` and fires only once the gate opened."""

    def __init__(
        self,
        endpoint: interfaces.IStreamClientEndpoint,
        make_gate: Callable[[interfaces.IProtocolFactory], _ClientGateFactory],
    ) -> None:
        self._endpoint = endpoint
        self._make_gate = make_gate

    def connect(self, protocolFactory: interfaces.IProtocolFactory) -> Deferred[Any]:
        gate = self._make_gate(protocolFactory)
        connecting = self._endpoint.connect(gate)

        def cancel(_: Deferred[Any]) -> None:
            gate.cancel()
            connecting.cancel()

        result: Deferred[Any] = Deferred(cancel)
        connecting.addCallback(lambda _proto: gate.ready)
        connecting.addCallbacks(result.callback, result.errback)
        return result


# -- shared-secret handshake -----------------------------------------------------


class _AuthServerProtocol(_GateProtocol):
    """Server side of the eth/1 handshake."""

    factory: AuthServerFactory

    def gate_started(self) -> None:
        f = self.factory
        if not f.allow_plaintext and not is_tls(self.transport):
            self._fail("plaintext", "shared-secret handshake refused over plaintext", close="abort")
            return
        self._decoder = NetstringDecoder(HANDSHAKE_MAX_LENGTH)
        self._raw = bytearray()
        self._server_nonce = _nonce()
        self.transport.write(encode(b"HELLO " + VERSION + b" " + self._server_nonce))

    def timeout_detail(self) -> str:
        return f"no AUTH within {self.factory.timeout:g} s"

    def handshake_data(self, data: bytes) -> None:
        self._raw += data
        frames = self._decoder.feed(data)
        if frames:
            first = frames[0]
            rest = bytes(self._raw[len(encode(first)) :])
            self._raw = bytearray()
            self._check(first, rest)
        elif self._decoder.error is not None:
            self._fail("bad-frame", self._decoder.error.detail, reply=b"ERR - auth")

    def _check(self, frame: bytes, rest: bytes) -> None:
        parts = frame.split(b" ")
        if parts[0] != b"AUTH":
            sha = hashlib.sha256(frame).hexdigest().encode("ascii")
            self._fail("not-auth", "first frame is not AUTH", reply=b"ERR " + sha + b" auth")
            return
        if (
            len(parts) != 4
            or not _NAME.match(parts[1])
            or not _HEX64.match(parts[2])
            or not _HEX64.match(parts[3])
        ):
            self._fail("malformed", "AUTH frame is malformed", reply=b"ERR - auth")
            return
        _, name, client_nonce, proof = parts
        secret = self.factory.secret
        expected = client_proof(secret, self._server_nonce, client_nonce, name)
        if not _proof_matches(expected, proof):
            self._fail(
                "bad-proof", f"wrong proof for client {name.decode('ascii')!r}", reply=b"ERR - auth"
            )
            return
        answer = server_proof(secret, self._server_nonce, client_nonce, name)
        self.transport.write(encode(b"AUTH-OK " + answer))
        client = name.decode("ascii")
        self.factory.log.info(
            "Client {client} authenticated from {peer}", client=client, peer=self.peer
        )
        self._open(client, rest)


class AuthServerFactory(_GateFactory):
    """Server side of the shared-secret handshake, wrapping the receiver's factory.

    Each connection is greeted with ``HELLO``; the inner protocol is built
    and connected (with ``client_id`` = the client's name) only after a
    valid ``AUTH``, and receives exactly the bytes after it. A wrong or
    missing ``AUTH`` is answered (``ERR - auth`` or ``ERR <sha> auth``) and
    closed, and nothing behind it is ever read; no ``AUTH`` within
    ``timeout`` seconds aborts the connection. Over a non-TLS transport each
    connection is aborted unless ``allow_plaintext``. At most
    ``max_pending`` handshakes run at once, ``max_pending_per_group`` from
    one address group; a newcomer past either evicts (aborts) an old one
    (:class:`PendingHandshakes`) and is never refused. ``on_failure(reason)``
    is called for each refusal (reasons: ``bad-proof``, ``not-auth``,
    ``malformed``, ``bad-frame``, ``timeout``, ``closed``, ``plaintext``,
    ``evicted``).
    """

    gate_protocol = _AuthServerProtocol
    gate_name = "Handshake"

    def __init__(
        self,
        inner_factory: interfaces.IProtocolFactory,
        secret: bytes,
        clock: interfaces.IReactorTime,
        timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        allow_plaintext: bool = False,
        *,
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
        _check_secret(secret)
        self.secret = secret
        self.allow_plaintext = allow_plaintext


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"the link secret must be at least {MIN_SECRET_BYTES} bytes")


class _AuthClientProtocol(_GateProtocol):
    """Client side of the eth/1 handshake."""

    factory: AuthClientFactory

    def gate_started(self) -> None:
        if not self.factory.allow_plaintext and not is_tls(self.transport):
            self._fail("plaintext", "shared-secret handshake refused over plaintext", close="abort")
            return
        self._decoder = NetstringDecoder(HANDSHAKE_MAX_LENGTH)
        self._raw = bytearray()
        self._stage = "hello"
        self._server_nonce = b""
        self._client_nonce = b""

    def timeout_detail(self) -> str:
        what = "HELLO" if self._stage == "hello" else "AUTH-OK"
        return f"no {what} from the server within {self.factory.timeout:g} s"

    def handshake_data(self, data: bytes) -> None:
        self._raw += data
        for frame in self._decoder.feed(data):
            del self._raw[: len(encode(frame))]
            if self._stage == "hello":
                self._hello(frame)
            else:
                self._auth_ok(frame, bytes(self._raw))
            if self.state != "waiting":
                return
        if self._decoder.error is not None:
            self._fail(
                "bad-frame",
                f"server sent a bad frame ({self._decoder.error.detail})",
                close="abort",
            )

    def _hello(self, frame: bytes) -> None:
        parts = frame.split(b" ")
        if len(parts) != 3 or parts[0] != b"HELLO":
            self._fail(
                "no-hello",
                f"the server did not greet us with HELLO (got {frame[:40]!r})",
                close="abort",
            )
            return
        if parts[1] != VERSION:
            self._fail(
                "version", f"the server speaks {parts[1][:20]!r}, not {VERSION!r}", close="abort"
            )
            return
        if not _HEX64.match(parts[2]):
            self._fail("no-hello", "the server's HELLO nonce is malformed", close="abort")
            return
        f = self.factory
        self._server_nonce = parts[2]
        self._client_nonce = _nonce()
        proof = client_proof(f.secret, self._server_nonce, self._client_nonce, f.name)
        self.transport.write(encode(b"AUTH " + f.name + b" " + self._client_nonce + b" " + proof))
        self._stage = "proof"

    def _auth_ok(self, frame: bytes, rest: bytes) -> None:
        f = self.factory
        parts = frame.split(b" ")
        if frame.startswith(b"ERR ") and frame.endswith(b" auth"):
            self._fail(
                "refused",
                "the server refused our credentials (wrong secret or name)",
                close="abort",
            )
            return
        if len(parts) != 2 or parts[0] != b"AUTH-OK" or not _HEX64.match(parts[1]):
            self._fail("unexpected", f"expected AUTH-OK, got {frame[:40]!r}", close="abort")
            return
        expected = server_proof(f.secret, self._server_nonce, self._client_nonce, f.name)
        if not _proof_matches(expected, parts[1]):
            self._fail(
                "bad-proof",
                "the server's proof is wrong: it does not know the secret",
                close="abort",
            )
            return
        self._raw = bytearray()
        f.log.info(
            "Authenticated to {server} as {name}", server=f.server, name=f.name.decode("ascii")
        )
        self._open(None, rest)


class AuthClientFactory(_ClientGateFactory):
    """Client side of the shared-secret handshake for one connection.

    Waits for ``HELLO``, answers ``AUTH``, checks the server's proof in
    constant time, and only then builds ``inner_factory``'s protocol and
    connects it (its ``connectionMade`` runs after mutual authentication);
    ``ready`` fires with that protocol, or fails with
    :class:`~eth_twisted.errors.HandshakeFailed`. On any failure the
    connection is aborted without a message frame ever being written. For a
    reconnecting client use :class:`AuthClientEndpoint`, which makes one of
    these per attempt.
    """

    gate_protocol = _AuthClientProtocol
    gate_name = "Handshake"

    def __init__(
        self,
        inner_factory: interfaces.IProtocolFactory,
        secret: bytes,
        name: str,
        clock: interfaces.IReactorTime,
        timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        allow_plaintext: bool = False,
        *,
        on_failure: OnFailure | None = None,
        server: str = "server",
    ) -> None:
        super().__init__(
            inner_factory, clock=clock, timeout=timeout, on_failure=on_failure, server=server
        )
        _check_secret(secret)
        raw_name = name.encode("ascii", "replace")
        if not _NAME.match(raw_name):
            raise ConfigError(
                f"client name {name!r}: 1-128 characters of letters, digits and . _ @ : -, "
                "starting with a letter or digit"
            )
        self.secret = secret
        self.name = raw_name
        self.allow_plaintext = allow_plaintext


@implementer(interfaces.IStreamClientEndpoint)
class AuthClientEndpoint(_GatedClientEndpoint):
    """A client endpoint that runs the shared-secret handshake on every connection.

    ``connect(factory)`` connects ``endpoint`` (usually
    :func:`client_tls_endpoint`) and fires with ``factory``'s protocol only
    after mutual authentication; a wrong secret, an impostor server, or no
    ``HELLO``/``AUTH-OK`` within ``timeout`` fails the attempt with
    :class:`~eth_twisted.errors.HandshakeFailed` (so ``ClientService`` backs
    off). Pass it to ``DeliveryService`` as its endpoint.
    """

    def __init__(
        self,
        endpoint: interfaces.IStreamClientEndpoint,
        secret: bytes,
        name: str,
        clock: interfaces.IReactorTime,
        timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        allow_plaintext: bool = False,
        *,
        on_failure: OnFailure | None = None,
        server: str = "server",
    ) -> None:
        # Validate now (a bad name or secret is a start-up error, not a retry loop).
        AuthClientFactory(Factory(), secret, name, clock, timeout, allow_plaintext)

        def make(factory: interfaces.IProtocolFactory) -> _ClientGateFactory:
            return AuthClientFactory(
                factory,
                secret,
                name,
                clock,
                timeout,
                allow_plaintext,
                on_failure=on_failure,
                server=server,
            )

        super().__init__(endpoint, make)
