"""The Reconciler service: rebuilds Redis from the SQL record at start, every interval and after an outage.

A maintenance loop of its own beside the sink's write path (:mod:`eth_twisted.sinks.redis`):
the rebuild reads payload-free pages of the record and never blocks ingest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from eth_twisted.errors import SinkError
from eth_twisted.interfaces import IRecord, maybe_global_reactor
from eth_twisted.model import DEFAULT_SUMMARY_PAGE_BYTES
from eth_twisted.sinks.redis import DEFAULT_PAGE_SIZE, ReconcileCancelled, ReconcileResult

DEFAULT_RECONCILE_INTERVAL = 300.0


class _ReconcilableSink(Protocol):
    """What the Reconciler needs from its sink (:class:`~eth_twisted.sinks.redis.RedisSink`)."""

    def reconcile(
        self,
        record: IRecord,
        page_size: int = ...,
        page_bytes: int = ...,
        cancelled: Callable[[], bool] | None = ...,
    ) -> Deferred[ReconcileResult]:
        """Rebuild what Redis can know from ``record``, a bounded page at a time."""

    def check_restart(self) -> Deferred[bool]:
        """Fire True when Redis restarted since the last look (its ``run_id`` changed)."""

    def add_recovery_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever Redis comes back or is seen to have restarted."""

    def remove_recovery_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling ``listener``."""


class Reconciler(Service):
    """Runs ``sink.reconcile(record)`` at start, every ``interval`` and when Redis comes back.

    Runs never overlap: a trigger during a run asks for one more run after it.
    Every failure is logged and counted and the loop goes on (a LoopingCall
    whose function fails stops for good). Every ``watch_interval`` seconds it
    asks the sink whether Redis restarted (``run_id`` changed), which an idle
    server would otherwise not notice.
    """

    log = Logger()

    def __init__(
        self,
        sink: _ReconcilableSink,
        record: IRecord,
        interval: float = DEFAULT_RECONCILE_INTERVAL,
        clock: IReactorTime | None = None,
        metrics: Any = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        watch_interval: float | None = 10.0,
        page_bytes: int = DEFAULT_SUMMARY_PAGE_BYTES,
    ) -> None:
        clock = maybe_global_reactor(clock)
        self.sink = sink
        self.record = record
        self.interval = interval
        self.clock: IReactorTime = clock
        self.metrics = metrics
        self.page_size = page_size
        self.page_bytes = page_bytes
        self.watch_interval = watch_interval
        self.runs = 0
        """Reconciliations attempted."""
        self.failures = 0
        """Reconciliations that failed."""
        self.last_result: ReconcileResult | None = None
        self.last_success_at: float | None = None
        self._busy = False
        self._stopping = False
        self._again = False
        self._waiters: list[Deferred[ReconcileResult | None]] = []
        self._loop: LoopingCall | None = None
        self._watch: LoopingCall | None = None

    def startService(self) -> None:
        """Start the loops; the first reconciliation runs now."""
        self._stopping = False
        super().startService()
        self.sink.add_recovery_listener(self.trigger)
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(self._loop_died, "reconcile")
        if self.watch_interval:
            self._watch = LoopingCall(self._check_restart)
            self._watch.clock = self.clock
            self._watch.start(self.watch_interval, now=False).addErrback(self._loop_died, "watch")

    def stopService(self) -> Deferred[None]:
        """Stop the loops and wait for a reconciliation in progress to end (at its next page)."""
        self._stopping = True
        super().stopService()
        self.sink.remove_recovery_listener(self.trigger)
        for loop in (self._loop, self._watch):
            if loop is not None and loop.running:
                loop.stop()
        self._loop = self._watch = None
        if not self._busy:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)  # type: ignore[arg-type]
        return d.addCallback(lambda _: None)

    def trigger(self) -> None:
        """Ask for a reconciliation soon (e.g. Redis came back); never fails."""
        if self.running:
            self.run_once()

    def run_once(self) -> Deferred[ReconcileResult | None]:
        """Reconcile now, or after the run in progress; fires with its result (None on failure)."""
        if self._busy:
            self._again = True
            d: Deferred[ReconcileResult | None] = Deferred()
            self._waiters.append(d)
            return d
        self._busy = True
        return defer.ensureDeferred(self._run())

    async def _run(self) -> ReconcileResult | None:
        result: ReconcileResult | None = None
        try:
            while True:
                self._again = False
                result = await self._attempt()
                if not self._again:
                    break
        finally:
            self._busy = False
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                w.callback(result)
        return result

    async def _attempt(self) -> ReconcileResult | None:
        self.runs += 1
        try:
            result = await self.sink.reconcile(
                self.record, self.page_size, self.page_bytes, lambda: self._stopping
            )
        except ReconcileCancelled as e:
            self.log.info("Redis reconciliation stopped for shutdown ({reason})", reason=str(e))
            return None
        except SinkError as e:
            self.failures += 1
            self._count("error")
            self.log.error(
                "Redis reconciliation failed: {reason}; retrying in {interval:g}s or "
                "when Redis comes back",
                reason=str(e),
                interval=self.interval,
            )
            return None
        except Exception:
            self.failures += 1
            self._count("error")
            self.log.failure(
                "Redis reconciliation failed; retrying in {interval:g}s", interval=self.interval
            )
            return None
        self.last_result = result
        self.last_success_at = self.clock.seconds()
        self._count("ok")
        if self.metrics is not None:
            self.metrics.reconciled_hashes.inc(result.hashes_added)
        self.log.info(
            "Redis reconciled from {records} records: {added} hashes added, {ips} IPs counted, "
            "{raised} ip_messages raised, in {seconds:.2f}s",
            records=result.records,
            added=result.hashes_added,
            ips=result.ips,
            raised=result.ip_messages_raised,
            seconds=result.seconds,
        )
        return result

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.reconciliations.labels(result=result).inc()

    def _tick(self) -> Deferred[None]:
        return self.run_once().addCallback(lambda _: None)

    def _check_restart(self) -> Deferred[None]:
        # check_restart tells the listeners (this service) itself; a Redis that
        # does not answer is the data path's business, logged by the sink.
        d = defer.maybeDeferred(self.sink.check_restart)
        return d.addCallbacks(lambda _: None, lambda _: None)

    def _loop_died(self, f: Failure, which: str) -> None:
        self.log.failure("Redis reconciler: the {which} loop stopped", f, which=which)
