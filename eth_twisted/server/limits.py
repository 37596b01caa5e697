"""What a hostile or broken peer meets at the receiver: the limits, the connection caps, the budget.

:class:`ReceiverLimits` holds every limit (each one is a server option);
:class:`ConnectionCaps` counts connections per address group at accept time;
:class:`PartialBudget` bounds the bytes held in frames not yet handled across
all connections; :class:`ViolationLog` logs each kind of violation at most once
per address and interval. The receiver (:mod:`eth_twisted.server.receiver`)
uses them; docs/hostile-input.md lists the attacks each one stops.
"""

from __future__ import annotations

import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import interfaces
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

from eth_twisted.metrics import ServerMetrics
from eth_twisted.model import normalise_ip, peer_group
from eth_twisted.options import int_in, positive_float, setting

DEFAULT_MAX_LENGTH = 64 * 1024
DEFAULT_WINDOW = 256
DEFAULT_DEADLINE = 10.0


@dataclass(slots=True)
class ReceiverLimits:
    """The receiver's limits; each field is also the server option of its name (README, "Limits")."""

    max_length: int = setting(
        DEFAULT_MAX_LENGTH, "Largest message accepted, in bytes", int_in(1, 16 * 1024 * 1024)
    )
    window: int = setting(
        DEFAULT_WINDOW, "Unanswered messages per connection before reading pauses", int_in(1, 65536)
    )
    deadline: float = setting(
        DEFAULT_DEADLINE,
        "Seconds within which every message is answered (else ERR timeout)",
        positive_float,
    )
    frame_timeout: float = setting(
        30.0, "Seconds a frame may take from its first byte to its comma", positive_float
    )
    idle_timeout: float = setting(
        90.0,
        "Seconds without a complete frame before a connection is dropped "
        "(a client sends a heartbeat when it has been quiet for --heartbeat, 10 s by default)",
        positive_float,
    )
    write_stall: float = setting(
        60.0, "Seconds a peer may leave its replies unread before it is dropped", positive_float
    )
    rate: float = setting(
        5000.0, "Messages per second per connection before reading pauses", positive_float
    )
    burst: int = setting(
        10000, "Messages a connection may send at once before the rate applies", int_in(1)
    )
    partial_budget: int = setting(
        32 * 1024 * 1024,
        "Bytes of incomplete (or not yet handled) frames held across all connections before reading pauses; "
        "the oldest holder always reads",
        int_in(1024),
    )
    max_connections: int = setting(10000, "Connections the server holds at once", int_in(1))
    max_per_ip: int = setting(100, "Connections per client address (IPv6: per /64)", int_in(1))
    violation_log_interval: float = 60.0

    def check(self) -> None:
        """Raise ValueError naming the first limit that cannot work."""
        if self.max_length < 1:
            raise ValueError("max_length must be at least 1")
        if self.window < 1:
            raise ValueError("window must be at least 1")
        if self.idle_timeout <= self.deadline:
            raise ValueError("idle_timeout must be longer than the deadline")
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("rate and burst must be positive")


SEND_BUFFER = 128 * 1024
"""SO_SNDBUF of a client connection (Linux doubles it): the kernel's share of the reply bytes owed.

Replies are small (at most 84 bytes a message), so this is room for thousands
in flight; without it Linux autotunes a socket whose peer never reads up to 4
MiB of queued replies (``net.ipv4.tcp_wmem``), times every such connection.
"""


