"""Group commit: messages from every connection, in batches, to the sinks.

:class:`Router` collects submitted messages into batches, stores each in the record sink,
hands it with the record's verdicts to every mirror and answers each message once, never
before the commit; its docstring says how batches overlap. docs/architecture.md (section
1, "Router") places it on the data path; docs/protocol.md (section 4) says when a reply is
written.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from eth_twisted.errors import SinkError, SinkTimeout
from eth_twisted.interfaces import ISink
from eth_twisted.metrics import ServerMetrics
from eth_twisted.model import Message, Outcome
from eth_twisted.options import int_in, non_negative_float, setting

Reply = Callable[[str], None]
Observer = Callable[[Sequence[Message], Sequence[str]], None]


_CODES = {outcome: outcome.value for outcome in Outcome}
"""Each outcome's reply code (a lookup: ``Outcome.value`` is a slow enum property, once per message)."""


@dataclass(slots=True)
class BatchSettings:
    """How the router batches (group commit); the option fields are the server options of their names."""

    batch_size: int = setting(1000, "Most messages per sink batch", int_in(1, 100_000))
    batch_delay: float = setting(
        0.002,
        "Most seconds a batch collects while every --concurrent-batches slot is busy; then it is "
        "stored anyway (at most as many batches again). A record with a free slot stores a "
        "message at once, without waiting (until issue 19 every batch waited this long)",
        non_negative_float,
    )
    concurrent_batches: int = setting(
        2,
        "Batches in the SQL record at once, each in its own transaction (answers stay in order); more than 1 "
        "lets the database share one flush between them",
        int_in(1, 8),
    )
    pipeline: bool = setting(
        False,
        "With Redis, let SQL store the next batch while Redis stores the current one (one batch in "
        "SQL at a time): lower latency from 1,000 msgs/s up, about 30% less throughput under "
        "saturation than two concurrent batches (bench/README.md, issue 19)",
    )
    pending_budget: int = setting(
        64 * 1024 * 1024,
        "Payload bytes queued for the sinks across all connections before new messages are "
        "answered busy",
        int_in(65536),
    )
    batch_bytes: int = 4 * 1024 * 1024
    """Most payload bytes per batch (a quarter of MySQL's default max_allowed_packet)."""
    max_pending: int = 100_000
    """Messages queued across all connections before new ones are answered ``busy``."""
    batch_timeout: float = 30.0
    """Seconds a sink has to store one batch before its messages are answered ``timeout``."""

    def check(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        if self.concurrent_batches < 1:
            raise ValueError(
                f"concurrent_batches must be at least 1, not {self.concurrent_batches}"
            )


class _Queued:
    """A message waiting for a batch, and the ticket its receiver holds.

    ``cancel()`` withdraws it while it is still waiting (its deadline passed or
    its connection went away: the client will resend it, and one copy is
    enough); once it is in a batch, cancelling does nothing.
    """

    __slots__ = ("message", "reply", "router")

    def __init__(self, message: Message, reply: Reply, router: Router) -> None:
        self.message: Message | None = message
        self.reply = reply
        self.router: Router | None = router

    def cancel(self) -> None:
        """Withdraw the message if it has not been taken into a batch yet."""
        router = self.router
        if router is not None:
            self.router = None
            router._withdrawn(self)


class SinkHealth:
    """Tracks one sink's outages so each is logged once, when it starts and ends."""

    log = Logger()

    def __init__(self, name: str, metrics: ServerMetrics) -> None:
        self.name = name
        self.metrics = metrics
        self.up = True
        self.since: float | None = None
        self.last_error = ""
        metrics.sink_up.labels(sink=name).set(1)

    def failed(self, reason: str, now: float) -> None:
        """A batch failed in this sink at ``now``: log and mark it down if it was up."""
        if self.up:
            self.up = False
            self.since = now
            self.last_error = reason
            self.log.error(
                "Sink {sink} is failing: {reason}; answering ERR until it recovers",
                sink=self.name,
                reason=reason,
            )
            self.metrics.sink_up.labels(sink=self.name).set(0)

    def succeeded(self, now: float) -> None:
        """A batch succeeded at ``now``: log the recovery and mark it up if it was down."""
        if not self.up:
            self.log.info(
                "Sink {sink} recovered after {seconds:.1f}s",
                sink=self.name,
                seconds=now - (self.since or now),
            )
            self.up = True
            self.since = None
            self.metrics.sink_up.labels(sink=self.name).set(1)


class Router:
    """Batches messages to ``record`` and then ``mirrors``; answers each message once.

    Latency first (group commit as MariaDB and PostgreSQL do it): a message that
    finds a free slot (fewer than ``concurrent_batches`` batches taken and not yet
    answered) is stored at once, with whatever else is queued, and no timer. While
    every slot is busy messages collect, and the batch goes when a slot frees, when it
    is full (``batch_size`` messages or ``batch_bytes``) or when its first message has
    waited ``batch_delay``; the last two may take up to ``concurrent_batches`` places
    beyond the slots, never more, so a stalled record still fills the queue and its
    bounds answer ``busy``. With ``pipeline`` there are no places beyond the slot.

    Each batch is stored in the record sink (SQL or memory), then handed with the
    record's verdicts to every mirror (Redis), and each message is answered once:
    ``OK``/``DUP`` when every sink has it, or the retryable code of the sink that failed.
    Answers never come before the commit. There is one callable per message, not a
    Deferred chain, on the hot path.

    With ``pipeline`` the two stages overlap: while the mirrors store
    batch N (with the record's verdicts for it), the record may already store
    batch N+1. Each stage still has one batch at a time, batches pass the stages
    in order, at most one stored batch waits for the mirrors, and every message
    is still answered only once both have it. Without it (the default) a batch
    goes through both stages before the next one starts.

    With ``concurrent_batches`` N > 1 (not with ``pipeline``) up to N batches are in the
    record at once, each in its own transaction: while one waits for its
    COMMIT's fsync the next is already inserting, and the database can make both
    durable with one flush (group commit). The record's own locking keeps
    OK/DUP exact when two batches hold the same hash (the later one waits, then
    finds it). The mirror stage and the answers still go batch by batch, in the
    order the batches were taken, so a mirror never sees a later delivery first.
    """

    log = Logger()

    def __init__(
        self,
        record: ISink,
        mirrors: Sequence[ISink] = (),
        *,
        clock: IReactorTime,
        settings: BatchSettings | None = None,
        metrics: ServerMetrics | None = None,
        answering: Callable[[], AbstractContextManager[object]] = nullcontext,
    ) -> None:
        settings = settings if settings is not None else BatchSettings()
        settings.check()
        self.settings = settings
        self.record = record
        self.pipeline = settings.pipeline
        self.concurrent_batches = 1 if self.pipeline else settings.concurrent_batches
        self.mirrors = list(mirrors)
        self.clock = clock
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self.observers: list[Observer] = []
        self.answering = answering
        """Entered around each batch's replies (a ReplyBatcher's ``hold``).

        The receiver holds its writes until the batch is answered.
        """
        self.health = {s.name: SinkHealth(s.name, self.metrics) for s in [record, *self.mirrors]}
        self.ready = True
        self._queue: deque[_Queued] = deque()
        self._queued = 0
        """Messages in the queue that are still wanted (cancelled ones are skipped lazily)."""
        self._queued_bytes = 0
        """Payload bytes of those messages: with ``max_pending`` the queue's bound (bytes and items)."""
        self._timer: Any = None
        """The ``batch_delay`` call that stores a collecting batch when no slot frees in time."""
        self._in_flight = 0
        """Batches taken and not yet answered (at most ``_most_batches``)."""
        self._most_batches = (
            self.concurrent_batches if self.pipeline else 2 * self.concurrent_batches
        )
        """Batches in flight at most: the slots, and as many again for full or overdue batches."""
        self._flushing = False
        self._finish_tail: defer.Deferred[None] | None = None
        """Fires when the newest taken batch has been answered: the next one's mirrors wait for it."""
        self._stored: deque[tuple[list[tuple[Message, Reply]], list[Message], Any]] = deque()
        self._mirroring = False
        self._drained: list[defer.Deferred[None]] = []
        # Read when scraped: no gauge update (and its lock) per message.
        self.metrics.pending.set_function(lambda: self._queued)
        self.metrics.pending_bytes.set_function(lambda: self._queued_bytes)

    @property
    def pending(self) -> int:
        """Messages waiting for a batch (not counting the ones being stored)."""
        return self._queued

    @property
    def pending_bytes(self) -> int:
        """Payload bytes of the messages waiting for a batch."""
        return self._queued_bytes

    def submit(self, message: Message, reply: Reply) -> _Queued | None:
        """Queue ``message``; ``reply`` is called once with OK, DUP or an ERR code.

        Returns the ticket that withdraws it while it waits, or None when it
        was answered at once: ``unavailable`` before the sinks are ready,
        ``busy`` when the queue already holds ``max_pending`` messages or
        ``pending_budget`` payload bytes.
        """
        if not self.ready:
            self._count("unavailable")
            reply("unavailable")
            return None
        nbytes = len(message.payload)
        queued = self._queued
        if queued and (
            queued >= self.settings.max_pending
            or self._queued_bytes + nbytes > self.settings.pending_budget
        ):
            self._count("busy")
            reply("busy")
            return None
        entry = _Queued(message, reply, self)
        self._queue.append(entry)
        queued = self._queued = queued + 1
        self._queued_bytes += nbytes
        in_flight = self._in_flight
        if in_flight < self.concurrent_batches:
            self._flush()  # a free slot: at once
        elif in_flight < self._most_batches:
            if (
                queued >= self.settings.batch_size
                or self._queued_bytes >= self.settings.batch_bytes
            ):
                self._flush()  # a full batch waits for no slot
            elif self._timer is None:
                self._timer = self.clock.callLater(self.settings.batch_delay, self._overdue)
        return entry

    def _withdrawn(self, entry: _Queued) -> None:
        """A queued message was cancelled: release its place and its bytes now."""
        message = entry.message
        assert message is not None
        entry.message = None  # the payload is freed now, the entry is skipped when reached
        self._queued -= 1
        self._queued_bytes -= len(message.payload)
        self.metrics.withdrawn.inc()
        if len(self._queue) > 2 * self._queued + 1024:
            # Mostly withdrawn entries: drop them at once (amortised, each entry goes once).
            self._queue = deque(e for e in self._queue if e.router is not None)

    def _take_batch(self) -> list[tuple[Message, Reply]]:
        batch: list[tuple[Message, Reply]] = []
        size = 0
        queue = self._queue
        limit, max_bytes = self.settings.batch_size, self.settings.batch_bytes
        while queue and len(batch) < limit:
            entry = queue.popleft()
            message = entry.message
            if message is None:
                continue  # withdrawn
            nbytes = len(message.payload)
            if batch and size + nbytes > max_bytes:
                queue.appendleft(entry)
                break
            entry.router = None  # in a batch now: too late to withdraw
            batch.append((message, entry.reply))
            size += nbytes
        self._queued -= len(batch)
        self._queued_bytes -= size
        return batch

    def _idle(self) -> bool:
        return not self._in_flight and not self._queued and not self._stored and not self._mirroring

    def _full(self) -> bool:
        return (
            self._queued >= self.settings.batch_size
            or self._queued_bytes >= self.settings.batch_bytes
        )

    def _overdue(self) -> None:
        """The collecting batch has waited ``batch_delay``: store it even if no slot is free."""
        self._timer = None
        self._flush(overdue=True)

    def _flush(self, overdue: bool = False) -> None:
        """Take batches while a slot is free; beyond the slots, a full or overdue batch.

        Never re-entrant: a batch a synchronous sink finishes inside the loop
        only frees its slot, and the loop goes on.
        """
        if self._flushing:
            return
        self._flushing = True
        try:
            slots, most = self.concurrent_batches, self._most_batches
            while self._queued and self._in_flight < most and not self._stored:
                # not self._stored: a stored batch still waits for the mirrors (pipeline)
                if self._in_flight >= slots and not overdue and not self._full():
                    break
                overdue = False
                if self._timer is not None:
                    if self._timer.active():
                        self._timer.cancel()
                    self._timer = None
                if not self._start_batch():
                    break
        finally:
            self._flushing = False
        if self._queued:
            if self._timer is None and self._in_flight < self._most_batches and not self._stored:
                self._timer = self.clock.callLater(self.settings.batch_delay, self._overdue)
        elif self._idle():
            self._notify_drained()

    def _start_batch(self) -> bool:
        """Take one batch from the queue into the record; False when only withdrawn entries were left."""
        batch = self._take_batch()
        if not batch:
            return False
        self._in_flight += 1
        previous, self._finish_tail = self._finish_tail, defer.Deferred()
        self._store(batch, previous, self._finish_tail).addBoth(self._batch_done)
        return True

    def _batch_done(self, _: object) -> None:
        self._in_flight -= 1
        self._flush()  # whatever arrived while the batch was being stored goes next, at once

    def _pump_mirrors(self) -> None:
        """Overlap mode: hand the oldest stored batch to the mirrors when they are free."""
        if self._mirroring or not self._stored:
            return
        batch, messages, verdicts = self._stored.popleft()
        self._mirroring = True
        d = self._finish(batch, messages, verdicts)
        d.addErrback(lambda f: self.log.failure("Mirror stage failed", f))
        d.addBoth(self._mirrors_done)

    def _mirrors_done(self, _: object) -> None:
        self._mirroring = False
        self._pump_mirrors()
        self._flush()

    @defer.inlineCallbacks
    def _store(
        self,
        batch: list[tuple[Message, Reply]],
        previous: defer.Deferred[None] | None,
        finished: defer.Deferred[None],
    ) -> Any:
        """The record, then (after the batch taken before this one is answered) the mirrors and answers."""
        try:
            messages = [m for m, _ in batch]
            verdicts = yield self._call_sink(self.record, messages, None)
            if previous is not None and not previous.called:
                yield previous  # only with concurrency > 1: answer in the order batches were taken
            if self.pipeline:
                self._stored.append((batch, messages, verdicts))
                self._pump_mirrors()
            else:
                yield self._finish(batch, messages, verdicts)
        finally:
            finished.callback(None)

    @defer.inlineCallbacks
    def _finish(
        self, batch: list[tuple[Message, Reply]], messages: list[Message], verdicts: Any
    ) -> Any:
        """The mirrors (given the record's verdicts), then the answers."""
        codes: list[str]
        if isinstance(verdicts, str):
            codes = [verdicts] * len(messages)
        else:
            codes = list(map(_CODES.__getitem__, verdicts))
            if self.mirrors:
                results = yield defer.gatherResults(
                    [self._call_sink(m, messages, verdicts) for m in self.mirrors],
                    consumeErrors=True,
                )
                for result in results:
                    if isinstance(result, str):
                        codes = [c if c == Outcome.REJECTED.value else result for c in codes]
                        break
        for code, n in Counter(codes).items():
            self._count(code, n)
        for observer in self.observers:
            try:
                observer(messages, codes)
            except Exception:
                self.log.failure("Batch observer {observer!r} failed", observer=observer)
        with self.answering():
            for (_, reply), code in zip(batch, codes, strict=True):
                try:
                    reply(code)
                except Exception:
                    self.log.failure("Reply callback failed")

    @defer.inlineCallbacks
    def _call_sink(
        self, sink: ISink, messages: list[Message], verdicts: list[Outcome] | None
    ) -> Any:
        """The sink's outcomes, or the ERR code to answer when it failed."""
        name = sink.name
        started = self.clock.seconds()
        self.metrics.batch_size.labels(sink=name).observe(len(messages))
        try:
            d = defer.maybeDeferred(sink.store_batch, messages, verdicts)
            d.addTimeout(self.settings.batch_timeout, self.clock)
            outcomes = yield d
            if len(outcomes) != len(messages):
                raise RuntimeError(
                    f"{name} answered {len(outcomes)} outcomes for {len(messages)} messages"
                )
        except defer.TimeoutError:
            return self._sink_failed(
                name, SinkTimeout(name, f"no answer in {self.settings.batch_timeout}s")
            )
        except SinkError as e:
            return self._sink_failed(name, e)
        except Exception as e:
            self.log.failure("Sink {sink} raised unexpectedly", Failure(), sink=name)
            return self._sink_failed(name, SinkError(name, repr(e)))
        self.metrics.sink_latency.labels(sink=name).observe(self.clock.seconds() - started)
        self.health[name].succeeded(self.clock.seconds())
        return list(outcomes)

    def _sink_failed(self, name: str, error: SinkError) -> str:
        self.metrics.sink_failures.labels(sink=name, code=error.code).inc()
        self.health[name].failed(error.reason, self.clock.seconds())
        return error.code

    def _count(self, code: str, n: int = 1) -> None:
        label = {"OK": "stored", "DUP": "duplicate"}.get(code, code)
        self.metrics.outcomes.labels(outcome=label).inc(n)

    def drain(self) -> defer.Deferred[None]:
        """Fire when every queued message has been stored and answered."""
        if self._idle():
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._drained.append(d)
        self._flush()
        return d

    def _notify_drained(self) -> None:
        waiting, self._drained = self._drained, []
        for d in waiting:
            d.callback(None)
