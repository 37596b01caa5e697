"""The head pipeline: every source of headers (push, poll, backfill) feeds one chain of hashes.

:class:`HeadPipeline` keeps a window of the canonical chain it has sent (number, hash,
parent; persisted in the outbox), dedupes headers by hash, links them by parent hash, fills
gaps by walking parent hashes, detects reorgs (a parent that is not the held block, an equal
or lower head with another hash, a head that went back without a replacement) and appends
each canonical block to the outbox once, in order, with a reorg record before replacement
blocks when the payloads are ``json``. docs/architecture.md ("Heads") draws the sources.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from eth_twisted.client.jsonrpc import RPCFailure
from eth_twisted.client.outbox import Cursor
from eth_twisted.client.rpc import RPCClient
from eth_twisted.errors import OutboxFull
from eth_twisted.link.payload import render, render_reorg
from eth_twisted.metrics import ClientMetrics

log = Logger(namespace="eth_twisted.client.heads")

Header = dict[str, Any]
"""A checked header: ``number``, ``hash``, ``parentHash``, ``timestamp`` (lowercase hex)."""

MAX_QUEUED = 1024
"""Headers waiting for the pipeline; past it the oldest waiting one is dropped (a later
header's ancestry brings it back by parent hash)."""

ROLLBACK_CONFIRMATIONS = 3
"""Polls in a row that must find the held tip gone before a head below it is a rollback."""

HEADER_CACHE = 1024
"""Headers remembered by hash (pushed or fetched), so a walk by parent hash asks the node
only for what it has not already sent."""


def number_of(header: Header) -> int:
    """The header's block number."""
    return int(header["number"], 16)


@dataclass
class Reorg:
    """A reorganisation the pipeline followed."""

    fork_number: int
    old_hashes: list[str]
    new_hashes: list[str]
    at: float
    below_finality: bool = False

    @property
    def depth(self) -> int:
        """Blocks that stopped being canonical."""
        return len(self.old_hashes)


class HeadPipeline:
    """One chain of hashes for every head source; appends canonical blocks to ``outbox``.

    :meth:`observe` takes a header from any source and fires, once the pipeline has dealt
    with it, with what happened: ``ok`` (blocks appended), ``dup`` (already held), ``reorg``
    (followed, or a node out of step: retried on the next header), ``outbox-full``; it fails
    with the RPC failure that stopped a walk. Headers are handled one at a time in arrival
    order; a header that extends the held tip is appended at once, without a call to the
    node (the payload is rendered from the header).

    ``fmt`` is the payload format; ``max_backfill`` bounds the blocks fetched for one
    header; ``history`` is how many canonical blocks are remembered for finding a fork
    point. ``finalized`` (set by the finality tracker) is the finalized block, for the
    "reorg at or below finality" alarm.
    """

    def __init__(
        self,
        rpc: RPCClient,
        outbox: Any,
        *,
        fmt: str = "html",
        max_backfill: int = 128,
        parallel: int = 4,
        history: int = 256,
        clock: IReactorTime,
        metrics: ClientMetrics | None = None,
        on_enqueued: Callable[[], None] | None = None,
    ) -> None:
        self.rpc = rpc
        self.outbox = outbox
        self.format = fmt
        self.max_backfill = max_backfill
        self.parallel = parallel
        self.history = max(history, 2 * max_backfill, 256)
        self.clock = clock
        self.metrics = metrics
        self.on_enqueued = on_enqueued or (lambda: None)
        self.finalized: tuple[int, str] | None = None
        self.last_reorg: Reorg | None = None
        self.reorgs = 0
        self.violations = 0
        self._window: OrderedDict[int, str] = OrderedDict()
        self._numbers: dict[str, int] = {}
        self._cache: OrderedDict[str, Header] = OrderedDict()
        self._queue: deque[tuple[Callable[[], Any], bool, Deferred[str]]] = deque()
        self._running = False
        self._draining = False
        self._out_of_step: tuple[int, str] | None = None
        self._gone: tuple[str, int] | None = None

    # -- state ---------------------------------------------------------------

    def load(self) -> None:
        """Take the remembered chain from the outbox (its cursor and recent blocks)."""
        self._window.clear()
        self._numbers.clear()
        recent = getattr(self.outbox, "recent_blocks", None)
        if recent is not None:
            for number, block_hash in recent(self.history):
                self._hold(number, block_hash)
        cursor = self.outbox.cursor()
        if cursor is not None:
            self._forget_above(cursor.block_number)
            self._hold(cursor.block_number, cursor.block_hash.lower())

    @property
    def tip(self) -> tuple[int, str] | None:
        """(number, hash) of the last block appended, or None before the first."""
        cursor = self.outbox.cursor()
        if cursor is None:
            return None
        return cursor.block_number, cursor.block_hash.lower()

    def held(self, number: int) -> str | None:
        """The canonical hash held at ``number``, if remembered."""
        return self._window.get(number)

    def holds(self, block_hash: str) -> bool:
        """Whether ``block_hash`` is on the held canonical chain."""
        return block_hash.lower() in self._numbers

    def _hold(self, number: int, block_hash: str) -> None:
        old = self._window.pop(number, None)
        if old is not None:
            self._numbers.pop(old, None)
        self._window[number] = block_hash
        self._numbers[block_hash] = number
        while len(self._window) > self.history:
            _, gone = self._window.popitem(last=False)
            self._numbers.pop(gone, None)

    def _forget_above(self, number: int) -> None:
        for n in [n for n in self._window if n > number]:
            self._numbers.pop(self._window.pop(n), None)

    def remember(self, header: Header) -> None:
        """Keep ``header`` by hash for later walks (bounded)."""
        self._cache[header["hash"]] = header
        self._cache.move_to_end(header["hash"])
        while len(self._cache) > HEADER_CACHE:
            self._cache.popitem(last=False)

    # -- the queue -----------------------------------------------------------

    def observe(self, header: Header, source: str) -> Deferred[str]:
        """Take ``header`` from ``source`` (push, poll, backfill); see the class docstring."""
        return self.run(lambda: self.reconcile(header, source), droppable=True)

    def run(self, step: Callable[[], Any], *, droppable: bool = False) -> Deferred[str]:
        """Run the coroutine ``step()`` after every step queued before it, alone.

        Every change of the held chain goes through here, so a push, a poll and a
        finality record never interleave inside one change. At most
        :data:`MAX_QUEUED` steps wait; past it the oldest droppable one (a header:
        a later header's ancestry brings it back) fires ``dropped`` unrun.
        """
        d: Deferred[str] = Deferred()
        if len(self._queue) >= MAX_QUEUED:
            for i, (_, can_drop, waiting) in enumerate(self._queue):
                if can_drop:
                    del self._queue[i]
                    waiting.callback("dropped")
                    break
        self._queue.append((step, droppable, d))
        self._drain()
        return d

    @property
    def busy(self) -> bool:
        """A step is running or waiting."""
        return self._running or bool(self._queue)

    def _drain(self) -> None:
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue and not self._running:
                step, _, d = self._queue.popleft()
                self._running = True
                done = Deferred.fromCoroutine(step())
                done.addBoth(self._step_done, d)
        finally:
            self._draining = False

    def _step_done(self, result: Any, d: Deferred[str]) -> None:
        self._running = False
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)
        self._drain()

    # -- one header ----------------------------------------------------------

    async def reconcile(self, header: Header, source: str) -> str:
        """Deal with one header now (inside a :meth:`run` step); :meth:`observe` queues this."""
        if self.metrics is not None:
            self.metrics.heads_received.labels(source).inc()
        self.remember(header)
        h, block_hash, parent = number_of(header), header["hash"], header["parentHash"]
        tip = self.tip
        if tip is None:
            return self.append([header])
        if block_hash in self._numbers or (self._window and h < next(iter(self._window))):
            # Held already, or older than anything held (a push from before the first
            # poll): nothing to judge it by and nothing to send.
            if self.metrics is not None:
                self.metrics.heads_duplicate.labels(source).inc()
            return "dup"
        nt, ht = tip
        if h == nt + 1 and parent == ht:
            return self._extend(nt, [header])
        return await self._resolve(header, nt)

    def _extend(self, nt: int, chain: Sequence[Header]) -> str:
        """Append ``chain``, which links to the tip at ``nt``.

        Blocks the last rollback orphaned that come back go with a reorg record naming
        them canonical again.
        """
        last = self.last_reorg
        if (
            last is not None
            and not last.new_hashes
            and chain
            and chain[0]["hash"] in last.old_hashes
        ):
            return self._follow_reorg(nt, chain)
        return self.append(chain)

    async def _resolve(self, header: Header, nt: int) -> str:
        """A header that does not extend the tip: a gap, a reorg, or a node out of step."""
        h = number_of(header)
        if h > nt + 1 + self.max_backfill:
            return await self.advance(h)  # far behind: catch up by number, chained
        if h > nt + 1:
            await self._prefetch(nt + 1, h - 1)
        chain, ancestor = await self._walk_back(header)
        if ancestor == nt:
            return self._extend(nt, chain)
        if ancestor is not None:
            await self._verify()
            return self._follow_reorg(ancestor, chain)
        return await self._unconnected(nt)

    async def _walk_back(self, header: Header) -> tuple[list[Header], int | None]:
        """The headers from ``header`` down to the held chain, oldest first, and the fork point.

        Walks ``parentHash`` (headers already seen first, then ``eth_getBlockByHash``) at
        most ``history`` steps and never below the oldest held block; the fork point is
        None when the walk did not reach the held chain.
        """
        chain = [header]
        lowest = min(self._window) if self._window else 0
        while True:
            cur = chain[-1]
            parent = cur["parentHash"]
            if parent in self._numbers:
                chain.reverse()
                return chain, self._numbers[parent]
            if number_of(cur) - 1 <= lowest or len(chain) > self.history:
                chain.reverse()
                return chain, None
            found = self._cache.get(parent)
            if found is None:
                found = await self.rpc.get_block_by_hash(parent)
                if found is None:
                    raise RPCFailure(f"parent {parent} not available yet", "null-result")
                self.remember(found)
            if number_of(found) != number_of(cur) - 1:
                raise RPCFailure(f"block {parent} is not at {number_of(cur) - 1}", "bad-result")
            chain.append(found)

    async def _prefetch(self, first: int, last: int) -> None:
        """Fetch blocks ``first..last`` by number, ``parallel`` at a time, into the cache.

        Only a warm-up for the walk by parent hash (which checks every link): a failure
        or a block of another fork costs one ``eth_getBlockByHash`` later, nothing else.
        """
        for start in range(first, last + 1, self.parallel):
            numbers = range(start, min(start + self.parallel, last + 1))
            results = await defer.DeferredList(
                [self.rpc.get_block(n) for n in numbers], consumeErrors=True
            )
            for ok, value in results:
                if ok:
                    self.remember(value)

    async def _verify(self) -> None:
        """Before following a reorg: every endpoint shows the followed chain again.

        A node restarted on another chain looks like a reorg; this raises ChainMismatch
        for that (the poller makes it fatal) instead of mixing two chains.
        """
        cursor = self.outbox.cursor()
        expected = (cursor.chain_id, cursor.genesis_hash) if cursor is not None else None
        self.rpc.invalidate()
        await self.rpc.verify_chain(expected)

    async def _unconnected(self, nt: int) -> str:
        """The walk did not reach the held chain: a node out of step, or a deep reorg."""
        canonical = await self.rpc.get_block(nt)
        held = self._window.get(nt)
        if canonical["hash"] == held:
            seen = (nt, canonical["hash"])
            if seen != self._out_of_step:  # once per disagreement
                self._out_of_step = seen
                log.warn(
                    "a block does not link to the held block {number}, which the node "
                    "still has: a node out of step; trying again",
                    number=nt,
                )
            return "reorg"
        await self._verify()
        ancestor = await self._common_ancestor(nt - 1)
        if ancestor is None:
            log.error(
                "reorg deeper than the {n} blocks remembered: following the node from block "
                "{number}",
                n=len(self._window),
                number=nt,
            )
            return self._follow_reorg(nt - 1, [canonical])
        blocks = await self.fetch_chained(ancestor + 1, nt - ancestor, self._window[ancestor])
        return self._follow_reorg(ancestor, blocks)

    async def _common_ancestor(self, below: int) -> int | None:
        number = below
        while number >= 0 and number in self._window:
            block = await self.rpc.get_block(number)
            if block["hash"] == self._window[number]:
                return number
            number -= 1
        return None

    # -- catching up by number -----------------------------------------------

    async def advance(self, head: int) -> str:
        """Fetch and append the blocks after the tip up to ``head`` (capped), by number.

        At most ``max_backfill`` blocks and the outbox's free slots; each must name the
        previous one's hash as parent. A first block that does not is handed to the reorg
        path. Fails with the RPC failure that stopped the fetch when nothing was appended.
        """
        tip = self.tip
        assert tip is not None
        nt, ht = tip
        free = self.outbox.free_slots()
        if free <= 0:
            return self._outbox_full(f"no free slot for block {nt + 1}")
        count = min(head - nt, self.max_backfill, free)
        blocks, error = await self._fetch(nt + 1, count)
        good = self._chained(blocks, ht)
        if not good and blocks:
            return await self._resolve_first(blocks[0], nt)
        if not good:
            assert error is not None
            error.raiseException()
        result = self._extend(nt, good)
        if len(good) < len(blocks):
            return "reorg"
        if error is not None and result == "ok":
            e = error.value
            kind = e.kind if isinstance(e, RPCFailure) else "error"
            log.debug(
                "fetched blocks {first}..{last}, then ({kind}): {why}",
                first=nt + 1,
                last=nt + len(good),
                kind=kind,
                why=str(e),
            )
            return kind
        return result

    async def skip_to(self, head: int, keep: int, reason: str) -> str:
        """Skip the blocks after the tip up to ``head - keep`` (recorded as a gap), then append the rest.

        The ``--max-gap`` bankruptcy: the skipped range goes to ``outbox.record_gap``, is
        logged and counted, and the last ``keep`` blocks up to ``head`` are appended.
        """
        tip = self.tip
        assert tip is not None
        first, last_skipped = tip[0] + 1, head - keep
        free = self.outbox.free_slots()
        if free <= 0:
            return self._outbox_full(f"no free slot for block {head - keep + 1}")
        blocks, error = await self._fetch(head - keep + 1, min(keep, free))
        good = self._chained(blocks, None)
        if not good:
            assert error is not None
            error.raiseException()
        result = self.append(good)
        if result != "ok":
            return result
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
        return result

    async def _resolve_first(self, block: Header, nt: int) -> str:
        self.remember(block)
        chain, ancestor = await self._walk_back(block)
        if ancestor is not None and ancestor < nt:
            await self._verify()
            return self._follow_reorg(ancestor, chain)
        return await self._unconnected(nt)

    async def fetch_chained(self, first: int, count: int, parent: str | None) -> list[Header]:
        """Blocks ``first..first+count-1`` by number, the leading run that links to ``parent``."""
        blocks, _ = await self._fetch(first, count)
        return self._chained(blocks, parent)

    async def _fetch(self, start: int, count: int) -> tuple[list[Header], Failure | None]:
        """Blocks start..start+count-1 in order, stopping at the first failure."""
        blocks: list[Header] = []
        end = start + count
        for first in range(start, end, self.parallel):
            numbers = range(first, min(first + self.parallel, end))
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
    def _chained(blocks: list[Header], parent: str | None) -> list[Header]:
        """The leading blocks that each name the previous one's hash as parent."""
        good = []
        for block in blocks:
            if parent is not None and block["parentHash"] != parent:
                break
            good.append(block)
            parent = block["hash"]
        return good

    # -- appending -----------------------------------------------------------

    def _identity(self) -> tuple[int, str]:
        identity = self.rpc.identity
        assert identity is not None, "enqueue before the chain was verified"
        return identity

    def append(
        self,
        blocks: Sequence[Header],
        *,
        records: Sequence[bytes] = (),
        rewind_to: int | None = None,
        fit: bool = True,
    ) -> str:
        """Append ``records`` then ``blocks`` (rendered) and move the cursor, atomically.

        ``rewind_to`` first forgets the held blocks above that height (a reorg). With
        ``fit`` only as many blocks as the outbox has room for are taken (the rest come
        with a later header). Returns ``ok`` or ``outbox-full``.
        """
        chain_id, genesis = self._identity()
        free = self.outbox.free_slots() - len(records)
        if fit and len(blocks) > max(free, 0):
            blocks = blocks[: max(free, 0)]
        if not blocks and rewind_to is None:
            return self._outbox_full(f"no free slot for block {number_of_first(blocks)}")
        items: list[tuple[bytes, int | None]] = [(r, None) for r in records]
        items += [(render(self.format, b, chain_id), number_of(b)) for b in blocks]
        if blocks:
            last = blocks[-1]
            cursor = Cursor(chain_id, genesis, number_of(last), last["hash"])
        else:
            assert rewind_to is not None
            cursor = Cursor(chain_id, genesis, rewind_to, self._window[rewind_to])
        chain = [(number_of(b), b["hash"], b["parentHash"]) for b in blocks]
        try:
            self._outbox_append(items, cursor, chain, rewind_to)
        except OutboxFull as e:
            return self._outbox_full(str(e))
        if rewind_to is not None:
            self._forget_above(rewind_to)
        for number, block_hash, _ in chain:
            self._hold(number, block_hash)
        self._out_of_step = None
        if self.metrics is not None:
            self.metrics.blocks_enqueued.inc(len(blocks))
            self.metrics.cursor.set(cursor.block_number)
        if blocks:
            log.debug(
                "enqueued blocks {first}..{last}", first=chain[0][0], last=cursor.block_number
            )
        try:
            self.on_enqueued()
        except Exception:  # noqa: BLE001 - the sender's wake-up must not fail the pipeline
            log.failure("on_enqueued failed")
        return "ok"

    def _outbox_append(
        self,
        items: list[tuple[bytes, int | None]],
        cursor: Cursor,
        chain: list[tuple[int, str, str]],
        rewind_to: int | None,
    ) -> None:
        if hasattr(self.outbox, "recent_blocks"):
            self.outbox.append(items, cursor, chain=chain, rewind_to=rewind_to)
        else:
            self.outbox.append(items, cursor)

    def append_record(self, record: bytes) -> str:
        """Append one record (a finality record) without moving the cursor."""
        tip = self.tip
        assert tip is not None
        chain_id, genesis = self._identity()
        cursor = Cursor(chain_id, genesis, tip[0], tip[1])
        try:
            self._outbox_append([(record, None)], cursor, [], None)
        except OutboxFull as e:
            return self._outbox_full(str(e))
        try:
            self.on_enqueued()
        except Exception:  # noqa: BLE001
            log.failure("on_enqueued failed")
        return "ok"

    def _outbox_full(self, why: str) -> str:
        log.debug("outbox full: {why}", why=why)
        if self.metrics is not None:
            self.metrics.outbox_full.inc()
        return "outbox-full"

    # -- reorgs --------------------------------------------------------------

    def _follow_reorg(
        self, ancestor: int, chain: Sequence[Header], ancestor_hash: str | None = None
    ) -> str:
        """Blocks above ``ancestor`` were replaced by ``chain`` (which may be empty).

        ``ancestor_hash`` is the fork block's hash when it is not a held block (a chain
        that went back below what is remembered).
        """
        tip = self.tip
        assert tip is not None
        old = [self._window[n] for n in range(ancestor + 1, tip[0] + 1) if n in self._window]
        new = [b["hash"] for b in chain]
        reorg = Reorg(ancestor, old, new, self.clock.seconds())
        finalized = self.finalized
        if finalized is not None and ancestor < finalized[0]:
            reorg.below_finality = True
        records: list[bytes] = []
        if self.format == "json":
            chain_id, _ = self._identity()
            records.append(render_reorg(chain_id, ancestor, old, new, int(reorg.at)))
        if ancestor_hash is not None:
            self._hold(ancestor, ancestor_hash)
        result = self.append(chain, records=records, rewind_to=ancestor)
        if result != "ok":
            return result
        self.reorgs += 1
        self.last_reorg = reorg
        if self.metrics is not None:
            self.metrics.reorgs.inc()
            self.metrics.reorg_depth.observe(reorg.depth)
        if reorg.below_finality:
            self.violations += 1
            if self.metrics is not None:
                self.metrics.finality_violations.labels("reorg").inc()
            log.critical(
                "FINALITY VIOLATION: a reorg replaced blocks from {first} while block "
                "{finalized} was finalized; following the node (old {old}, new {new})",
                first=ancestor + 1,
                finalized=finalized[0] if finalized else None,
                old=_short(old),
                new=_short(new),
            )
        else:
            log.warn(
                "reorg of depth {depth} at block {fork}: {old} replaced by {new}",
                depth=reorg.depth,
                fork=ancestor,
                old=_short(old),
                new=_short(new),
            )
        return "reorg"

    async def rolled_back(self, head: Header) -> str:
        """Whether the chain went back to the held block ``head`` (below the tip) without a push.

        It did when the node no longer has the tip block at all (``anvil_rollback``,
        ``evm_revert``, a reorg to a shorter chain seen before its next block) on
        :data:`ROLLBACK_CONFIRMATIONS` polls in a row; then the blocks above ``head`` are
        orphaned (a reorg record with no new hashes) and the cursor goes back to ``head``.
        A node that still has the tip, or not for long, is only behind: ``behind``.
        Should the same blocks come back (it was a node far behind after all), they
        are sent with a reorg record that names them canonical again.
        """
        tip = self.tip
        assert tip is not None
        still = await self.rpc.get_block_by_hash(tip[1])
        if still is not None:
            self._gone = None
            return "behind"
        seen = 1 + (self._gone[1] if self._gone and self._gone[0] == tip[1] else 0)
        self._gone = (tip[1], seen)
        if seen < ROLLBACK_CONFIRMATIONS:
            return "behind"  # a lagging node looks the same for a moment
        self._gone = None
        held = self.held(number_of(head))
        if held is not None and held != head["hash"]:
            return await self.reconcile(head, "poll")  # another block there: walk to it
        await self._verify()
        return self._follow_reorg(number_of(head), [], ancestor_hash=head["hash"])


def number_of_first(blocks: Sequence[Header]) -> str:
    """The first block's number for a message, or 'the next block'."""
    return str(number_of(blocks[0])) if blocks else "the next block"


def _short(hashes: Sequence[str]) -> str:
    if not hashes:
        return "[]"
    if len(hashes) <= 2:
        return "[" + ", ".join(h[:10] for h in hashes) + "]"
    return f"[{hashes[0][:10]} .. {hashes[-1][:10]}] ({len(hashes)})"
