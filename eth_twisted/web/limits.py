"""What a hostile HTTP client meets at the stats site's listener.

Every stats listener (the server's ``--stats``, the client's ``--stats`` and ``eth run``'s
combined site) serves a :class:`GuardedSite`, whose :class:`GuardedChannel` holds each
connection to the limits of :class:`SiteLimits` (listed in its docstring and in the README,
"Stats API and dashboard"). docs/hostile-input.md (items 14 and 15) lists the attacks they
stop.
"""

from __future__ import annotations

import json
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import Site

from eth_twisted.model import normalise_ip, peer_group
from eth_twisted.options import int_in, option_rows, positive_float, setting, settings_from
from eth_twisted.web.pages import MAX_PAYLOAD

log = Logger()

MIN_PAGE_BYTES = 6 * MAX_PAYLOAD + 4096
"""The smallest page budget: one record whose shown payload escapes entirely (6x), plus its fields."""

ABORT_GRACE = 5.0
"""Seconds a closing connection may take to read its last answer before it is aborted."""

LOG_EVERY = 60.0
"""Seconds between two log lines about refused or cut connections."""

SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'self'; base-uri 'none'; object-src 'none'; "
        "frame-ancestors 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

REASONS = {
    400: b"Bad Request",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    421: b"Misdirected Request",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}
"""Reason phrases Twisted's table lacks (421, 431) or words differently."""


@dataclass(frozen=True, slots=True)
class SiteLimits:
    """The limits of one stats listener; the first three are the options of their names."""

    stats_max_connections: int = setting(
        64,
        "Connections the stats site holds at once; at the cap the longest-waiting idle one is cut",
        int_in(1, 1_000_000),
    )
    stats_max_per_ip: int = setting(
        16, "Stats site connections per client address (IPv6: per /64)", int_in(1, 1_000_000)
    )
    stats_header_timeout: float = setting(
        10.0,
        "Seconds from a stats request's first byte to its last header (not reset by a trickle)",
        positive_float,
    )
    idle_timeout: float = 30.0
    """Seconds a connection may wait for its next request."""
    max_line: int = 8192
    """Longest request line or header line, in bytes."""
    max_header_bytes: int = 16384
    """Request line plus all headers, in bytes."""
    max_headers: int = 50
    """Header lines per request."""
    heavy_requests: int = 2
    """Reads of stored records (/api/messages, /api/blocks) served at once; the rest wait their turn."""
    page_bytes: int = 1024 * 1024
    """Largest JSON body of one page of records: the page stops before it would pass this."""

    def check(self) -> None:
        """Raise ValueError naming the first limit that makes no sense."""
        if self.stats_max_connections < 1 or self.stats_max_per_ip < 1:
            raise ValueError("stats_max_connections and stats_max_per_ip must be at least 1")
        if self.stats_header_timeout <= 0 or self.idle_timeout <= 0:
            raise ValueError("stats_header_timeout and idle_timeout must be positive")
        if min(self.max_line, self.max_header_bytes, self.max_headers, self.heavy_requests) < 1:
            raise ValueError("header limits and heavy_requests must be at least 1")
        if self.page_bytes < MIN_PAGE_BYTES:
            raise ValueError(
                f"page_bytes must be at least {MIN_PAGE_BYTES} (one record of the largest kind)"
            )


STATS_LIMIT_OPTIONS: list[list[Any]] = option_rows(SiteLimits)
"""The stats listener's options, shared by ``eth server``, ``eth client`` and ``eth run``."""


def limits_from_options(config: Any) -> SiteLimits:
    """The :class:`SiteLimits` of parsed options holding :data:`STATS_LIMIT_OPTIONS`."""
    return settings_from(SiteLimits, config)


