"""The BlockPoller service: watch the chain head and put every new block in the outbox.

Each tick verifies the chain, asks for the agreed head, fetches the blocks after the cursor
(each checked to name its parent), renders them and appends them with the new cursor in one
outbox transaction. The loop, the steps of a tick, gaps and reorgs are described in
:class:`BlockPoller` and :meth:`BlockPoller.tick`; docs/architecture.md (section 1, "Poller")
places the poller on the data path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from eth_twisted.client.heads import HeadPipeline
from eth_twisted.client.jsonrpc import RPCFailure
from eth_twisted.client.rpc import RPCClient
from eth_twisted.errors import ChainMismatch
from eth_twisted.interfaces import maybe_global_reactor
from eth_twisted.link.payload import FORMATS
from eth_twisted.metrics import ClientMetrics
from eth_twisted.options import int_in, optional_positive_int, positive_float, setting
from eth_twisted.outage import Episode

log = Logger(namespace="eth_twisted.client.poller")

SUCCESS_RESULTS = frozenset({"ok", "idle", "behind"})
"""Poll results that count as a successful poll (for /readyz and the metric)."""


@dataclass(frozen=True)
class PollSettings:
    """How the poller follows the head; the option fields are the client options of their names."""

    interval: float = setting(5.0, "Seconds between polls of the chain head", positive_float)
    max_backfill: int = setting(
        128, "Most blocks fetched and enqueued per poll", int_in(1, 100_000)
    )
    max_gap: int | None = setting(
        None,
        "Skip ahead (recording the gap) when further behind than this many blocks; 'off' never skips",
        optional_positive_int,
    )
    """None never skips; 0 follows the head only (see :meth:`BlockPoller.tick`, step 5)."""
    format: str = setting("html", "Payload format: html or json (use json for more than one chain)")
    chain_id: int | None = setting(
        None, "Expected chain id; refuse endpoints that disagree", int_in(1)
    )
    parallel: int = 4
    """Blocks fetched at once within a poll."""
    tick_timeout: float = 60.0
    """Seconds one poll may take before it is cancelled (fetching stops at half of it)."""

    def check(self) -> None:
        """Raise ValueError naming the option of the first value that makes no sense."""
        if self.format not in FORMATS:
            raise ValueError(f"--format: expected {' or '.join(FORMATS)}, got {self.format!r}")
        if not self.interval > 0:
            raise ValueError(f"--interval: must be positive, got {self.interval}")
        if self.max_backfill < 1:
            raise ValueError(f"--max-backfill: must be at least 1, got {self.max_backfill}")
        if self.max_gap is not None and self.max_gap < 0:
            raise ValueError(f"--max-gap: must be 0 or more, got {self.max_gap}")
        if self.parallel < 1 or not self.tick_timeout > 0:
            raise ValueError("parallel must be at least 1 and tick_timeout positive")


class BlockPoller(service.Service):
    """Polls the head through ``rpc`` and appends rendered blocks to ``outbox``.

    A ``LoopingCall`` on the injected clock runs one tick (:meth:`tick`) every
    ``interval`` seconds. A tick returns a Deferred, so ticks never overlap; it has its own
    deadline (``tick_timeout``); and every failure is caught, logged and counted, so the
    loop never stops (a LoopingCall dies for good on the first unhandled failure).

    Failed polls are logged once per outage (when the first fails and when one succeeds
    again, with the duration), as are a head below the cursor and a node out of step: a
    poller that fails every tick for hours writes two lines.

    ``on_enqueued`` is called after every append (it wakes the sender);
    ``fatal`` is called once with the message when the chain does not match
    (the tap stops the process). ``close_rpc`` closes ``rpc`` when the
    poller stops (off when the RPC client is shared). ``last_success`` is
    the clock time of the last successful poll, or None.
    """

    name = "poller"  # type: ignore[assignment]

    def __init__(
        self,
        rpc: RPCClient,
        outbox: Any,
        settings: PollSettings | None = None,
        *,
        clock: IReactorTime | None = None,
        metrics: ClientMetrics | None = None,
        on_enqueued: Callable[[], None] | None = None,
        fatal: Callable[[str], None] | None = None,
        close_rpc: bool = True,
        pipeline: HeadPipeline | None = None,
    ) -> None:
        settings = settings if settings is not None else PollSettings()
        settings.check()
        clock = maybe_global_reactor(clock)
        self.rpc = rpc
        self.outbox = outbox
        self.settings = settings
        self.clock: IReactorTime = clock
        self.metrics = metrics
        self.on_enqueued = on_enqueued or (lambda: None)
        self.fatal = fatal
        self.close_rpc = close_rpc
        self.last_success: float | None = None
        """Clock time of the last successful poll (ok, idle or behind)."""
        self.last_result: str | None = None
        self.last_head: int | None = None
        self.fatal_message: str | None = None
        self.verified = False
        self._loop: LoopingCall | None = None
        self._in_flight: Deferred[Any] | None = None
        self._idle_waiters: list[Deferred[None]] = []
        self.polled_at: float | None = None
        """Clock time of the last head round that answered."""
        self.pipeline = pipeline or HeadPipeline(
            rpc,
            outbox,
            fmt=settings.format,
            max_backfill=settings.max_backfill,
            parallel=settings.parallel,
            clock=clock,
            metrics=metrics,
            on_enqueued=self.on_enqueued,
        )
        self.trouble = Episode(
            log,
            self.clock.seconds,
            "polls",
            start="poll failed ({kind}): {detail}{note}; the next line says when polls succeed again",
            end="polls succeed again after {duration:.1f} s ({failures} failed polls: {kinds})",
        )
        """The current run of failed polls, logged at its start and its end."""
        self.behind = Episode(
            log,
            self.clock.seconds,
            "the chain head",
            start="{subject} is below the cursor: {detail}{note}; nothing to send until the chain reaches it",
            end="{subject} reached the cursor again after {duration:.1f} s",
        )

    # -- service -------------------------------------------------------------

    def startService(self) -> None:
        """Start ticking now and every ``settings.interval`` seconds."""
        super().startService()
        self.pipeline.load()
        cursor = self.outbox.cursor()
        if cursor is not None and self.metrics is not None:
            self.metrics.cursor.set(cursor.block_number)
        self.verified = False
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.settings.interval, now=True).addErrback(self._loop_died)

    def stopService(self) -> Deferred[None]:
        """Stop ticking, cancel a tick in flight, wait for it, close the RPC client."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        waits: list[Deferred[Any]] = []
        if self._in_flight is not None:
            waiter: Deferred[None] = Deferred()
            self._idle_waiters.append(waiter)
            waits.append(waiter)
            self._in_flight.cancel()
        d = defer.gatherResults(waits) if waits else defer.succeed(None)
        if self.close_rpc:
            d.addCallback(lambda _: self.rpc.close())
        d.addCallback(lambda _: None)
        return d  # type: ignore[return-value]

    def _loop_died(self, failure: Failure) -> None:
        log.failure("the poll loop stopped unexpectedly", failure)

    # -- one tick ------------------------------------------------------------

    def tick(self) -> Deferred[Any] | None:
        """Run one poll; the Deferred fires when it is over and never fails.

        Nothing is started (None) while a tick is in flight or after a fatal mismatch.
        One tick:

        1. Until the chain is verified (at start, after a failed poll, i.e. when
           the endpoints come back), every endpoint must show the chain of the stored
           cursor (:meth:`RPCClient.verify_chain`). A mismatch calls ``fatal`` with a
           message naming ``--reset-cursor``; the tap stops the process.
        2. ``head_round`` gives the best trusted head.
        3. No cursor yet: the head block itself is enqueued (the first poll emits
           the current block, like the seed). Head unchanged: nothing. Head below
           the cursor: nothing, logged.
        4. Head moved from N to N+k: blocks N+1 .. N+min(k, max_backfill, free
           outbox slots) are fetched (``parallel`` at a time, kept in order), each
           checked to name the previous block's hash as its parent, rendered, and
           appended with the new cursor in ONE ``outbox.append``; the rest of the
           gap is walked by later ticks, never jumped.
        5. ``max_gap`` G (off by default): when k > G, blocks N+1 .. head-K are
           skipped, where K = max(1, min(G, max_backfill)); the skipped range is
           recorded with ``outbox.record_gap``, logged and counted, and the last K
           blocks up to the head are fetched. ``max_gap=0`` follows the head only.
        6. Parent-hash mismatch: nothing past it is enqueued. When the node
           confirms that the cursor's own block was replaced (a reorg), the poller
           walks back through the hashes it enqueued recently to the common
           ancestor and enqueues the canonical blocks after it again (``json``
           payloads then carry the new hashes; ``html`` payloads are byte-identical
           and the server answers DUP). Otherwise (a node out of step) it retries
           next tick. Either way it never skips and never crashes.
        """
        if self.fatal_message is not None or self._in_flight is not None:
            return None
        d = Deferred.fromCoroutine(self._poll())
        self._in_flight = d
        d.addTimeout(self.settings.tick_timeout, self.clock)
        d.addCallbacks(self._poll_done, self._poll_failed)
        d.addBoth(self._tick_over)
        return d

    def _tick_over(self, _: object) -> None:
        self._in_flight = None
        waiters, self._idle_waiters = self._idle_waiters, []
        for w in waiters:
            w.callback(None)

    def _poll_done(self, result: str) -> None:
        self._count(result)
        self.trouble.recovered()

    def _poll_failed(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError):
            return
        if failure.check(ChainMismatch):
            self._fatal(str(failure.value))
            return
        if failure.check(RPCFailure):
            e = failure.value
            self.trouble.failed(e.kind, str(e))
            # No endpoint gave what the poll needed: when one answers again it may be
            # a node restarted on another chain, so the chain is verified again first.
            self.verified = False
            self._count(e.kind)
            return
        if failure.check(defer.TimeoutError):
            self.trouble.failed(
                "tick-timeout",
                f"the poll took longer than its {self.settings.tick_timeout:g} s "
                "deadline and was cancelled",
            )
            self._count("tick-timeout")
            return
        self.trouble.failed("error", "unexpected error", failure)
        self._count("error")

    def _count(self, result: str) -> None:
        if result == "outbox-full" and self.last_result != "outbox-full":  # once per episode
            log.error("outbox full: not advancing the cursor until it drains")
        self.last_result = result
        if result in SUCCESS_RESULTS:
            self.last_success = self.clock.seconds()
        if self.metrics is not None:
            self.metrics.polls.labels(result).inc()
            if result in SUCCESS_RESULTS:
                self.metrics.last_poll_success.set(self.clock.seconds())

    def _fatal(self, message: str) -> None:
        self.fatal_message = message
        self._count("chain-mismatch")
        if self.fatal is None:  # otherwise the callback logs it, once
            log.critical("stopping: {message}", message=message)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self.fatal is not None:
            try:
                self.fatal(message)
            except Exception:  # noqa: BLE001 - a broken callback must not hide the cause
                log.failure("the fatal callback failed")

    async def _poll(self) -> str:
        if not self.verified:
            cursor = self.outbox.cursor()
            expected = (cursor.chain_id, cursor.genesis_hash) if cursor is not None else None
            await self.rpc.verify_chain(expected, self.settings.chain_id)
            self.verified = True
        head = await self.rpc.head_round()
        self.last_head = head
        self.polled_at = self.clock.seconds()
        return await self.pipeline.run(lambda: self._follow(head))

    async def _follow(self, head: int) -> str:
        """Bring the pipeline to the polled ``head`` (a step of the pipeline's queue)."""
        pipeline = self.pipeline
        tip = pipeline.tip
        if tip is None:
            return await pipeline.reconcile(await self.rpc.get_block(head), "poll")
        nt = tip[0]
        if head < nt:
            block = await self.rpc.get_block(head)
            held = pipeline.held(head)
            if held is not None and held != block["hash"]:
                return await pipeline.reconcile(block, "poll")  # a reorg to a lower head
            result = await pipeline.rolled_back(block)
            if result == "behind":
                self.behind.failed("behind", f"head {head}, cursor {nt}")
                self.rpc.invalidate()  # checking the chain again
            return result
        self.behind.recovered()
        if head == nt:
            # The same height may hold another block now (a reorg of equal length).
            result = await pipeline.reconcile(await self.rpc.get_block(head), "poll")
            return "idle" if result == "dup" else result
        max_gap, max_backfill = self.settings.max_gap, self.settings.max_backfill
        if max_gap is not None and head - nt > max_gap:
            keep = max(1, min(max_gap, max_backfill))
            reason = f"max-gap: head {head} was more than {max_gap} blocks ahead"
            return await pipeline.skip_to(head, keep, reason)
        return await pipeline.advance(head)
