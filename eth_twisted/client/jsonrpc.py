"""One JSON-RPC request over HTTP, and the checks an answer must pass before it is believed.

:func:`post` sends one request through ``twisted.web.client.Agent``: never redirected,
never inflated, its body capped in bytes (why not treq is in its docstring).
:func:`parse_envelope`, :func:`check_block` and :func:`hex_quantity` bound and check what
an answer holds; :func:`classify` names a transport failure's kind. docs/architecture.md
(section 1, "RPC endpoints") places it on the data path; docs/hostile-input.md (items
9-11) lists the attacks these checks stop.
"""

from __future__ import annotations

import base64
import email.utils
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import unquote, urlsplit, urlunsplit

from hyperlink import EncodedURL
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from eth_twisted.client.tcp import quickack, tcp_socket
from eth_twisted.errors import RPCError

MAX_QUANTITY = 2**63 - 1
"""Largest block number or timestamp believed (the server's BIGINT range)."""
MAX_CHAIN_ID = 2**63 - 37
"""Largest chain id believed: floor(MAX_UINT64 / 2) - 36, as EIP-2294 bounds it."""
MAX_HEX_DIGITS = 16
"""Longest hex quantity read (leading zeros included); longer ones are refused before int()."""
ERROR_BODY_CAP = 64 * 1024
"""Most bytes read of a non-2xx answer's body (only its status is used)."""
RETRY_AFTER_MAX = 600.0
"""Longest Retry-After honoured (a provider asking for hours is clamped)."""

RATE_LIMIT_CODES = frozenset({-32005, -32007})
_RATE_LIMIT_WORDS = re.compile(
    r"rate.?limit|too many requests|exceeded.*(quota|capacity|limit)", re.I
)
_QUANTITY = re.compile(rf"0x[0-9a-fA-F]{{1,{MAX_HEX_DIGITS}}}\Z")
_HASH = re.compile(r"0x[0-9a-fA-F]{64}\Z")


