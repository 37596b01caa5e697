"""The HTTP side: stats API, Prometheus metrics, health checks and the dashboard.

Three builders return the ``twisted.web.server.Site`` a tap listens on with an endpoint
string: :func:`make_server_site`, :func:`make_client_site` and :func:`make_combined_site`
(``eth run``); each docstring lists its paths, and :class:`~eth_twisted.web.app.App` says
what every answer carries. The web layer reads the record's read path and the in-memory
:class:`~eth_twisted.web.stats.ServerStats`, never the writer (docs/architecture.md,
section 1, "Web").
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request, Site

from eth_twisted.interfaces import IRecord, ISink
from eth_twisted.metrics import ClientMetrics, ServerMetrics
from eth_twisted.model import MAX_BLOCK_NUMBER
from eth_twisted.web.app import (
    JSON_TYPE,
    MAX_ID,
    ApiError,
    App,
    Handler,
    Response,
    Route,
    json_response,
    make_site,
    parse_int,
    single_arg,
)
from eth_twisted.web.chains import chain_routes
from eth_twisted.web.limits import SiteLimits
from eth_twisted.web.pages import Page, json_bytes, read_page
from eth_twisted.web.stats import ServerStats

log = Logger()


DEFAULT_LIMIT = 50


MAX_LIMIT = 200


PING_TIMEOUT = 2.0
"""Seconds each sink has to answer a /readyz ping."""


READY_CACHE = 1.0
"""Seconds a /readyz answer is reused, so probes and dashboards cannot hammer the sinks."""


STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json; charset=utf-8",
}


CLIENT_OPENAPI = "openapi-client.json"
"""The client site's OpenAPI document (its /api/openapi.json)."""
DASHBOARD_FILES = ("index.html", "dashboard.js", "dashboard.css", "favicon.svg")


def _static_files() -> dict[str, Response]:
    folder = resources.files("eth_twisted.web") / "static"
    files: dict[str, Response] = {}
    for name in DASHBOARD_FILES:
        body = (folder / name).read_bytes()
        ctype = STATIC_TYPES[name[name.rfind(".") :]]
        files[name] = Response(body, ctype, 200, {"Cache-Control": "no-cache"})
    return files


def openapi_document(name: str = "openapi.json") -> dict[str, Any]:
    """An OpenAPI 3 document shipped in static/: the server's (openapi.json) or the client's.

    The client's is :data:`CLIENT_OPENAPI`.
    """
    folder = resources.files("eth_twisted.web") / "static"
    document: dict[str, Any] = json.loads((folder / name).read_text(encoding="utf-8"))
    return document


class Readiness:
    """Pings every sink with a short timeout; caches the answer for a second."""

    def __init__(self, sinks: Sequence[ISink], clock: IReactorTime, timeout: float = PING_TIMEOUT):
        self.sinks = list(sinks)
        self.clock = clock
        self.timeout = timeout
        self._cached: tuple[float, bool, dict[str, Any]] | None = None
        self._waiters: list[defer.Deferred[tuple[bool, dict[str, Any]]]] = []

    def check(self) -> defer.Deferred[tuple[bool, dict[str, Any]]]:
        """Fire with (all sinks ok, {name: {"ok", "latency_ms", "error"?}}).

        Concurrent checks share one round of pings.
        """
        if self._cached is not None and self.clock.seconds() - self._cached[0] < READY_CACHE:
            return defer.succeed((self._cached[1], self._cached[2]))
        waiter: defer.Deferred[tuple[bool, dict[str, Any]]] = defer.Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            self._ping_all().addBoth(self._done)
        return waiter

    def _done(self, result: Any) -> None:
        if isinstance(result, Failure):
            log.failure("Readiness check failed", result)
            result = (False, {})
        else:
            self._cached = (self.clock.seconds(), result[0], result[1])
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(result)

    @defer.inlineCallbacks
    def _ping_all(self) -> Any:
        results = yield defer.gatherResults([self._ping(s) for s in self.sinks])
        detail = {name: info for name, info in results}
        return all(info["ok"] for info in detail.values()), detail

    @defer.inlineCallbacks
    def _ping(self, sink: ISink) -> Any:
        name = getattr(sink, "name", type(sink).__name__)
        started = self.clock.seconds()
        try:
            d = defer.maybeDeferred(sink.ping)
            d.addTimeout(self.timeout, self.clock)
            yield d
        except defer.TimeoutError:
            return name, {"ok": False, "error": f"no answer within {self.timeout:g}s"}
        except Exception as e:
            # The class name says what failed; a backend's message may carry a DSN.
            return name, {"ok": False, "error": type(e).__name__}
        return name, {"ok": True, "latency_ms": round((self.clock.seconds() - started) * 1000, 3)}


