"""The interfaces the parts of the relay meet at, and the one "this reactor or the global one" helper.

A sink stores batches of :class:`~eth_twisted.model.Message` and answers one
:class:`~eth_twisted.model.Outcome` per message (:class:`ISink`); the record
(SQL, or the memory sink in tests) also serves the reads the stats API and
Redis reconciliation need (:class:`IRecord`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from eth_twisted.model import (
    DEFAULT_SUMMARY_PAGE_BYTES,
    ChainRow,
    ChainSummary,
    Message,
    Outcome,
    Record,
    RecordSummary,
    ReorgRow,
    Totals,
)


class ISink(Interface):
    """A place messages are stored; every method returns a Deferred."""

    name = Attribute("Short name used in logs, metrics and /readyz, e.g. 'mysql'.")

    def start() -> Deferred[None]:
        """Connect, apply migrations where allowed; fire when ready."""

    def stop() -> Deferred[None]:
        """Finish in-flight work and release every connection and thread."""

    def ping() -> Deferred[None]:
        """Fire when the backend answers a trivial request; fail otherwise."""

    def store_batch(
        messages: Sequence[Message], verdicts: Sequence[Outcome] | None = None
    ) -> Deferred[list[Outcome]]:
        """Store ``messages`` atomically and answer one Outcome per message, in order.

        The record sink (SQL or memory) is called with ``verdicts=None`` and
        decides OK/DUP itself. Mirrors (Redis) are called afterwards with the
        record's verdicts for the same messages, and count a first delivery
        only where the verdict is ``Outcome.STORED``. The same hash may appear
        twice in one batch: the first is the delivery, the rest are DUP.

        Fails the whole batch with a :class:`~eth_twisted.errors.SinkError`
        subclass when nothing can be said for certain.
        """


class IRecord(ISink):
    """The sink that is the record (SQL or memory): it also serves reads."""

    def fetch_records(after_id: int, limit: int) -> Deferred[list[Record]]:
        """Records with ``id > after_id`` in id order, at most ``limit``."""

    def fetch_summaries(
        after_id: int, limit: int, max_bytes: int = DEFAULT_SUMMARY_PAGE_BYTES
    ) -> Deferred[list[RecordSummary]]:
        """Summaries (no payloads) of the records with ``id > after_id``, in id order: one page.

        At most ``limit`` of them and, past the first, at most ``max_bytes`` of
        :func:`summary_bytes` in all; a page is never empty while records are
        left, so passing the last id back (keyset pagination) reaches them all.
        The read never loads a payload, nor more rows than the page holds.
        """

    def recent_summaries(
        limit: int, before: int | None = None, max_bytes: int = DEFAULT_SUMMARY_PAGE_BYTES
    ) -> Deferred[list[RecordSummary]]:
        """Summaries newest first (by id), ids below ``before`` if given; bounded as ``fetch_summaries``."""

    def recent(limit: int, before: int | None = None) -> Deferred[list[Record]]:
        """Newest first (by id), at most ``limit``, only ids below ``before`` if given."""

    def by_block(
        block_number: int, limit: int | None = None, after: int | None = None
    ) -> Deferred[list[Record]]:
        """Records whose recognised block number is ``block_number``, in id order.

        Only ids above ``after`` if given, at most ``limit`` if given (the API pages with both).
        """

    def totals() -> Deferred[Totals]:
        """Aggregate counts over every record."""

    chain_alarms = Attribute(
        "A list of callables, each called with every ChainViolation (a reorg at or below the "
        "finalized block, a finality record naming another hash) once its batch is stored."
    )

    def chains(limit: int, after: int | None = None) -> Deferred[list[ChainSummary]]:
        """One page of the chains seen, in chain id order, only ids above ``after`` if given.

        Each with its head (the highest canonical block), finality and reorg counts.
        """

    def chain_blocks(chain_id: int, start: int, end: int, limit: int) -> Deferred[list[ChainRow]]:
        """The canonical blocks of ``chain_id`` numbered ``start..end``, in order, at most ``limit``."""

    def chain_reorgs(
        chain_id: int, limit: int, before: int | None = None
    ) -> Deferred[list[ReorgRow]]:
        """The reorg records of ``chain_id``, newest first, only ids below ``before`` if given."""


def maybe_global_reactor(reactor: Any = None) -> Any:
    """``reactor``, or Twisted's global reactor when it is None.

    The global reactor is imported only then, as Twisted's own helper does.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        return global_reactor
    return reactor