def error_bytes(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> bytes:
    """A complete HTTP/1.1 answer (JSON error body, security headers) that closes the connection."""
    body = json.dumps({"error": code, "message": message}, separators=(",", ":")).encode()
    reason = REASONS.get(status) or http.RESPONSES.get(status, b"Error")
    lines = [
        b"HTTP/1.1 %d %s" % (status, reason),
        b"Content-Type: application/json; charset=utf-8",
        b"Content-Length: %d" % len(body),
        b"Cache-Control: no-store",
        b"Connection: close",
        b"Server: eth-twisted",
    ]
    for name, value in {**SECURITY_HEADERS, **(headers or {})}.items():
        lines.append(f"{name}: {value}".encode("latin-1"))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def group_of(address: Any) -> str:
    """The key connections are capped by: the peer's address, or its /64 for IPv6."""
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return type(address).__name__  # a UNIX socket: every peer is one group
    return peer_group(normalise_ip(host))


class ConnectionTable:
    """Open connections of one site, by address group, with the waiting ones in age order.

    "Waiting" is every connection without a request in progress (reading
    headers, idle between requests, or closing): those may be cut to admit a
    new one. A connection whose request is being answered is never cut here;
    its handler has its own deadline.
    """

    def __init__(self, limits: SiteLimits, clock: IReactorTime) -> None:
        self.limits = limits
        self.clock = clock
        self.open: set[GuardedChannel] = set()
        self.per_group: Counter[str] = Counter()
        self.waiting: OrderedDict[GuardedChannel, None] = OrderedDict()
        self.waiting_by_group: dict[str, OrderedDict[GuardedChannel, None]] = {}
        self.refused: Counter[str] = Counter()
        """Every refusal and cut since start, by reason (the error code)."""
        self._unlogged: Counter[str] = Counter()
        self._logged_at: float | None = None

    def admit(self, channel: GuardedChannel) -> bool:
        """Take ``channel`` in, cutting the longest-waiting connection at a cap; False to refuse it."""
        group = channel.group
        if self.per_group[group] >= self.limits.stats_max_per_ip and not self._cut_oldest(
            self.waiting_by_group.get(group)
        ):
            return False
        if len(self.open) >= self.limits.stats_max_connections and not self._cut_oldest(
            self.waiting
        ):
            return False
        self.open.add(channel)
        self.per_group[group] += 1
        self.wait(channel)
        return True

    def _cut_oldest(self, queue: OrderedDict[GuardedChannel, None] | None) -> bool:
        if not queue:
            return False
        victim = next(iter(queue))
        self.note("evicted")
        victim.evict()
        return True

    def wait(self, channel: GuardedChannel) -> None:
        """``channel`` has no request in progress (from now: the newest waiter)."""
        if channel not in self.open:
            return
        self.waiting.pop(channel, None)
        self.waiting[channel] = None
        queue = self.waiting_by_group.setdefault(channel.group, OrderedDict())
        queue.pop(channel, None)
        queue[channel] = None

    def busy(self, channel: GuardedChannel) -> None:
        """``channel``'s request is being answered: it is not cut to make room."""
        self.waiting.pop(channel, None)
        queue = self.waiting_by_group.get(channel.group)
        if queue is not None:
            queue.pop(channel, None)

    def gone(self, channel: GuardedChannel) -> None:
        """``channel`` is closed (or being aborted): its place is free."""
        if channel not in self.open:
            return
        self.open.discard(channel)
        self.busy(channel)
        group = channel.group
        self.per_group[group] -= 1
        if self.per_group[group] <= 0:
            del self.per_group[group]
            self.waiting_by_group.pop(group, None)

    def note(self, reason: str, warn: bool = True) -> None:
        """Count a refusal or cut; log the counts at most once per :data:`LOG_EVERY` seconds.

        ``warn=False`` counts without logging (an idle keep-alive connection timing out is normal).
        """
        self.refused[reason] += 1
        if not warn:
            return
        self._unlogged[reason] += 1
        now = self.clock.seconds()
        if self._logged_at is None or now - self._logged_at >= LOG_EVERY:
            log.warn(
                "Stats site refused or cut connections: {counts} (open {open}, cap {cap}, "
                "per address {per_ip})",
                counts=dict(self._unlogged),
                open=len(self.open),
                cap=self.limits.stats_max_connections,
                per_ip=self.limits.stats_max_per_ip,
            )
            self._unlogged.clear()
            self._logged_at = now


class GuardedChannel(http.HTTPChannel):
    """Twisted's HTTP/1.1 channel with the stats site's limits (:class:`SiteLimits`).

    - a whole-request header deadline: from the first byte of a request to its
      last header, not a rolling idle timer, so a trickle of one byte every few
      seconds is answered 408 and closed;
    - small header limits (line length, count, total bytes): 414/431 and close;
    - no request bodies: a request declaring one (``Content-Length`` > 0 or
      chunked) is answered 413 (405 for a method other than GET/HEAD) at its
      headers, before anything is read or spooled, and closed;
    - a connection cap, overall and per address (IPv6: per /64): at a cap the
      connection that has waited longest without a request in progress is cut,
      so an attacker's parked connections make room for a well-behaved client,
      and only when every connection is busy is the new one answered 503;
    - an idle timeout between requests, and pipelined requests are not parsed
      while the peer leaves answers unread (the answers it is owed stay one at
      a time, however many requests it queued).

    Every refusal is a JSON error with the security headers, written before the
    connection is closed; a peer that does not read it is aborted after
    :data:`ABORT_GRACE` seconds. Refusals are counted and logged at most once a
    minute, never one line per connection.
    """

    limits: SiteLimits = SiteLimits()
    table: ConnectionTable
    group = ""
    _closing = False
    _awaiting = True
    _header_call: IDelayedCall | None = None
    _abort_call: IDelayedCall | None = None
    _held: list[bytes] | None = None

    @property
    def _wire(self) -> Any:
        """The transport (typed loosely: TCP, TLS and test transports all abort)."""
        return self.transport

    def connectionMade(self) -> None:
        """Start the idle timer; take a place in the table or be refused (503)."""
        super().connectionMade()
        self.group = group_of(self._wire.getPeer())
        if not self.table.admit(self):
            self.refuse(
                503,
                "busy",
                "too many connections to the stats site; try again",
                {"Retry-After": "1"},
            )

    # -- reading -----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Start the header deadline on a request's first byte; hold input the peer must wait with."""
        if self._closing:
            return
        if self._held is not None:
            self._held.append(data)
            return
        if self._awaiting and self._header_call is None and data:
            self._header_call = self.callLater(
                self.limits.stats_header_timeout, self._headers_too_slow
            )
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        """Nothing is parsed once the connection is closing."""
        if not self._closing:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        """The headers are in: stop the deadline; refuse a body before anything of it is read."""
        self._stop_header_deadline()
        self._awaiting = False
        if self.length != 0:  # Content-Length > 0, or chunked (None)
            if self._command in (b"GET", b"HEAD"):
                self.refuse(413, "body-not-allowed", "requests with a body are not accepted here")
            else:
                self.refuse(
                    405,
                    "method-not-allowed",
                    "only GET and HEAD are supported",
                    {"Allow": "GET, HEAD"},
                )
            return
        self.table.busy(self)
        super().allHeadersReceived()

    def lineLengthExceeded(self, line: bytes) -> None:
        """A request line or header line over ``max_line``: 414 or 431, and close."""
        if self._receivedHeaderSize == 0:
            self.refuse(
                414, "uri-too-long", f"the request line is longer than {self.MAX_LENGTH} bytes"
            )
        else:
            self.refuse(
                431, "headers-too-large", f"a header line is longer than {self.MAX_LENGTH} bytes"
            )

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Twisted's 400 for a malformed request, and for too many or too large headers (431)."""
        if (
            self._receivedHeaderSize > self.totalHeadersSize
            or self._receivedHeaderCount > self.maxHeaders
        ):
            self.refuse(
                431,
                "headers-too-large",
                f"at most {self.maxHeaders} headers and {self.totalHeadersSize} bytes of them",
            )
        else:
            self.refuse(400, "bad-request", "malformed HTTP request")

    def _headers_too_slow(self) -> None:
        self._header_call = None
        self.refuse(
            408,
            "request-timeout",
            f"the request's headers did not arrive within {self.limits.stats_header_timeout:g} s",
        )

    def _stop_header_deadline(self) -> None:
        if self._header_call is not None:
            if self._header_call.active():
                self._header_call.cancel()
            self._header_call = None

    # -- answering -----------------------------------------------------------------------

    def requestDone(self, request: Any) -> None:
        """Back to waiting; while the peer leaves answers unread, its pipelined requests wait too."""
        self._awaiting = True
        self.table.wait(self)
        if self.persistent and self._waitingForTransport and not self._closing:
            # Whatever the peer sent after this request: the channel's buffer (an answer
            # that took a while) or the line parser's (an answer written at once).
            self._held = [*self._dataBuffer, self._buffer]
            self._dataBuffer, self._buffer = [], b""
            super().requestDone(request)
            self._networkProducer.pauseProducing()
            return
        super().requestDone(request)

    def resumeProducing(self) -> None:
        """The peer read its answers: parse the requests it queued meanwhile."""
        super().resumeProducing()
        if self._held is not None and not self._handlingRequest:
            held, self._held = b"".join(self._held), None
            if held:
                self.dataReceived(held)

    # -- closing -------------------------------------------------------------------------

    def refuse(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        """Answer a JSON error and close (aborting after :data:`ABORT_GRACE` if it is not read)."""
        if self._closing:
            return
        self.table.note(code)
        self._wire.write(error_bytes(status, code, message, headers))
        self._close()

    def timeoutConnection(self) -> None:
        """Idle too long between requests (or answers unread that long): close, without a log line."""
        self.table.note("idle-timeout", warn=False)
        self._close()

    def evict(self) -> None:
        """Cut at once to make room for a new connection."""
        self._closing = True
        self._stop_header_deadline()
        self.table.gone(self)
        self._wire.abortConnection()

    def _close(self) -> None:
        self._closing = True
        self._stop_header_deadline()
        self.setTimeout(None)
        self.loseConnection()
        if self._abort_call is None:
            self._abort_call = self.callLater(ABORT_GRACE, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        self._wire.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Free the place and stop every timer."""
        self._closing = True
        self._stop_header_deadline()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        self.table.gone(self)
        super().connectionLost(reason)


class GuardedSite(Site):
    """A ``Site`` whose connections are :class:`GuardedChannel` (HTTP/1.1 only).

    No tracebacks in answers and no per-request access log (a reverse proxy
    keeps those; metrics count what matters).
    """

    protocol = GuardedChannel  # type: ignore[assignment]
    displayTracebacks = False

    def __init__(self, resource: Any, limits: SiteLimits, clock: IReactorTime) -> None:
        limits.check()
        super().__init__(resource, timeout=limits.idle_timeout, reactor=clock)
        self.limits = limits
        self.table = ConnectionTable(limits, clock)

    def buildProtocol(self, addr: Any) -> Any:
        """A :class:`GuardedChannel` with this site's limits and table."""
        channel = super().buildProtocol(addr)
        channel.limits = self.limits
        channel.table = self.table
        channel.MAX_LENGTH = self.limits.max_line
        channel.totalHeadersSize = self.limits.max_header_bytes
        channel.maxHeaders = self.limits.max_headers
        return channel

    def acceptableProtocols(self) -> list[bytes]:
        """HTTP/1.1 only: an HTTP/2 connection would bypass the channel's limits."""
        return [b"http/1.1"]

    def log(self, request: http.Request) -> None:
        """No per-request access line."""


__all__ = [
    "ABORT_GRACE",
    "STATS_LIMIT_OPTIONS",
    "SECURITY_HEADERS",
    "GuardedChannel",
    "GuardedSite",
    "SiteLimits",
    "error_bytes",
    "limits_from_options",
]
