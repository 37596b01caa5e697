"""Gates: protocol wrappers that hold a new connection until a check passes, then hand it on.

The inner protocol does not exist until then, so it never sees a byte that arrived before, or
pipelined behind, a failed check (see docs/protocol.md). :class:`PendingHandshakes` bounds the
connections still waiting, per address group, and evicts rather than refuses.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from eth_twisted.errors import HandshakeFailed
from eth_twisted.link.netstring import encode
from eth_twisted.model import normalise_ip, peer_group

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_MAX_PENDING = 1024
"""Handshakes a server gate holds at once; past it the newest connection evicts an old one."""
DEFAULT_MAX_PENDING_PER_GROUP = 64
"""Handshakes one address group (an IPv4 address, an IPv6 /64) holds at once in a server gate."""
OnFailure = Callable[[str], None]

# -- gates ---------------------------------------------------------------------


log = Logger(namespace="eth_twisted.link.gate")


class LogLimiter:
    """At most ``burst`` lines per ``interval`` seconds per reason; counts the rest."""

    def __init__(
        self, clock: interfaces.IReactorTime, burst: int = 20, interval: float = 60.0
    ) -> None:
        self.clock = clock
        self.burst = burst
        self.interval = interval
        self._windows: dict[str, tuple[float, int, int]] = {}

    def allow(self, reason: str) -> tuple[bool, int]:
        """Whether to log now, and how many lines of this reason were suppressed before."""
        now = self.clock.seconds()
        start, count, suppressed = self._windows.get(reason, (now, 0, 0))
        if now - start >= self.interval:
            start, count = now, 0
        if count < self.burst:
            self._windows[reason] = (start, count + 1, 0)
            return True, suppressed
        self._windows[reason] = (start, count, suppressed + 1)
        return False, 0


def peer_text(transport: Any) -> str:
    """The peer of ``transport`` for log lines: ``host:port`` (``[v6]:port``), or ``-``."""
    try:
        address = transport.getPeer()
    except Exception:  # noqa: BLE001
        return "-"
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def transport_group(transport: Any) -> str:
    """The address group a connection counts against (``protocol.peer_group``), ``-`` without one."""
    try:
        host = getattr(transport.getPeer(), "host", None)
    except Exception:  # noqa: BLE001
        host = None
    return peer_group(normalise_ip(host)) if isinstance(host, str) and host else "-"


class PendingHandshakes:
    """Connections still in a handshake, by address group, oldest first; full means evict, not refuse.

    ``add`` never refuses the newcomer. When its group already holds
    ``max_per_group`` it evicts that group's oldest; else, when the table
    holds ``max_total``, it evicts the oldest of the group holding the most
    (the first to reach that size, on a tie). Silent connections from a few
    addresses can then never lock out a client that completes its handshake
    promptly: at worst they push each other out. Every operation is O(1)
    (groups are kept in buckets by size, like an LFU cache; OrderedDicts,
    because finding the first key of a plain dict whose front was deleted
    scans the deleted slots). ``None`` means no limit (the client side, which
    has one connection).
    """

    def __init__(self, max_total: int | None = None, max_per_group: int | None = None) -> None:
        if (max_total is not None and max_total < 1) or (
            max_per_group is not None and max_per_group < 1
        ):
            raise ValueError("pending handshake limits must be at least 1")
        self.max_total = max_total
        self.max_per_group = max_per_group
        self._groups: dict[
            str, OrderedDict[Any, None]
        ] = {}  # group -> its connections, oldest first
        self._group_of: dict[Any, str] = {}
        self._by_size: dict[
            int, OrderedDict[str, None]
        ] = {}  # size -> groups of that size, by arrival
        self._largest = 0

    def __len__(self) -> int:
        return len(self._group_of)

    def __contains__(self, proto: object) -> bool:
        return proto in self._group_of

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._group_of))

    def group_size(self, group: str) -> int:
        """How many handshakes ``group`` holds."""
        return len(self._groups.get(group, ()))

    def add(self, proto: Any, group: str) -> Any | None:
        """Hold ``proto`` under ``group``; returns the connection it evicted (already removed), if any."""
        victim = None
        if self.max_per_group is not None and self.group_size(group) >= self.max_per_group:
            victim = next(iter(self._groups[group]))
        elif self.max_total is not None and len(self) >= self.max_total:
            largest = next(iter(self._by_size[self._largest]))
            victim = next(iter(self._groups[largest]))
        if victim is not None:
            self.discard(victim)
        members = self._groups.get(group)
        if members is None:
            members = self._groups[group] = OrderedDict()
        self._move(group, len(members), len(members) + 1)
        members[proto] = None
        self._group_of[proto] = group
        return victim

    def discard(self, proto: Any) -> None:
        """Forget ``proto`` (it opened, failed or closed); nothing if it is not held."""
        group = self._group_of.pop(proto, None)
        if group is None:
            return
        members = self._groups[group]
        del members[proto]
        self._move(group, len(members) + 1, len(members))
        if not members:
            del self._groups[group]

    def _move(self, group: str, old: int, new: int) -> None:
        if old:
            previous = self._by_size[old]
            del previous[group]
            if not previous:
                del self._by_size[old]
        if new:
            bucket = self._by_size.get(new)
            if bucket is None:
                bucket = self._by_size[new] = OrderedDict()
            bucket[group] = None
        if new > self._largest:
            self._largest = new
        while self._largest and self._largest not in self._by_size:
            self._largest -= 1


class GateFactory(Factory):
    """Wraps ``inner_factory``; its protocols hold each connection until a check passes."""

    noisy = False
    log = log
    gate_name = "gate"
    gate_protocol: type[GateProtocol]

    def __init__(
        self,
        inner_factory: interfaces.IProtocolFactory,
        *,
        clock: interfaces.IReactorTime,
        timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        on_failure: OnFailure | None = None,
        max_pending: int | None = None,
        max_pending_per_group: int | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.inner_factory = inner_factory
        self.clock = clock
        self.timeout = timeout
        self.on_failure = on_failure
        self.max_pending = max_pending
        self.max_pending_per_group = max_pending_per_group
        self.pending = PendingHandshakes(max_pending, max_pending_per_group)
        self.failures: dict[str, int] = {}
        self._limiter = LogLimiter(clock)

    def buildProtocol(self, addr: Any) -> GateProtocol:  # type: ignore[override]
        proto = self.gate_protocol(addr)
        proto.factory = self
        return proto

    def startFactory(self) -> None:
        start = getattr(self.inner_factory, "doStart", None)
        if start is not None:
            start()

    def stopFactory(self) -> None:
        stop = getattr(self.inner_factory, "doStop", None)
        if stop is not None:
            stop()

    # hooks for subclasses (the client side fires a Deferred)

    def gate_opened(self, proto: GateProtocol, inner: Any) -> None:
        """A connection passed the check and ``inner`` is connected."""

    def gate_failed(self, proto: GateProtocol, error: HandshakeFailed) -> None:
        """A connection failed the check: count it, log it (rate-limited), tell ``on_failure``."""
        self.failures[error.reason] = self.failures.get(error.reason, 0) + 1
        ok, suppressed = self._limiter.allow(error.reason)
        if ok:
            self.log.warn(
                "{gate} refused {peer}: {reason} ({detail}){more}",
                gate=self.gate_name,
                peer=proto.peer,
                reason=error.reason,
                detail=error.detail,
                more=f"; {suppressed} more like it not logged" if suppressed else "",
            )
        if self.on_failure is not None:
            try:
                self.on_failure(error.reason)
            except Exception:
                self.log.failure("on_failure hook raised")


@implementer(interfaces.IHalfCloseableProtocol)
class GateProtocol(Protocol):
    """A connection held until a check passes; then a pass-through to the inner protocol."""

    factory: GateFactory
    transport: Any

    def __init__(self, addr: Any) -> None:
        self.addr = addr
        self.inner: Any = None
        self.state = "waiting"  # waiting -> open | failed
        self.peer = "-"
        self.group = "-"  # the address group it counts against in the pending table
        self.client_id: str | None = None
        self._timer: Any = None

    # lifecycle

    def connectionMade(self) -> None:
        self.peer = peer_text(self.transport)
        self.group = transport_group(self.transport)
        f = self.factory
        victim = f.pending.add(self, self.group)
        self._timer = f.clock.callLater(f.timeout, self._timed_out)
        if victim is not None:
            victim._fail(
                "evicted",
                f"handshake table full ({len(f.pending)} pending, at most {f.max_pending}; "
                f"{f.pending.group_size(victim.group)} from its address group, at most "
                f"{f.max_pending_per_group}): the oldest of the largest group makes room",
                close="abort",
            )
        self.gate_started()

    def gate_started(self) -> None:
        """The connection is up and waiting for its check."""

    def _timed_out(self) -> None:
        self._timer = None
        if self.state == "waiting":
            self._fail("timeout", self.timeout_detail(), close="abort")
        elif self.state == "failed":
            self.transport.abortConnection()  # a refused peer that does not read our ERR

    def timeout_detail(self) -> str:
        """What the peer failed to do in time."""
        return f"no handshake within {self.factory.timeout:g} s"

    def _open(self, client_id: str | None, rest: bytes = b"") -> None:
        """The check passed: build and connect the inner protocol, hand it ``rest``."""
        self._cancel_timer()
        self.factory.pending.discard(self)
        inner: Any = self.factory.inner_factory.buildProtocol(self.addr)
        if inner is None:
            self._fail("refused", "the inner factory refused the connection", close="abort")
            return
        if client_id is not None:
            try:
                inner.client_id = client_id
            except AttributeError:
                pass
        self.inner = inner
        self.state = "open"
        inner.makeConnection(self.transport)
        self.factory.gate_opened(self, inner)
        if rest and self.state == "open":
            inner.dataReceived(rest)

    def _fail(
        self, reason: str, detail: str, *, reply: bytes | None = None, close: str = "lose"
    ) -> None:
        """The check failed: nothing more reaches anyone; optionally reply, then close.

        ``close`` is ``lose`` (flush ``reply``, close, abort after the
        timeout if the peer does not read), ``abort``, or ``none`` (already gone).
        """
        if self.state != "waiting":
            return
        self.state = "failed"
        self.factory.pending.discard(self)
        self._cancel_timer()
        self.factory.gate_failed(self, HandshakeFailed(reason, detail))
        if close == "abort":
            self.transport.abortConnection()
        elif close == "lose":
            if reply is not None:
                self.transport.write(encode(reply))
            self.transport.loseConnection()
            self._timer = self.factory.clock.callLater(self.factory.timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # data

    def dataReceived(self, data: bytes) -> None:
        if self.state == "open":
            self.inner.dataReceived(data)
        elif self.state == "waiting":
            self.handshake_data(data)
        # failed: dropped, whatever it is

    def handshake_data(self, data: bytes) -> None:
        """Bytes that arrived before the check passed."""
        self._fail("early-data", "data before the handshake completed", close="abort")

    # closing

    def readConnectionLost(self) -> None:
        if self.state == "open" and interfaces.IHalfCloseableProtocol.providedBy(self.inner):
            self.inner.readConnectionLost()
            return
        if self.state == "waiting":
            self._fail("closed", "the peer closed its side during the handshake")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self.state == "open" and interfaces.IHalfCloseableProtocol.providedBy(self.inner):
            self.inner.writeConnectionLost()
            return
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._cancel_timer()
        self.factory.pending.discard(self)
        if self.state == "open":
            self.inner.connectionLost(reason)
        elif self.state == "waiting":
            reason_word, detail = self.lost_detail(reason)
            self._fail(reason_word, detail, close="none")

    def lost_detail(self, reason: Failure | None) -> tuple[str, str]:
        """How to report a connection lost during the handshake."""
        why = reason.getErrorMessage() if reason is not None else "closed"
        return "closed", f"connection lost during the handshake ({why})"

    def logPrefix(self) -> str:
        return self.factory.gate_name


class ClientGateFactory(GateFactory):
    """A client-side gate for one connection: ``ready`` fires with the inner protocol."""

    def __init__(
        self,
        inner_factory: interfaces.IProtocolFactory,
        *,
        clock: interfaces.IReactorTime,
        timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        on_failure: OnFailure | None = None,
        server: str = "server",
    ) -> None:
        super().__init__(inner_factory, clock=clock, timeout=timeout, on_failure=on_failure)
        self.server = server
        self.ready: Deferred[Any] = Deferred()

    def gate_opened(self, proto: GateProtocol, inner: Any) -> None:
        if not self.ready.called:
            self.ready.callback(inner)

    def gate_failed(self, proto: GateProtocol, error: HandshakeFailed) -> None:
        self.failures[error.reason] = self.failures.get(error.reason, 0) + 1
        self.log.error(
            "{gate} handshake with {server} failed: {reason} ({detail}); nothing was sent",
            gate=self.gate_name,
            server=self.server,
            reason=error.reason,
            detail=error.detail,
        )
        if self.on_failure is not None:
            try:
                self.on_failure(error.reason)
            except Exception:
                self.log.failure("on_failure hook raised")
        if not self.ready.called:
            self.ready.errback(error)

    def cancel(self) -> None:
        """Stop waiting: abort the connection still in its handshake."""
        for proto in list(self.pending):
            proto.transport.abortConnection()
        self.ready.addErrback(lambda _: None)


@implementer(interfaces.IStreamClientEndpoint)
class GatedClientEndpoint:
    """Connects through ``endpoint`` and fires only once the gate opened."""

    def __init__(
        self,
        endpoint: interfaces.IStreamClientEndpoint,
        make_gate: Callable[[interfaces.IProtocolFactory], ClientGateFactory],
    ) -> None:
        self._endpoint = endpoint
        self._make_gate = make_gate

    def connect(self, protocolFactory: interfaces.IProtocolFactory) -> Deferred[Any]:
        gate = self._make_gate(protocolFactory)
        connecting = self._endpoint.connect(gate)

        def cancel(_: Deferred[Any]) -> None:
            gate.cancel()
            connecting.cancel()

        result: Deferred[Any] = Deferred(cancel)
        connecting.addCallback(lambda _proto: gate.ready)
        connecting.addCallbacks(result.callback, result.errback)
        return result
