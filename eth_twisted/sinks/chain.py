"""Canonical and finalized status per chain: the one rule every record applies.

The record (SQL or memory) calls :func:`apply_chain_events` in the transaction that
stored a batch, with the messages that batch stored for the first time, in order; a
:class:`ChainStore` gives it the few indexed reads and writes it needs. The rule, and why
it is safe whatever order the records arrive in, is in docs/architecture.md ("Chains").
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from twisted.logger import Logger

from eth_twisted.model import (
    MAX_REORG_HASHES,
    ChainBlock,
    ChainViolation,
    FinalityEvent,
    Message,
    ReorgEvent,
)

log = Logger(namespace="eth_twisted.sinks.chain")

FORWARD_LIMIT = 1024
"""Stored children promoted after their parent became canonical, at most, per chain and batch."""


class Row(NamedTuple):
    """A stored block of one chain, as the rule sees it (``sha`` is the record's message id)."""

    sha: str
    block_number: int
    block_hash: str
    parent_hash: str
    canonical: bool
    finalized: bool


@dataclass(slots=True)
class ChainState:
    """One row of ``chains``: the chain's finality and reorg counts, locked for the batch."""

    chain_id: int
    finalized_number: int | None = None
    finalized_hash: str | None = None
    safe_number: int | None = None
    safe_hash: str | None = None
    reorgs: int = 0
    violations: int = 0


class ChainStore(Protocol):
    """What the rule needs from a record, inside the batch's write transaction."""

    def lock_chains(self, chain_ids: Sequence[int], now: float) -> dict[int, ChainState]:
        """The chains' rows (created when new), locked until the transaction ends, in id order."""

    def canonical_at(self, chain_id: int, heights: Collection[int]) -> dict[int, Row]:
        """The canonical block at each of ``heights`` that has one."""

    def rows_by_block_hash(self, chain_id: int, hashes: Collection[str]) -> dict[str, Row]:
        """The stored block of each of ``hashes`` (the canonical one, else the first stored)."""

    def verdicts(self, chain_id: int, hashes: Collection[str]) -> dict[str, bool]:
        """For each hash a stored reorg record named: the latest such record's word (True: new)."""

    def children(self, chain_id: int, parents: Mapping[int, str], limit: int) -> list[Row]:
        """Non-canonical blocks at height ``n`` whose parent is ``parents[n]``, at most ``limit``."""

    def set_status(
        self, chain_id: int, demote: Sequence[str], promote: Sequence[tuple[str, bool]]
    ) -> None:
        """Orphan the rows ``demote`` (by message id), then make ``promote`` canonical (finalized?)."""

    def add_reorg(
        self,
        message: Message,
        event: ReorgEvent,
        below_finality: bool,
        finalized_number: int | None,
    ) -> int | None:
        """Insert the reorg's row; its id (None when a row of that record exists already)."""

    def add_verdicts(self, chain_id: int, reorg_id: int, verdicts: Mapping[str, bool]) -> None:
        """Remember what reorg ``reorg_id`` said of each hash."""

    def add_finality(self, message: Message, event: FinalityEvent, violation: bool) -> None:
        """Insert the finality record's row."""

    def mark_finalized(self, chain_id: int, number: int) -> None:
        """Mark finalized the canonical rows up to ``number`` that are not (from the highest that is)."""

    def save_chain(self, state: ChainState) -> None:
        """Write the chain's row back."""


def apply_chain_events(
    store: ChainStore, messages: Sequence[Message], now: float
) -> list[ChainViolation]:
    """Apply the chain messages among ``messages`` (stored for the first time, in order).

    Returns the finality violations found, for the caller to count and log once
    the transaction has committed.
    """
    by_chain: dict[int, list[Message]] = {}
    for m in messages:
        event = m.chain
        if event is None or (isinstance(event, ChainBlock) and m.block_number is None):
            continue
        by_chain.setdefault(event.chain_id, []).append(m)
    if not by_chain:
        return []
    chain_ids = sorted(by_chain)
    states = store.lock_chains(chain_ids, now)
    violations: list[ChainViolation] = []
    for chain_id in chain_ids:
        _Chain(store, states[chain_id], violations).apply(by_chain[chain_id])
    return violations


class _Chain:
    """One chain's share of a batch: an overlay of the rows it touches, written at the end."""

    def __init__(
        self, store: ChainStore, state: ChainState, violations: list[ChainViolation]
    ) -> None:
        self.store = store
        self.state = state
        self.id = state.chain_id
        self.violations = violations
        self.canon: dict[int, Row | None] = {}
        self.rows: dict[str, Row] = {}
        self.verdicts: dict[str, bool] = {}
        self.changed: dict[str, Row] = {}
        self.promoted: list[Row] = []
        self.dirty = False

    def apply(self, messages: Sequence[Message]) -> None:
        self._prefetch(messages)
        for m in messages:
            event = m.chain
            if isinstance(event, ChainBlock):
                assert m.block_number is not None
                self._block(m.hash, m.block_number, event)
            elif isinstance(event, ReorgEvent):
                self._reorg(m, event)
            elif isinstance(event, FinalityEvent):
                self._finality(m, event)
        self._forward()
        self._flush()
        if self.dirty:
            self.store.save_chain(self.state)

    def _prefetch(self, messages: Sequence[Message]) -> None:
        """Every row and height the batch may touch, in a few reads."""
        heights: set[int] = set()
        named: set[str] = set()
        arriving: list[str] = []
        for m in messages:
            event = m.chain
            if isinstance(event, ChainBlock):
                n = m.block_number
                assert n is not None
                heights.update((n, n - 1) if n > 0 else (n,))
                arriving.append(event.block_hash)
            elif isinstance(event, ReorgEvent):
                named.update(event.old_hashes)
                named.update(event.new_hashes)
            elif isinstance(event, FinalityEvent):
                heights.add(event.block_number)
        if named:
            self.rows.update(self.store.rows_by_block_hash(self.id, named))
            heights.update(r.block_number for r in self.rows.values())
        if arriving and self.state.reorgs:  # the batch's own reorgs speak as they come
            self.verdicts.update(self.store.verdicts(self.id, arriving))
        self._load_heights(heights)

    def _load_heights(self, heights: Collection[int]) -> None:
        missing = [h for h in heights if h not in self.canon]
        if missing:
            found = self.store.canonical_at(self.id, missing)
            for h in missing:
                self.canon[h] = found.get(h)

    def _set(self, row: Row, canonical: bool, finalized: bool = False) -> Row:
        new = row._replace(canonical=canonical, finalized=canonical and finalized)
        if new != row:
            self.changed[row.sha] = new
        held = self.rows.get(row.block_hash)
        if held is None or held.sha == row.sha:
            self.rows[row.block_hash] = new
        return new

    def _promote(self, row: Row) -> None:
        n = row.block_number
        current = self.canon.get(n)
        if current is not None:
            if current.sha == row.sha:
                return
            self._set(current, False)
        fin = self.state.finalized_number
        new = self._set(row, True, fin is not None and n <= fin)
        self.canon[n] = new
        self.promoted.append(new)

    def _block(self, sha: str, n: int, event: ChainBlock) -> None:
        """A new block: canonical when a reorg named it, when its parent is, or on an empty height."""
        row = Row(sha, n, event.block_hash, event.parent_hash, False, False)
        self.rows.setdefault(event.block_hash, row)
        verdict = self.verdicts.get(event.block_hash)
        if verdict is False:
            return  # a reorg record said this block is no longer canonical
        below = self.canon.get(n - 1) if n > 0 else None
        if (
            verdict
            or (below is not None and below.block_hash == event.parent_hash)
            or (below is None and self.canon.get(n) is None)
        ):
            self._promote(row)

    def _reorg(self, m: Message, event: ReorgEvent) -> None:
        st = self.state
        fin = st.finalized_number
        below = bool(event.old_hashes) and fin is not None and event.fork_number + 1 <= fin
        reorg_id = self.store.add_reorg(m, event, below, fin)
        said = dict.fromkeys(event.old_hashes, False)
        said.update(dict.fromkeys(event.new_hashes, True))
        if reorg_id is not None:
            self.store.add_verdicts(self.id, reorg_id, said)
        self.verdicts.update(said)
        st.reorgs += 1
        self.dirty = True
        if event.dropped:
            log.warn(
                "A reorg record of chain {chain} named {dropped} hashes past the {limit} of each "
                "list the record applies; those were ignored",
                chain=self.id,
                dropped=event.dropped,
                limit=MAX_REORG_HASHES,
            )
        if below:
            st.violations += 1
            self.violations.append(
                ChainViolation(
                    "reorg",
                    self.id,
                    event.fork_number + 1,
                    f"reorg of depth {event.depth} after block {event.fork_number}, "
                    f"at or below the finalized block {fin}",
                )
            )
        for h in event.old_hashes:
            row = self.rows.get(h)
            if row is not None and row.canonical:
                self._set(row, False)
                held = self.canon.get(row.block_number)
                if held is not None and held.sha == row.sha:
                    self.canon[row.block_number] = None
        for h in event.new_hashes:
            row = self.rows.get(h)
            if row is not None:
                self._promote(row)

    def _finality(self, m: Message, event: FinalityEvent) -> None:
        st = self.state
        n = event.block_number
        held = self.canon.get(n)
        violation = held is not None and held.block_hash != event.block_hash
        self.store.add_finality(m, event, violation)
        if violation:
            st.violations += 1
            self.dirty = True
            assert held is not None
            self.violations.append(
                ChainViolation(
                    "finalized",
                    self.id,
                    n,
                    f"finalized block {n} is {event.block_hash}, the canonical one {held.block_hash}",
                )
            )
        if st.finalized_number is not None and n < st.finalized_number:
            return  # finality never goes back: an older record changes nothing
        advanced = st.finalized_number is None or n > st.finalized_number
        st.finalized_number, st.finalized_hash = n, event.block_hash
        st.safe_number, st.safe_hash = event.safe_number, event.safe_hash
        self.dirty = True
        if advanced:
            self._flush()
            self.store.mark_finalized(self.id, n)
            for height, row in self.canon.items():
                if row is not None and height <= n and not row.finalized:
                    done = row._replace(finalized=True)
                    self.canon[height] = done
                    if self.rows.get(row.block_hash, done).sha == row.sha:
                        self.rows[row.block_hash] = done

    def _forward(self) -> None:
        """Stored children of newly canonical blocks (they arrived first) follow their parent."""
        budget = FORWARD_LIMIT
        frontier = self.promoted
        while frontier and budget > 0:
            parents: dict[int, str] = {}
            for row in frontier:
                held = self.canon.get(row.block_number)
                child = self.canon.get(row.block_number + 1)
                if held is not None and held.sha == row.sha:
                    if child is None or child.parent_hash != row.block_hash:
                        parents[row.block_number + 1] = row.block_hash
            if not parents:
                return
            found = self.store.children(self.id, parents, budget)
            if not found:
                return
            unknown = [r.block_hash for r in found if r.block_hash not in self.verdicts]
            if unknown and self.state.reorgs:
                self.verdicts.update(self.store.verdicts(self.id, unknown))
            self._load_heights({r.block_number for r in found})
            self.promoted = []
            for row in found:
                if self.verdicts.get(row.block_hash) is not False:
                    self.rows.setdefault(row.block_hash, row)
                    self._promote(row)
            budget -= len(found)
            frontier = self.promoted
        if budget <= 0:
            log.warn(
                "Chain {chain}: more than {limit} stored blocks followed their parent onto the "
                "canonical chain in one batch; the rest wait for the next record that names them",
                chain=self.id,
                limit=FORWARD_LIMIT,
            )

    def _flush(self) -> None:
        if not self.changed:
            return
        rows = list(self.changed.values())
        self.changed.clear()
        self.store.set_status(
            self.id,
            [r.sha for r in rows if not r.canonical],
            [(r.sha, r.finalized) for r in rows if r.canonical],
        )


__all__ = ["FORWARD_LIMIT", "ChainState", "ChainStore", "Row", "apply_chain_events"]