def held_place(
    places: defer.DeferredSemaphore, work: Callable[[], defer.Deferred[Any]]
) -> defer.Deferred[Any]:
    """Run ``work()`` in one of ``places``, held until the work itself ends.

    Cancelling the answer (the handler deadline, a client gone) while it waits
    for a place gives the place up unused; once the work has started, the
    answer fails at once but the place is kept until the work (a read in a
    database thread, which cannot be stopped) finishes, so abandoned reads can
    never pile up behind the ones the places admit.
    """
    acquired = places.acquire()

    def cancel(_: defer.Deferred[Any]) -> None:
        if not acquired.called:
            acquired.cancel()

    answer: defer.Deferred[Any] = defer.Deferred(cancel)

    def start(_: Any) -> None:
        def finished(result: Any) -> None:
            places.release()
            if not answer.called:
                answer.callback(result)  # a Failure errbacks

        defer.maybeDeferred(work).addBoth(finished)

    def not_started(failure: Failure) -> None:
        if not failure.check(defer.CancelledError) and not answer.called:
            answer.errback(failure)

    acquired.addCallbacks(start, not_started)
    return answer


def _healthz(clock: IReactorTime, started: float) -> Handler:
    def handler(request: Request, match: re.Match[str]) -> Response:
        return json_response(
            {"status": "ok", "uptime_seconds": max(0.0, clock.seconds() - started)}
        )

    return handler


def _metrics(registries: Sequence[CollectorRegistry]) -> Handler:
    def handler(request: Request, match: re.Match[str]) -> Response:
        body = b"".join(generate_latest(r) for r in registries)
        return Response(body, CONTENT_TYPE_LATEST, 200, {"Cache-Control": "no-store"})

    return handler


def _call_readiness(
    readiness: Callable[[], tuple[bool, dict[str, Any]]],
) -> tuple[bool, dict[str, Any]]:
    try:
        ok, detail = readiness()
        return bool(ok), dict(detail)
    except Exception:
        log.failure("Client readiness check failed")
        return False, {"error": "readiness check failed"}


def _client_readyz(readiness: Callable[[], tuple[bool, dict[str, Any]]]) -> Handler:
    def handler(request: Request, match: re.Match[str]) -> Response:
        ok, detail = _call_readiness(readiness)
        return json_response(
            {"status": "ready" if ok else "unready", "checks": detail}, 200 if ok else 503
        )

    return handler


def _server_readyz(
    ready: Readiness, client: Callable[[], tuple[bool, dict[str, Any]]] | None = None
) -> Handler:
    @defer.inlineCallbacks
    def handler(request: Request, match: re.Match[str]) -> Any:
        ok, sinks = yield ready.check()
        body: dict[str, Any] = {"status": "ready", "sinks": sinks}
        failing = [name for name, info in sinks.items() if not info["ok"]]
        if client is not None:
            client_ok, client_detail = _call_readiness(client)
            body["client"] = {"ok": client_ok, "checks": client_detail}
            if not client_ok:
                failing.append("client")
            ok = ok and client_ok
        if not ok:
            body["status"] = "unready"
            body["failing"] = failing
        return json_response(body, 200 if ok else 503)

    return handler


