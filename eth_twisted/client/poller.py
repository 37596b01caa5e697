"""The BlockPoller service: watch the chain head and put every new block in the outbox.

Each tick verifies the chain, asks for the agreed head, fetches the blocks after the cursor
(each checked to name its parent), renders them and appends them with the new cursor in one
outbox transaction. The loop, the steps of a tick, gaps and reorgs are described in
:class:`BlockPoller` and :meth:`BlockPoller.tick`; docs/architecture.md (section 1, "Poller")
places the poller on the data path.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from eth_twisted.client.jsonrpc import RPCFailure
from eth_twisted.client.outbox import Cursor
from eth_twisted.client.rpc import RPCClient
from eth_twisted.errors import ChainMismatch, OutboxFull
from eth_twisted.interfaces import maybe_global_reactor
from eth_twisted.link.payload import FORMATS, render
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
        self._recent: OrderedDict[int, str] = OrderedDict()
        self._history = max(2 * settings.max_backfill, 256)
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
        self._out_of_step: tuple[int, str] | None = None

    # -- service -------------------------------------------------------------

    def startService(self) -> None:
        """Start ticking now and every ``settings.interval`` seconds."""
        super().startService()
        cursor = self.outbox.cursor()
        if cursor is not None:
            self._remember(cursor.block_number, cursor.block_hash)
            if self.metrics is not None:
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
        cursor = self.outbox.cursor()
        if cursor is None:
            block = await self.rpc.get_block(head)
            return self._enqueue([block], None)
        if head < cursor.block_number:
            self.behind.failed("behind", f"head {head}, cursor {cursor.block_number}")
            self.rpc.invalidate()  # checking the chain again
            return "behind"
        self.behind.recovered()
        if head == cursor.block_number:
            return "idle"
        return await self._advance(cursor, head)

    async def _advance(self, cursor: Cursor, head: int) -> str:
        start = cursor.block_number + 1
        parent: str | None = cursor.block_hash.lower()
        skipped: tuple[int, int] | None = None
        max_gap, max_backfill = self.settings.max_gap, self.settings.max_backfill
        if max_gap is not None and head - cursor.block_number > max_gap:
            keep = max(1, min(max_gap, max_backfill))
            skipped = (start, head - keep)
            start, parent = head - keep + 1, None
        free = self.outbox.free_slots()
        if free <= 0:
            return self._outbox_full(f"no free slot for block {start}")
        count = min(head - start + 1, max_backfill, free)
        blocks, error = await self._fetch(start, count)
        good = self._chained(blocks, parent)
        if not good and blocks:
            return await self._mismatch(cursor, head, blocks[0])
        if not good:
            assert error is not None
            error.raiseException()
        result = self._enqueue(good, skipped)
        if len(good) < len(blocks):
            return "reorg"
        if error is not None and result == "ok":
            e = error.value
            kind = e.kind if isinstance(e, RPCFailure) else "error"
            # Progress, and the rest comes next tick: not an outage, so not a warning per tick.
            log.debug(
                "fetched blocks {first}..{last}, then ({kind}): {why}",
                first=start,
                last=start + len(good) - 1,
                kind=kind,
                why=str(e),
            )
            return kind
        return result

    async def _fetch(self, start: int, count: int) -> tuple[list[dict[str, Any]], Failure | None]:
        """Blocks start.. start+count-1 in order, stopping at the first failure or half the deadline."""
        soft_deadline = self.clock.seconds() + self.settings.tick_timeout / 2
        blocks: list[dict[str, Any]] = []
        end = start + count
        parallel = self.settings.parallel
        for first in range(start, end, parallel):
            if blocks and self.clock.seconds() > soft_deadline:
                break
            numbers = range(first, min(first + parallel, end))
            results = await defer.DeferredList(
                [self.rpc.get_block(n) for n in numbers], consumeErrors=True
            )
            for ok, value in results:
                if not ok:
                    failure = cast(Failure, value)
                    if not failure.check(RPCFailure):
                        failure.raiseException()  # ChainMismatch, or a bug
                    return blocks, failure
                blocks.append(value)
        return blocks, None

    @staticmethod
    def _chained(blocks: list[dict[str, Any]], parent: str | None) -> list[dict[str, Any]]:
        """The leading blocks that each name the previous one's hash as parent."""
        good = []
        for block in blocks:
            if parent is not None and block["parentHash"].lower() != parent:
                break
            good.append(block)
            parent = block["hash"].lower()
        return good

    def _enqueue(self, blocks: list[dict[str, Any]], skipped: tuple[int, int] | None) -> str:
        identity = self.rpc.identity
        assert identity is not None, "enqueue before the chain was verified"
        chain_id, genesis = identity
        items = [(render(self.settings.format, b, chain_id), int(b["number"], 16)) for b in blocks]
        last = blocks[-1]
        cursor = Cursor(chain_id, genesis, int(last["number"], 16), last["hash"].lower())
        try:
            self.outbox.append(items, cursor)
        except OutboxFull as e:
            return self._outbox_full(str(e))
        for b in blocks:
            self._remember(int(b["number"], 16), b["hash"].lower())
        if skipped is not None:
            first, last_skipped = skipped
            reason = f"max-gap: head {cursor.block_number} was more than {self.settings.max_gap} blocks ahead"
            self.outbox.record_gap(first, last_skipped, reason)
            log.warn(
                "skipped blocks {first}..{last} ({n} blocks): {reason}",
                first=first,
                last=last_skipped,
                n=last_skipped - first + 1,
                reason=reason,
            )
            if self.metrics is not None:
                self.metrics.gaps_skipped.inc(last_skipped - first + 1)
        if self.metrics is not None:
            self.metrics.blocks_enqueued.inc(len(items))
            self.metrics.cursor.set(cursor.block_number)
        log.debug("enqueued blocks {first}..{last}", first=items[0][1], last=cursor.block_number)
        try:
            self.on_enqueued()
        except Exception:  # noqa: BLE001 - the sender's wake-up must not fail the poll
            log.failure("on_enqueued failed")
        return "ok"

    def _outbox_full(self, why: str) -> str:
        if self.last_result != "outbox-full":  # once per episode, not every poll
            log.error("outbox full, not advancing the cursor until it drains: {why}", why=why)
        if self.metrics is not None:
            self.metrics.outbox_full.inc()
        return "outbox-full"

    # -- reorgs --------------------------------------------------------------

    def _remember(self, number: int, block_hash: str) -> None:
        self._recent[number] = block_hash
        self._recent.move_to_end(number)
        for stale in [n for n in self._recent if n > number]:
            del self._recent[stale]  # a rewind: those heights now hold other blocks
        while len(self._recent) > self._history:
            self._recent.popitem(last=False)

    async def _mismatch(self, cursor: Cursor, head: int, block: dict[str, Any]) -> str:
        """Block cursor+1 does not name the cursor's block as parent."""
        number = int(block["number"], 16)
        self.rpc.invalidate()  # a node restarted on another chain looks like a reorg: check first
        seen = (number, block["parentHash"])
        if seen != self._out_of_step:  # once per disagreement, not once per tick
            self._out_of_step = seen
            log.warn(
                "block {number} names parent {parent}, not {expected}: a reorg or a node out of step",
                number=number,
                parent=block["parentHash"],
                expected=cursor.block_hash,
            )
        canonical = await self.rpc.get_block(cursor.block_number)
        if canonical["hash"].lower() == cursor.block_hash.lower():
            return "reorg"  # the node contradicts itself: retry next tick
        ancestor = await self._common_ancestor(cursor.block_number - 1)
        if ancestor is None:
            log.error(
                "reorg deeper than the {n} blocks remembered: resuming from the node's block {number}",
                n=len(self._recent),
                number=cursor.block_number,
            )
            return self._after_rewind([canonical], head)
        a_number, a_hash = ancestor
        log.warn(
            "reorg: block {cursor} replaced; common ancestor {ancestor}, re-sending from {first}",
            cursor=cursor.block_number,
            ancestor=a_number,
            first=a_number + 1,
        )
        free = self.outbox.free_slots()
        if free <= 0:
            return self._outbox_full("no free slot for the reorganised blocks")
        count = min(head - a_number, self.settings.max_backfill, free)
        blocks, _ = await self._fetch(a_number + 1, count)
        return self._after_rewind(self._chained(blocks, a_hash), head)

    def _after_rewind(self, blocks: list[dict[str, Any]], head: int) -> str:
        if blocks:
            result = self._enqueue(blocks, None)
            if result != "ok":
                return result
        return "reorg"

    async def _common_ancestor(self, below: int) -> tuple[int, str] | None:
        number = below
        while number >= 0 and number in self._recent:
            block = await self.rpc.get_block(number)
            if block["hash"].lower() == self._recent[number]:
                return number, self._recent[number]
            number -= 1
        return None
