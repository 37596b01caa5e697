"""Pushed heads: each node WebSocket feeds the head pipeline, and a watchdog checks its silence.

:class:`PushSource` connects one :class:`~eth_twisted.client.ws.NodeSocket`'s pushes to the
:class:`~eth_twisted.client.heads.HeadPipeline`: after every (re)subscribe it checks the
node's chain, fetches the head and backfills from the cursor before it takes pushes as new.
:class:`Watchdog` compares a silent subscription with the independently polled head: only a
polled head above the last push is a stall (a quiet chain raises nothing); the first stall
resubscribes, a second within a window reconnects, and after that the poll carries the
heads while the socket is retried. docs/architecture.md ("Heads") draws the sources.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from eth_twisted.client.endpoints import UNUSABLE, RPCEndpoint, check_header
from eth_twisted.client.heads import Header, HeadPipeline, number_of
from eth_twisted.client.jsonrpc import RPCFailure, check_block, hex_quantity
from eth_twisted.client.rpc import RPCClient
from eth_twisted.errors import ChainMismatch
from eth_twisted.metrics import ClientMetrics
from eth_twisted.options import positive_float, setting
from eth_twisted.outage import Episode

log = Logger(namespace="eth_twisted.client.push")

HELD_PUSHES = 1024
"""Pushes kept while the source syncs after a (re)subscribe; past it the oldest go (the
head fetched after the sync brings them back by parent hash)."""

DEFAULT_BLOCK_TIME = 12.0
"""Seconds per block assumed until pushed timestamps say otherwise (Ethereum mainnet)."""


def optional_seconds(value: str) -> float | None:
    """A positive number of seconds, or None for 'auto'."""
    if value.strip().lower() in ("", "auto"):
        return None
    return positive_float(value)


@dataclass(frozen=True)
class PushSettings:
    """How pushed heads are watched; the option fields are the client options of their names."""

    stall_after: float | None = setting(
        None,
        "Seconds without a push before the subscription is compared with the polled head "
        "[default: auto, clamp(30 x block time, 30 s, 5 min)]",
        optional_seconds,
    )
    ws_heartbeat: float = setting(
        20.0, "Seconds between heartbeats (eth_blockNumber) on each node WebSocket", positive_float
    )
    stall_window: float = 3.0
    """Stalls within this many ``stall_after`` escalate (resubscribe, reconnect, poll)."""

    def check(self) -> None:
        """Raise ValueError naming the option of a value that makes no sense."""
        if self.stall_after is not None and not self.stall_after > 0:
            raise ValueError(f"--stall-after: must be positive, got {self.stall_after}")
        if not self.ws_heartbeat > 0:
            raise ValueError(f"--ws-heartbeat: must be positive, got {self.ws_heartbeat}")


def stall_threshold(block_time: float) -> float:
    """clamp(30 x block time, 30 s, 5 min): how long a subscription may be silent."""
    return min(max(30.0 * block_time, 30.0), 300.0)


class PushSource:
    """One node WebSocket's pushes into the pipeline, with a watchdog on its silence.

    ``socket`` is the endpoint's NodeSocket (its ``on_head`` and ``on_subscribed`` are
    set here); ``endpoint`` is its RPCClient endpoint (its trust is the pool's);
    ``polled_head`` returns the last head the poll agreed on, or None.
    """

    def __init__(
        self,
        socket: Any,
        endpoint: RPCEndpoint,
        rpc: RPCClient,
        pipeline: HeadPipeline,
        *,
        clock: IReactorTime,
        polled_head: Callable[[], int | None],
        settings: PushSettings | None = None,
        metrics: ClientMetrics | None = None,
    ) -> None:
        self.socket = socket
        self.endpoint = endpoint
        self.rpc = rpc
        self.pipeline = pipeline
        self.clock = clock
        self.polled_head = polled_head
        self.settings = settings if settings is not None else PushSettings()
        self.metrics = metrics
        self.label: str = socket.label
        self.synced = False
        """Since the last (re)subscribe, the chain was checked and the head fetched."""
        self.last_push_number: int | None = None
        self.silent_since: float | None = None
        """Clock time of the last push, or of the last (re)subscribe when later."""
        self.mode = "push"
        """``push`` while the subscription delivers, ``poll`` after repeated stalls."""
        self.stalls: deque[float] = deque(maxlen=8)
        self.checks = 0
        self._held: deque[Header] = deque(maxlen=HELD_PUSHES)
        self._timestamps: deque[int] = deque(maxlen=33)
        self._sync_timer: IDelayedCall | None = None
        self._watch: LoopingCall | None = None
        self.trouble = Episode(
            log,
            self.clock.seconds,
            self.label,
            start="WebSocket {subject} cannot be followed ({kind}): {detail}{note}",
            end="WebSocket {subject} is followed again after {duration:.1f} s",
        )
        socket.on_head = self.pushed
        socket.on_subscribed = self.subscribed

    # -- life ----------------------------------------------------------------

    def start(self) -> None:
        """Start the socket and the watchdog."""
        self.socket.start()
        self._watch = LoopingCall(self.check)
        self._watch.clock = self.clock
        self._watch.start(self.check_every, now=False).addErrback(
            lambda f: log.failure("the watchdog stopped", f)
        )

    def stop(self) -> Deferred[None]:
        """Stop the watchdog and the socket."""
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        if self._sync_timer is not None and self._sync_timer.active():
            self._sync_timer.cancel()
        return self.socket.stop()  # type: ignore[no-any-return]

    @property
    def block_time(self) -> float:
        """Seconds per block, from the pushed timestamps (median), else mainnet's 12."""
        stamps = list(self._timestamps)
        steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False) if b > a]
        return float(statistics.median(steps)) if steps else DEFAULT_BLOCK_TIME

    @property
    def stall_after(self) -> float:
        """``--stall-after``, or clamp(30 x block time, 30 s, 5 min)."""
        if self.settings.stall_after is not None:
            return self.settings.stall_after
        return stall_threshold(self.block_time)

    @property
    def check_every(self) -> float:
        """How often the watchdog looks: a third of the threshold, within 0.1 s .. 60 s."""
        return min(max(self.stall_after / 3.0, 0.1), 60.0)

    # -- after every (re)subscribe ---------------------------------------------

    def subscribed(self) -> None:
        """The socket (re)subscribed: check its chain, fetch its head, then take pushes."""
        self.synced = False
        self.silent_since = self.clock.seconds()
        self._sync()

    def _sync(self) -> None:
        self._sync_timer = None
        d = Deferred.fromCoroutine(self._sync_once())
        d.addErrback(self._sync_failed)

    async def _sync_once(self) -> None:
        identity = self.rpc.identity
        if identity is None:  # the poller has not chosen the chain yet
            self._retry_sync(0.5)
            return
        chain_id = hex_quantity(await self.socket.request("eth_chainId", []), "eth_chainId")
        genesis = check_block(
            await self.socket.request("eth_getBlockByNumber", ["0x0", False]), 0, self.label
        )["hash"]
        if (chain_id, genesis) != identity:
            raise ChainMismatch(
                f"it is on chain id {chain_id} with genesis {genesis}, not the followed chain "
                f"id {identity[0]} with genesis {identity[1]}"
            )
        head = check_header(
            await self.socket.request("eth_getBlockByNumber", ["latest", False]), self.label
        )
        self.synced = True
        self.trouble.recovered()
        # The head first: the pipeline backfills from the cursor by parent hash, then the
        # pushes held meanwhile (most are duplicates by then) are taken in order.
        self._feed(head, "backfill")
        held, self._held = self._held, deque(maxlen=HELD_PUSHES)
        for header in held:
            self._feed(header, "push")

    def _sync_failed(self, failure: Failure) -> None:
        if failure.check(RPCFailure, ChainMismatch):
            kind = failure.value.kind if failure.check(RPCFailure) else "wrong-chain"
            self.trouble.failed(kind, str(failure.value))
        else:
            self.trouble.failed("error", "unexpected error", failure)
        if self.socket.connected:
            self._retry_sync(5.0)

    def _retry_sync(self, delay: float) -> None:
        if self._sync_timer is None or not self._sync_timer.active():
            self._sync_timer = self.clock.callLater(delay, self._sync)

    # -- pushes ----------------------------------------------------------------

    def pushed(self, header: Header) -> None:
        """One valid head pushed by the subscription."""
        number = number_of(header)
        self.last_push_number = max(number, self.last_push_number or number)
        self.silent_since = self.clock.seconds()
        self._timestamps.append(int(header["timestamp"], 16))
        if self.mode != "push":
            self.mode = "push"
            log.info(
                "WebSocket {endpoint}: pushes arrive again; heads come from the subscription",
                endpoint=self.label,
            )
            self._publish_mode()
        if not self.synced:
            self._held.append(header)
            return
        if self.endpoint.distrust in UNUSABLE:
            return  # far ahead of the others, or on another chain: its heads are not followed
        self._feed(header, "push")

    def _feed(self, header: Header, source: str) -> None:
        d = self.pipeline.observe(header, source)
        d.addErrback(self._observe_failed)

    def _observe_failed(self, failure: Failure) -> None:
        if failure.check(RPCFailure):
            # A walk by parent hash that could not finish: the next header or poll retries.
            log.debug("a pushed head could not be followed yet: {why}", why=str(failure.value))
            return
        if failure.check(ChainMismatch):
            log.warn("a pushed head led to another chain: {why}", why=str(failure.value))
            return
        log.failure("following a pushed head failed", failure)

    # -- the watchdog ----------------------------------------------------------

    def check(self) -> None:
        """Compare a silence longer than ``stall_after`` with the polled head; act on a stall."""
        if not self.socket.connected or self.silent_since is None:
            return  # reconnecting: the ClientService's backoff is at work
        now = self.clock.seconds()
        if now - self.silent_since < self.stall_after:
            return
        self.checks += 1
        if self.metrics is not None:
            self.metrics.watchdog_checks.labels(self.label).inc()
        polled = self.polled_head()
        pushed = self.last_push_number
        if polled is None or (pushed is not None and polled <= pushed):
            return  # a quiet chain: the polled head has not moved past the last push
        if pushed is None and self.pipeline.tip is not None and polled <= self.pipeline.tip[0]:
            return  # nothing pushed yet and nothing new: quiet as well
        window = self.settings.stall_window * self.stall_after
        while self.stalls and now - self.stalls[0] > window:
            self.stalls.popleft()
        self.stalls.append(now)
        self.silent_since = now
        action = (
            ("resubscribe", "reconnect")[len(self.stalls) - 1] if len(self.stalls) <= 2 else "poll"
        )
        if self.metrics is not None:
            self.metrics.stalls.labels(self.label, action).inc()
        log.warn(
            "WebSocket {endpoint}: no push for {silence:.0f} s while the polled head moved to "
            "{polled} (last push {pushed}): {action}",
            endpoint=self.label,
            silence=self.stall_after,
            polled=polled,
            pushed=pushed,
            action={
                "resubscribe": "resubscribing",
                "reconnect": "reconnecting",
                "poll": "following the poll and retrying the socket",
            }[action],
        )
        if action == "resubscribe":
            self.socket.resubscribe().addErrback(lambda f: None)  # a failure drops the socket
            return
        if action == "poll" and self.mode != "poll":
            self.mode = "poll"
            self._publish_mode()
        self.socket.reconnect()

    def _publish_mode(self) -> None:
        if self.metrics is not None:
            self.metrics.head_source.state(self.mode)

    def status(self) -> dict[str, Any]:
        """What /readyz and /api/status say of this source."""
        return {
            "endpoint": self.label,
            "state": self.socket.state,
            "mode": self.mode,
            "last_push_at": self.socket.last_push_at,
            "last_push": self.last_push_number,
            "stall_after": self.stall_after,
            "stalls": len(self.stalls),
            "watchdog_checks": self.checks,
            "reconnects": self.socket.reconnects,
            "resubscribes": self.socket.resubscribes,
        }


