"""The server's receiver: netstrings in, ordered replies out.

:class:`ReceiverProtocol` frames and delegates: each frame becomes a
:class:`~eth_twisted.model.Message` handed to the router's ``submit``, and its
reply is written only when the router answers, in frame order even when
answers arrive out of order (docs/protocol.md). The limits it enforces live in
:mod:`eth_twisted.server.limits`; it never imports a sink.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any
from typing import Protocol as Protocol_

from twisted.internet import interfaces
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from eth_twisted.errors import FrameError
from eth_twisted.link.netstring import NetstringDecoder, encode
from eth_twisted.link.payload import OutOfRange, recognise
from eth_twisted.link.replies import reply_text
from eth_twisted.metrics import ServerMetrics
from eth_twisted.model import EMPTY_SHA256, Message, normalise_ip, peer_group, sha256_hex
from eth_twisted.server.batcher import ReplyBatcher
from eth_twisted.server.limits import (
    ConnectionCaps,
    PartialBudget,
    ReceiverLimits,
    ViolationLog,
    limit_send_buffer,
)


class Ticket(Protocol_):
    """What the router hands back for a queued message; the receiver withdraws it when unwanted."""

    def cancel(self) -> None:
        """The message timed out or its connection is gone: do not store it if it is still queued."""


Reply = Callable[[str], None]
Submit = Callable[[Message, Reply], "Ticket | None"]


@dataclass(slots=True)
class _Slot:
    """A reply owed for one frame, in frame order."""

    sha: str
    due: float
    text: bytes | None = None
    ticket: Ticket | None = None


TURN_FRAMES = 256
"""Frames one connection may have handled per reactor turn before the others get theirs.

A read holds up to 64 KiB: 21,845 probes. Without a cap one turn of the
reactor could spend seconds on a few hundred such reads while every other
client, timer and the stats site waited.
"""

_BUDGET_ONLY = frozenset({"budget"})
"""A connection paused only for the partial-frame budget may still handle the whole frames it holds."""
_OWN_TIMERS_RUN = frozenset({"writes", "budget"})
"""Pauses that do not stop the peer's frame and idle timers: ``writes`` has its own
stall timer, and a peer paused for the budget holds bytes others are waiting for."""

_REPLY_KINDS = {ord("O"): "OK", ord("D"): "DUP", ord("E"): "ERR"}
"""A reply's kind by its first byte (what :meth:`ReceiverFactory.count_replies` counts)."""


