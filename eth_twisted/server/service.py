"""The eth-server service: listener, router and sinks, started and stopped in order.

Built by :func:`make_server_service` from plain arguments (the tap turns
options into them). Start: bind the listener at once (a bind failure stops
startup loudly), then start the sinks in the background, retrying while a
database is unreachable; until they answer, every message gets
``ERR <sha> unavailable``. Stop: stop accepting, stop reading, store and
answer what was already received, then close the sinks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.application import service, strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, task
from twisted.logger import Logger

from eth_twisted.interfaces import IRecord, ISink, maybe_global_reactor
from eth_twisted.metrics import ServerMetrics
from eth_twisted.server.limits import CapsFactory, ReceiverLimits
from eth_twisted.server.receiver import ReceiverFactory, ReplyBatcher
from eth_twisted.server.router import DEFAULT_PENDING_BUDGET, SERVER_CONCURRENCY, Router
from eth_twisted.systemd import notify_ready

START_RETRY_INITIAL = 1.0
START_RETRY_MAX = 30.0


class ServerService(service.MultiService):
    """Owns the receiver's listening port, the router and the sinks."""

    log = Logger()

    def __init__(
        self,
        *,
        record: IRecord,
        mirrors: Sequence[ISink],
        router: Router,
        factory: ReceiverFactory,
        reactor: Any,
        drain_timeout: float = 15.0,
    ) -> None:
        super().__init__()
        self.record = record
        self.mirrors = list(mirrors)
        self.sinks: list[ISink] = [record, *self.mirrors]
        self.router = router
        self.factory = factory
        self.metrics = factory.metrics
        self.reactor = reactor
        self.drain_timeout = drain_timeout
        self.ready = False
        self.summary = ""  # where messages are stored, for start-up lines (no secrets)
        self.stats: Any = None  # the ServerStats the API reads, once attached
        self.on_ready: list[Callable[[], Any]] = []
        self.before_stop: list[Callable[[], Any]] = []
        self._starting: defer.Deferred[None] | None = None
        self._retry_wait: defer.Deferred[None] | None = None
        self._stopping = False
        self.listening_port: Any = None

    def listen(self, description: str, factory: Any = None, tls: Any = None) -> None:
        """Serve the receiver on an endpoint string (``tcp:9999:interface=127.0.0.1``).

        ``factory`` is what listens (the receiver, or the TLS/handshake gates in
        front of it); ``tls`` wraps every connection in TLS (security.server_tls_options).
        """
        from eth_twisted.link.tls import listen_endpoint

        endpoint = listen_endpoint(self.reactor, description, tls=tls)
        svc = StreamServerEndpointService(endpoint, factory or self.factory)
        svc._raiseSynchronously = True  # a bind failure stops start-up loudly, as strports does
        svc.setName("receiver")
        svc.setServiceParent(self)

    def startService(self) -> None:
        self.router.ready = False
        super().startService()
        receiver = self.namedServices.get("receiver")
        if receiver is not None and getattr(receiver, "_waitingForPort", None) is not None:
            receiver._waitingForPort.addCallback(self._remember_port)
        self._starting = self._start_sinks()

    def _remember_port(self, port: Any) -> Any:
        self.listening_port = port
        return port

    @defer.inlineCallbacks
    def _start_sinks(self) -> Any:
        """Start every sink, retrying each with a capped backoff until it answers.

        An outage is logged once when it starts (with why) and once when it
        ends (with how long it took); the attempts in between are debug lines.
        A stop during the wait between attempts ends the wait at once.
        """
        for sink in self.sinks:
            delay = START_RETRY_INITIAL
            failed_at: float | None = None
            attempts = 0
            while not self._stopping:
                attempts += 1
                try:
                    yield sink.start()
                    break
                except Exception as e:
                    if self._stopping:
                        return  # stopped while starting: the sink was told, nothing to retry
                    if failed_at is None:
                        failed_at = self.reactor.seconds()
                        self.log.error(
                            "Sink {sink} could not start: {error}; retrying every {delay:.0f}s to "
                            "{longest:.0f}s until it answers (ERR unavailable meanwhile)",
                            sink=sink.name, error=_reason(e), delay=delay, longest=START_RETRY_MAX,
                        )
                    else:
                        self.log.debug("Sink {sink} still cannot start: {error}", sink=sink.name,
                                       error=_reason(e))
                    self._retry_wait = task.deferLater(self.reactor, delay, lambda: None)
                    try:
                        yield self._retry_wait
                    except defer.CancelledError:
                        return
                    finally:
                        self._retry_wait = None
                    delay = min(delay * 2, START_RETRY_MAX)
            if self._stopping:
                return
            if failed_at is not None:
                self.log.info("Sink {sink} started after {seconds:.1f}s and {attempts} attempts",
                              sink=sink.name, seconds=self.reactor.seconds() - failed_at, attempts=attempts)
        self.router.ready = True
        self.ready = True
        self.log.info("Sinks ready: {sinks}", sinks=", ".join(s.name for s in self.sinks))
        for callback in self.on_ready:
            try:
                yield callback()
            except Exception:
                self.log.failure("Start-up hook {hook!r} failed", hook=callback)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        self._stopping = True
        if self._retry_wait is not None:
            self._retry_wait.cancel()
        for callback in self.before_stop:
            try:
                yield callback()
            except Exception:
                self.log.failure("Stop hook {hook!r} failed", hook=callback)
        self.factory.stop_reading()
        yield super().stopService()  # stop listening
        drained = self.router.drain()
        drained.addTimeout(self.drain_timeout, self.reactor)
        try:
            yield drained
        except defer.TimeoutError:
            self.log.warn("Stopped with {n} messages unstored after {t}s: clients will resend them",
                          n=self.router.pending, t=self.drain_timeout)
        self.router.ready = False
        self.factory.close_all()
        for sink in reversed(self.sinks):
            try:
                yield sink.stop()
            except Exception:
                self.log.failure("Sink {sink} did not stop cleanly", sink=sink.name)


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__


