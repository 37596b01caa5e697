"""The small web framework under the stats sites: routes, JSON errors, the Host allowlist, the token.

Routes are matched on the whole path. A leaf :class:`App` resource routes every path itself, so
every answer (errors included) is JSON with the security headers, never a traceback.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from eth_twisted.options import option_rows, settings_from
from eth_twisted.web.limits import REASONS, SECURITY_HEADERS, GuardedSite, SiteLimits
from eth_twisted.web.pages import json_bytes

MAX_ID = 2**63 - 1
"""Largest record id (and largest ``limit``/``before`` the API parses)."""


HANDLER_TIMEOUT = 10.0
"""Seconds a read (messages, blocks) may take before the answer is a 503."""


JSON_TYPE = "application/json; charset=utf-8"


_DIGITS = re.compile(r"[0-9]{1,20}")


@dataclass(slots=True)
class Response:
    """A complete HTTP answer a handler returns."""

    body: bytes
    content_type: str = JSON_TYPE
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


class ApiError(Exception):
    """An error answer: ``status`` and a short machine-readable ``code``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer that is never cached."""
    h = {"Cache-Control": "no-store"}
    h.update(headers or {})
    return Response(json_bytes(obj), JSON_TYPE, status, h)


def error_response(error: ApiError) -> Response:
    """The JSON body of an :class:`ApiError`."""
    return json_response(
        {"error": error.code, "message": error.message}, error.status, error.headers
    )


def single_arg(request: Request, name: str) -> str | None:
    """The one value of query argument ``name`` (None when absent), or ApiError 400 when repeated."""
    args: dict[bytes, list[bytes]] = request.args or {}
    values = args.get(name.encode(), [])
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, "bad-request", f"{name} given more than once")
    try:
        return values[0].decode("ascii")
    except UnicodeDecodeError:
        raise ApiError(400, "bad-request", f"{name} must be an integer")


def parse_int(text: str | None, name: str, low: int, high: int | None = None) -> int | None:
    """A decimal integer in ``low..high`` from a query/path value, or ApiError 400."""
    if text is None:
        return None
    if not _DIGITS.fullmatch(text):
        raise ApiError(400, "bad-request", f"{name} must be a decimal integer")
    value = int(text)
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ApiError(400, "bad-request", f"{name} must be in {bound}")
    return value


Handler = Callable[[Request, "re.Match[str]"], Any]
"""Takes the request and the route's match; returns a Response or a Deferred of one."""


@dataclass(frozen=True, slots=True)
class Route:
    """One path pattern (full match) and its handler; ``public`` skips token and Host checks."""

    pattern: re.Pattern[str]
    handler: Handler
    public: bool = False

    @classmethod
    def at(cls, pattern: str, handler: Handler, public: bool = False) -> Route:
        """A route whose ``pattern`` is a regex matched against the whole path."""
        return cls(re.compile(pattern), handler, public)


def _host_of(header: bytes | None) -> str | None:
    """The host name of a Host header, lowercased, without port or brackets."""
    if not header:
        return None
    try:
        host = header.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else None
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".") or None


def host_allowed(host: str | None, allowed: Sequence[str]) -> bool:
    """True when ``host`` matches an entry: exact, ``*``, or ``.example.com`` for subdomains."""
    if host is None:
        return False
    for entry in allowed:
        entry = entry.strip().lower().strip("[]")
        if entry == "*" or host == entry.rstrip("."):
            return True
        if entry.startswith(".") and (host.endswith(entry) or host == entry[1:]):
            return True
    return False