@implementer(interfaces.IHalfCloseableProtocol, interfaces.IPushProducer)
class ReceiverProtocol(Protocol):
    """One client connection on the server."""

    log = Logger()
    factory: ReceiverFactory
    transport: Any  # ITCPTransport and IProducer (or a TLS/wrapper transport that forwards them)

    def __init__(self) -> None:
        self._decoder: NetstringDecoder | None = None
        self._slots: deque[_Slot] = deque()
        self._unanswered = 0
        self._pauses: set[str] = set()
        self._closing = False  # no more frames accepted; close once replies are out
        self._read_closed = False
        self._gone = False
        self._deadline_timer: Any = None
        self._frame_timer: Any = None
        self._idle_timer: Any = None
        self._rate_timer: Any = None
        self._stall_timer: Any = None
        self._close_timer: Any = None
        self._read_call: Any = None
        self._stopped_early = (
            False  # the frame loop stopped while the decoder may hold whole frames
        )
        self._owed_limit = 0
        self._tokens = 0.0
        self._tokens_at = 0.0
        self.held = 0  # bytes of this connection the partial-frame budget has accounted
        self._frame_started = 0.0
        self._write_paused_at: float | None = None
        self.peer_ip = "-"
        self.peer = "-"
        self.group = "-"
        self.client_id: str | None = None

    # -- connection lifecycle -------------------------------------------------

    def connectionMade(self) -> None:
        f = self.factory
        self._decoder = NetstringDecoder(f.limits.max_length)
        address = self.transport.getPeer()
        host = getattr(address, "host", None)
        self.peer_ip = normalise_ip(host) if host else "-"
        port = getattr(address, "port", None)
        self.peer = f"{self.peer_ip}:{port}" if port is not None else self.peer_ip
        self.group = peer_group(self.peer_ip)
        self._tokens = float(f.limits.burst)
        self._tokens_at = f.clock.seconds()
        self._owed_limit = 2 * f.limits.window
        f.connection_made(self)
        try:
            self.transport.setTcpKeepAlive(True)
            # Replies are small and wanted at once: Nagle would hold one back
            # until the peer acknowledges the previous (up to a delayed ACK).
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        limit_send_buffer(self.transport)
        # The transport pauses us when its write buffer fills (a peer that does
        # not read its replies); we then stop reading from that peer.
        self.transport.registerProducer(self, True)
        self._reset_idle()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._gone:
            return
        self._gone = True
        if (
            self._decoder is not None
            and self._decoder.in_frame
            and not self._read_closed
            and not self._stopped_early
        ):
            self._violation("truncated", "connection closed mid-frame")
        for name in (
            "_deadline_timer",
            "_frame_timer",
            "_idle_timer",
            "_rate_timer",
            "_stall_timer",
            "_close_timer",
            "_read_call",
        ):
            timer = getattr(self, name)
            if timer is not None and timer.active():
                timer.cancel()
            setattr(self, name, None)
        if self._pauses:
            self.factory.metrics.paused_connections.dec()
            self._pauses.clear()
        self._set_partial(0)
        self.factory.connection_lost(self)
        # Answers still owed are dropped (the client resends and gets DUP), and
        # messages not yet taken into a batch are withdrawn: nobody waits for them.
        for slot in self._slots:
            if slot.text is None and slot.ticket is not None:
                slot.ticket.cancel()
        self._slots.clear()

    def readConnectionLost(self) -> None:
        """The peer half-closed (the seed's client, ``nc -N``): answer, then close."""
        self._read_closed = True
        if not self._stopped_early:
            self._end_of_input()
        # else: whole frames are still held; _read_frames ends the input after them.

    def _end_of_input(self) -> None:
        """Every byte the peer sent is handled: answer, then close (``ERR - truncated`` for a cut frame)."""
        if self._decoder is not None and self._decoder.in_frame:
            self._violation("truncated", "half-closed mid-frame")
            self._finish(b"ERR - truncated")
        else:
            self._finish(None)

    def writeConnectionLost(self) -> None:
        """The peer stopped reading: nobody will see our replies."""
        self.transport.loseConnection()

    # -- IPushProducer: the transport's write buffer drives these -------------

    def pauseProducing(self) -> None:
        if self._write_paused_at is None:
            self._write_paused_at = self.factory.clock.seconds()
            self._stall_timer = self.factory.clock.callLater(
                self.factory.limits.write_stall, self._stalled
            )
        self.pause_reading("writes")

    def resumeProducing(self) -> None:
        self._write_paused_at = None
        if self._stall_timer is not None and self._stall_timer.active():
            self._stall_timer.cancel()
        self._stall_timer = None
        self.resume_reading("writes")

    def _stalled(self) -> None:
        self._stall_timer = None
        if not self._gone and self._write_paused_at is not None:
            self._abort("write-stall", f"replies unread for {self.factory.limits.write_stall:.0f}s")

    def stopProducing(self) -> None:
        self._closing = True

    # -- frames ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing or self._decoder is None:
            return
        self._decoder.add(data)
        with self.factory.batcher.hold():  # the replies of this turn leave in one write
            self._read_frames()

    def _read_frames(self) -> None:
        """Handle the frames the decoder holds, one at a time, until reading must pause.

        The loop stops the moment the window fills, the tokens run out, the
        connection owes too many replies or its transport pauses us: whatever
        the read held beyond that stays in the decoder (counted against the
        partial-frame budget) until the pause ends.
        """
        decoder = self._decoder
        assert decoder is not None
        f = self.factory
        window = f.limits.window
        handled = 0
        now = 0.0
        exhausted = False
        yielded = False
        while not self._closing:
            if self._pauses and not self._pauses <= _BUDGET_ONLY:
                break
            if not decoder.buffered:
                exhausted = True
                break
            if handled >= TURN_FRAMES:
                yielded = True
                break
            if self._tokens < 1.0 and not self._refill_tokens():
                break
            # As many frames as every bound allows, taken in one call: none can
            # overrun the window, the owed replies, the tokens or the turn.
            most = min(
                TURN_FRAMES - handled,
                window - self._unanswered,
                self._owed_limit - len(self._slots) - 1,
                int(self._tokens),
            )
            frames = decoder.take(max(1, most))
            if not frames:
                exhausted = decoder.error is None
                break
            if not handled:
                now = f.clock.seconds()
            handled += len(frames)
            self._tokens -= len(frames)
            for index, payload in enumerate(frames):
                try:
                    self._frame_received(payload, now)
                except Exception:
                    # A bug of ours: the frame is not acknowledged, the owed
                    # replies still go out, and the connection closes.
                    self.log.failure("Internal error handling a frame from {peer}", peer=self.peer)
                    f.metrics.protocol_errors.labels(reason="internal").inc()
                    f.metrics.received.inc(handled - len(frames) + index + 1)
                    self._forget_last(payload)
                    self._finish(None)
                    return
                if self._closing:
                    break  # type: ignore[unreachable]  # _frame_received may close
        if handled:
            f.metrics.received.inc(handled)
        if decoder.error is not None:
            if not self._closing:
                self._frame_error(decoder.error)
            return
        if self._closing:
            return
        if handled:
            self._reset_idle()
        self._stopped_early = not exhausted and decoder.buffered > 0
        if yielded and self._stopped_early:
            # The rest next turn; meanwhile no more reads (the decoder would grow a read per turn).
            self.pause_reading("turn")
            self._schedule_read()
        partial = exhausted and decoder.buffered > 0
        self._track_frame_timer(restarted=handled > 0, in_frame=partial)
        self._set_partial(decoder.buffered, restarted=handled > 0)
        if exhausted and self._read_closed:
            self._end_of_input()

    def _schedule_read(self) -> None:
        """Reading may go on: handle the frames the decoder held, from the reactor (never re-entrantly)."""
        if self._read_call is None and not self._gone and not self._closing:
            self._read_call = self.factory.clock.callLater(0, self._scheduled_read)

    def _scheduled_read(self) -> None:
        self._read_call = None
        if "turn" in self._pauses:
            self._pauses.discard("turn")
            if not self._pauses:
                self.factory.metrics.paused_connections.dec()
                if not self._gone and not self._closing:
                    self.transport.resumeProducing()
        if not self._gone and not self._closing and self._decoder is not None:
            with self.factory.batcher.hold():
                self._read_frames()

    def _frame_received(self, payload: bytes, now: float) -> None:
        f = self.factory
        if len(self._slots) + 1 >= self._owed_limit:
            self.pause_reading("owed")  # stop after this frame until replies are written
        if not payload:
            slot = _Slot(EMPTY_SHA256, now)
            self._slots.append(slot)
            self._resolve(slot, "empty")
            return
        sha = sha256_hex(payload)
        if f.log_payloads:
            self.log.debug("DATA - {peer} - {payload!r}", peer=self.peer, payload=payload)
        slot = _Slot(sha, now + f.limits.deadline)
        self._slots.append(slot)
        try:
            block_number, chain = recognise(payload)
        except OutOfRange:
            f.metrics.outcomes.labels(outcome="rejected").inc()
            self._resolve(slot, "rejected")
            return
        message = Message(payload, sha, self.peer_ip, now, block_number, self.client_id, chain)
        self._unanswered += 1
        if self._deadline_timer is None:
            self._arm_deadline()
        if self._unanswered >= f.limits.window:
            self.pause_reading("window")
        slot.ticket = f.submit(message, partial(self._answered, slot))

    def _forget_last(self, payload: bytes) -> None:
        """Drop the unanswered slot of the frame whose handling just failed."""
        if (
            self._slots
            and self._slots[-1].text is None
            and self._slots[-1].sha == sha256_hex(payload)
        ):
            slot = self._slots.pop()
            if slot.ticket is not None:
                slot.ticket.cancel()
            self._unanswered = max(0, self._unanswered - 1)

    def _answered(self, slot: _Slot, code: str) -> None:
        if slot.text is not None or self._gone:
            return  # already answered (deadline passed) or nobody to tell
        slot.ticket = None
        self._unanswered -= 1
        self._resolve(slot, code)
        if self._unanswered < self.factory.limits.window:
            self.resume_reading("window")
        if self._unanswered == 0:
            self._released()

    def _resolve(self, slot: _Slot, code: str) -> None:
        """Set the reply for ``slot`` and write every reply now due, in order."""
        slot.text = reply_text(slot.sha, code)
        self.write_due_replies()

    def write_due_replies(self) -> None:
        """Write every reply now due, in frame order, in one write (at a batch's end when held)."""
        if self._gone:
            return
        if self.factory.batcher.defer(self):
            return  # written once, when the batch's answers are all in
        slots = self._slots
        texts: list[bytes] = []
        while slots and slots[0].text is not None:
            texts.append(slots.popleft().text)  # type: ignore[arg-type]
        if texts:
            self.factory.count_replies(texts)
            self.transport.write(b"".join(map(encode, texts)))
            if "owed" in self._pauses and len(slots) + 1 < self._owed_limit:
                self.resume_reading("owed")
        if self._closing and not slots:
            self.transport.loseConnection()

    # -- deadlines, timeouts and rate -----------------------------------------

    def _arm_deadline(self) -> None:
        """Schedule the deadline check for the oldest unanswered message (one timer per connection)."""
        if self._deadline_timer is None or not self._deadline_timer.active():
            pending = next((s for s in self._slots if s.text is None), None)
            if pending is not None:
                delay = max(0.0, pending.due - self.factory.clock.seconds())
                self._deadline_timer = self.factory.clock.callLater(delay, self._deadline_passed)

    def _deadline_passed(self) -> None:
        """Answer ``timeout`` for every message whose deadline has passed."""
        self._deadline_timer = None
        now = self.factory.clock.seconds()
        expired = []
        for (
            slot
        ) in self._slots:  # frame order is deadline order: stop at the first one still running
            if slot.text is None:
                if slot.due > now:
                    break
                expired.append(slot)
        for slot in expired:
            self.factory.metrics.outcomes.labels(outcome="timeout").inc()
            if slot.ticket is not None:
                slot.ticket.cancel()  # still queued: the client resends it, one copy is enough
            self._answered(slot, "timeout")
        self._arm_deadline()

    def _held_up_by_us(self) -> bool:
        """True while the server keeps this peer waiting (so its timers must not run)."""
        return self._unanswered > 0 or bool(self._pauses - _OWN_TIMERS_RUN)

    def _reset_idle(self) -> None:
        timeout = self.factory.limits.idle_timeout
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(timeout)
        else:
            self._idle_timer = self.factory.clock.callLater(timeout, self._idle_passed)

    def _idle_passed(self) -> None:
        self._idle_timer = None
        if self._gone or self._closing:
            return
        if self._held_up_by_us() or self._write_paused_at is not None:
            self._reset_idle()  # held up by us, or the write-stall timer decides
        else:
            self._abort(
                "idle-timeout", f"no complete frame for {self.factory.limits.idle_timeout:.0f}s"
            )

    def _track_frame_timer(self, restarted: bool, in_frame: bool) -> None:
        """Start the whole-frame timer at a frame's first byte; stop it when no frame is open."""
        if not in_frame:
            if self._frame_timer is not None and self._frame_timer.active():
                self._frame_timer.cancel()
            self._frame_timer = None
            return
        if not restarted and self._frame_timer is not None:
            return  # the same frame goes on: its timer counts from its first byte
        if self._frame_timer is not None and self._frame_timer.active():
            self._frame_timer.cancel()
        self._frame_started = self.factory.clock.seconds()
        self._frame_timer = self.factory.clock.callLater(
            self.factory.limits.frame_timeout, self._frame_passed
        )

    def _frame_passed(self) -> None:
        self._frame_timer = None
        if self._gone or self._closing:
            return
        if self._held_up_by_us():
            # We are not reading from this peer: give it the full time again
            # once we do.
            self._frame_timer = self.factory.clock.callLater(
                self.factory.limits.frame_timeout, self._frame_passed
            )
            return
        self._abort(
            "frame-timeout", f"frame incomplete after {self.factory.limits.frame_timeout:.0f}s"
        )

    def _refill_tokens(self) -> bool:
        """Token bucket: True when a token is available; else pause reading until one is back."""
        limits = self.factory.limits
        now = self.factory.clock.seconds()
        self._tokens = min(
            float(limits.burst), self._tokens + (now - self._tokens_at) * limits.rate
        )
        self._tokens_at = now
        if self._tokens >= 1.0:
            return True
        if self._rate_timer is None or not self._rate_timer.active():
            self.factory.metrics.protocol_errors.labels(reason="rate-limited").inc()
            self.pause_reading("rate")
            # Resume with a tenth of a second's tokens, not one: one wake-up per frame
            # would cost more than the frame.
            wanted = max(1.0, min(float(limits.burst), limits.rate / 10.0))
            self._rate_timer = self.factory.clock.callLater(
                (wanted - self._tokens) / limits.rate, self._rate_refilled
            )
        return False

    def _rate_refilled(self) -> None:
        self._rate_timer = None
        self.resume_reading("rate")

    def _set_partial(self, nbytes: int, restarted: bool = False) -> None:
        """Account the bytes this connection's decoder holds against the global budget.

        ``restarted``: frames completed, so what is held now is a newer frame.
        """
        if nbytes != self.held or (restarted and nbytes):
            self.factory.budget.changed(self, nbytes - self.held, restarted)
            self.held = nbytes

    # -- pausing --------------------------------------------------------------

    def pause_reading(self, reason: str) -> None:
        """Stop reading from the peer for ``reason`` (reading resumes when no reason is left)."""
        if not self._pauses:
            self.factory.metrics.paused_connections.inc()
            if not self._gone:
                self.transport.pauseProducing()
        self._pauses.add(reason)

    def resume_reading(self, reason: str) -> None:
        """``reason`` no longer holds reading up."""
        if reason not in self._pauses:
            return
        self._pauses.discard(reason)
        if not self._pauses:
            self.factory.metrics.paused_connections.dec()
            if not self._gone and not self._closing:
                self.transport.resumeProducing()
        if self._stopped_early and self._pauses <= _BUDGET_ONLY:
            self._schedule_read()
        if reason != "budget":
            # The budget pauses a peer for holding bytes, not for our sake: its
            # frame timer keeps counting from the frame's first byte.
            self._released()

    def _released(self) -> None:
        """When the server stops holding the peer up, its timers start afresh."""
        if self._gone or self._closing or self._held_up_by_us():
            return
        self._reset_idle()
        if self._frame_timer is not None and self._frame_timer.active():
            self._frame_timer.reset(self.factory.limits.frame_timeout)

    @property
    def gone(self) -> bool:
        """The connection is lost."""
        return self._gone

    @property
    def paused(self) -> frozenset[str]:
        """Why reading from this peer is paused (empty while reading)."""
        return frozenset(self._pauses)

    # -- errors and closing ---------------------------------------------------

    def _frame_error(self, error: FrameError) -> None:
        self._violation(error.code, error.detail)
        self._set_partial(0)
        self._finish(f"ERR - {error.code}".encode("ascii"))

    def _violation(self, reason: str, detail: str) -> None:
        self.factory.metrics.protocol_errors.labels(reason=reason).inc()
        self.factory.violations.report(self.peer_ip, self.peer, reason, detail)

    def _abort(self, reason: str, detail: str) -> None:
        self._violation(reason, detail)
        self._closing = True
        self.transport.abortConnection()
        # connectionLost comes a reactor turn later: give the budget back now, so
        # the next oldest holder is reading before its own timer can fire.
        self._set_partial(0)

    def _finish(self, last: bytes | None) -> None:
        """Stop reading; write the owed replies, then ``last``, then close."""
        if self._closing:
            return
        if last is not None:
            self._slots.append(_Slot("-", 0.0, text=last))
        self.pause_reading("closing")
        self._closing = True
        # Replies wait at most the deadline for the sinks, then the peer has
        # write_stall to read them: past both the connection is aborted.
        limits = self.factory.limits
        self._close_timer = self.factory.clock.callLater(
            limits.deadline + limits.write_stall, self._close_overdue
        )
        self.write_due_replies()

    def _close_overdue(self) -> None:
        self._close_timer = None
        if not self._gone:
            self._violation("close-timeout", "replies not taken before the close deadline")
            self.transport.abortConnection()


