"""The server's receiver protocol: netstrings in, ordered replies out.

The protocol frames and delegates. Each frame becomes a
:class:`~eth_twisted.model.Message` handed to a *submit* callable (the
router); the reply for it is written only when the router answers, and
replies leave in frame order even when answers arrive out of order. It never
imports a sink.

Replies (DESIGN.md, wire protocol version 1)::

    OK <sha256>          committed now
    DUP <sha256>         already held
    ERR <sha256> <code>  not stored (unavailable/timeout/busy: retry;
                         empty/too-long/rejected/auth: final)
    ERR - <code>         the connection's framing broke (bad-frame, too-long,
                         truncated); the connection closes after it
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import interfaces
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from eth_twisted.errors import FrameError
from eth_twisted.framing import NetstringDecoder, encode
from eth_twisted.metrics import ServerMetrics
from eth_twisted.model import EMPTY_SHA256, Message, normalise_ip, sha256_hex
from eth_twisted.payload import OutOfRange, recognise_block_number

Reply = Callable[[str], None]
Submit = Callable[[Message, Reply], None]

DEFAULT_MAX_LENGTH = 64 * 1024
DEFAULT_WINDOW = 256
DEFAULT_DEADLINE = 10.0


@dataclass(slots=True)
class ReceiverLimits:
    """Per-connection limits of the receiver (see README, "Limits")."""

    max_length: int = DEFAULT_MAX_LENGTH
    window: int = DEFAULT_WINDOW
    deadline: float = DEFAULT_DEADLINE


@dataclass(slots=True)
class _Slot:
    """A reply owed for one frame, in frame order."""

    sha: str
    due: float
    text: bytes | None = None
    callbacks: list[Any] = field(default_factory=list)


@implementer(interfaces.IHalfCloseableProtocol)
class ReceiverProtocol(Protocol):
    """One client connection on the server."""

    log = Logger()
    factory: ReceiverFactory

    def __init__(self) -> None:
        self._decoder: NetstringDecoder | None = None
        self._slots: deque[_Slot] = deque()
        self._unanswered = 0
        self._paused = False
        self._closing = False  # no more frames accepted; close once replies are out
        self._read_closed = False
        self._gone = False
        self._timer: Any = None
        self.peer_ip = "-"
        self.peer = "-"
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
        f.connections.add(self)
        f.metrics.connections.inc()
        f.metrics.open_connections.inc()
        try:
            self.transport.setTcpKeepAlive(True)
        except (AttributeError, OSError):
            pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._gone:
            return
        self._gone = True
        self.factory.connections.discard(self)
        self.factory.metrics.open_connections.dec()
        if self._paused:
            self.factory.metrics.paused_connections.dec()
            self._paused = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._decoder is not None and self._decoder.in_frame and not self._read_closed:
            self._violation("truncated", "connection closed mid-frame")
        # Answers still owed are dropped: the client resends and gets DUP.
        self._slots.clear()

    def readConnectionLost(self) -> None:
        """The peer half-closed (the seed's client, ``nc -N``): answer, then close."""
        self._read_closed = True
        if self._decoder is not None and self._decoder.in_frame:
            self._violation("truncated", "half-closed mid-frame")
            self._finish(b"ERR - truncated")
        else:
            self._finish(None)

    def writeConnectionLost(self) -> None:
        """The peer stopped reading: nobody will see our replies."""
        self.transport.loseConnection()

    # -- frames ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing or self._decoder is None:
            return
        frames = self._decoder.feed(data)
        for payload in frames:
            if self._closing:
                break
            try:
                self._frame_received(payload)
            except Exception:
                # A bug of ours: the frame is not acknowledged, the owed
                # replies still go out, and the connection closes.
                self.log.failure("Internal error handling a frame from {peer}", peer=self.peer)
                self.factory.metrics.protocol_errors.labels(reason="internal").inc()
                self._forget_last(payload)
                self._finish(None)
                return
        error = self._decoder.error
        if error is not None and not self._closing:
            self._frame_error(error)

    def _frame_received(self, payload: bytes) -> None:
        f = self.factory
        f.metrics.received.inc()
        now = f.clock.seconds()
        if not payload:
            sha = EMPTY_SHA256
            slot = _Slot(sha, now)
            self._slots.append(slot)
            self._resolve(slot, "empty")
            return
        sha = sha256_hex(payload)
        if f.log_payloads:
            self.log.debug("DATA - {peer} - {payload!r}", peer=self.peer, payload=payload)
        slot = _Slot(sha, now + f.limits.deadline)
        self._slots.append(slot)
        try:
            block_number = recognise_block_number(payload)
        except OutOfRange:
            self._resolve(slot, "rejected")
            return
        message = Message(payload, sha, self.peer_ip, now, block_number, self.client_id)
        self._unanswered += 1
        self._arm_deadline()
        if self._unanswered >= f.limits.window:
            self._pause()
        f.submit(message, lambda code, slot=slot: self._answered(slot, code))

    def _forget_last(self, payload: bytes) -> None:
        """Drop the unanswered slot of the frame whose handling just failed."""
        if self._slots and self._slots[-1].text is None and self._slots[-1].sha == sha256_hex(payload):
            self._slots.pop()
            self._unanswered = max(0, self._unanswered - 1)

    def _answered(self, slot: _Slot, code: str) -> None:
        if slot.text is not None or self._gone:
            return  # already answered (deadline passed) or nobody to tell
        self._unanswered -= 1
        self._resolve(slot, code)
        if self._paused and self._unanswered < self.factory.limits.window:
            self._resume()

    def _resolve(self, slot: _Slot, code: str) -> None:
        """Set the reply for ``slot`` and write every reply now due, in order."""
        if code in ("OK", "DUP"):
            slot.text = f"{code} {slot.sha}".encode("ascii")
        else:
            slot.text = f"ERR {slot.sha} {code}".encode("ascii")
        self._flush()

    def _flush(self) -> None:
        if self._gone:
            return
        f = self.factory
        out = []
        while self._slots and self._slots[0].text is not None:
            text = self._slots.popleft().text
            assert text is not None
            out.append(encode(text))
            f.metrics.replies.labels(kind=text.split(b" ", 1)[0].decode()).inc()
        if out:
            self.transport.write(b"".join(out))
        if self._closing and not self._slots:
            self.transport.loseConnection()

    # -- deadlines and backpressure -------------------------------------------

    def _arm_deadline(self) -> None:
        if self._timer is None or not self._timer.active():
            pending = [s for s in self._slots if s.text is None]
            if pending:
                delay = max(0.0, pending[0].due - self.factory.clock.seconds())
                self._timer = self.factory.clock.callLater(delay, self._deadline_passed)

    def _deadline_passed(self) -> None:
        """Answer ``timeout`` for every message whose deadline has passed."""
        self._timer = None
        now = self.factory.clock.seconds()
        for slot in list(self._slots):
            if slot.text is None and slot.due <= now:
                self.factory.metrics.outcomes.labels(outcome="timeout").inc()
                self._answered(slot, "timeout")
        self._arm_deadline()

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self.factory.metrics.paused_connections.inc()
            self.transport.pauseProducing()

    def _resume(self) -> None:
        if self._paused and not self._closing:
            self._paused = False
            self.factory.metrics.paused_connections.dec()
            self.transport.resumeProducing()

    # -- errors and closing ---------------------------------------------------

    def _frame_error(self, error: FrameError) -> None:
        self._violation(error.code, error.detail)
        self._finish(f"ERR - {error.code}".encode("ascii"))

    def _violation(self, reason: str, detail: str) -> None:
        self.factory.metrics.protocol_errors.labels(reason=reason).inc()
        self.factory.report_violation(self.peer, reason, detail)

    def _finish(self, last: bytes | None) -> None:
        """Stop reading; write the owed replies, then ``last``, then close."""
        if self._closing:
            return
        self._closing = True
        if last is not None:
            self._slots.append(_Slot("-", 0.0, text=last))
        if not self._paused:
            try:
                self.transport.pauseProducing()
            except Exception:  # noqa: BLE001 - a half-closed transport may refuse
                pass
        self._flush()


class ReceiverFactory(Factory):
    """Builds :class:`ReceiverProtocol` for every connection and holds what they share."""

    protocol = ReceiverProtocol
    log = Logger()
    noisy = False

    def __init__(
        self,
        submit: Submit,
        *,
        clock: interfaces.IReactorTime,
        metrics: ServerMetrics | None = None,
        limits: ReceiverLimits | None = None,
        log_payloads: bool = False,
    ) -> None:
        self.submit = submit
        self.log_payloads = log_payloads
        self.clock = clock
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self.limits = limits if limits is not None else ReceiverLimits()
        if self.limits.max_length < 1:
            raise ValueError("max_length must be at least 1")
        self.connections: set[ReceiverProtocol] = set()

    def stop_reading(self) -> None:
        """Shutting down: every connection stops reading, answers what it owes, then closes."""
        for protocol in list(self.connections):
            protocol._finish(None)

    def close_all(self) -> None:
        """Abort every connection still open (their unanswered messages will be resent)."""
        for protocol in list(self.connections):
            protocol.transport.abortConnection()

    def report_violation(self, peer: str, reason: str, detail: str) -> None:
        """Log one protocol violation from ``peer``."""
        self.log.warn("Protocol violation from {peer}: {reason} ({detail})", peer=peer, reason=reason, detail=detail)
