"""The client's link to the server: resend, window, ack matching, heartbeats.

:class:`DeliveryService` keeps one connection to the server and sends the outbox over it,
oldest first, within the window; :class:`SenderProtocol` only frames and parses. What is
done with each reply is in :meth:`DeliveryService.reply_received` and docs/protocol.md
(section 3, "What the client does with each"); the probe, the heartbeat and the ack
timeout are in docs/protocol.md sections 5 and 8.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import NetstringReceiver
from twisted.python.failure import Failure

from eth_twisted.client.outbox import Entry, Outbox
from eth_twisted.link.netstring import encode
from eth_twisted.link.replies import (
    FINAL_CODES,
    FRAME_CODES,
    KNOWN_CODES,
    RETRYABLE_CODES,
    Reply,
    ReplyError,
    parse_reply,
)
from eth_twisted.metrics import ClientMetrics
from eth_twisted.model import EMPTY_SHA256
from eth_twisted.options import int_in, positive_float, setting

MAX_WINDOW = 256
"""The server's default per-connection window: the client never keeps more frames unanswered."""
SERVER_DEADLINE = 10.0
"""The server's default per-message deadline (``eth server --deadline``).

The ack timeout is at least twice it.
"""
RETRY_INITIAL = 1.0
RETRY_MAX = 30.0
METRICS_INTERVAL = 5.0


@dataclass(frozen=True)
class DeliverySettings:
    """How the link sends and when it gives up on a connection.

    Each field is the client option of its name.
    """

    window: int = setting(
        256,
        f"Unanswered frames in flight (1..{MAX_WINDOW}, at most the server's window)",
        int_in(1, MAX_WINDOW),
    )
    ack_timeout: float = setting(
        30.0,
        f"Seconds to wait for a reply before reconnecting (>= {2 * SERVER_DEADLINE:.0f})",
        positive_float,
    )
    heartbeat: float = setting(
        10.0, "Seconds of quiet before sending the empty probe frame", positive_float
    )

    def check(self) -> None:
        """Raise ValueError naming the option of the first value that makes no sense."""
        if not 1 <= self.window <= MAX_WINDOW:
            raise ValueError(f"--window: must be 1..{MAX_WINDOW}, got {self.window}")
        if self.ack_timeout < 2 * SERVER_DEADLINE:
            raise ValueError(
                f"--ack-timeout: must be at least {2 * SERVER_DEADLINE:.0f} s (twice the server's "
                f"{SERVER_DEADLINE:.0f} s deadline), got {self.ack_timeout}"
            )
        if not 0 < self.heartbeat < self.ack_timeout:
            raise ValueError(
                f"--heartbeat: must be positive and shorter than --ack-timeout ({self.ack_timeout}), "
                f"got {self.heartbeat}"
            )


class SenderProtocol(NetstringReceiver):
    """One connection to the server: writes frames, parses replies, delegates the rest.

    The protocol only frames and parses; the state lives in :class:`DeliveryService`,
    which survives reconnections.
    """

    MAX_LENGTH = 1024
    """Replies are short (``ERR <64 hex> <code>``); anything longer is a broken peer."""

    log = Logger()
    link: DeliveryService
    transport: Any  # a TCP transport: abortConnection, setTcpKeepAlive, disconnecting
    closing = False
    """Set once the link gave up on this connection: later replies are not read."""

    def connectionMade(self) -> None:
        try:
            self.transport.setTcpKeepAlive(1)
            # Frames go out while earlier ones are unanswered: Nagle would hold
            # each small write until the server's ACK.
            self.transport.setTcpNoDelay(1)
        except (AttributeError, OSError):
            pass  # not TCP (tests, UNIX sockets)

    def start_link(self) -> None:
        """Called from ClientService's ``prepareConnection``: start resending."""
        try:
            self.link.link_up(self)
        except Exception:
            # The outbox could not be read or written (disk full, I/O error):
            # drop this connection; the next one tries again.
            self.log.failure("Could not start sending on a new connection; dropping it")
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        # All replies in one read settle in one outbox transaction (one fsync).
        try:
            with self.link.outbox.transaction():
                super().dataReceived(data)
                self.link.fill()
        except Exception:
            self.log.failure("Failed to settle replies from the server; dropping the connection")
            self.transport.abortConnection()
            return
        self.link.settled()

    def stringReceived(self, string: bytes) -> None:
        if self.closing:
            return
        try:
            reply = parse_reply(string)
        except ReplyError as e:
            self.link.protocol_error(self, str(e))
            return
        self.link.reply_received(self, reply)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.brokenPeer:
            self.log.warn("The server sent a malformed netstring; reconnecting")
        self.link.link_down(self, reason)