def _server_routes(
    *,
    record: IRecord,
    sinks: Sequence[ISink],
    stats: ServerStats,
    registries: Sequence[CollectorRegistry],
    clock: IReactorTime,
    limits: SiteLimits,
    client_readiness: Callable[[], tuple[bool, dict[str, Any]]] | None = None,
) -> list[Route]:
    started = clock.seconds()
    static = _static_files()
    spec = json_bytes(openapi_document())
    ready = Readiness(sinks, clock)

    def dashboard(request: Request, match: re.Match[str]) -> Response:
        return static["index.html"]

    def static_file(request: Request, match: re.Match[str]) -> Response:
        found = static.get(match["name"])
        if found is None:
            raise ApiError(404, "not-found", "no such file")
        return found

    chart_load: list[defer.Deferred[None]] = []
    heavy = defer.DeferredSemaphore(limits.heavy_requests)

    @defer.inlineCallbacks
    def fill_chart() -> Any:
        """Once, after the stats were seeded: the chart's history from the record's read path.

        Summaries only (id, hash, block, address, time): no payload is read.
        """
        try:
            rows = yield record.recent_summaries(stats.chart.maxlen or MAX_LIMIT)  # no payloads
            stats.seed_chart(rows)
        except Exception:
            log.failure("Could not load the chart's history; it shows new blocks only")
            stats.chart_seeded = True

    @defer.inlineCallbacks
    def api_stats(request: Request, match: re.Match[str]) -> Any:
        if stats.seeded and not stats.chart_seeded:
            if not chart_load:
                chart_load.append(fill_chart())
            yield chart_load[0]
        return Response(stats.snapshot_bytes(), JSON_TYPE, 200, {"Cache-Control": "no-store"})

    def openapi(request: Request, match: re.Match[str]) -> Response:
        return Response(spec, JSON_TYPE, 200, {"Cache-Control": "no-cache"})

    def page_of(fetch: Any, limit: int) -> defer.Deferred[Page]:
        return held_place(heavy, lambda: read_page(fetch, limit, limits.page_bytes, clock))

    @defer.inlineCallbacks
    def messages(request: Request, match: re.Match[str]) -> Any:
        limit = parse_int(single_arg(request, "limit"), "limit", 1, MAX_ID)
        before = parse_int(single_arg(request, "before"), "before", 1, MAX_ID)
        limit = min(limit if limit is not None else DEFAULT_LIMIT, MAX_LIMIT)
        page = yield page_of(
            lambda n, last: record.recent(n, before if last is None else last), limit
        )
        body = page.body(
            {"limit": limit, "before": before}, "messages", {"next_before": page.next_cursor}
        )
        return Response(body, JSON_TYPE, 200, {"Cache-Control": "no-store"})

    @defer.inlineCallbacks
    def blocks(request: Request, match: re.Match[str]) -> Any:
        number = parse_int(match["number"], "block number", 0, MAX_BLOCK_NUMBER)
        assert number is not None
        limit = parse_int(single_arg(request, "limit"), "limit", 1, MAX_ID)
        after = parse_int(single_arg(request, "after"), "after", 0, MAX_ID)
        limit = min(limit if limit is not None else DEFAULT_LIMIT, MAX_LIMIT)
        page = yield page_of(
            lambda n, last: record.by_block(number, limit=n, after=after if last is None else last),
            limit,
        )
        if not page.items and after is None:
            raise ApiError(404, "not-found", f"no record of block {number}")
        body = page.body(
            {"block_number": number, "limit": limit, "after": after},
            "records",
            {"next_after": page.next_cursor},
        )
        return Response(body, JSON_TYPE, 200, {"Cache-Control": "no-store"})

    return [
        Route.at(r"/", dashboard, public=True),
        Route.at(r"/static/(?P<name>[A-Za-z0-9_.-]+)", static_file, public=True),
        Route.at(r"/healthz", _healthz(clock, started), public=True),
        Route.at(r"/readyz", _server_readyz(ready, client_readiness), public=True),
        Route.at(r"/metrics", _metrics(registries)),
        Route.at(r"/api/stats", api_stats),
        Route.at(r"/api/messages", messages),
        Route.at(r"/api/blocks/(?P<number>[^/]*)", blocks),
        Route.at(r"/api/openapi\.json", openapi),
        *chain_routes(record, lambda work: held_place(heavy, work)),
    ]


