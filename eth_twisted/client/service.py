"""The eth-client assembled: RPC client, poller, durable outbox, sender link, stats site.

:func:`make_client_service` takes plain arguments (the tap turns options into
them) and returns an :class:`EthClientService` whose children are the
delivery link (started first, stopped last) and the poller; the stats site,
when configured, is a third child. Stopping closes the RPC connection pool
and then the outbox file.

A fatal condition (the RPC endpoints or the stored cursor disagree about the
chain) is reported by the poller through :meth:`EthClientService.fatal`: it
logs critically, sets ``exit_code`` to 2 and stops the reactor. The ``eth``
CLI returns ``exit_code`` as the process status. Under ``twistd``, which has
no exit-code channel, the service is built with ``exit_on_fatal=True`` and
registers an ``atexit`` hook that ends the process with status 2 after
twistd has finished its own shutdown (pidfile removed, logs flushed), so a
supervisor sees the failure instead of a clean exit.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application import service, strports
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger

from eth_twisted import systemd
from eth_twisted.client.outbox import Outbox, open_outbox
from eth_twisted.client.sender import DeliveryService, DeliverySettings
from eth_twisted.metrics import ClientMetrics
from eth_twisted.web.site import make_client_site

log = Logger()

FATAL_EXIT_CODE = 2


class EthClientService(service.MultiService):
    """Everything ``eth client`` runs, with the parts others need as attributes.

    ``outbox``, ``poller``, ``delivery``, ``metrics`` and ``rpc`` are the
    parts; ``exit_code`` is 0 until :meth:`fatal` is called.
    """

    def __init__(
        self,
        *,
        reactor: Any,
        outbox: Outbox,
        metrics: ClientMetrics,
        delivery: DeliveryService,
        rpc: Any,
        interval: float,
        exit_on_fatal: bool = False,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.outbox = outbox
        self.metrics = metrics
        self.delivery = delivery
        self.rpc = rpc
        self.interval = interval
        self.poller: Any = None
        self.stats: service.Service | None = None
        self.exit_code = 0
        self.fatal_message: str | None = None
        self.exit_on_fatal = exit_on_fatal
        delivery.setServiceParent(self)

    def fatal(self, message: str) -> None:
        """Stop the process with a non-zero status after logging ``message``."""
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

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """For /readyz: linked to the server and a poll succeeded recently."""
        now = self.reactor.seconds()
        last_poll = getattr(self.poller, "last_success", None)
        fresh = last_poll is not None and now - last_poll <= max(3 * self.interval, 30.0)
        detail = {
            "server_link": {"ok": self.delivery.connected, "last_ack_at": self.delivery.last_ack_at},
            "poller": {"ok": fresh, "last_success": last_poll},
            "outbox": {"ok": self.outbox.free_slots() > 0, "depth": self.outbox.depth(),
                       "free_slots": self.outbox.free_slots()},
        }
        ok = self.delivery.connected and fresh and self.outbox.free_slots() > 0
        return ok, detail

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
        close = getattr(self.rpc, "close", None)
        if close is None:
            return result
        closing = defer.maybeDeferred(close)
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
    *,
    reactor: Any,
    connect: str,
    rpc_urls: Sequence[str],
    spool: str | None = None,
    max_outbox: int = 100_000,
    reset_cursor: bool = False,
    fmt: str = "html",
    interval: float = 5.0,
    max_backfill: int = 128,
    max_gap: int | None = None,
    chain_id: int | None = None,
    delivery: DeliverySettings | None = None,
    rpc_timeout: float = 10.0,
    stats_listen: str | None = None,
    stats_token: str | None = None,
    allowed_hosts: Sequence[str] | None = None,
    stats_limits: Any = None,
    exit_on_fatal: bool = False,
    agent: Any = None,
    metrics: ClientMetrics | None = None,
    tls: dict[str, Any] | None = None,
    secret: bytes | None = None,
    client_name: str = "eth-client",
    allow_plaintext_secret: bool = False,
) -> EthClientService:
    """Build the client. Opens (and locks) the outbox now, so a bad spool fails at once.

    ``connect`` is a client endpoint string (``tcp:host=H:port=P``);
    ``agent`` injects the ``IAgent`` the RPC calls go through (tests).
    """
    from eth_twisted.client.poller import BlockPoller, PollSettings
    from eth_twisted.client.rpc import RPCClient, RPCSettings

    metrics = metrics if metrics is not None else ClientMetrics()
    outbox = open_outbox(spool, max_messages=max_outbox, clock=reactor)
    try:
        if reset_cursor:
            old = outbox.cursor()
            outbox.reset_cursor()
            log.warn(
                "--reset-cursor: forgot the stored cursor ({cursor}); starting at the chain head; "
                "{depth} waiting messages are still delivered",
                cursor=old, depth=outbox.depth(),
            )
        endpoint = link_endpoint(reactor, connect, tls=tls, secret=secret, name=client_name,
                                 allow_plaintext=allow_plaintext_secret)
        link = DeliveryService(endpoint, outbox, delivery, clock=reactor, metrics=metrics, server=connect)
        rpc = RPCClient(RPCSettings(rpc=tuple(rpc_urls), rpc_timeout=rpc_timeout), agent=agent, clock=reactor,
                        metrics=metrics)
        client = EthClientService(
            reactor=reactor, outbox=outbox, metrics=metrics, delivery=link, rpc=rpc,
            interval=interval, exit_on_fatal=exit_on_fatal,
        )
        poll = PollSettings(interval=interval, max_backfill=max_backfill, max_gap=max_gap, format=fmt,
                            chain_id=chain_id)
        poller = BlockPoller(
            rpc, outbox, poll, clock=reactor, metrics=metrics,
            on_enqueued=link.wake, fatal=client.fatal, close_rpc=False,
        )
        poller.setServiceParent(client)
        client.poller = poller
        if stats_listen:
            client.stats = _stats_service(client, stats_listen, reactor, stats_token, allowed_hosts,
                                          stats_limits)
    except BaseException:
        outbox.close()
        raise
    log.info(
        "eth-client: {urls} every {interval} s ({fmt}) -> {connect}; outbox {spool}",
        urls=len(rpc_urls), interval=interval, fmt=fmt, connect=connect, spool=outbox.path,
    )
    return client


def link_endpoint(
    reactor: Any,
    connect: str,
    *,
    tls: dict[str, Any] | None = None,
    secret: bytes | None = None,
    name: str = "eth-client",
    allow_plaintext: bool = False,
) -> Any:
    """The endpoint the sender connects with: plain, TLS (verified, never falling back), and/or
    behind the shared-secret handshake.

    ``tls`` is ``{"host", "port", "ca", "cert", "key", "hostname", "min_version"}``.
    """
    from eth_twisted.link.handshake import AuthClientEndpoint
    from eth_twisted.link.secret import check_secret_transport
    from eth_twisted.link.tls import client_tls_endpoint

    check_secret_transport(secret, tls is not None or connect.startswith("tls:"), allow_plaintext)
    if tls is not None:
        endpoint = client_tls_endpoint(
            reactor, tls["host"], tls["port"], ca_file=tls.get("ca"), cert_file=tls.get("cert"),
            key_file=tls.get("key"), hostname=tls.get("hostname"), min_tls=tls.get("min_version", "1.2"),
        )
    else:
        endpoint = clientFromString(reactor, connect)
    if secret is not None:
        endpoint = AuthClientEndpoint(endpoint, secret, name, clock=reactor, allow_plaintext=allow_plaintext,
                                      server=connect)
    return endpoint


def _stats_service(
    client: EthClientService, listen: str, reactor: Any, token: str | None = None,
    allowed_hosts: Sequence[str] | None = None, limits: Any = None,
) -> service.Service:
    site = make_client_site(metrics=client.metrics, readiness=client.readiness, clock=reactor,
                            token=token, allowed_hosts=allowed_hosts, limits=limits)
    svc = strports.service(listen, site, reactor=reactor)
    svc.setName("stats")
    svc.setServiceParent(client)
    return svc