class ReceiverFactory(Factory):
    """Builds :class:`ReceiverProtocol` for every connection and holds what they share.

    What they share: the connection caps, the partial-frame budget, the reply batcher and
    the violation log.

    ``caps_in_front``: a :class:`~eth_twisted.server.limits.CapsFactory` in front
    of TLS or handshake gates counts the connections in :attr:`caps`, so this
    factory does not count them again.
    """

    protocol = ReceiverProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        submit: Submit,
        *,
        clock: interfaces.IReactorTime,
        metrics: ServerMetrics | None = None,
        limits: ReceiverLimits | None = None,
        batcher: ReplyBatcher | None = None,
        caps_in_front: bool = False,
        log_payloads: bool = False,
    ) -> None:
        self.submit = submit
        self.clock = clock
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self.limits = limits if limits is not None else ReceiverLimits()
        self.limits.check()
        self.batcher = batcher if batcher is not None else ReplyBatcher()
        self.caps_in_front = caps_in_front
        self.log_payloads = log_payloads
        self.connections: set[ReceiverProtocol] = set()
        self.violations = ViolationLog(clock, self.limits.violation_log_interval)
        self.caps = ConnectionCaps(self.limits, self._refused)
        self.budget = PartialBudget(self.limits, self.metrics)
        self._reply_counters: dict[int, Any] = {}

    @property
    def partial_bytes(self) -> int:
        """Bytes held in frames not yet handled, across every connection."""
        return self.budget.total

    def buildProtocol(self, addr: Any) -> ReceiverProtocol | None:  # type: ignore[override]
        group = None
        if not self.caps_in_front:
            group = self.caps.admit(addr)
            if group is None:
                return None
        protocol = super().buildProtocol(addr)
        protocol._reserved_group = group  # type: ignore[union-attr]
        return protocol  # type: ignore[return-value]

    def _refused(self, reason: str, host: str | None) -> None:
        self.metrics.refused_connections.labels(reason=reason).inc()
        self.violations.report(host or "-", host or "-", reason, "connection refused")

    def connection_made(self, protocol: ReceiverProtocol) -> None:
        """``protocol`` is connected."""
        self.connections.add(protocol)
        self.metrics.connections.inc()
        self.metrics.open_connections.inc()

    def connection_lost(self, protocol: ReceiverProtocol) -> None:
        """``protocol``'s connection is gone: free its place in the caps and the budget."""
        if protocol in self.connections:
            self.connections.discard(protocol)
            self.metrics.open_connections.dec()
            group = getattr(protocol, "_reserved_group", None)
            if group is not None:
                self.caps.release(group)
        self.budget.forget(protocol)

    def count_replies(self, texts: list[bytes]) -> None:
        """Count replies about to be written by kind (OK, DUP, ERR): one counter update per kind."""
        for first, n in Counter(text[0] for text in texts).items():
            child = self._reply_counters.get(first)
            if child is None:
                kind = _REPLY_KINDS.get(first, "ERR")
                child = self._reply_counters[first] = self.metrics.replies.labels(kind=kind)
            child.inc(n)

    def stop_reading(self) -> None:
        """Shutting down: every connection stops reading, answers what it owes, then closes."""
        for protocol in list(self.connections):
            protocol._finish(None)

    def close_all(self) -> None:
        """Abort every connection still open (their unanswered messages will be resent)."""
        for protocol in list(self.connections):
            protocol.transport.abortConnection()