class RPCFailure(RPCError):
    """One classified RPC failure: ``kind`` names it, ``endpoint`` is the safe label."""

    def __init__(
        self, message: str, kind: str, endpoint: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(f"{endpoint}: {message}" if endpoint else message)
        self.kind = kind
        self.endpoint = endpoint
        self.retry_after = retry_after


def endpoint_label(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: no user info, path or query (they hold keys)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme or 'http'}://{host}" + (f":{port}" if port is not None else "")


def redact_url(url: str) -> str:
    """``url`` with the password of any ``user:password@`` replaced by ``***`` (for error messages)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url[:200]
    netloc, slash, tail = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    return f"{scheme}{sep}{netloc}{slash}{tail}"[:200]


@dataclass(frozen=True)
class Target:
    """Where one endpoint's requests go: the URL without credentials, and its auth header."""

    url: str = field(repr=False)
    """The URL to POST to, with any ``user:password@`` removed (may still hold a key in its path)."""
    label: str
    authorization: bytes | None = field(default=None, repr=False)
    """``Basic ...`` when the URL carried credentials; never logged."""

    @classmethod
    def from_url(cls, url: str) -> Target:
        """Split ``url``'s credentials off into a basic-auth header.

        Raises ValueError for a URL that is not ``http(s)://host...`` (the
        message never repeats the URL: it may hold a password).
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL with a host name")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("the URL's port is not a number from 0 to 65535") from None
        authorization = None
        if parts.username is not None or parts.password is not None:
            user = unquote(parts.username or "")
            password = unquote(parts.password or "")
            if ":" in user:
                raise ValueError("a basic-auth user name cannot contain ':'")
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            authorization = f"Basic {token}".encode("ascii")
        host = parts.hostname
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{port}" if port is not None else "")
        clean = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
        return cls(url=clean, label=endpoint_label(clean), authorization=authorization)


def parse_retry_after(value: str | bytes | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta seconds or HTTP date), or None."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()[:64]
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None:  # defensive: typeshed says it never returns None
            return None  # type: ignore[unreachable]
        try:
            seconds = when.timestamp() - now
        except (OverflowError, OSError, ValueError):
            return None
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


def _preview(value: Any) -> str:
    """A short repr of a peer's value, cut before repr() so a huge one costs nothing."""
    if isinstance(value, str | bytes):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if isinstance(value, dict | list):
        return type(value).__name__
    return repr(value)[:40]


def hex_quantity(value: Any, what: str, label: str = "", limit: int = MAX_QUANTITY) -> int:
    """``value`` as an int if it is a hex quantity of at most 16 digits and at most ``limit``."""
    if not isinstance(value, str) or len(value) > 2 + MAX_HEX_DIGITS or not _QUANTITY.match(value):
        raise RPCFailure(
            f"{what} is not a hex quantity of at most {MAX_HEX_DIGITS} digits: {_preview(value)}",
            "bad-result",
            label,
        )
    number = int(value, 16)
    if number > limit:
        raise RPCFailure(f"{what} {_preview(value)} is over {limit}", "bad-result", label)
    return number


def check_hash(value: Any, what: str, label: str = "") -> str:
    """``value`` lowercased if it is a 32-byte ``0x`` hex hash."""
    if not isinstance(value, str) or len(value) != 66 or not _HASH.match(value):
        raise RPCFailure(
            f"{what} is not a 32-byte hex hash: {_preview(value)}", "bad-result", label
        )
    return value.lower()


def check_block(block: Any, number: int, label: str = "") -> dict[str, Any]:
    """The fields the payloads need from an ``eth_getBlockByNumber`` result for ``number``.

    ``None`` means the node does not have that block yet (``null-result``);
    anything malformed or out of bounds is ``bad-result``. The result is a
    new dict of ``number``, ``hash``, ``parentHash`` and ``timestamp`` in
    canonical form (lowercase hex), whatever else the node sent, so a fetched
    block holds a few hundred bytes however large the node's answer was.

    Every quantity in an answer is bounded before ``int()`` sees it: block
    numbers and timestamps below 2**63 (:data:`MAX_QUANTITY`), chain ids at most
    :data:`MAX_CHAIN_ID` (EIP-2294), hex strings at most 16 digits
    (:func:`hex_quantity`); hashes are 32 bytes of hex (:func:`check_hash`).
    """
    if block is None:
        raise RPCFailure(f"block {number} not available yet", "null-result", label)
    if not isinstance(block, dict):
        raise RPCFailure(f"block {number} is not an object", "bad-result", label)
    got = hex_quantity(block.get("number"), "block number", label)
    if got != number:
        raise RPCFailure(f"asked for block {number}, got {got}", "bad-result", label)
    return {
        "number": hex(number),
        "hash": check_hash(block.get("hash"), f"block {number}'s hash", label),
        "parentHash": check_hash(block.get("parentHash"), f"block {number}'s parentHash", label),
        "timestamp": hex(
            hex_quantity(block.get("timestamp"), f"block {number}'s timestamp", label)
        ),
    }


def parse_envelope(raw: bytes, request_id: int, label: str = "") -> Any:
    """The ``result`` of a JSON-RPC 2.0 answer to ``request_id``, or the classified failure."""
    try:
        reply = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        looks = "an HTML page" if raw.lstrip()[:1] == b"<" else f"{len(raw)} bytes of non-JSON"
        raise RPCFailure(f"answer is {looks}", "bad-json", label) from None
    if not isinstance(reply, dict):
        raise RPCFailure("answer is not a JSON-RPC object", "bad-envelope", label)
    return envelope_result(reply, request_id, label)


def envelope_result(reply: dict[str, Any], request_id: int, label: str = "") -> Any:
    """The ``result`` of a decoded JSON-RPC 2.0 answer object, or the classified failure.

    An error object is ``rate-limit`` (codes -32005 and -32007, or a message that says
    so) or ``rpc-error``; anything else malformed is ``bad-envelope``.
    """
    if reply.get("jsonrpc") != "2.0":
        raise RPCFailure("answer lacks jsonrpc 2.0", "bad-envelope", label)
    reply_id = reply.get("id")
    if type(reply_id) is not int or reply_id != request_id:
        raise RPCFailure(
            f"answer id {_preview(reply_id)} is not our {request_id}", "bad-envelope", label
        )
    if ("result" in reply) == ("error" in reply):
        raise RPCFailure("answer must carry exactly one of result and error", "bad-envelope", label)
    if "error" in reply:
        err = reply["error"]
        if not isinstance(err, dict) or type(err.get("code")) is not int:
            raise RPCFailure("answer has a malformed error object", "bad-envelope", label)
        code = err["code"]
        message = err.get("message", "")
        message = message[:200] if isinstance(message, str) else _preview(message)
        if code in RATE_LIMIT_CODES or _RATE_LIMIT_WORDS.search(message):
            raise RPCFailure(f"rate limited: {code} {message}", "rate-limit", label)
        code_text = str(code) if -(10**12) < code < 10**12 else "(out of range)"
        raise RPCFailure(f"JSON-RPC error {code_text}: {message}", "rpc-error", label)
    return reply["result"]


def status_failure(
    code: int, label: str, retry_after: float | None, location: str | None
) -> RPCFailure:
    """The failure a non-2xx HTTP status is: ``http-3xx``, ``http-429``, ``http-4xx``, ``http-5xx``."""
    if 300 <= code < 400:
        where = f" to {endpoint_label(location)}" if location else ""
        return RPCFailure(
            f"HTTP {code} redirect{where}; redirects are never followed", "http-3xx", label
        )
    if code == 429:
        return RPCFailure("HTTP 429 Too Many Requests", "http-429", label, retry_after)
    if code >= 500:
        return RPCFailure(f"HTTP {code}", "http-5xx", label, retry_after)
    if code >= 400:
        return RPCFailure(f"HTTP {code}", "http-4xx", label)
    return RPCFailure(f"HTTP {code}", "http-other", label)


class _CappedBody(Protocol):
    """Collects a response body up to ``cap`` bytes; past it, closes the connection.

    Like ``treq.collect`` with a capping collector, plus a canceller that
    closes the connection, so a stalled body never holds a socket after the
    call's timeout.
    """

    def __init__(self, cap: int, label: str, length: int | None = None) -> None:
        self.cap = cap
        self.label = label
        self.length = length
        self.size = 0
        self.chunks: list[bytes] = []
        self.finished: Deferred[bytes] | None = Deferred(self._cancel)

    def _close(self) -> None:
        transport = self.transport
        if transport is not None:
            # TransportProxyProducer (what Agent hands a body protocol) has both.
            close = getattr(transport, "loseConnection", None)
            if close is None:
                close = transport.stopProducing  # type: ignore[attr-defined]
            close()

    def _cancel(self, d: Deferred[bytes]) -> None:
        self.finished = None
        self._close()

    def connectionMade(self) -> None:
        if self.length is not None and self.length > self.cap and self.finished is not None:
            d, self.finished = self.finished, None
            self._close()
            d.errback(
                RPCFailure(
                    f"response body of {self.length} bytes is over {self.cap}",
                    "too-large",
                    self.label,
                )
            )

    def dataReceived(self, data: bytes) -> None:
        if self.finished is None:
            return
        self.size += len(data)
        if self.size > self.cap:
            d, self.finished = self.finished, None
            self.chunks = []
            self._close()
            d.errback(RPCFailure(f"response body over {self.cap} bytes", "too-large", self.label))
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
        if self.finished is None:
            return
        d, self.finished = self.finished, None
        if reason.check(ResponseDone, PotentialDataLoss):
            # PotentialDataLoss: a body without a length ended by close. It may be
            # cut short; the JSON and envelope checks catch that.
            d.callback(b"".join(self.chunks))
        else:
            d.errback(reason)


def collect_capped(response: Any, cap: int, label: str = "") -> Deferred[bytes]:
    """The body of ``response`` (an IResponse), failing ``too-large`` past ``cap`` bytes."""
    length = getattr(response, "length", None)
    if length == 0:
        return defer.succeed(b"")
    body = _CappedBody(cap, label, length if isinstance(length, int) else None)
    d = body.finished
    assert d is not None
    response.deliverBody(body)
    return d


class _Discard(Protocol):
    """A body protocol that closes the connection at once (a body we will not read)."""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body that is written at once (synchronously, as treq's test producer does)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: the body was written whole."""

    def resumeProducing(self) -> None:
        """Nothing to resume."""

    def stopProducing(self) -> None:
        """Nothing to stop."""


@dataclass(frozen=True)
class Answer:
    """What came back for one POST: the status, Retry-After in seconds, and the body."""

    code: int
    retry_after: float | None
    body: bytes
    location: str | None = None


async def post(
    agent: Any, target: Target, body: bytes, *, max_body: int, now: Callable[[], float]
) -> Answer:
    """POST ``body`` to ``target`` through ``agent`` (an IAgent); never follows or inflates anything.

    A 2xx answer's body is read up to ``max_body`` bytes; other answers'
    bodies up to :data:`ERROR_BODY_CAP` (their status is what counts). An
    encoded 2xx answer is ``bad-encoding`` (we asked for identity).

    The request goes straight through ``twisted.web.client.Agent`` (the library
    treq is built on, see :func:`capped_agent`), not through ``treq.HTTPClient``:
    every treq request is wrapped in a ``ContentDecoderAgent`` that asks for gzip
    and inflates it without a bound (one 4 MiB compressed body becomes gigabytes
    before any cap sees it), in a redirect agent (a node's 303 sends us, as a GET,
    to any host it names), in a cookie jar shared by every endpoint, and in a
    response buffer. We need none of them, so none is there:

    * no ``Accept-Encoding`` but ``identity``, and a response that is encoded
      anyway is the endpoint's ``bad-encoding`` failure (nothing is inflated);
    * redirects are never followed: a 3xx is the endpoint's ``http-3xx``;
    * the body is read with a byte cap (:func:`collect_capped`);
    * a URL's ``user:password@`` becomes an HTTP basic ``Authorization`` header
      and is removed from the URL (:meth:`Target.from_url`), so it reaches no log,
      label or metric.
    """
    headers = Headers(
        {
            b"Content-Type": [b"application/json"],
            b"Accept": [b"application/json"],
            b"Accept-Encoding": [b"identity"],
            b"User-Agent": [b"eth-twisted"],
        }
    )
    if target.authorization is not None:
        headers.setRawHeaders(b"Authorization", [target.authorization])
    uri = EncodedURL.from_text(target.url).to_uri().to_text().encode("ascii")
    response = await agent.request(b"POST", uri, headers, _BytesProducer(body))
    code = int(response.code)
    label = target.label
    retry_after = None
    location = None
    if code == 429 or code >= 500:
        values = response.headers.getRawHeaders(b"retry-after")
        retry_after = parse_retry_after(values[0], now()) if values else None
    if 300 <= code < 400:
        values = response.headers.getRawHeaders(b"location")
        location = values[0][:2048].decode("latin-1") if values else None
    if not 200 <= code < 300:
        try:
            raw = await collect_capped(response, ERROR_BODY_CAP, label)
        except RPCFailure:
            raw = b""
        return Answer(code, retry_after, raw, location)
    encodings = [
        e.strip().lower()
        for value in response.headers.getRawHeaders(b"content-encoding") or []
        for e in value.split(b",")
    ]
    if any(e not in (b"", b"identity") for e in encodings):
        response.deliverBody(_Discard())
        shown = b", ".join(encodings)[:40].decode("latin-1")
        raise RPCFailure(
            f"answer is {shown}-encoded; only identity was asked for", "bad-encoding", label
        )
    raw = await collect_capped(response, max_body, label)
    return Answer(code, None, raw)


def is_tls_failure(e: BaseException) -> bool:
    """Whether ``e`` (or one of twisted.web's wrapped reasons) is a TLS handshake or verification failure."""
    from OpenSSL import SSL

    candidates: list[Any] = [e]
    for reason in getattr(e, "reasons", None) or ():
        candidates.append(reason.value if isinstance(reason, Failure) else reason)
    for c in candidates:
        if isinstance(c, SSL.Error):
            return True
        if type(c).__name__ in ("VerificationError", "CertificateError"):
            return True
    return False


def classify(e: BaseException, label: str) -> RPCFailure | None:
    """The failure kind of an exception from the transport, or None for an unexpected one.

    ``dns``, ``connect``, ``timeout``, ``tls`` and ``connection-lost``: the
    expected network trouble (one line per outage, never a traceback).
    """
    if isinstance(e, defer.TimeoutError | error.TimeoutError):
        return RPCFailure("timed out", "timeout", label)
    if has_reason(e, ResponseTooLarge):
        return RPCFailure(
            "more bytes for one response (headers included) than the cap; connection aborted",
            "too-large",
            label,
        )
    if isinstance(e, error.DNSLookupError):
        return RPCFailure("host name does not resolve", "dns", label)
    if is_tls_failure(e):
        return RPCFailure(f"TLS failed: {reasons(e)}", "tls", label)
    if isinstance(e, error.ConnectError):
        return RPCFailure(f"cannot connect: {e.__class__.__name__}", "connect", label)
    if isinstance(e, ResponseNeverReceived | RequestTransmissionFailed | ResponseFailed):
        return RPCFailure(f"connection lost: {reasons(e)}", "connection-lost", label)
    if isinstance(e, error.ConnectionLost | error.ConnectionDone):
        return RPCFailure(f"connection lost: {e.__class__.__name__}", "connection-lost", label)
    return None


def cancelled(e: BaseException) -> bool:
    """Whether ``e`` is, or wraps (twisted.web's reasons lists), a cancellation."""
    if isinstance(e, defer.CancelledError):
        return True
    return any(
        isinstance(r, Failure) and r.check(defer.CancelledError)
        for r in getattr(e, "reasons", None) or ()
    )


def reasons(e: BaseException) -> str:
    """The class names of the failures twisted.web wrapped in ``e``."""
    wrapped = getattr(e, "reasons", None)
    if not wrapped:
        return e.__class__.__name__
    return ", ".join(
        r.value.__class__.__name__ if isinstance(r, Failure) else str(r) for r in wrapped
    )


STALE_CONNECTION = (ResponseNeverReceived, RequestTransmissionFailed)
"""Failures before any answer: a stale pooled connection, retried once (reads are idempotent)."""

HEADER_ALLOWANCE = 64 * 1024
"""Bytes a response may carry beyond its body cap (status line, headers, chunk framing)."""


class ResponseTooLarge(Exception):
    """A connection received more bytes for one response than its cap; it was aborted."""


def has_reason(e: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``e`` is, or wraps (twisted.web's reasons lists), an exception of ``kind``."""
    if isinstance(e, kind):
        return True
    return any(isinstance(r, Failure) and r.check(kind) for r in getattr(e, "reasons", None) or ())


class _ByteCap(ProtocolWrapper):
    """Counts the bytes a connection receives for each request; past the cap, aborts it.

    Twisted's HTTP client parser keeps every header line it is sent, with no
    limit on their number: a node streaming headers would grow the client
    without bound until the call's timeout (2 GB in 5 s on loopback). The
    count restarts whenever a request is written, so a persistent connection
    gets a fresh allowance per response.
    """

    received = 0
    over = False
    _sock: Any = None

    def makeConnection(self, transport: Any) -> None:
        # Requests are small writes that must not wait for an ACK (Nagle); the
        # QUICKACK re-arm is in dataReceived (both: HEADS.md 6.7).
        try:
            transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass  # not TCP (tests)
        self._sock = tcp_socket(transport)
        super().makeConnection(transport)

    def write(self, data: bytes) -> None:
        self.received = 0
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        self.received = 0
        super().writeSequence(data)

    def dataReceived(self, data: bytes) -> None:
        quickack(self._sock)
        if self.over:
            return
        self.received += len(data)
        cap = cast(_ByteCapFactory, self.factory).cap
        if self.received > cap:
            self.over = True
            transport: Any = self.transport
            transport.abortConnection()
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._sock = None
        if self.over:
            cap = cast(_ByteCapFactory, self.factory).cap
            reason = Failure(ResponseTooLarge(f"more than {cap} bytes for one response"))
        super().connectionLost(reason)


class _ByteCapFactory(WrappingFactory):
    protocol = _ByteCap
    noisy = False

    def __init__(self, wrapped: Any, cap: int) -> None:
        super().__init__(wrapped)
        self.cap = cap


def _inner_protocol(wrapper: Any) -> Any:
    return wrapper.wrappedProtocol


@implementer(IStreamClientEndpoint)
class _CappedEndpoint:
    """An endpoint whose connections are wrapped in :class:`_ByteCap`; it hands back the inner protocol."""

    def __init__(self, endpoint: IStreamClientEndpoint, cap: int) -> None:
        self.endpoint = endpoint
        self.cap = cap

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = self.endpoint.connect(_ByteCapFactory(factory, self.cap))
        return d.addCallback(_inner_protocol)

    def __repr__(self) -> str:
        return f"<capped {self.endpoint!r}>"


@implementer(IAgentEndpointFactory)
class CappedEndpointFactory:
    """What ``Agent`` uses by default, with every connection's bytes per response capped at ``cap``.

    That default is TCP for http, and TLS with browser-like checks for https.
    """

    def __init__(self, reactor: Any, cap: int, connect_timeout: float | None = None) -> None:
        from twisted.web.client import BrowserLikePolicyForHTTPS

        self.reactor = reactor
        self.cap = cap
        self.connect_timeout = connect_timeout
        self.policy = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
        from twisted.web.error import SchemeNotSupported

        kwargs: dict[str, Any] = {}
        if self.connect_timeout is not None:
            kwargs["timeout"] = self.connect_timeout
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self.reactor, uri.host.decode("ascii"), uri.port, **kwargs
        )
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self.policy.creatorForNetloc(uri.host, uri.port), endpoint)
        elif uri.scheme != b"http":
            raise SchemeNotSupported(f"unsupported scheme {uri.scheme!r}")
        return _CappedEndpoint(endpoint, self.cap)


def capped_agent(reactor: Any, max_body: int, connect_timeout: float, pool: Any) -> Any:
    """A ``twisted.web.client.Agent`` on ``pool`` whose responses are capped in bytes, headers included."""
    from twisted.web.client import Agent

    factory = CappedEndpointFactory(reactor, max_body + HEADER_ALLOWANCE, connect_timeout)
    return Agent.usingEndpointFactory(reactor, factory, pool=pool)
