"""An in-memory record sink: the reference the contract tests hold the real ones to."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from eth_twisted.interfaces import IRecord
from eth_twisted.model import (
    DEFAULT_SUMMARY_PAGE_BYTES,
    MAX_BLOCK_NUMBER,
    Message,
    Outcome,
    Record,
    RecordSummary,
    Totals,
    storable_client_id,
    storable_client_ip,
    take_page,
)


@implementer(IRecord)
class MemorySink:
    """Holds records in a dict; ``fail_with`` makes every call fail (for tests)."""

    name = "memory"

    def __init__(self) -> None:
        self.records: dict[str, Record] = {}
        self.order: list[Record] = []
        self.fail_with: Exception | None = None
        self.batches: list[int] = []

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
        for m in messages:
            if m.block_number is not None and not 0 <= m.block_number <= MAX_BLOCK_NUMBER:
                outcomes.append(Outcome.REJECTED)
            elif m.hash in self.records:
                outcomes.append(Outcome.DUPLICATE)
            else:
                rec = Record(
                    len(self.order) + 1,
                    m.hash,
                    m.payload,
                    m.block_number,
                    storable_client_ip(m.client_ip),
                    storable_client_id(m.client_id),
                    m.received_at,
                )
                self.records[m.hash] = rec
                self.order.append(rec)
                outcomes.append(Outcome.STORED)
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
            if r.block_number is not None:  # rows are in id order: the last one wins
                t.latest_block, t.latest_block_at = r.block_number, r.received_at
                t.latest_block_by_ip[r.client_ip] = r.block_number
        if self.order:
            t.first_received_at = min(r.received_at for r in self.order)
            t.last_received_at = max(r.received_at for r in self.order)
        return defer.succeed(t)


def _summary(r: Record) -> RecordSummary:
    return RecordSummary(r.id, r.hash, r.block_number, r.client_ip, r.received_at)


__all__ = ["MemorySink"]