def limit_send_buffer(transport: Any) -> None:
    """Cap the kernel send buffer of ``transport``'s socket (a no-op without one, e.g. in tests)."""
    sock = getattr(transport, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    except (AttributeError, OSError):
        pass


class ViolationLog:
    """Logs a protocol violation at most once per address and reason per ``interval`` seconds."""

    log = Logger(namespace="eth_twisted.server.receiver")
    MAX_KEYS = 10000
    """Distinct (address, reason) pairs remembered; past it the memory starts afresh."""

    def __init__(self, clock: interfaces.IReactorTime, interval: float) -> None:
        self.clock = clock
        self.interval = interval
        self._logged: dict[tuple[str, str], float] = {}

    def report(self, ip: str, peer: str, reason: str, detail: str) -> None:
        """Log one violation, unless this address was logged for this reason within the interval."""
        now = self.clock.seconds()
        key = (ip, reason)
        last = self._logged.get(key)
        if last is not None and now - last < self.interval:
            return
        if len(self._logged) > self.MAX_KEYS:
            self._logged.clear()
        self._logged[key] = now
        self.log.warn(
            "Protocol violation from {peer}: {reason} ({detail})",
            peer=peer,
            reason=reason,
            detail=detail,
        )


class ConnectionCaps:
    """Connections held at once, overall and per address group (IPv4 address, IPv6 /64).

    Counted at accept time (Twisted's ``LimitConnectionsByPeer`` is broken in
    26.10), so a burst of simultaneous connects cannot overshoot them.
    ``refused(reason, host)`` is told of every refusal.
    """

    def __init__(self, limits: ReceiverLimits, refused: Callable[[str, str | None], None]) -> None:
        self.limits = limits
        self.refused = refused
        self.open_count = 0
        self.per_group: dict[str, int] = {}

    def admit(self, addr: Any) -> str | None:
        """Count a new connection from ``addr``; its group, or None when a cap refuses it."""
        host = getattr(addr, "host", None)
        group = peer_group(normalise_ip(host)) if host else "-"
        if self.open_count >= self.limits.max_connections:
            self.refused("max-connections", host)
            return None
        if self.per_group.get(group, 0) >= self.limits.max_per_ip:
            self.refused("max-per-ip", host)
            return None
        self.per_group[group] = self.per_group.get(group, 0) + 1
        self.open_count += 1
        return group

    def release(self, group: str) -> None:
        """A connection counted by :meth:`admit` has ended."""
        self.open_count -= 1
        left = self.per_group.get(group, 0) - 1
        if left > 0:
            self.per_group[group] = left
        else:
            self.per_group.pop(group, None)


@implementer(interfaces.IHalfCloseableProtocol, interfaces.IHandshakeListener)
class CappedConnection(ProtocolWrapper):
    """Holds a connection's place in the caps until it ends.

    It forwards half-closes and the TLS handshake's completion to the gate behind it.
    """

    group: str | None
    transport: Any

    def handshakeCompleted(self) -> None:
        if interfaces.IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def readConnectionLost(self) -> None:
        if interfaces.IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if interfaces.IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.writeConnectionLost()
        else:
            self.transport.loseConnection()


class CapsFactory(WrappingFactory):
    """Applies the connection caps in front of TLS or handshake gates.

    Without it a connection still in its TLS or secret handshake would not be
    counted until the receiver's own protocol is built (the receiver is then
    built without caps of its own).
    """

    protocol = CappedConnection
    noisy = False

    def __init__(self, wrapped: Any, caps: ConnectionCaps) -> None:
        super().__init__(wrapped)
        self.caps = caps

    def buildProtocol(self, addr: Any) -> Any:
        group = self.caps.admit(addr)
        if group is None:
            return None
        wrapper: Any = super().buildProtocol(addr)
        if wrapper is None:
            self.caps.release(group)
            return None
        wrapper.group = group
        return wrapper

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        group = getattr(p, "group", None)
        if group is not None:
            p.group = None
            self.caps.release(group)


class BudgetHolder(Protocol):
    """What :class:`PartialBudget` needs of a connection."""

    group: str
    """Its address group."""
    held: int
    """Bytes of it the budget has accounted so far."""

    @property
    def gone(self) -> bool:
        """The connection is lost."""

    def pause_reading(self, reason: str) -> None:
        """Stop reading from the peer for ``reason``."""

    def resume_reading(self, reason: str) -> None:
        """``reason`` no longer holds reading up."""


class PartialBudget:
    """Bytes held in frames not yet handled, across all connections, and who may read more.

    Holders are kept oldest first, overall and per address group (ordered
    dicts: O(1) to find the oldest, to add and to remove). Over the budget only
    the oldest holder may grow; over its group's share (a sixteenth of the
    budget, at least two frames) only the group's oldest may. The oldest holder
    overall is also the oldest of its group, so somebody can always read, and
    whenever the oldest changes or a total falls back under its bound, the
    paused holders that may grow again are resumed: the budget always drains.
    """

    def __init__(self, limits: ReceiverLimits, metrics: ServerMetrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self.total = 0
        self.share = max(limits.partial_budget // 16, 2 * limits.max_length)
        """Bytes one address group may hold before its own newer holders pause."""
        self._holders: OrderedDict[BudgetHolder, None] = OrderedDict()
        self._group_holders: dict[str, OrderedDict[BudgetHolder, None]] = {}
        self._group_bytes: dict[str, int] = {}
        self._paused: set[BudgetHolder] = set()

    def may_grow(self, holder: BudgetHolder) -> bool:
        """Whether ``holder`` may read more under the budget rules."""
        group = holder.group
        if self._group_bytes.get(group, 0) > self.share:
            members = self._group_holders.get(group)
            if members and next(iter(members)) is not holder:
                return False
        if self.total > self.limits.partial_budget:
            if self._holders and next(iter(self._holders)) is not holder:
                return False
        return True

    def changed(self, holder: BudgetHolder, delta: int, restarted: bool = False) -> None:
        """Account ``delta`` more bytes held by ``holder``; pause or resume readers.

        ``restarted``: the bytes belong to a newer frame.
        """
        budget, share = self.limits.partial_budget, self.share
        group = holder.group
        was_over = self.total > budget
        group_was_over = self._group_bytes.get(group, 0) > share
        self.total += delta
        held = self._group_bytes.get(group, 0) + delta
        members = self._group_holders.get(group)
        if holder.held + delta > 0:
            self._group_bytes[group] = held
            if members is None:
                members = self._group_holders[group] = OrderedDict()
            if holder not in members:
                members[holder] = None
                self._holders[holder] = None
            elif restarted:
                members.move_to_end(holder)  # a new frame: no longer the oldest
                self._holders.move_to_end(holder)
        else:
            if held > 0:
                self._group_bytes[group] = held
            else:
                self._group_bytes.pop(group, None)
            self._holders.pop(holder, None)
            if members is not None:
                members.pop(holder, None)
                if not members:
                    del self._group_holders[group]
        if (
            delta > 0
            and holder not in self._paused
            and not holder.gone
            and not self.may_grow(holder)
        ):
            self._paused.add(holder)
            holder.pause_reading("budget")
            self.metrics.protocol_errors.labels(reason="partial-budget").inc()
        if not self._paused:
            return
        candidates: list[BudgetHolder | None]
        if was_over and self.total <= budget:
            candidates = list(self._paused)
        elif group_was_over and self._group_bytes.get(group, 0) <= share:
            candidates = [p for p in self._group_holders.get(group, ()) if p in self._paused]
        else:
            candidates = [
                next(iter(self._holders), None),
                next(iter(self._group_holders.get(group, ())), None),
            ]
        for candidate in candidates:
            if candidate is not None and candidate in self._paused and self.may_grow(candidate):
                self._paused.discard(candidate)
                candidate.resume_reading("budget")

    def forget(self, holder: BudgetHolder) -> None:
        """``holder`` is gone (its bytes were given back already)."""
        self._paused.discard(holder)
