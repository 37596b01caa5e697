"""The eth-client assembled: RPC client, poller, durable outbox, sender link, stats site.

:func:`make_client_service` builds an :class:`EthClientService` from one checked
:class:`ClientSettings`; :meth:`EthClientService.fatal` says how a chain mismatch ends the
process. docs/architecture.md (section 2, "eth client") draws the service tree and its
start and stop order.
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application import service, strports
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger

from eth_twisted import systemd
from eth_twisted.client.endpoints import RPCSettings
from eth_twisted.client.finality import FinalitySettings, FinalityTracker
from eth_twisted.client.outbox import Outbox, OutboxSettings, open_outbox
from eth_twisted.client.poller import BlockPoller, PollSettings
from eth_twisted.client.push import HeadSources, PushSettings
from eth_twisted.client.rpc import RPCClient
from eth_twisted.client.sender import DeliveryService, DeliverySettings
from eth_twisted.errors import ConfigError
from eth_twisted.metrics import ClientMetrics
from eth_twisted.options import int_in, setting
from eth_twisted.web.app import SiteSettings
from eth_twisted.web.site import make_client_site

log = Logger()

FATAL_EXIT_CODE = 2


def tcp_client_endpoint(host: str, port: int) -> str:
    """The client endpoint string for ``--host``/``--port`` (IPv6 colons escaped)."""
    return f"tcp:host={host.replace(':', chr(92) + ':')}:port={port}"


@dataclass(frozen=True)
class LinkSettings:
    """Where the server is and how the link to it is secured.

    The option fields are the client options of their names.
    """

    host: str = setting("127.0.0.1", "Server host")
    port: int = setting(9999, "Server port", int_in(1, 65535))
    connect: str | None = setting(
        None, "Server endpoint string instead of --host/--port, e.g. tcp:host=h:port=9999"
    )
    tls: bool = setting(
        False,
        "Connect to --host/--port over TLS, verifying the server's certificate and name "
        "(no plaintext fallback)",
    )
    tls_ca: str | None = setting(
        None, "PEM CA the server's certificate must chain to [default: the system's trust store]"
    )
    tls_cert: str | None = setting(None, "PEM client certificate (for servers that require one)")
    tls_key: str | None = setting(None, "PEM private key of --tls-cert")
    tls_hostname: str | None = setting(
        None, "Name the server's certificate must carry [default: --host]"
    )
    tls_min_version: str = setting("1.2", "Lowest TLS version: 1.2 or 1.3")
    client_name: str = setting(
        "eth-client",
        "Name this client proves in the shared-secret handshake (recorded as client_id)",
    )
    allow_plaintext_secret: bool = setting(False, "Allow the shared-secret handshake without TLS")
    secret: bytes | None = field(default=None, repr=False)
    """The shared secret, or None: no handshake (the tap loads it: --secret-file, ETH_SECRET, credentials)."""

    @property
    def server(self) -> str:
        """The endpoint string connected to: ``connect``, else ``host``/``port``.

        Always ``host``/``port`` with ``tls``.
        """
        if self.connect and not self.tls:
            return self.connect
        return tcp_client_endpoint(self.host, self.port)

    @property
    def encrypted(self) -> bool:
        """True when the link is TLS (``--tls``, or a ``tls:`` endpoint string)."""
        return self.tls or self.server.startswith("tls:")

    def check(self) -> None:
        """Raise ValueError naming the first option that cannot work (files are looked for)."""
        names = {"tls-ca": self.tls_ca, "tls-cert": self.tls_cert, "tls-key": self.tls_key}
        if not self.tls:
            for name, value in (*names.items(), ("tls-hostname", self.tls_hostname)):
                if value:
                    raise ValueError(f"--{name} needs --tls")
            if self.connect:
                _check_endpoint(self.connect)
        else:
            if bool(self.tls_cert) != bool(self.tls_key):
                raise ValueError("--tls-cert and --tls-key go together")
            for name, path in names.items():
                if path and not Path(path).is_file():
                    raise ValueError(f"--{name}: no such file {path}")
            if self.tls_min_version not in ("1.2", "1.3"):
                raise ValueError(
                    f"--tls-min-version: expected 1.2 or 1.3, got {self.tls_min_version!r}"
                )
        from eth_twisted.link.secret import check_secret_transport

        try:
            check_secret_transport(self.secret, self.encrypted, self.allow_plaintext_secret)
        except ConfigError as e:
            raise ValueError(str(e)) from None


def _check_endpoint(description: str) -> None:
    """Parse ``description`` as a client endpoint string, or raise a ValueError naming --connect."""
    from twisted.internet.testing import MemoryReactor

    try:
        clientFromString(MemoryReactor(), description)
    except Exception as e:  # ValueError, KeyError, TypeError from the parsers
        raise ValueError(f"--connect: not a client endpoint string {description!r}: {e}") from None


@dataclass(frozen=True)
class ClientSettings:
    """Everything ``eth client`` runs with; each part's defaults live in its own settings class."""

    link: LinkSettings = field(default_factory=LinkSettings)
    rpc: RPCSettings = field(default_factory=RPCSettings)
    poll: PollSettings = field(default_factory=PollSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    push: PushSettings = field(default_factory=PushSettings)
    finality: FinalitySettings = field(default_factory=FinalitySettings)
    site: SiteSettings = field(
        default_factory=lambda: SiteSettings(stats="tcp:8081:interface=127.0.0.1")
    )
    """The stats site (/healthz, /readyz, /metrics); ``site.stats`` None serves none."""
    reset_cursor: bool = setting(
        False, "Forget the stored cursor and start at the chain head (after a chain change)"
    )

    def check(self) -> None:
        """Raise ValueError naming the option of the first value that makes no sense."""
        parts = (self.link, self.rpc, self.poll, self.outbox, self.delivery, self.push)
        for part in (*parts, self.finality, self.site.limits):
            part.check()


class EthClientService(service.MultiService):
    """Everything ``eth client`` runs, with the parts others need as attributes.

    ``outbox``, ``poller`` (built here, reporting to :meth:`fatal`),
    ``delivery``, ``metrics`` and ``rpc`` are the parts; ``exit_code`` is 0
    until :meth:`fatal` is called.
    """

    def __init__(
        self,
        *,
        reactor: Any,
        outbox: Outbox,
        rpc: RPCClient,
        delivery: DeliveryService,
        poll: PollSettings,
        metrics: ClientMetrics,
        exit_on_fatal: bool = False,
        push: PushSettings | None = None,
        finality: FinalitySettings | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.outbox = outbox
        self.metrics = metrics
        self.delivery = delivery
        self.rpc = rpc
        self.poller = BlockPoller(
            rpc,
            outbox,
            poll,
            clock=reactor,
            metrics=metrics,
            on_enqueued=delivery.wake,
            fatal=self.fatal,
            close_rpc=False,
        )
        self.stats: service.Service | None = None
        self.exit_code = 0
        self.fatal_message: str | None = None
        self.exit_on_fatal = exit_on_fatal
        self._behind_since: float | None = None
        delivery.setServiceParent(self)
        self.poller.setServiceParent(self)
        self.finality = FinalityTracker(
            rpc, self.poller.pipeline, finality, fmt=poll.format, clock=reactor, metrics=metrics
        )
        self.finality.setServiceParent(self)
        self.heads = HeadSources(
            rpc,
            self.poller,
            push or PushSettings(),
            reactor=reactor,
            metrics=metrics,
            request_timeout=rpc.settings.rpc_timeout,
        )
        self.heads.setServiceParent(self)

    def fatal(self, message: str) -> None:
        """Stop the process with a non-zero status after logging ``message``.

        The poller calls it for a fatal condition (the RPC endpoints or the stored
        cursor disagree about the chain): it logs critically, sets ``exit_code`` to 2
        and stops the reactor. The ``eth`` CLI returns ``exit_code`` as the process
        status. Under ``twistd``, which has no exit-code channel, the service is built
        with ``exit_on_fatal=True`` and registers an ``atexit`` hook that ends the
        process with status 2 after twistd has finished its own shutdown (pidfile
        removed, logs flushed), so a supervisor sees the failure instead of a clean exit.
        """
        if self.fatal_message is not None:
            return
        self.fatal_message = message
        self.exit_code = FATAL_EXIT_CODE
        log.critical("eth-client cannot continue: {message}", message=message)
        if self.exit_on_fatal:
            atexit.register(_exit_with, FATAL_EXIT_CODE)
        # Never stop from inside the caller's own callback chain.
        self.reactor.callLater(0, self._stop_reactor)

    def _stop_reactor(self) -> None:
        try:
            self.reactor.stop()
        except Exception as e:  # ReactorNotRunning: already on its way down
            log.info("Reactor already stopping: {error}", error=e)

    def status(self) -> dict[str, Any]:
        """For /api/status and ``eth status`` (:func:`eth_twisted.client.status.client_status`)."""
        from eth_twisted.client.status import client_status

        return client_status(self)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """For /readyz: linked to the server and a poll succeeded recently."""
        now = self.reactor.seconds()
        last_poll = self.poller.last_success
        fresh = last_poll is not None and now - last_poll <= max(
            3 * self.poller.settings.interval, 30.0
        )
        heads_ok = self._heads_follow(now)
        detail = {
            "server_link": {
                "ok": self.delivery.connected,
                "last_ack_at": self.delivery.last_ack_at,
            },
            "poller": {"ok": fresh, "last_success": last_poll},
            "outbox": {
                "ok": self.outbox.free_slots() > 0,
                "depth": self.outbox.depth(),
                "free_slots": self.outbox.free_slots(),
            },
            "heads": {"ok": heads_ok, **self.heads.status()},
            "finality": self.finality.status(),
        }
        ok = self.delivery.connected and fresh and self.outbox.free_slots() > 0 and heads_ok
        return ok, detail

    def _heads_follow(self, now: float) -> bool:
        """False when the polled head has been above the held tip for too long (heads stopped)."""
        polled, tip = self.poller.last_head, self.poller.pipeline.tip
        if polled is None or tip is None or polled <= tip[0]:
            self._behind_since = None
            return True
        if self._behind_since is None:
            self._behind_since = now
        limit = max(3 * self.poller.settings.interval, 30.0)
        return now - self._behind_since <= limit

    def startService(self) -> None:
        super().startService()
        systemd.notify_ready("eth-client ready")

    def stopService(self) -> defer.Deferred[None]:
        systemd.notify_stopping("eth-client stopping")
        d: defer.Deferred[Any] = defer.maybeDeferred(super().stopService)
        d.addBoth(self._close_rpc)
        d.addBoth(self._close_outbox)
        return d

    def _close_rpc(self, result: Any) -> Any:
        closing = defer.maybeDeferred(self.rpc.close)
        closing.addErrback(lambda f: log.failure("Closing the RPC client failed", f))
        return closing.addCallback(lambda _: result)

    def _close_outbox(self, result: Any) -> Any:
        self.outbox.close()
        return result


def _exit_with(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def make_client_service(
    settings: ClientSettings,
    *,
    reactor: Any,
    agent: Any = None,
    metrics: ClientMetrics | None = None,
    exit_on_fatal: bool = False,
) -> EthClientService:
    """Build the client. Opens (and locks) the outbox now, so a bad spool fails at once.

    ``settings`` are trusted (the tap builds and checks them from the options; every
    part's defaults live in that part's own settings class); ``agent`` injects the
    ``IAgent`` the RPC calls go through (tests). The service's children are the
    delivery link (started first, stopped last) and the poller; the stats site, when
    configured, is a third child. Stopping closes the RPC connection pool and then the
    outbox file.
    """
    metrics = metrics if metrics is not None else ClientMetrics()
    outbox = open_outbox(settings.outbox, clock=reactor)
    try:
        if settings.reset_cursor:
            old = outbox.cursor()
            outbox.reset_cursor()
            log.warn(
                "--reset-cursor: forgot the stored cursor ({cursor}); starting at the chain head; "
                "{depth} waiting messages are still delivered",
                cursor=old,
                depth=outbox.depth(),
            )
        link = settings.link
        delivery = DeliveryService(
            link_endpoint(reactor, link),
            outbox,
            settings.delivery,
            clock=reactor,
            metrics=metrics,
            server=link.server,
        )
        rpc = RPCClient(settings.rpc, agent=agent, clock=reactor, metrics=metrics)
        client = EthClientService(
            reactor=reactor,
            outbox=outbox,
            rpc=rpc,
            delivery=delivery,
            poll=settings.poll,
            metrics=metrics,
            exit_on_fatal=exit_on_fatal,
            push=settings.push,
            finality=settings.finality,
        )
        if settings.site.stats:
            client.stats = _stats_service(client, settings.site, reactor)
    except BaseException:
        outbox.close()
        raise
    log.info(
        "eth-client: {urls} every {interval} s ({payloads}) -> {server}; outbox {spool}",
        urls=len(settings.rpc.rpc),
        interval=settings.poll.interval,
        payloads=settings.poll.format,
        server=link.server,
        spool=outbox.path,
    )
    return client


def link_endpoint(reactor: Any, link: LinkSettings) -> Any:
    """The endpoint the sender connects with: plain or TLS, and perhaps behind the handshake.

    TLS is verified and never falls back to plaintext; with a secret, the endpoint is
    wrapped in the shared-secret handshake.
    """
    from eth_twisted.link.handshake import AuthClientEndpoint
    from eth_twisted.link.tls import client_tls_endpoint

    if link.tls:
        endpoint = client_tls_endpoint(
            reactor,
            link.host,
            link.port,
            ca_file=link.tls_ca,
            cert_file=link.tls_cert,
            key_file=link.tls_key,
            hostname=link.tls_hostname,
            min_tls=link.tls_min_version,
        )
    else:
        endpoint = clientFromString(reactor, link.server)
    if link.secret is not None:
        endpoint = AuthClientEndpoint(
            endpoint,
            link.secret,
            link.client_name,
            clock=reactor,
            allow_plaintext=link.allow_plaintext_secret,
            server=link.server,
        )
    return endpoint


def _stats_service(client: EthClientService, site: SiteSettings, reactor: Any) -> service.Service:
    assert site.stats is not None
    resource = make_client_site(
        metrics=client.metrics,
        readiness=client.readiness,
        status=client.status,
        clock=reactor,
        token=site.stats_token,
        allowed_hosts=site.stats_allowed_hosts,
        limits=site.limits,
    )
    svc = strports.service(site.stats, resource, reactor=reactor)
    svc.setName("stats")
    svc.setServiceParent(client)
    return svc