class App(Resource):
    """A leaf resource that routes every path itself, so errors are always JSON.

    Every response is JSON (``/metrics`` is Prometheus text, the dashboard its static
    files), carries the security headers in :data:`SECURITY_HEADERS`, and an error is a
    JSON body ``{"error": code, "message": text}`` with the proper status, never a
    traceback. Only GET and HEAD are answered. With a ``token`` every path needs
    ``Authorization: Bearer <token>`` except the public routes: the health checks and the
    dashboard's static files (which hold no data: the dashboard's script sends the token
    it is given in the URL fragment). With ``allowed_hosts`` a request for a route that is
    not public whose ``Host`` is not listed gets 421.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        routes: Sequence[Route],
        *,
        clock: IReactorTime,
        token: str | None = None,
        allowed_hosts: Sequence[str] | None = None,
        handler_timeout: float = HANDLER_TIMEOUT,
    ) -> None:
        super().__init__()
        self.routes = list(routes)
        self.clock = clock
        self._token = token.encode() if token else None
        self.allowed_hosts = list(allowed_hosts) if allowed_hosts else None
        self.handler_timeout = handler_timeout

    def render(self, request: Request) -> Any:
        """Answer ``request``: headers, checks, then the route's handler."""
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader("Server", "eth-twisted")
        try:
            route, match = self._route(request)
            if request.method not in (b"GET", b"HEAD"):
                raise ApiError(
                    405,
                    "method-not-allowed",
                    "only GET and HEAD are supported",
                    {"Allow": "GET, HEAD"},
                )
            if not route.public:
                self._check_host(request)
                self._check_token(request)
        except ApiError as e:
            self._write(request, error_response(e))
            return NOT_DONE_YET
        except Exception:
            self.log.failure("Checking a request for {path} failed", path=request.path)
            self._write(request, error_response(ApiError(500, "internal", "internal error")))
            return NOT_DONE_YET
        d = defer.maybeDeferred(route.handler, request, match)
        d.addTimeout(self.handler_timeout, self.clock)
        finished = request.notifyFinish()
        finished.addErrback(lambda _: d.cancel())
        d.addCallbacks(lambda resp: self._write(request, resp), lambda f: self._failed(request, f))
        d.addErrback(lambda f: self.log.failure("Writing a response failed", f))
        return NOT_DONE_YET

    def _route(self, request: Request) -> tuple[Route, re.Match[str]]:
        try:
            path = request.path.decode("ascii")
        except UnicodeDecodeError:
            raise ApiError(404, "not-found", "no such path")
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/") or "/"
        for route in self.routes:
            match = route.pattern.fullmatch(path)
            if match is not None:
                return route, match
        raise ApiError(404, "not-found", "no such path")

    def _check_host(self, request: Request) -> None:
        if self.allowed_hosts is None:
            return
        if not host_allowed(_host_of(request.getHeader(b"host")), self.allowed_hosts):
            raise ApiError(421, "host-not-allowed", "this Host is not served here")

    def _check_token(self, request: Request) -> None:
        if self._token is None:
            return
        # Bytes throughout: a header that is not UTF-8 is a wrong token, never an exception.
        header = request.getHeader(b"authorization") or b""
        scheme, _, presented = header.partition(b" ")
        if scheme.lower() != b"bearer" or not presented.strip():
            raise ApiError(
                401,
                "unauthorized",
                "a bearer token is required",
                {"WWW-Authenticate": 'Bearer realm="eth-twisted"'},
            )
        if not hmac.compare_digest(presented.strip(), self._token):
            raise ApiError(
                401,
                "unauthorized",
                "the bearer token is not valid",
                {"WWW-Authenticate": 'Bearer realm="eth-twisted", error="invalid_token"'},
            )

    def _failed(self, request: Request, failure: Failure) -> None:
        if failure.check(defer.CancelledError) and request._disconnected:
            return
        if failure.check(ApiError):
            self._write(request, error_response(failure.value))
        elif failure.check(defer.TimeoutError, defer.CancelledError):
            self._write(
                request,
                error_response(
                    ApiError(
                        503, "timeout", "the backend did not answer in time", {"Retry-After": "1"}
                    )
                ),
            )
        else:
            self.log.failure("Handler for {path} failed", failure, path=request.path)
            self._write(request, error_response(ApiError(500, "internal", "internal error")))

    def _write(self, request: Request, response: Response) -> None:
        if request._disconnected or request.finished:
            return
        request.setResponseCode(response.status, REASONS.get(response.status))
        request.setHeader("Content-Type", response.content_type)
        for name, value in response.headers.items():
            request.setHeader(name, value)
        request.setHeader("Content-Length", str(len(response.body)))
        if request.method != b"HEAD":
            request.write(response.body)
        request.finish()


def make_site(app: App, limits: SiteLimits) -> Site:
    """The listener's site: every connection gets the limits of :mod:`eth_twisted.web.limits`."""
    return GuardedSite(app, limits, app.clock)


def allowed_hosts(stats: str, option: str | None) -> list[str] | None:
    """The Host allowlist: the option's list, or the loopback names when the API listens on loopback.

    On loopback a fixed list stops DNS-rebinding pages from reading the API.
    """
    if option:
        return [h.strip() for h in option.split(",") if h.strip()]
    if stats and (
        "interface=127." in stats or "interface=localhost" in stats or "interface=\\:\\:1" in stats
    ):
        return ["localhost", "127.0.0.1", "::1"]
    return None


def exposure_warning(stats: str | None, allowed: list[str] | None, token: str | None) -> str | None:
    """A warning when a stats site on the network answers any Host without a token, else None.

    Any web page a browser near it opens can then read the API by DNS rebinding.
    """
    if not stats or stats.strip().lower() == "none" or allowed is not None or token:
        return None
    if not stats.startswith(("tcp:", "tcp6:", "ssl:", "haproxy:")):
        return None
    return (
        f"the stats site on {stats} answers any Host header and needs no token: a web page "
        "opened by a browser that can reach it can read the API (DNS rebinding); set "
        "--stats-allowed-hosts or --stats-token-file"
    )


@dataclass(slots=True)
class SiteSettings:
    """The stats site: where it listens, who may read it, and its listener's limits."""

    stats: str | None = "tcp:8080:interface=127.0.0.1"
    """Endpoint string, or None for no site."""
    stats_token: str | None = None
    """Bearer token every route but the health checks requires (resolved by the tap: never argv only)."""
    stats_allowed_hosts: list[str] | None = None
    """Host header values answered (None: any; the tap defaults it to the loopback names on loopback)."""
    limits: SiteLimits = field(default_factory=SiteLimits)


SITE_OPTIONS: list[list[Any]] = [
    [
        "stats-token",
        None,
        None,
        "Bearer token the stats API requires (not /healthz, /readyz); "
        "prefer ETH_STATS_TOKEN or --stats-token-file",
    ],
    ["stats-token-file", None, None, "File holding the stats API token"],
    [
        "stats-allowed-hosts",
        None,
        None,
        "Comma list of Host header values the stats API answers "
        "[default on loopback: localhost,127.0.0.1,::1]",
    ],
    *option_rows(SiteLimits),
]
"""Who may read a stats site, and its listener's limits.

The same options on eth server, eth client and eth run.
"""


def site_settings_from(config: Any, stats: str | None) -> SiteSettings:
    """The site settings of parsed options holding :data:`SITE_OPTIONS` (``stats``: its endpoint, or None).

    The token is resolved from the option, ``ETH_STATS_TOKEN``, ``--stats-token-file``
    or ``$CREDENTIALS_DIRECTORY/stats-token``; the allowlist defaults to the loopback
    names when the site listens on loopback (DNS rebinding).
    """
    limits = settings_from(SiteLimits, config)
    limits.check()
    return SiteSettings(
        stats=stats,
        stats_token=config.resolve_secret("stats-token"),
        stats_allowed_hosts=allowed_hosts(stats or "", config["stats-allowed-hosts"]),
        limits=limits,
    )
