"""The eth-server service: its settings, and the listener, router, sinks and site, in order.

The tap turns options into one :class:`ServerSettings`; :func:`build_server` builds every
part from it and hands them to :class:`ServerService`, which starts and stops them in a
fixed order. docs/architecture.md (section 2, "eth server") draws the tree and gives the
start and stop order step by step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from twisted.application import service, strports
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from eth_twisted.errors import ConfigError
from eth_twisted.interfaces import IRecord, ISink, maybe_global_reactor
from eth_twisted.metrics import ServerMetrics
from eth_twisted.options import positive_float, setting
from eth_twisted.server.batcher import ReplyBatcher
from eth_twisted.server.limits import CapsFactory, ReceiverLimits
from eth_twisted.server.receiver import ReceiverFactory
from eth_twisted.server.router import BatchSettings, Router
from eth_twisted.sinks import StorageSettings, create_sinks
from eth_twisted.systemd import notify_ready
from eth_twisted.web.app import SiteSettings

START_RETRY_INITIAL = 1.0
START_RETRY_MAX = 30.0


@dataclass(slots=True)
class ServerTLS:
    """TLS on the listener; the fields are the server options of their names."""

    tls_cert: str | None = setting(None, "PEM certificate (chain) of the server: listen with TLS")
    tls_key: str | None = setting(None, "PEM private key of --tls-cert")
    tls_client_ca: str | None = setting(
        None,
        "PEM CA: require client certificates issued by it (mutual TLS); the subject becomes client_id",
    )
    tls_min_version: str = setting("1.2", "Lowest TLS version accepted: 1.2 or 1.3")

    @property
    def enabled(self) -> bool:
        """True when the listener speaks TLS."""
        return bool(self.tls_cert)

    def check(self) -> None:
        """Raise ConfigError naming the first option that cannot work."""
        if not self.tls_cert and not self.tls_key:
            if self.tls_client_ca:
                raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
            return
        if not self.tls_cert or not self.tls_key:
            raise ConfigError("--tls-cert and --tls-key go together")
        for name, path in (
            ("tls-cert", self.tls_cert),
            ("tls-key", self.tls_key),
            ("tls-client-ca", self.tls_client_ca),
        ):
            if path and not Path(path).is_file():
                raise ConfigError(f"--{name}: no such file {path}")
        if self.tls_min_version not in ("1.2", "1.3"):
            raise ConfigError(
                f"--tls-min-version: expected 1.2 or 1.3, got {self.tls_min_version!r}"
            )

    def options(self) -> Any:
        """The TLS server options (mutual TLS with a client CA), or None without TLS."""
        if not self.enabled:
            return None
        from eth_twisted.link.tls import server_tls_options

        assert self.tls_cert and self.tls_key
        return server_tls_options(
            self.tls_cert,
            self.tls_key,
            client_ca_file=self.tls_client_ca,
            min_tls=self.tls_min_version,
        )


@dataclass(slots=True)
class ServerSettings:
    """Everything ``eth server`` runs with; each part's defaults live in its own settings class."""

    listen: str = "tcp:9999:interface=127.0.0.1"
    storage: StorageSettings = field(default_factory=StorageSettings)
    limits: ReceiverLimits = field(default_factory=ReceiverLimits)
    batch: BatchSettings = field(default_factory=BatchSettings)
    tls: ServerTLS = field(default_factory=ServerTLS)
    secret: bytes | None = None
    """The link's shared secret (resolved by the tap), or None: no handshake."""
    allow_plaintext_secret: bool = setting(
        False,
        "Allow the shared-secret handshake without TLS (the secret never crosses the wire, but the "
        "messages do, in clear)",
    )
    site: SiteSettings = field(default_factory=SiteSettings)
    reconcile_interval: float = setting(
        300.0, "Seconds between Redis rebuilds from SQL", positive_float
    )
    verbose: bool = False
    """Log every message received (the seed's DATA line)."""
    drain_timeout: float = 15.0
    """Seconds a stop waits for the messages already received to be stored and answered."""


class _Listener(service.Service):
    """Listens on an endpoint while running; a bind failure raises out of ``startService`` (loud start-up)."""

    def __init__(self, endpoint: Any, factory: Any) -> None:
        self.setName("receiver")
        self.endpoint = endpoint
        self.factory = factory
        self.port: Any = None
        self.listening: defer.Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        self.listening = self.endpoint.listen(self.factory)
        outcome: list[Any] = []

        def seen(result: Any) -> Any:
            outcome.append(result)
            return result

        self.listening.addBoth(seen)
        if outcome and isinstance(outcome[0], Failure):
            self.running = False
            self.listening.addErrback(lambda _: None)
            outcome[0].raiseException()
        self.listening.addCallback(self._bound)

    def _bound(self, port: Any) -> Any:
        self.port = port
        return port

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return None