class SenderFactory(Factory):
    """Builds :class:`SenderProtocol` bound to one :class:`DeliveryService`."""

    protocol = SenderProtocol
    noisy = False

    def __init__(self, link: DeliveryService) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> SenderProtocol:
        proto = SenderProtocol()
        proto.factory = self
        proto.link = self.link
        return proto


@dataclass(slots=True)
class _Flight:
    entry: Entry
    frame: int
    sent_at: float


class DeliveryService(service.MultiService):
    """Delivers the outbox to the server over a self-healing connection.

    It owns a ``ClientService`` (capped exponential backoff, the injected clock) that keeps
    one TCP connection to the server. On every new connection it resends every
    unacknowledged outbox entry, oldest first, keeping at most ``window`` frames
    unanswered; replies are matched by hash (:meth:`reply_received`).

    Liveness: when nothing has been written for ``heartbeat`` seconds the empty frame
    ``0:,`` goes out (its ``ERR e3b0...b855 empty`` reply is expected); if the oldest
    unanswered frame (probe or message) waits ``ack_timeout`` seconds the connection is
    aborted and remade, and everything in flight is resent. The server deduplicates by
    hash, so a resend costs a ``DUP``, never a row.

    ``endpoint`` is where the server listens (``clientFromString(...)``);
    ``server`` only labels log lines. ``wake()`` after an append sends what
    fits; ``drain(deadline)`` waits for an empty outbox.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        outbox: Outbox,
        settings: DeliverySettings | None = None,
        *,
        clock: IReactorTime,
        metrics: ClientMetrics | None = None,
        retry_policy: Callable[[int], float] | None = None,
        server: str = "server",
    ) -> None:
        super().__init__()
        settings = settings if settings is not None else DeliverySettings()
        settings.check()
        self.outbox = outbox
        self.clock = clock
        self.metrics = metrics if metrics is not None else ClientMetrics()
        self.settings = settings
        self.server = server
        self.last_ack_at: float | None = None
        """Clock time of the last OK/DUP (for /readyz)."""
        policy = retry_policy or backoffPolicy(initialDelay=0.5, factor=2.0, maxDelay=30.0)
        self.client_service = ClientService(
            endpoint,
            SenderFactory(self),
            retryPolicy=self._logged_policy(policy),
            clock=clock,
            prepareConnection=self._prepare_connection,
        )
        self.client_service.setServiceParent(self)
        self._proto: SenderProtocol | None = None
        self._in_flight: OrderedDict[str, _Flight] = OrderedDict()
        self._probes: deque[tuple[int, float]] = deque()
        self._frames = 0
        self._scan_after = 0
        self._last_write = 0.0
        self._retry_delay = 0.0
        self._hold_until = 0.0
        self._hold_timer: IDelayedCall | None = None
        self._ack_timer: IDelayedCall | None = None
        self._hb_timer: IDelayedCall | None = None
        self._drains: list[tuple[Deferred[bool], IDelayedCall]] = []
        self._unknown_codes: set[str] = set()
        self._metrics_loop = task.LoopingCall(self.refresh_metrics)
        self._metrics_loop.clock = clock

    # -- public ---------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection to the server is up (for /readyz)."""
        return self._proto is not None

    @property
    def in_flight(self) -> int:
        """Messages written on this connection and not answered yet."""
        return len(self._in_flight)

    def wake(self) -> None:
        """New messages were appended: send what the window allows."""
        if self._proto is not None:
            try:
                with self.outbox.transaction():
                    self.fill()
            except Exception:
                self.log.failure("Could not send from the outbox; dropping the connection to retry")
                self._proto.transport.abortConnection()
        self.refresh_metrics()

    def drain(self, deadline: float) -> Deferred[bool]:
        """Fire True when the outbox is empty, or False once ``deadline`` seconds pass."""
        if self.outbox.depth() == 0:
            return defer.succeed(True)
        d: Deferred[bool] = Deferred()
        timer = self.clock.callLater(deadline, self._drain_expired, d)
        self._drains.append((d, timer))
        return d

    def refresh_metrics(self) -> None:
        """Update the outbox depth and oldest-age gauges."""
        try:
            self.metrics.outbox_depth.set(self.outbox.depth())
            oldest = self.outbox.oldest_created_at()
            age = 0.0 if oldest is None else max(0.0, self.clock.seconds() - oldest)
            self.metrics.outbox_oldest_age.set(age)
        except Exception:
            self.log.failure("Could not read the outbox for metrics")

    # -- service --------------------------------------------------------------

    def startService(self) -> None:
        self.log.info(
            "Delivering to {server}: {depth} messages waiting, window {window}",
            server=self.server,
            depth=self.outbox.depth(),
            window=self.settings.window,
        )
        super().startService()
        self._metrics_loop.start(METRICS_INTERVAL, now=True)

    def stopService(self) -> Deferred[None]:
        if self._metrics_loop.running:
            self._metrics_loop.stop()
        self._cancel(self._hold_timer)
        self._hold_timer = None
        for d, timer in self._drains:
            self._cancel(timer)
            d.callback(self.outbox.depth() == 0)
        self._drains = []
        return super().stopService()  # type: ignore[no-any-return]

    def _prepare_connection(self, proto: Any) -> None:
        proto.start_link()

    def _logged_policy(self, policy: Callable[[int], float]) -> Callable[[int], float]:
        def logged(attempt: int) -> float:
            delay = policy(attempt)
            if attempt <= 1 or attempt % 10 == 0:
                self.log.warn(
                    "Cannot reach {server} (attempt {attempt}); retrying in {delay:.1f} s; "
                    "{depth} messages kept in the outbox",
                    server=self.server,
                    attempt=attempt,
                    delay=delay,
                    depth=self.outbox.depth(),
                )
            return delay

        return logged

    # -- link state (called by the protocol) ----------------------------------

    def link_up(self, proto: SenderProtocol) -> None:
        """A new connection: forget what was in flight and resend from the oldest."""
        self._proto = proto
        self._in_flight.clear()
        self._probes.clear()
        self._scan_after = 0
        self._unknown_codes.clear()
        self._last_write = self.clock.seconds()
        self.metrics.reconnects.inc()
        self.metrics.link_up.set(1)
        self.log.info(
            "Connected to {server}; {depth} messages to send",
            server=self.server,
            depth=self.outbox.depth(),
        )
        self._arm_heartbeat(self.settings.heartbeat)
        with self.outbox.transaction():
            self.fill()

    def link_down(self, proto: SenderProtocol, reason: Failure | None) -> None:
        """The connection is gone; what was in flight is resent on the next one."""
        if proto is not self._proto:
            return
        self._proto = None
        self.metrics.link_up.set(0)
        for timer in (self._ack_timer, self._hb_timer):
            self._cancel(timer)
        self._ack_timer = self._hb_timer = None
        lost = len(self._in_flight)
        self._in_flight.clear()
        self._probes.clear()
        why = reason.getErrorMessage() if reason is not None else "closed"
        if not self.running:
            self.log.info(
                "Disconnected from {server} (stopping); {depth} messages kept in the outbox",
                server=self.server,
                depth=self.outbox.depth(),
            )
            return
        self.log.warn(
            "Lost the connection to {server} ({why}); {lost} unanswered messages will be resent",
            server=self.server,
            why=why,
            lost=lost,
        )

    def protocol_error(self, proto: SenderProtocol, detail: str) -> None:
        """The server said something we do not understand: drop the connection."""
        self.log.error(
            "Protocol error from {server}: {detail}; reconnecting",
            server=self.server,
            detail=detail,
        )
        self.metrics.replies.labels(kind="invalid").inc()
        proto.closing = True
        proto.transport.loseConnection()

    def reply_received(self, proto: SenderProtocol, reply: Reply) -> None:
        """Settle one reply (inside the protocol's outbox transaction).

        * ``OK <sha>`` / ``DUP <sha>``: the server holds it; the outbox forgets it;
        * ``ERR <sha> unavailable|timeout|busy``: kept; sending pauses (1 s, doubling
          to 30 s while errors continue) and the message is resent first afterwards;
        * ``ERR <sha> empty|too-long|rejected|auth``: final; the message moves to the
          outbox's dead letters and is never resent;
        * ``ERR - <code>``: the connection's framing broke; the server closes it and
          everything unanswered is resent on the next connection. For ``too-long``
          the first unanswered message (replies come in frame order) is the culprit and
          is dead-lettered, so it cannot block the queue forever (unless a probe sent
          before it is still unanswered).

        A reply for a hash that is not in flight, or text that is none of the above,
        is a protocol error: logged, and the connection is dropped (and remade).
        Nothing that connection says afterwards is read (a burst of garbage costs one
        line, not one per frame); what it left unanswered is resent on the next one.
        An ERR code outside the vocabulary is retryable, logged once per code per
        connection.
        """
        if proto is not self._proto:
            return
        if reply.code is None:
            label = reply.kind
        else:
            label = f"ERR:{reply.code if reply.code in KNOWN_CODES else 'other'}"
        self.metrics.replies.labels(kind=label).inc()
        if reply.sha == "-":
            self._connection_error(proto, reply.code or "")
            return
        if reply.sha == EMPTY_SHA256 and reply.code == "empty" and self._probes:
            self._probes.popleft()
            return
        flight = self._in_flight.pop(reply.sha, None)
        if flight is None:
            self.protocol_error(
                proto, f"reply {reply.kind} for {reply.sha}, which is not in flight"
            )
            return
        if reply.kind in ("OK", "DUP"):
            self.outbox.ack(reply.sha)
            self.last_ack_at = self.clock.seconds()
            self._retry_delay = 0.0
        elif reply.code in FINAL_CODES:
            self._dead_letter(flight.entry, reply.code)
        else:
            if reply.code not in RETRYABLE_CODES and reply.code not in self._unknown_codes:
                self._unknown_codes.add(reply.code or "")
                self.log.warn(
                    "Unknown ERR code {code!r} from {server} (first for {sha}); keeping such messages "
                    "and retrying them",
                    code=reply.code,
                    server=self.server,
                    sha=reply.sha,
                )
            self._retry_later(flight.entry, reply.code or "")

    def settled(self) -> None:
        """After a read's replies are committed: resolve drains, update gauges."""
        if self._drains and self.outbox.depth() == 0:
            drains, self._drains = self._drains, []
            for d, timer in drains:
                self._cancel(timer)
                d.callback(True)
        self.metrics.outbox_depth.set(self.outbox.depth())

    # -- sending --------------------------------------------------------------

    def fill(self) -> None:
        """Write as many waiting messages as the window allows (inside a transaction)."""
        proto = self._proto
        if proto is None or proto.transport.disconnecting:
            return
        if self._hold_until > self.clock.seconds():
            return
        room = self.settings.window - len(self._in_flight)
        if room <= 0:
            return
        entries = self.outbox.pending(room, exclude=set(self._in_flight), after=self._scan_after)
        if not entries:
            return
        # Every waiting entry up to the last one returned is now in flight.
        self._scan_after = max(self._scan_after, entries[-1].seq)
        now = self.clock.seconds()
        frames = []
        for entry in entries:
            self._frames += 1
            self._in_flight[entry.hash] = _Flight(entry, self._frames, now)
            frames.append(encode(entry.payload))
        self.outbox.mark_sent(e.hash for e in entries)
        self._write(b"".join(frames), now)
        self.metrics.sent.inc(len(entries))
        self.log.debug("Sent {count} frames to {server}", count=len(entries), server=self.server)

    def _write(self, data: bytes, now: float) -> None:
        assert self._proto is not None
        self._proto.transport.write(data)
        self._last_write = now
        if self._ack_timer is None:
            self._arm_ack_timer(self.settings.ack_timeout)

    def _send_probe(self) -> None:
        now = self.clock.seconds()
        self._frames += 1
        self._probes.append((self._frames, now))
        self._write(b"0:,", now)
        self.metrics.sent.inc()

    def _retry_later(self, entry: Entry, code: str) -> None:
        """A retryable ERR: keep the message, pause sending, resend it first."""
        self._scan_after = min(self._scan_after, entry.seq - 1)
        now = self.clock.seconds()
        if self._hold_until > now:
            return  # already pausing for an earlier error of the same outage
        self._retry_delay = (
            RETRY_INITIAL if not self._retry_delay else min(self._retry_delay * 2, RETRY_MAX)
        )
        self._hold_until = now + self._retry_delay
        self.log.warn(
            "{server} answered ERR {code}; pausing sends for {delay:.0f} s",
            server=self.server,
            code=code,
            delay=self._retry_delay,
        )
        self._cancel(self._hold_timer)
        self._hold_timer = self.clock.callLater(self._retry_delay, self._hold_over)

    def _hold_over(self) -> None:
        self._hold_timer = None
        self.wake()

    def _dead_letter(self, entry: Entry, code: str) -> None:
        self.outbox.dead_letter(entry.hash, code)
        self.metrics.dead_letters.labels(code=code).inc()

    def _connection_error(self, proto: SenderProtocol, code: str) -> None:
        if code not in FRAME_CODES:
            self.log.warn(
                "{server} closed the connection: ERR - {code}", server=self.server, code=code
            )
        else:
            self.log.error(
                "{server} rejected our framing: ERR - {code}; reconnecting",
                server=self.server,
                code=code,
            )
        if code == "too-long" and self._in_flight:
            first = next(iter(self._in_flight.values()))
            if not self._probes or first.frame < self._probes[0][0]:
                self._in_flight.pop(first.entry.hash)
                self._dead_letter(first.entry, "too-long")
        proto.closing = True
        proto.transport.loseConnection()

    # -- timers ---------------------------------------------------------------

    def _oldest_unanswered(self) -> float | None:
        times = []
        if self._in_flight:
            times.append(next(iter(self._in_flight.values())).sent_at)
        if self._probes:
            times.append(self._probes[0][1])
        return min(times) if times else None

    def _arm_ack_timer(self, delay: float) -> None:
        self._ack_timer = self.clock.callLater(max(0.0, delay), self._check_ack_timeout)

    def _check_ack_timeout(self) -> None:
        self._ack_timer = None
        proto = self._proto
        oldest = self._oldest_unanswered()
        if proto is None or oldest is None:
            return
        waited = self.clock.seconds() - oldest
        if waited >= self.settings.ack_timeout:
            self.metrics.ack_timeouts.inc()
            self.log.error(
                "No answer from {server} for {waited:.0f} s ({count} frames unanswered); "
                "dropping the connection to resend",
                server=self.server,
                waited=waited,
                count=len(self._in_flight) + len(self._probes),
            )
            proto.transport.abortConnection()
            return
        self._arm_ack_timer(self.settings.ack_timeout - waited)

    def _arm_heartbeat(self, delay: float) -> None:
        self._hb_timer = self.clock.callLater(max(0.0, delay), self._heartbeat_due)

    def _heartbeat_due(self) -> None:
        self._hb_timer = None
        if self._proto is None:
            return
        quiet = self.clock.seconds() - self._last_write
        if quiet >= self.settings.heartbeat and not self._proto.transport.disconnecting:
            self._send_probe()
            quiet = 0.0
        self._arm_heartbeat(self.settings.heartbeat - quiet)

    def _drain_expired(self, d: Deferred[bool]) -> None:
        self._drains = [(x, t) for x, t in self._drains if x is not d]
        d.callback(self.outbox.depth() == 0)

    @staticmethod
    def _cancel(timer: IDelayedCall | None) -> None:
        if timer is not None and timer.active():
            timer.cancel()
