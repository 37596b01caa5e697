"""An in-memory record sink: the reference the contract tests hold the real ones to."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from eth_twisted.interfaces import IRecord
from eth_twisted.model import (
    DEFAULT_SUMMARY_PAGE_BYTES,
    MAX_BLOCK_NUMBER,
    ChainBlock,
    ChainRow,
    ChainSummary,
    ChainViolation,
    FinalityEvent,
    Message,
    Outcome,
    Record,
    RecordSummary,
    ReorgEvent,
    ReorgRow,
    Totals,
    storable_client_id,
    storable_client_ip,
    take_page,
)
from eth_twisted.sinks.chain import ChainState, ChainStore, Row, apply_chain_events


@implementer(IRecord)
class MemorySink:
    """Holds records in a dict; ``fail_with`` makes every call fail (for tests)."""

    name = "memory"

    def __init__(self) -> None:
        self.records: dict[str, Record] = {}
        self.order: list[Record] = []
        self.fail_with: Exception | None = None
        self.batches: list[int] = []
        self.chain_states: dict[int, ChainState] = {}
        self.first_seen: dict[int, float] = {}
        self.reorgs: list[ReorgRow] = []
        self.reorg_verdicts: dict[tuple[int, str], tuple[int, bool]] = {}
        self.finality: list[tuple[FinalityEvent, bool, str]] = []
        self.canonical: dict[tuple[int, int], str] = {}
        """(chain id, height) -> the message id of the canonical block there."""
        self.violations: list[ChainViolation] = []
        """Every finality violation found, in order."""
        self.chain_alarms: list[Callable[[ChainViolation], None]] = []
        """Called with each finality violation once its batch is stored (the server counts them)."""

    def _check(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    def start(self) -> Deferred[None]:
        return defer.succeed(None)

    def stop(self) -> Deferred[None]:
        return defer.succeed(None)

    def ping(self) -> Deferred[None]:
        return defer.maybeDeferred(self._check)

    def store_batch(
        self, messages: Sequence[Message], verdicts: Sequence[Outcome] | None = None
    ) -> Deferred[list[Outcome]]:
        if self.fail_with is not None:
            return defer.fail(self.fail_with)
        self.batches.append(len(messages))
        outcomes: list[Outcome] = []
        fresh: list[Message] = []
        for m in messages:
            if m.block_number is not None and not 0 <= m.block_number <= MAX_BLOCK_NUMBER:
                outcomes.append(Outcome.REJECTED)
            elif m.hash in self.records:
                outcomes.append(Outcome.DUPLICATE)
            else:
                chain = m.chain
                block = isinstance(chain, ChainBlock) and m.block_number is not None
                rec = Record(
                    len(self.order) + 1,
                    m.hash,
                    m.payload,
                    m.block_number,
                    storable_client_ip(m.client_ip),
                    storable_client_id(m.client_id),
                    m.received_at,
                    m.kind,
                    None if chain is None else chain.chain_id,
                    chain.block_hash if isinstance(chain, ChainBlock | FinalityEvent) else None,
                    chain.parent_hash if isinstance(chain, ChainBlock) else None,
                    False if block else None,
                )
                self.records[m.hash] = rec
                self.order.append(rec)
                outcomes.append(Outcome.STORED)
                fresh.append(m)
        if fresh:
            found = apply_chain_events(_MemoryChains(self), fresh, fresh[0].received_at)
            self.violations.extend(found)
            for alarm in list(self.chain_alarms):
                for v in found:
                    alarm(v)
        return defer.succeed(outcomes)

    def fetch_records(self, after_id: int, limit: int) -> Deferred[list[Record]]:
        return defer.succeed([r for r in self.order if r.id > after_id][:limit])

    def fetch_summaries(
        self, after_id: int, limit: int, max_bytes: int = DEFAULT_SUMMARY_PAGE_BYTES
    ) -> Deferred[list[RecordSummary]]:
        rows = self.order[max(0, int(after_id)) :]  # ids are positions + 1
        return defer.succeed(take_page(map(_summary, rows), limit, max_bytes))

    def recent_summaries(
        self, limit: int, before: int | None = None, max_bytes: int = DEFAULT_SUMMARY_PAGE_BYTES
    ) -> Deferred[list[RecordSummary]]:
        end = len(self.order) if before is None else max(0, min(len(self.order), int(before) - 1))
        return defer.succeed(take_page(map(_summary, reversed(self.order[:end])), limit, max_bytes))

    def recent(self, limit: int, before: int | None = None) -> Deferred[list[Record]]:
        rows = [r for r in reversed(self.order) if before is None or r.id < before]
        return defer.succeed(rows[:limit])

    def by_block(
        self, block_number: int, limit: int | None = None, after: int | None = None
    ) -> Deferred[list[Record]]:
        rows = [
            r
            for r in self.order
            if r.block_number == block_number and (after is None or r.id > after)
        ]
        return defer.succeed(rows if limit is None else rows[:limit])

    def totals(self) -> Deferred[Totals]:
        t = Totals(records=len(self.order))
        for r in self.order:
            t.first_by_ip[r.client_ip] = t.first_by_ip.get(r.client_ip, 0) + 1
            if r.block_number is not None:  # the newest received (ties: the highest) wins
                if t.latest_block_at is None or (r.received_at, r.block_number) >= (
                    t.latest_block_at,
                    t.latest_block if t.latest_block is not None else -1,
                ):
                    t.latest_block, t.latest_block_at = r.block_number, r.received_at
                t.latest_block_by_ip[r.client_ip] = r.block_number
        if self.order:
            t.first_received_at = min(r.received_at for r in self.order)
            t.last_received_at = max(r.received_at for r in self.order)
        return defer.succeed(t)

    def chains(self, limit: int, after: int | None = None) -> Deferred[list[ChainSummary]]:
        ids = sorted(c for c in self.chain_states if after is None or c > after)[: max(0, limit)]
        return defer.succeed([self._chain_summary(c) for c in ids])

    def _chain_summary(self, chain_id: int) -> ChainSummary:
        st = self.chain_states[chain_id]
        heights = [n for (c, n) in self.canonical if c == chain_id]
        head = max(heights, default=None)
        head_hash = (
            None if head is None else self.records[self.canonical[chain_id, head]].block_hash
        )
        mine = [r for r in self.reorgs if r.chain_id == chain_id]
        return ChainSummary(
            chain_id,
            self.first_seen[chain_id],
            head,
            head_hash,
            st.finalized_number,
            st.finalized_hash,
            st.safe_number,
            st.safe_hash,
            st.reorgs,
            st.violations,
            mine[-1] if mine else None,
        )

    def chain_blocks(
        self, chain_id: int, start: int, end: int, limit: int
    ) -> Deferred[list[ChainRow]]:
        heights = sorted(n for (c, n) in self.canonical if c == chain_id and start <= n <= end)
        rows = []
        for n in heights[: max(0, limit)]:
            r = self.records[self.canonical[chain_id, n]]
            assert r.block_hash is not None and r.parent_hash is not None
            rows.append(
                ChainRow(n, r.block_hash, r.parent_hash, r.finalized, r.hash, r.received_at)
            )
        return defer.succeed(rows)

    def chain_reorgs(
        self, chain_id: int, limit: int, before: int | None = None
    ) -> Deferred[list[ReorgRow]]:
        rows = [
            r
            for r in reversed(self.reorgs)
            if r.chain_id == chain_id and (before is None or r.id < before)
        ]
        return defer.succeed(rows[: max(0, limit)])


class _MemoryChains(ChainStore):
    """The memory record as a :class:`~eth_twisted.sinks.chain.ChainStore`."""

    def __init__(self, sink: MemorySink) -> None:
        self.sink = sink

    def _row(self, r: Record) -> Row:
        assert r.block_number is not None and r.block_hash and r.parent_hash
        return Row(
            r.hash, r.block_number, r.block_hash, r.parent_hash, bool(r.canonical), r.finalized
        )

    def _blocks(self, chain_id: int) -> list[Record]:
        return [
            r
            for r in self.sink.order
            if r.chain_id == chain_id and r.kind == "block" and r.canonical is not None
        ]

    def lock_chains(self, chain_ids: Sequence[int], now: float) -> dict[int, ChainState]:
        for c in chain_ids:
            if c not in self.sink.chain_states:
                self.sink.chain_states[c] = ChainState(c)
                self.sink.first_seen[c] = now
        return {c: replace(self.sink.chain_states[c]) for c in chain_ids}

    def canonical_at(self, chain_id: int, heights: Collection[int]) -> dict[int, Row]:
        found = {}
        for n in heights:
            sha = self.sink.canonical.get((chain_id, n))
            if sha is not None:
                found[n] = self._row(self.sink.records[sha])
        return found

    def rows_by_block_hash(self, chain_id: int, hashes: Collection[str]) -> dict[str, Row]:
        found: dict[str, Row] = {}
        for r in self._blocks(chain_id):
            if r.block_hash is not None and r.block_hash in hashes:
                held = found.get(r.block_hash)
                if held is None or (r.canonical and not held.canonical):
                    found[r.block_hash] = self._row(r)
        return found

    def verdicts(self, chain_id: int, hashes: Collection[str]) -> dict[str, bool]:
        said = self.sink.reorg_verdicts
        return {h: said[chain_id, h][1] for h in hashes if (chain_id, h) in said}

    def children(self, chain_id: int, parents: Mapping[int, str], limit: int) -> list[Row]:
        found = [
            self._row(r)
            for r in self._blocks(chain_id)
            if not r.canonical
            and r.block_number is not None
            and parents.get(r.block_number) == r.parent_hash
        ]
        return found[:limit]

    def _update(self, sha: str, canonical: bool, finalized: bool) -> None:
        old = self.sink.records[sha]
        new = replace(old, canonical=canonical, finalized=finalized)
        self.sink.records[sha] = new
        self.sink.order[new.id - 1] = new
        assert new.chain_id is not None and new.block_number is not None
        key = (new.chain_id, new.block_number)
        if canonical:
            held = self.sink.canonical.get(key)
            if held is not None and held != sha:
                raise AssertionError(f"two canonical blocks at {key}: {held} and {sha}")
            self.sink.canonical[key] = sha
        elif self.sink.canonical.get(key) == sha:
            del self.sink.canonical[key]

    def set_status(
        self, chain_id: int, demote: Sequence[str], promote: Sequence[tuple[str, bool]]
    ) -> None:
        for sha in demote:
            self._update(sha, False, False)
        for sha, finalized in promote:
            self._update(sha, True, finalized)

    def add_reorg(
        self,
        message: Message,
        event: ReorgEvent,
        below_finality: bool,
        finalized_number: int | None,
    ) -> int | None:
        row = ReorgRow(
            len(self.sink.reorgs) + 1,
            event.chain_id,
            event.fork_number,
            event.depth,
            len(event.new_hashes),
            event.old_hashes[-1] if event.old_hashes else None,
            event.new_hashes[-1] if event.new_hashes else None,
            event.detected_at,
            message.received_at,
            storable_client_ip(message.client_ip),
            message.hash,
            below_finality,
            finalized_number,
        )
        self.sink.reorgs.append(row)
        return row.id

    def add_verdicts(self, chain_id: int, reorg_id: int, verdicts: Mapping[str, bool]) -> None:
        for h, word in verdicts.items():
            self.sink.reorg_verdicts[chain_id, h] = (reorg_id, word)

    def add_finality(self, message: Message, event: FinalityEvent, violation: bool) -> None:
        self.sink.finality.append((event, violation, message.hash))

    def mark_finalized(self, chain_id: int, number: int) -> None:
        for (c, n), sha in list(self.sink.canonical.items()):
            if c == chain_id and n <= number and not self.sink.records[sha].finalized:
                self._update(sha, True, True)

    def save_chain(self, state: ChainState) -> None:
        self.sink.chain_states[state.chain_id] = replace(state)


def _summary(r: Record) -> RecordSummary:
    return RecordSummary(r.id, r.hash, r.block_number, r.client_ip, r.received_at)


__all__ = ["MemorySink"]
