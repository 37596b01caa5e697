"""A WebSocket JSON-RPC connection to one node, subscribed to ``newHeads``.

:class:`NodeSocket` keeps one connection up under a ``ClientService`` (capped, jittered
backoff that never gives up), subscribes on every connection, matches replies by id with
a deadline each, proves the socket answers with a heartbeat, and hands each valid head
pushed to ``on_head``. Every timer is on the injected clock. The autobahn plumbing is in
:mod:`eth_twisted.client.wsproto`; docs/architecture.md (section 1, "Node socket") places
it on the data path.
"""

from __future__ import annotations

import json
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from eth_twisted.client.jsonrpc import (
    RPCFailure,
    check_block,
    classify,
    envelope_result,
    hex_quantity,
)
from eth_twisted.client.wsproto import (
    NodeProtocol,
    WSTarget,
    node_endpoint,
    node_factory,
)
from eth_twisted.interfaces import maybe_global_reactor
from eth_twisted.metrics import ClientMetrics
from eth_twisted.outage import Episode

log = Logger(namespace="eth_twisted.client.ws")

STATES = ("connecting", "open", "subscribed", "down")
"""The values of :attr:`NodeSocket.state` (and of the ``eth_client_ws_state`` metric)."""
CLOSE_WAIT = 1.0
"""Seconds a closing connection may take before it is aborted."""
MAX_SUBSCRIPTION_ID = 130
"""Longest subscription id believed (geth and anvil send 16 bytes of hex)."""