def make_server_service(
    *,
    listen: str,
    record: IRecord,
    mirrors: Sequence[ISink] = (),
    reactor: Any = None,
    metrics: ServerMetrics | None = None,
    limits: ReceiverLimits | None = None,
    max_batch: int = 1000,
    max_batch_bytes: int = 4 * 1024 * 1024,
    batch_delay: float = 0.002,
    tls: dict[str, Any] | None = None,
    secret: bytes | None = None,
    allow_plaintext_secret: bool = False,
    pipeline: bool | None = None,
    concurrent_batches: int = SERVER_CONCURRENCY,
    pending_budget: int = DEFAULT_PENDING_BUDGET,
) -> ServerService:
    """Assemble the server from already-built sinks.

    ``tls`` is ``{"cert", "key", "client_ca" (optional: require client
    certificates), "min_version"}``; ``secret`` turns on the shared-secret
    handshake (refused over plaintext unless ``allow_plaintext_secret``).
    """
    reactor = maybe_global_reactor(reactor)
    metrics = metrics if metrics is not None else ServerMetrics()
    batcher = ReplyBatcher()
    router = Router(
        record, mirrors, clock=reactor, metrics=metrics, max_batch=max_batch,
        max_batch_bytes=max_batch_bytes, max_delay=batch_delay, overlap=pipeline,
        concurrency=concurrent_batches, pending_budget=pending_budget, answering=batcher.hold,
    )
    gated = tls is not None or secret is not None
    factory = ReceiverFactory(router.submit, clock=reactor, metrics=metrics, limits=limits, batcher=batcher,
                              caps_in_front=gated)
    server = ServerService(record=record, mirrors=mirrors, router=router, factory=factory, reactor=reactor)
    tls_options = None
    if tls is not None:
        from eth_twisted.link.tls import server_tls_options

        tls_options = server_tls_options(tls["cert"], tls["key"], client_ca_file=tls.get("client_ca"),
                                         min_tls=tls.get("min_version", "1.2"))
    server.listen(listen, gated_factory(factory, reactor=reactor, tls=tls_options is not None,
                                        secret=secret, allow_plaintext=allow_plaintext_secret,
                                        listen=listen, metrics=metrics), tls=tls_options)
    return server


def gated_factory(
    receiver: ReceiverFactory,
    *,
    reactor: Any,
    tls: bool,
    secret: bytes | None,
    allow_plaintext: bool,
    listen: str,
    metrics: ServerMetrics,
) -> Any:
    """The factory that listens: the receiver, behind the TLS and shared-secret gates when configured.

    The caps are counted in front of the gates, so connections still in a
    handshake count too.
    """
    from eth_twisted.link.handshake import AuthServerFactory
    from eth_twisted.link.secret import check_secret_transport
    from eth_twisted.link.tls import TLSGateFactory

    encrypted = tls or listen.split(":", 1)[0].lower() == "ssl"
    check_secret_transport(secret, encrypted, allow_plaintext)
    factory: Any = receiver
    if secret is not None:
        factory = AuthServerFactory(
            factory, secret, reactor, allow_plaintext=allow_plaintext,
            on_failure=lambda reason: metrics.protocol_errors.labels(reason=f"auth-{reason}").inc(),
        )
    if tls:
        factory = TLSGateFactory(
            factory, clock=reactor,
            on_failure=lambda reason: metrics.protocol_errors.labels(reason=f"tls-{reason}").inc(),
        )
    if factory is not receiver:
        factory = CapsFactory(factory, receiver.caps)
    return factory