class ServerService(service.MultiService):
    """The running server: its listener, router, sinks, stats, site and reconciler, in a fixed order.

    Start: bind the listener at once (a bind failure stops start-up loudly), serve the
    stats site, then start the sinks, retrying while a database is unreachable (until
    they answer every message gets ``ERR <sha> unavailable``), seed the stats, start the
    Redis reconciler and say ready. Stop: stop reading, stop accepting, store and answer
    what was already received, then close the sinks.
    """

    log = Logger()

    def __init__(
        self,
        *,
        record: IRecord,
        mirrors: Sequence[ISink],
        router: Router,
        receiver: ReceiverFactory,
        listener: _Listener,
        reactor: Any,
        stats: Any = None,
        site: service.Service | None = None,
        reconciler: service.Service | None = None,
        listen: str = "",
        summary: str = "",
        drain_timeout: float = 15.0,
    ) -> None:
        super().__init__()
        self.record = record
        self.mirrors = list(mirrors)
        self.sinks: list[ISink] = [record, *self.mirrors]
        self.router = router
        self.factory = receiver
        self.metrics = receiver.metrics
        self.reactor = reactor
        self.stats = stats
        self.reconciler = reconciler
        self.listen = listen
        self.summary = summary
        """Where messages are stored, for start-up lines (no secrets)."""
        self.drain_timeout = drain_timeout
        self.ready = False
        self._listener = listener
        listener.setServiceParent(self)
        if site is not None:
            site.setServiceParent(self)
        self._ready_waiters: list[defer.Deferred[None]] = []
        self._retry_wait: defer.Deferred[None] | None = None
        self._stopping = False

    @property
    def port(self) -> Any:
        """The receiver's listening port (an ``IListeningPort``) once bound, else None."""
        return self._listener.port

    def when_ready(self) -> defer.Deferred[None]:
        """Fire once the sinks answer and the stats are seeded (at once if they already are)."""
        if self.ready:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._ready_waiters.append(d)
        return d

    def startService(self) -> None:
        self.router.ready = False
        super().startService()  # the listener binds here, the site starts serving
        self._start().addErrback(lambda f: self.log.failure("Start-up failed", f))

    @defer.inlineCallbacks
    def _start(self) -> Any:
        """Sinks, then the stats seed, then the reconciler, then ready."""
        started = yield self._start_sinks()
        if not started:
            return
        self.router.ready = True
        self.log.info("Sinks ready: {sinks}", sinks=", ".join(s.name for s in self.sinks))
        if self.stats is not None:
            try:
                yield _seed_stats(self, self.stats)
            except Exception:
                self.log.failure("Could not seed the stats from the record")
        if self.reconciler is not None and not self._stopping:
            self.reconciler.setServiceParent(self)
        self.ready = True
        notify_ready(f"eth-server ready: {self.listen}, storing to {self.summary}")
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    @defer.inlineCallbacks
    def _start_sinks(self) -> Any:
        """Start every sink, retrying each with a capped backoff until it answers; False if stopped first.

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
                    if self._stopping:  # stopService may set it while sink.start() runs
                        # Stopped while starting: the sink was told, nothing to retry.
                        return False  # type: ignore[unreachable]  # mypy narrowed _stopping
                    if failed_at is None:
                        failed_at = self.reactor.seconds()
                        self.log.error(
                            "Sink {sink} could not start: {error}; retrying every {delay:.0f}s to "
                            "{longest:.0f}s until it answers (ERR unavailable meanwhile)",
                            sink=sink.name,
                            error=_reason(e),
                            delay=delay,
                            longest=START_RETRY_MAX,
                        )
                    else:
                        self.log.debug(
                            "Sink {sink} still cannot start: {error}",
                            sink=sink.name,
                            error=_reason(e),
                        )
                    self._retry_wait = task.deferLater(self.reactor, delay, lambda: None)
                    try:
                        yield self._retry_wait
                    except defer.CancelledError:
                        return False
                    finally:
                        self._retry_wait = None
                    delay = min(delay * 2, START_RETRY_MAX)
            if self._stopping:
                return False
            if failed_at is not None:
                self.log.info(
                    "Sink {sink} started after {seconds:.1f}s and {attempts} attempts",
                    sink=sink.name,
                    seconds=self.reactor.seconds() - failed_at,
                    attempts=attempts,
                )
        return True

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        self._stopping = True
        if self._retry_wait is not None:
            self._retry_wait.cancel()
        self.factory.stop_reading()
        yield super().stopService()  # stop listening, the site and the reconciler
        drained = self.router.drain()
        drained.addTimeout(self.drain_timeout, self.reactor)
        try:
            yield drained
        except defer.TimeoutError:
            self.log.warn(
                "Stopped with {n} messages unstored after {t}s: clients will resend them",
                n=self.router.pending,
                t=self.drain_timeout,
            )
        self.router.ready = False
        self.factory.close_all()
        for sink in reversed(self.sinks):
            try:
                yield sink.stop()
            except Exception:
                self.log.failure("Sink {sink} did not stop cleanly", sink=sink.name)


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__


def build_server(settings: ServerSettings, *, reactor: Any = None) -> ServerService:
    """Everything ``eth server`` runs, built from ``settings``: sinks, then :func:`assemble_server`."""
    reactor = maybe_global_reactor(reactor)
    record, mirrors = create_sinks(settings.storage, reactor)
    return assemble_server(
        settings,
        record=record,
        mirrors=mirrors,
        reactor=reactor,
        summary=settings.storage.summary(),
    )


def assemble_server(
    settings: ServerSettings,
    *,
    record: IRecord,
    mirrors: Sequence[ISink] = (),
    reactor: Any = None,
    metrics: ServerMetrics | None = None,
    summary: str = "",
) -> ServerService:
    """The server around already-built sinks: the batcher first, then the router and receiver sharing it."""
    reactor = maybe_global_reactor(reactor)
    metrics = metrics if metrics is not None else ServerMetrics()
    batcher = ReplyBatcher()
    batch = settings.batch
    if batch.pipeline and not mirrors:
        from dataclasses import replace

        batch = replace(batch, pipeline=False)  # nothing to overlap with
    router = Router(
        record, mirrors, clock=reactor, settings=batch, metrics=metrics, answering=batcher.hold
    )
    tls_options = settings.tls.options()
    gated = tls_options is not None or settings.secret is not None
    receiver = ReceiverFactory(
        router.submit,
        clock=reactor,
        metrics=metrics,
        limits=settings.limits,
        batcher=batcher,
        caps_in_front=gated,
        log_payloads=settings.verbose,
    )
    from eth_twisted.link.tls import listen_endpoint

    endpoint = listen_endpoint(reactor, settings.listen, tls=tls_options)
    listening = gated_factory(
        receiver,
        reactor=reactor,
        tls=tls_options is not None,
        secret=settings.secret,
        allow_plaintext=settings.allow_plaintext_secret,
        listen=settings.listen,
        metrics=metrics,
    )
    from eth_twisted.web.stats import ServerStats

    stats = ServerStats(reactor)
    router.observers.append(stats.observe)
    alarms = getattr(record, "chain_alarms", None)
    if isinstance(alarms, list):  # the record logs each violation; the metric counts them
        alarms.append(lambda v: metrics.finality_violations.labels(kind=v.kind).inc())
    site = None
    if settings.site.stats is not None:
        from eth_twisted.web.site import make_server_site

        web = make_server_site(
            record=record,
            sinks=[record, *mirrors],
            stats=stats,
            metrics=metrics,
            clock=reactor,
            token=settings.site.stats_token,
            allowed_hosts=settings.site.stats_allowed_hosts,
            limits=settings.site.limits,
        )
        site = strports.service(settings.site.stats, web, reactor=reactor)
        site.setName("stats")
    reconciler = _reconciler(record, mirrors, reactor, settings.reconcile_interval, metrics)
    server = ServerService(
        record=record,
        mirrors=mirrors,
        router=router,
        receiver=receiver,
        listener=_Listener(endpoint, listening),
        reactor=reactor,
        stats=stats,
        site=site,
        reconciler=reconciler,
        listen=settings.listen,
        summary=summary,
        drain_timeout=settings.drain_timeout,
    )
    server.log.info(
        "eth-server listening on {listen}, storing to {summary}",
        listen=settings.listen,
        summary=summary,
    )
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
            factory,
            secret,
            reactor,
            allow_plaintext=allow_plaintext,
            on_failure=lambda reason: metrics.protocol_errors.labels(reason=f"auth-{reason}").inc(),
        )
    if tls:
        factory = TLSGateFactory(
            factory,
            clock=reactor,
            on_failure=lambda reason: metrics.protocol_errors.labels(reason=f"tls-{reason}").inc(),
        )
    if factory is not receiver:
        factory = CapsFactory(factory, receiver.caps)
    return factory


def _reconciler(
    record: IRecord, mirrors: Sequence[ISink], reactor: Any, interval: float, metrics: ServerMetrics
) -> service.Service | None:
    """The service that rebuilds Redis from SQL, if Redis mirrors; else None.

    It rebuilds at start, every ``interval`` and after an outage.
    """
    from eth_twisted.sinks.reconcile import Reconciler
    from eth_twisted.sinks.redis import RedisSink

    redis = next((m for m in mirrors if isinstance(m, RedisSink)), None)
    if redis is None:
        return None
    reconciler = Reconciler(redis, record, interval=interval, clock=reactor, metrics=metrics)
    reconciler.setName("reconciler")
    return reconciler


@defer.inlineCallbacks
def _seed_stats(server: ServerService, stats: Any) -> Any:
    """The stats start from the record's totals and, with Redis, its per-client message counts."""
    totals = yield server.record.totals()
    ip_messages = None
    redis = next((m for m in server.mirrors if m.name == "redis"), None)
    if redis is not None:
        try:
            _firsts, ip_messages = yield cast(Any, redis).read_counts()
        except Exception as e:
            server.log.warn(
                "Could not read per-client message counts from Redis: {error}", error=_reason(e)
            )
    stats.seed(totals, ip_messages)