def make_server_site(
    *,
    record: IRecord,
    sinks: Sequence[ISink],
    stats: ServerStats,
    metrics: ServerMetrics,
    clock: IReactorTime,
    token: str | None = None,
    allowed_hosts: Sequence[str] | None = None,
    limits: SiteLimits | None = None,
) -> Site:
    """The server's stats site.

    Its paths: ``/`` (dashboard), ``/api/stats``, ``/api/messages?limit=&before=``,
    ``/api/blocks/<n>``, ``/api/chains``, ``/api/chains/<id>/blocks?from=&to=``,
    ``/api/chains/<id>/reorgs?limit=&before=``, ``/api/openapi.json``, ``/healthz``,
    ``/readyz``, ``/metrics``.
    ``record`` serves /api/messages and /api/blocks through its read path;
    ``sinks`` (every configured sink, the record included) are pinged by
    /readyz; ``stats`` answers /api/stats; ``metrics.registry`` is /metrics.
    ``limits`` are the listener's (:class:`~eth_twisted.web.limits.SiteLimits`).
    """
    limits = limits or SiteLimits()
    routes = _server_routes(
        record=record,
        sinks=sinks,
        stats=stats,
        registries=[metrics.registry],
        clock=clock,
        limits=limits,
    )
    return make_site(App(routes, clock=clock, token=token, allowed_hosts=allowed_hosts), limits)


def _client_routes(
    *,
    metrics: ClientMetrics,
    readiness: Callable[[], tuple[bool, dict[str, Any]]],
    clock: IReactorTime,
    prefix: str = "",
    status: Callable[[], dict[str, Any]] | None = None,
) -> list[Route]:
    started = clock.seconds()
    p = re.escape(prefix)
    routes = [
        Route.at(p + r"/healthz", _healthz(clock, started), public=True),
        Route.at(p + r"/readyz", _client_readyz(readiness), public=True),
        Route.at(p + r"/metrics", _metrics([metrics.registry])),
    ]
    if status is not None:
        spec = Response(
            json_bytes(openapi_document(CLIENT_OPENAPI)),
            JSON_TYPE,
            200,
            {"Cache-Control": "no-cache"},
        )
        routes.append(Route.at(p + r"/api/status", _client_status(status)))
        routes.append(Route.at(p + r"/api/openapi.json", lambda request, match: spec))
    return routes


def _client_status(status: Callable[[], dict[str, Any]]) -> Handler:
    def handler(request: Request, match: re.Match[str]) -> Response:
        return json_response(status())

    return handler


def make_client_site(
    *,
    metrics: ClientMetrics,
    readiness: Callable[[], tuple[bool, dict[str, Any]]],
    clock: IReactorTime,
    token: str | None = None,
    allowed_hosts: Sequence[str] | None = None,
    limits: SiteLimits | None = None,
    status: Callable[[], dict[str, Any]] | None = None,
) -> Site:
    """The client's site: /healthz, /readyz, /metrics, and /api/status when ``status`` is given.

    ``readiness()`` answers (ok, detail); ``status()`` the status document.
    """
    routes = _client_routes(metrics=metrics, readiness=readiness, clock=clock, status=status)
    return make_site(
        App(routes, clock=clock, token=token, allowed_hosts=allowed_hosts), limits or SiteLimits()
    )


def make_combined_site(
    *,
    record: IRecord,
    sinks: Sequence[ISink],
    stats: ServerStats,
    metrics: ServerMetrics,
    client_metrics: ClientMetrics,
    client_readiness: Callable[[], tuple[bool, dict[str, Any]]],
    clock: IReactorTime,
    token: str | None = None,
    allowed_hosts: Sequence[str] | None = None,
    limits: SiteLimits | None = None,
    client_status: Callable[[], dict[str, Any]] | None = None,
) -> Site:
    """One site for ``eth run``: the server's endpoints plus the client's.

    ``/metrics`` serves both registries (their names never collide:
    ``eth_server_*`` and ``eth_client_*``), ``/readyz`` is ready when the
    sinks answer and the client is ready, and ``/client/healthz``,
    ``/client/readyz``, ``/client/metrics`` answer for the client alone.
    """
    limits = limits or SiteLimits()
    routes = _server_routes(
        record=record,
        sinks=sinks,
        stats=stats,
        registries=[metrics.registry, client_metrics.registry],
        clock=clock,
        limits=limits,
        client_readiness=client_readiness,
    )
    routes += _client_routes(
        metrics=client_metrics,
        readiness=client_readiness,
        clock=clock,
        prefix="/client",
        status=client_status,
    )
    return make_site(App(routes, clock=clock, token=token, allowed_hosts=allowed_hosts), limits)