@dataclass(frozen=True)
class SocketSettings:
    """How a :class:`NodeSocket` bounds and times its connection (seconds and bytes)."""

    request_timeout: float = 10.0
    """Deadline of each request (``timeout`` when it passes); the subscribe request too."""
    open_timeout: float = 5.0
    """Deadline of the TCP connect, and then of the TLS and WebSocket handshakes."""
    heartbeat: float = 20.0
    """Seconds between the ``eth_blockNumber`` heartbeats of a subscribed connection."""
    heartbeat_timeout: float = 10.0
    """A heartbeat unanswered this long drops the connection (it reconnects)."""
    max_message: int = 4 * 1024 * 1024
    """Largest message and frame accepted; a bigger one drops the connection (1009)."""
    max_pending_pushes: int = 10_000
    """Pushes held while the subscribe reply is awaited; past it the oldest go."""
    backoff_initial: float = 1.0
    """First reconnect delay; it doubles per failed attempt, plus up to 1 s of jitter."""
    backoff_max: float = 15.0
    """Longest reconnect delay before jitter."""

    def check(self) -> None:
        """Raise ValueError for a setting that cannot work."""
        for name in ("request_timeout", "open_timeout", "heartbeat", "heartbeat_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_message < 1024 or self.max_pending_pushes < 1:
            raise ValueError("max_message must be at least 1024 and max_pending_pushes positive")
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise ValueError("backoff_initial must be positive and at most backoff_max")


def retry_policy(
    settings: SocketSettings, jitter: Callable[[], float] = random.random
) -> Callable[[int], float]:
    """``ClientService``'s retry policy: ``min(initial * 2**(n-1), max) + jitter()``; no limit.

    ClientService numbers failed attempts from 1, so the first retry waits
    ``backoff_initial`` (plus jitter), the next twice that, up to ``backoff_max``.
    """

    def policy(attempt: int) -> float:
        steps = min(max(attempt - 1, 0), 64)
        return min(settings.backoff_initial * 2.0**steps, settings.backoff_max) + jitter()

    return policy


@dataclass
class _Pending:
    d: Deferred[Any]
    timer: IDelayedCall
    method: str
    proto: NodeProtocol


def _ignore(*args: Any) -> None:
    """The default callback: nothing."""


class NodeSocket:
    """One node's WebSocket: ``newHeads`` pushes, JSON-RPC requests, reconnects.

    ``on_head(header)`` gets every push of the current subscription, checked as
    :func:`~eth_twisted.client.jsonrpc.check_block` checks a fetched block: a new dict of
    ``number``, ``hash``, ``parentHash`` and ``timestamp`` (lowercase hex), the same shape
    as ``RPCClient.get_block``. Pushes that arrive before the subscribe reply are held
    (at most ``max_pending_pushes``) and delivered once the id is known; pushes of
    another id are ignored; malformed messages are counted and dropped.
    ``on_subscribed()`` runs after every successful (re)subscribe, before the held
    pushes; ``on_down(reason)`` when a connection that was open is lost.

    ``reactor`` makes the connections (the global one by default); ``clock`` runs every
    timer (the reactor by default). ``endpoint`` replaces the TCP endpoint (tests; TLS
    still goes on top for ``wss``); ``tls_trust`` is a trust root or a client TLS policy for ``wss``
    (:func:`~eth_twisted.client.wsproto.tls_creator`).
    """

    def __init__(
        self,
        url: str,
        settings: SocketSettings | None = None,
        *,
        reactor: Any = None,
        clock: IReactorTime | None = None,
        on_head: Callable[[dict[str, Any]], None] = _ignore,
        on_subscribed: Callable[[], None] = _ignore,
        on_down: Callable[[str], None] = _ignore,
        tls_trust: Any = None,
        metrics: ClientMetrics | None = None,
        endpoint: IStreamClientEndpoint | None = None,
        jitter: Callable[[], float] = random.random,
        quickack: bool = True,
    ) -> None:
        self.settings = settings if settings is not None else SocketSettings()
        self.settings.check()
        self.target = WSTarget.from_url(url)
        self.label = self.target.label
        self.reactor = maybe_global_reactor(reactor)
        self.clock: IReactorTime = clock if clock is not None else self.reactor
        self.on_head = on_head
        self.on_subscribed = on_subscribed
        self.on_down = on_down
        self.metrics = metrics
        self.state = "down"
        """``connecting``, ``open`` (handshake done), ``subscribed`` or ``down``."""
        self.subscription: str | None = None
        self.last_push_at: float | None = None
        """Clock time of the last valid head pushed."""
        self.pushes = 0
        """Valid heads delivered to ``on_head``."""
        self.reconnects = 0
        """Connections subscribed after the first."""
        self.resubscribes = 0
        """Successful :meth:`resubscribe` calls."""
        self.invalid = 0
        """Messages dropped as malformed (bad JSON, binary, bad pushes, unknown ids)."""
        self.heartbeat_head: int | None = None
        """The head the last heartbeat answered."""
        self.outage = Episode(
            log,
            self.clock.seconds,
            self.label,
            start="WebSocket {subject} is down ({kind}): {detail}{note}",
            end="WebSocket {subject} is subscribed again after {duration:.1f} s "
            "({failures} failures: {kinds})",
        )
        self.bad_input = Episode(
            log,
            self.clock.seconds,
            self.label,
            start="WebSocket {subject} sends malformed messages ({kind}): {detail}{note}",
            end="WebSocket {subject} sends well-formed messages again after {duration:.1f} s "
            "({failures} dropped: {kinds})",
        )
        self._proto: NodeProtocol | None = None
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._held: deque[dict[str, Any]] = deque()
        self._subscribing: int | None = None
        self._ready: Deferred[None] | None = None
        self._open_timer: IDelayedCall | None = None
        self._beat_timer: IDelayedCall | None = None
        self._close_timer: IDelayedCall | None = None
        self._subscribed_once = False
        self._stopping = False
        self._open_waiters: list[Deferred[None]] = []
        factory = node_factory(
            self, self.target, self.settings.max_message, self.reactor, quickack=quickack
        )
        self.service = ClientService(
            node_endpoint(
                self.reactor,
                self.target,
                self.settings.open_timeout,
                self._connect_failed,
                tls_trust,
                endpoint,
            ),
            factory,
            retryPolicy=retry_policy(self.settings, jitter),
            clock=self.clock,
            prepareConnection=self._prepare,
        )

    # -- public ---------------------------------------------------------------

    def start(self) -> None:
        """Start connecting (and reconnecting, for ever)."""
        self._stopping = False
        self._set_state("connecting")
        self.service.startService()

    def stop(self) -> Deferred[None]:
        """Stop reconnecting, fail pending requests (CancelledError), close the socket."""
        self._stopping = True
        self._fail_pending(None, lambda p: CancelledError(f"{p.method}: the socket stopped"))
        self._stop_beat()
        proto = self._proto
        if proto is not None and proto.can_send:
            proto.sendClose(1000)
            self._arm_close(proto)
        d: Deferred[None] = self.service.stopService()
        d.addBoth(self._stopped)
        return d

    def request(
        self, method: str, params: list[Any], timeout: float | None = None
    ) -> Deferred[Any]:
        """The ``result`` of one JSON-RPC call over the socket, or an :class:`RPCFailure`.

        Kinds: ``unavailable`` (not open), ``timeout`` (no reply within ``timeout``,
        default ``request_timeout``), ``rate-limit`` and ``rpc-error`` (an error object,
        classified as HTTP answers are), ``bad-envelope``, ``connection-lost``. The
        result is unchecked (the caller checks it, as with ``parse_envelope``).
        While the very first connection is still being made the request waits for it,
        at most ``open_timeout``, instead of failing at once (a later reconnect does not
        hold requests: the other endpoints answer meanwhile).
        """
        first = not self._subscribed_once and not self.outage.active
        if self.state == "connecting" and first and not self._stopping:
            return Deferred.fromCoroutine(self._request_when_open(method, params, timeout))
        return self._request_now(method, params, timeout)

    def _request_now(self, method: str, params: list[Any], timeout: float | None) -> Deferred[Any]:
        proto = self._proto
        if proto is None or not proto.can_send or self.state not in ("open", "subscribed"):
            return defer.fail(RPCFailure(f"{method}: not connected", "unavailable", self.label))
        return self._send(proto, method, params, timeout)

    async def _request_when_open(
        self, method: str, params: list[Any], timeout: float | None
    ) -> Any:
        waiter: Deferred[None] = Deferred()
        self._open_waiters.append(waiter)
        timer = self.clock.callLater(self.settings.open_timeout, self._wake_open, waiter)
        try:
            await waiter
        finally:
            if timer.active():
                timer.cancel()
        return await self._request_now(method, params, timeout)

    def _wake_open(self, waiter: Deferred[None] | None = None) -> None:
        waiters = [waiter] if waiter is not None else list(self._open_waiters)
        for w in waiters:
            if w in self._open_waiters:
                self._open_waiters.remove(w)
                w.callback(None)

    def resubscribe(self) -> Deferred[None]:
        """Unsubscribe (its failure ignored) and subscribe again on the same socket.

        Fires once the new id is known and ``on_subscribed()`` has run; fails with the
        subscribe's RPCFailure (the connection is then dropped, so it reconnects).
        """
        return Deferred.fromCoroutine(self._resubscribe())

    def reconnect(self) -> None:
        """Drop the connection now; ClientService makes a new one after its backoff."""
        proto = self._proto
        if proto is not None:
            log.info(
                "WebSocket {endpoint}: dropping the connection to reconnect", endpoint=self.label
            )
            proto.abort()

    @property
    def connected(self) -> bool:
        """True while subscribed."""
        return self.state == "subscribed"

    # -- connection life (called by NodeProtocol) ---------------------------------

    def connection_made(self, proto: NodeProtocol) -> None:
        """TCP (and TLS) is up: the handshake must finish within ``open_timeout``."""
        self._proto = proto
        self._ready = Deferred(self._cancel_ready)
        self._open_timer = self.clock.callLater(
            self.settings.open_timeout, self._open_expired, proto
        )

    def _cancel_ready(self, d: Deferred[None]) -> None:
        """ClientService gave up on this attempt (it is stopping): drop the connection."""
        self._ready = None
        if self._proto is not None:
            self._proto.abort()

    def opened(self, proto: NodeProtocol) -> None:
        """The handshake succeeded: subscribe."""
        self._cancel("_open_timer")
        if proto is not self._proto:
            return
        self._set_state("open")
        d = self._subscribe(proto)
        d.addCallbacks(self._first_subscribed, self._subscribe_failed, errbackArgs=(proto,))

    def message(self, proto: NodeProtocol, payload: bytes, binary: bool) -> None:
        """One message from the node: a reply, a push, or something to count and drop."""
        if binary:
            self._invalid("binary", f"a binary message of {len(payload)} bytes")
            return
        try:
            msg = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            self._invalid("bad-json", f"{len(payload)} bytes of non-JSON")
            return
        if not isinstance(msg, dict):
            self._invalid("bad-envelope", "a message that is not a JSON object")
            return
        if msg.get("method") == "eth_subscription" and "id" not in msg:
            self._push(msg)
        elif type(msg.get("id")) is int:
            self._reply(msg)
        else:
            self._invalid("bad-envelope", "a message with neither an id nor a push")

    def closing(self, proto: NodeProtocol) -> None:
        """The node sent a close frame: it has ``CLOSE_WAIT`` s to drop the TCP connection."""
        self._arm_close(proto)

    def lost(self, proto: NodeProtocol, reason: str, failure: Failure) -> None:
        """The connection is gone: fail its requests, note the outage, let ClientService retry."""
        self._cancel("_open_timer")
        self._cancel("_close_timer")
        if proto is not self._proto:
            return
        self._proto = None
        was = self.state
        self._stop_beat()
        self._subscribing = None
        self._held.clear()
        self.subscription = None
        self._fail_pending(proto, lambda p: RPCFailure(reason, "connection-lost", self.label))
        ready, self._ready = self._ready, None
        if ready is not None:
            ready.errback(RPCFailure(reason, "connection-lost", self.label))
            ready.addErrback(_consumed)  # when ClientService had not taken it yet
        if self._stopping:
            self._set_state("down")
            return
        self._set_state("connecting")
        found = classify(failure.value, self.label)
        kind = (
            "timeout" if proto.lost_reason.startswith(("no ", "heartbeat")) else "connection-lost"
        )
        if found is not None and found.kind == "tls":
            kind, reason = "tls", str(found)
        elif was == "connecting" and kind == "connection-lost":
            kind = "handshake"
        self.outage.failed(kind, reason)
        if was in ("open", "subscribed"):
            self.on_down(reason)

    # -- subscribing ------------------------------------------------------------

    def _prepare(self, proxy: Any) -> Deferred[None]:
        """ClientService's prepareConnection: done once the subscribe reply is in."""
        d = self._ready
        if d is None:  # lost before prepareConnection ran
            return defer.fail(RPCFailure("connection lost", "connection-lost", self.label))
        return d

    def _subscribe(self, proto: NodeProtocol) -> Deferred[Any]:
        self._held.clear()
        request_id = self._next_id + 1
        self._subscribing = request_id
        d = self._send(proto, "eth_subscribe", ["newHeads"], None)
        d.addCallback(self._subscribed, proto)
        return d

    def _subscribed(self, result: Any, proto: NodeProtocol) -> str:
        self._subscribing = None
        if not isinstance(result, str) or not 0 < len(result) <= MAX_SUBSCRIPTION_ID:
            raise RPCFailure("eth_subscribe answered no subscription id", "bad-result", self.label)
        self.subscription = result
        self._set_state("subscribed")
        return result

    def _first_subscribed(self, subscription: str) -> None:
        if self._subscribed_once:
            self.reconnects += 1
            if self.metrics is not None:
                self.metrics.ws_reconnects.labels(self.label).inc()
        self._subscribed_once = True
        self.outage.recovered()
        log.info(
            "WebSocket {endpoint}: subscribed to newHeads ({id})",
            endpoint=self.label,
            id=subscription,
        )
        ready, self._ready = self._ready, None
        if ready is not None:
            ready.callback(None)
        self._after_subscribe()

    def _subscribe_failed(self, failure: Failure, proto: NodeProtocol) -> None:
        self._subscribing = None
        why = _describe(failure)
        if proto is self._proto:
            self.outage.failed(_kind(failure), f"eth_subscribe: {why}")
            ready, self._ready = self._ready, None
            proto.abort()
            if ready is not None:
                ready.errback(failure)
                ready.addErrback(_consumed)

    def _after_subscribe(self) -> None:
        self._start_beat()
        try:
            self.on_subscribed()
        except Exception:
            log.failure("WebSocket {endpoint}: on_subscribed failed", endpoint=self.label)
        held, self._held = self._held, deque()
        for msg in held:
            self._push(msg)

    async def _resubscribe(self) -> None:
        proto = self._proto
        if proto is None or not proto.can_send or self.state != "subscribed":
            raise RPCFailure("resubscribe: not subscribed", "unavailable", self.label)
        old = self.subscription
        self.subscription = None
        self._set_state("open")
        if old is not None:
            try:
                await self._send(proto, "eth_unsubscribe", [old], None)
            except RPCFailure as e:
                log.debug(
                    "WebSocket {endpoint}: eth_unsubscribe failed: {e}", endpoint=self.label, e=e
                )
        try:
            subscription = await self._subscribe(proto)
        except RPCFailure as e:
            self._subscribing = None
            if proto is self._proto:
                self.outage.failed(e.kind, f"eth_subscribe (resubscribe): {e}")
                proto.abort()
            raise
        self.resubscribes += 1
        if self.metrics is not None:
            self.metrics.ws_resubscribes.labels(self.label).inc()
        log.info(
            "WebSocket {endpoint}: resubscribed to newHeads ({id})",
            endpoint=self.label,
            id=subscription,
        )
        self._after_subscribe()

    # -- requests ---------------------------------------------------------------

    def _send(
        self, proto: NodeProtocol, method: str, params: list[Any], timeout: float | None
    ) -> Deferred[Any]:
        self._next_id += 1
        request_id = self._next_id
        body = json.dumps(
            {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params},
            separators=(",", ":"),
        ).encode("utf-8")
        if len(body) > self.settings.max_message:
            return defer.fail(RPCFailure(f"{method}: request too large", "too-large", self.label))
        wait = self.settings.request_timeout if timeout is None else timeout
        d: Deferred[Any] = Deferred(lambda _: self._forget(request_id))
        timer = self.clock.callLater(wait, self._expired, request_id, wait)
        self._pending[request_id] = _Pending(d, timer, method, proto)
        proto.send_text(body)
        return d

    def _reply(self, msg: dict[str, Any]) -> None:
        pending = self._pending.pop(msg["id"], None)
        if pending is None:
            self._invalid("unknown-id", f"a reply to id {msg['id']!r:.40}, not pending")
            return
        pending.timer.cancel()
        try:
            result = envelope_result(msg, msg["id"])
        except RPCFailure as e:
            failure = RPCFailure(f"{pending.method}: {e}", e.kind, self.label, e.retry_after)
            pending.d.errback(failure)
            return
        pending.d.callback(result)

    def _expired(self, request_id: int, wait: float) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            pending.d.errback(
                RPCFailure(f"{pending.method}: no reply within {wait:g} s", "timeout", self.label)
            )

    def _forget(self, request_id: int) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is not None and pending.timer.active():
            pending.timer.cancel()

    def _fail_pending(
        self, proto: NodeProtocol | None, error: Callable[[_Pending], Exception]
    ) -> None:
        doomed = [(rid, p) for rid, p in self._pending.items() if proto is None or p.proto is proto]
        for rid, p in doomed:
            del self._pending[rid]
            if p.timer.active():
                p.timer.cancel()
            p.d.errback(error(p))

    # -- pushes -------------------------------------------------------------------

    def _push(self, msg: dict[str, Any]) -> None:
        params = msg.get("params")
        if not isinstance(params, dict) or not isinstance(params.get("subscription"), str):
            self._invalid("bad-push", "an eth_subscription push without a subscription id")
            return
        if params["subscription"] != self.subscription:
            if self._subscribing is not None:
                if len(self._held) >= self.settings.max_pending_pushes:
                    self._held.popleft()
                    self._invalid("overflow", "pushes before the subscribe reply past the bound")
                self._held.append(msg)
            return  # another subscription's (an old one's): ignored
        result = params.get("result")
        try:
            number = hex_quantity(
                result.get("number") if isinstance(result, dict) else None,
                "pushed head's number",
                self.label,
            )
            header = check_block(result, number, self.label)
        except RPCFailure as e:
            self._invalid("bad-push", str(e))
            return
        self.pushes += 1
        self.last_push_at = self.clock.seconds()
        if self.bad_input.active:
            self.bad_input.recovered()
        try:
            self.on_head(header)
        except Exception:
            log.failure("WebSocket {endpoint}: on_head failed", endpoint=self.label)

    def _invalid(self, kind: str, detail: str) -> None:
        self.invalid += 1
        if self.metrics is not None:
            self.metrics.ws_invalid.labels(self.label, kind).inc()
        self.bad_input.failed(kind, detail)

    # -- timers -------------------------------------------------------------------

    def _open_expired(self, proto: NodeProtocol) -> None:
        self._open_timer = None
        if proto is self._proto and self.state == "connecting":
            proto.lost_reason = f"no WebSocket handshake within {self.settings.open_timeout:g} s"
            proto.abort()

    def _arm_close(self, proto: NodeProtocol) -> None:
        if self._close_timer is None or not self._close_timer.active():
            self._close_timer = self.clock.callLater(CLOSE_WAIT, proto.abort)

    def _start_beat(self) -> None:
        self._stop_beat()
        self._beat_timer = self.clock.callLater(self.settings.heartbeat, self._beat)

    def _stop_beat(self) -> None:
        self._cancel("_beat_timer")

    def _beat(self) -> None:
        self._beat_timer = None
        proto = self._proto
        if proto is None or self.state not in ("open", "subscribed"):
            return
        d = self._send(proto, "eth_blockNumber", [], self.settings.heartbeat_timeout)
        d.addCallbacks(self._beat_answered, self._beat_failed, errbackArgs=(proto,))

    def _beat_answered(self, result: Any) -> None:
        try:
            self.heartbeat_head = hex_quantity(result, "eth_blockNumber", self.label)
        except RPCFailure as e:
            self._invalid("bad-result", str(e))
        self._start_beat()

    def _beat_failed(self, failure: Failure, proto: NodeProtocol) -> None:
        if failure.check(RPCFailure) and failure.value.kind == "timeout" and proto is self._proto:
            if self.metrics is not None:
                self.metrics.ws_heartbeat_misses.labels(self.label).inc()
            proto.lost_reason = f"heartbeat unanswered for {self.settings.heartbeat_timeout:g} s"
            proto.abort()
        elif failure.check(RPCFailure) and proto is self._proto:
            self._start_beat()  # it answered (an error object): the socket is alive

    # -- helpers ------------------------------------------------------------------

    def _connect_failed(self, failure: Failure) -> None:
        if self._stopping or failure.check(CancelledError):
            return
        self._set_state("connecting")
        self.outage.failed(_kind(failure), _describe(failure))

    def _cancel(self, name: str) -> None:
        timer = getattr(self, name)
        setattr(self, name, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _set_state(self, state: str) -> None:
        self.state = state
        if self.metrics is not None:
            self.metrics.ws_state.labels(self.label).state(state)
        if state != "connecting" and self._open_waiters:
            self._wake_open()

    def _stopped(self, result: Any) -> None:
        self._cancel("_close_timer")
        self._cancel("_open_timer")
        self._set_state("down")
        if isinstance(result, Failure):
            log.failure("WebSocket {endpoint}: stopping failed", result, endpoint=self.label)


def _consumed(failure: Failure) -> None:
    """Ends a failure nobody else was waiting for (it was logged as an outage already)."""


def _kind(failure: Failure) -> str:
    if failure.check(RPCFailure):
        return str(failure.value.kind)
    found = classify(failure.value, "")
    return found.kind if found is not None else "other"


def _describe(failure: Failure) -> str:
    if failure.check(RPCFailure):
        return str(failure.value)
    found = classify(failure.value, "")
    return str(found) if found is not None else failure.type.__name__