class HeadSources(service.Service):
    """A :class:`PushSource` for each ``ws(s)://`` endpoint of ``rpc``, started and stopped together.

    Each endpoint's NodeSocket is attached to ``rpc`` (its requests go over the socket)
    and watched against the head ``poller`` last agreed on.
    """

    name = "heads"  # type: ignore[assignment]

    def __init__(
        self,
        rpc: RPCClient,
        poller: Any,
        settings: PushSettings,
        *,
        reactor: Any,
        metrics: ClientMetrics | None = None,
        request_timeout: float = 10.0,
        tls_trust: Any = None,
    ) -> None:
        from eth_twisted.client.ws import NodeSocket, SocketSettings

        self.sources: list[PushSource] = []
        socket_settings = SocketSettings(
            request_timeout=request_timeout,
            heartbeat=settings.ws_heartbeat,
            heartbeat_timeout=min(request_timeout, settings.ws_heartbeat),
        )
        for ep in rpc.endpoints:
            if ep.kind != "ws":
                continue
            socket = NodeSocket(
                ep.raw_url,
                socket_settings,
                reactor=reactor,
                clock=reactor,
                metrics=metrics,
                tls_trust=tls_trust,
            )
            rpc.attach_socket(ep.raw_url, socket)
            self.sources.append(
                PushSource(
                    socket,
                    ep,
                    rpc,
                    poller.pipeline,
                    clock=reactor,
                    polled_head=lambda: poller.last_head,
                    settings=settings,
                    metrics=metrics,
                )
            )
        if self.sources and metrics is not None:
            metrics.head_source.state("push")
        elif metrics is not None:
            metrics.head_source.state("poll")

    @property
    def source(self) -> str:
        """``push`` while some subscription delivers, else ``poll``."""
        live = [s for s in self.sources if s.mode == "push" and s.socket.connected]
        return "push" if live else "poll"

    def startService(self) -> None:
        """Connect every node WebSocket."""
        super().startService()
        for source in self.sources:
            source.start()

    def stopService(self) -> Deferred[Any]:
        """Close every node WebSocket."""
        super().stopService()
        return defer.gatherResults([s.stop() for s in self.sources])

    def status(self) -> dict[str, Any]:
        """The head source in use and each WebSocket's state."""
        return {"source": self.source, "sockets": [s.status() for s in self.sources]}