def build_sinks(storage: dict[str, Any], reactor: Any) -> tuple[IRecord, list[ISink]]:
    """The record sink and the mirrors described by ``storage`` (see server_tap.storage_kwargs)."""
    from eth_twisted.sinks import sql

    migrate = storage.get("migrate", True)
    if "mysql" in storage:
        record: IRecord = sql.make_mysql_sink(**storage["mysql"], reactor=reactor, migrate=migrate)
    else:
        record = sql.make_sqlite_sink(storage["sqlite"], reactor=reactor, migrate=migrate)
    mirrors: list[ISink] = []
    if "redis" in storage:
        from eth_twisted.sinks import redis

        mirrors.append(redis.make_redis_sink(**storage["redis"], reactor=reactor))
    return record, mirrors


def build_server(
    *,
    reactor: Any,
    listen: str,
    stats_listen: str | None,
    storage: dict[str, Any],
    limits: ReceiverLimits | None = None,
    batch_size: int = 1000,
    batch_delay: float = 0.002,
    reconcile_interval: float = 300.0,
    verbose: bool = False,
    summary: str = "",
    stats_token: str | None = None,
    allowed_hosts: Sequence[str] | None = None,
    tls: dict[str, Any] | None = None,
    secret: bytes | None = None,
    allow_plaintext_secret: bool = False,
    pipeline: bool | None = None,
    concurrent_batches: int = SERVER_CONCURRENCY,
    pending_budget: int = DEFAULT_PENDING_BUDGET,
    stats_limits: Any = None,
) -> ServerService:
    """Everything ``eth server`` runs: sinks, router, receiver, Redis reconciler, stats site.

    ``pipeline``: with mirrors (Redis), SQL stores the next batch while Redis
    stores the current one (answers still wait for both): more throughput
    under saturation, more latency at low load. None leaves the router's
    default (off).
    """
    record, mirrors = build_sinks(storage, reactor)
    metrics = ServerMetrics()
    server = make_server_service(
        listen=listen, record=record, mirrors=mirrors, reactor=reactor, metrics=metrics,
        limits=limits, max_batch=batch_size, batch_delay=batch_delay,
        tls=tls, secret=secret, allow_plaintext_secret=allow_plaintext_secret,
        pipeline=pipeline if mirrors else False, concurrent_batches=concurrent_batches,
        pending_budget=pending_budget,
    )
    server.factory.log_payloads = verbose
    server.summary = summary
    server.log.info("eth-server listening on {listen}, storing to {summary}", listen=listen, summary=summary)
    _attach_stats(server, reactor, stats_listen, stats_token, allowed_hosts, stats_limits)
    for mirror in mirrors:
        _attach_reconciler(server, mirror, reactor, reconcile_interval)
    server.on_ready.append(lambda: notify_ready(f"eth-server ready: {listen}, storing to {summary}"))
    return server


def _attach_stats(
    server: ServerService, reactor: Any, stats_listen: str | None,
    token: str | None, allowed_hosts: Sequence[str] | None, limits: Any = None,
) -> None:
    """The stats the router feeds and, on ``stats_listen``, their site (``limits``: its SiteLimits)."""
    from eth_twisted.web.stats import ServerStats

    stats = ServerStats(reactor)
    server.stats = stats
    server.router.observers.append(stats.observe)
    server.on_ready.insert(0, lambda: _seed_stats(server, stats))
    if stats_listen is None:
        return
    from eth_twisted.web.site import make_server_site

    redis = next((m for m in server.mirrors if m.name == "redis"), None)
    site = make_server_site(
        record=server.record, sinks=server.sinks, stats=stats, metrics=server.metrics,
        clock=reactor, token=token, allowed_hosts=allowed_hosts, redis=redis, limits=limits,
    )
    web = strports.service(stats_listen, site, reactor=reactor)
    web.setName("stats")
    web.setServiceParent(server)


@defer.inlineCallbacks
def _seed_stats(server: ServerService, stats: Any) -> Any:
    totals = yield server.record.totals()
    ip_messages = None
    redis = next((m for m in server.mirrors if m.name == "redis"), None)
    if redis is not None:
        try:
            _firsts, ip_messages = yield cast(Any, redis).read_counts()
        except Exception as e:
            server.log.warn("Could not read per-client message counts from Redis: {error}", error=_reason(e))
    stats.seed(totals, ip_messages)


def _attach_reconciler(server: ServerService, mirror: ISink, reactor: Any, interval: float) -> None:
    """Rebuild Redis from SQL once the sinks are up, then every ``interval`` and after an outage."""
    from eth_twisted.sinks.reconcile import Reconciler
    from eth_twisted.sinks.redis import RedisSink

    if not isinstance(mirror, RedisSink):
        return
    reconciler = Reconciler(mirror, server.record, interval=interval, clock=reactor, metrics=server.metrics)
    reconciler.setName("reconciler")
    server.on_ready.append(lambda: reconciler.setServiceParent(server))


