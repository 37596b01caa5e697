"""The chain rule every record keeps (docs/architecture.md, "Chains"): one suite, every record.

A test module subclasses :class:`ChainContract` and provides two fixtures: ``sink`` (a
started record) and ``raw_rows`` (a callable answering the ``kind = 'block'`` rows as the
database holds them: ``(chain_id, block_number, block_hash, canonical, finalized)``, read
with SQL directly for the SQL records). Messages are built as the server builds them:
rendered by ``link/payload.py`` and recognised by its recogniser.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest_twisted

from eth_twisted.link.payload import recognise, render_finalized, render_json, render_reorg
from eth_twisted.model import Message, Outcome

RawRows = Callable[[], list[tuple[Any, ...]]]

T0 = 1_700_000_000.0


def bh(tag: str, n: int, chain: int = 1) -> str:
    """A block hash that names its branch (``tag``, a hex digit), height and chain."""
    return "0x" + f"{chain:04x}{tag}{n:012x}".rjust(64, "0")


def block(n: int, tag: str = "a", parent_tag: str | None = None, chain: int = 1) -> Message:
    """Block ``n`` of branch ``tag`` (its parent on ``parent_tag``, by default the same branch)."""
    payload = render_json(
        {
            "block_hash": bh(tag, n, chain),
            "block_number": n,
            "chain_id": chain,
            "parent_hash": bh(parent_tag or tag, n - 1, chain),
            "timestamp": 1_600_000_000 + n,
        }
    )
    return recognised(payload, T0 + n)


def recognised(payload: bytes, at: float = T0, ip: str = "10.0.0.1") -> Message:
    """The message the receiver makes of ``payload``."""
    number, chain = recognise(payload)
    return Message.build(payload, ip, at, number, None, chain)


def reorg(fork: int, old: Sequence[str], new: Sequence[str], chain: int = 1) -> Message:
    """A reorg record after block ``fork``."""
    return recognised(render_reorg(chain, fork, old, new, 1_600_000_000 + fork), T0 + 0.5)


def finalized(n: int, tag: str = "a", chain: int = 1, safe: int | None = None) -> Message:
    """A finality record naming block ``n`` of branch ``tag``."""
    safe_hash = None if safe is None else bh(tag, safe, chain)
    return recognised(render_finalized(chain, n, bh(tag, n, chain), safe, safe_hash), T0 + 0.7)


def branch(
    tag: str, start: int, end: int, parent_tag: str | None = None, chain: int = 1
) -> list[Message]:
    """Blocks ``start..end`` of branch ``tag``; the first one's parent is on ``parent_tag``."""
    return [block(n, tag, parent_tag if n == start else None, chain) for n in range(start, end + 1)]


class ChainContract:
    """The canonical and finalized status every record derives from the same messages."""

    async def store(self, sink: Any, raw_rows: RawRows, *batches: list[Message]) -> list[Outcome]:
        """Store each batch in turn, checking the invariants after each one."""
        outcomes: list[Outcome] = []
        for batch in batches:
            outcomes += await sink.store_batch(batch)
            self.check_invariants(raw_rows())
        return outcomes

    def check_invariants(self, rows: list[tuple[Any, ...]]) -> None:
        """At most one canonical block per (chain, height); finalized only when canonical."""
        seen: set[tuple[int, int]] = set()
        for chain_id, n, _hash, canonical, fin in rows:
            if canonical == 1:
                assert (chain_id, n) not in seen, f"two canonical blocks at {chain_id}/{n}"
                seen.add((chain_id, n))
            if fin == 1:
                assert canonical == 1, f"an orphaned block finalized at {chain_id}/{n}"

    async def canonical(self, sink: Any, chain: int = 1) -> list[str]:
        """The chain's canonical block hashes from the read path, in height order."""
        rows = await sink.chain_blocks(chain, 0, 2**63 - 1, 1000)
        return [r.block_hash for r in rows]

    @pytest_twisted.ensureDeferred
    async def test_linear_chain_is_canonical(self, sink: Any, raw_rows: RawRows) -> None:
        """A linear chain, in two batches, is canonical block by block, linked parent to child."""
        await self.store(sink, raw_rows, branch("a", 1, 10), branch("a", 11, 20))
        rows = await sink.chain_blocks(1, 0, 100, 1000)
        assert [r.block_number for r in rows] == list(range(1, 21))
        assert all(r.parent_hash == bh("a", r.block_number - 1) for r in rows)
        (summary,) = await sink.chains(10)
        assert (summary.head_number, summary.head_hash) == (20, bh("a", 20))
        assert summary.reorgs == 0 and summary.finalized_number is None

    @pytest_twisted.ensureDeferred
    async def test_first_block_is_canonical_and_a_stranger_at_its_height_is_not(
        self, sink: Any, raw_rows: RawRows
    ) -> None:
        """The first block of a chain starts it; another block at that height, unlinked, does not."""
        await self.store(sink, raw_rows, [block(100)], [block(100, "f")])
        assert await self.canonical(sink) == [bh("a", 100)]
        assert {r[2]: r[3] for r in raw_rows()} == {bh("a", 100): 1, bh("f", 100): 0}

    async def _reorg(self, sink: Any, raw_rows: RawRows, depth: int, record_first: bool) -> None:
        await self.store(sink, raw_rows, branch("a", 1, 20))
        fork = 20 - depth
        old = [bh("a", n) for n in range(fork + 1, 21)]
        new_blocks = branch("b", fork + 1, 21, parent_tag="a")
        record = reorg(fork, old, [bh("b", n) for n in range(fork + 1, 21)])
        if record_first:
            await self.store(
                sink, raw_rows, [record], new_blocks[: depth // 2 + 1], new_blocks[depth // 2 + 1 :]
            )
        else:
            await self.store(sink, raw_rows, new_blocks[:-1], [record], new_blocks[-1:])
        expected = [bh("a", n) for n in range(1, fork + 1)] + [
            bh("b", n) for n in range(fork + 1, 22)
        ]
        assert await self.canonical(sink) == expected
        status = {r[2]: r[3] for r in raw_rows()}
        assert all(status[h] == 0 for h in old)
        (summary,) = await sink.chains(10)
        assert summary.reorgs == 1 and summary.violations == 0 and summary.head_number == 21
        assert summary.last_reorg is not None and summary.last_reorg.depth == depth

    @pytest_twisted.ensureDeferred
    async def test_reorg_depth_1_record_first(self, sink: Any, raw_rows: RawRows) -> None:
        """A reorg of depth 1 whose record comes before the replacement follows the new branch."""
        await self._reorg(sink, raw_rows, 1, True)

    @pytest_twisted.ensureDeferred
    async def test_reorg_depth_3_record_first(self, sink: Any, raw_rows: RawRows) -> None:
        """A reorg of depth 3, record first, replacements in two batches."""
        await self._reorg(sink, raw_rows, 3, True)

    @pytest_twisted.ensureDeferred
    async def test_reorg_depth_10_record_first(self, sink: Any, raw_rows: RawRows) -> None:
        """A reorg of depth 10, record first, replacements in two batches."""
        await self._reorg(sink, raw_rows, 10, True)

    @pytest_twisted.ensureDeferred
    async def test_reorg_depth_1_replacements_first(self, sink: Any, raw_rows: RawRows) -> None:
        """A reorg of depth 1 whose replacement arrives before its record."""
        await self._reorg(sink, raw_rows, 1, False)

    @pytest_twisted.ensureDeferred
    async def test_reorg_depth_3_replacements_first(self, sink: Any, raw_rows: RawRows) -> None:
        """A reorg of depth 3 whose replacements arrive before its record."""
        await self._reorg(sink, raw_rows, 3, False)

    @pytest_twisted.ensureDeferred
    async def test_reorg_depth_10_replacements_first(self, sink: Any, raw_rows: RawRows) -> None:
        """A reorg of depth 10 whose replacements arrive before its record."""
        await self._reorg(sink, raw_rows, 10, False)

    @pytest_twisted.ensureDeferred
    async def test_reorg_and_replacements_in_one_batch(self, sink: Any, raw_rows: RawRows) -> None:
        """Old blocks, the record and the replacements in a single batch end on the new branch."""
        old = [bh("a", n) for n in (8, 9, 10)]
        batch = branch("a", 1, 10) + [reorg(7, old, [bh("b", 8)])] + branch("b", 8, 9, "a")
        await self.store(sink, raw_rows, batch)
        assert await self.canonical(sink) == [bh("a", n) for n in range(1, 8)] + [
            bh("b", 8),
            bh("b", 9),
        ]

    @pytest_twisted.ensureDeferred
    async def test_rollback_without_replacement(self, sink: Any, raw_rows: RawRows) -> None:
        """A reorg record with no new hashes takes the head back to the fork; new blocks follow it."""
        await self.store(sink, raw_rows, branch("a", 1, 10))
        await self.store(sink, raw_rows, [reorg(7, [bh("a", n) for n in (8, 9, 10)], [])])
        assert await self.canonical(sink) == [bh("a", n) for n in range(1, 8)]
        (summary,) = await sink.chains(10)
        assert summary.head_number == 7 and summary.last_reorg.replaced == 0
        await self.store(sink, raw_rows, branch("c", 8, 8, "a"))
        assert (await self.canonical(sink))[-1] == bh("c", 8)

    @pytest_twisted.ensureDeferred
    async def test_a_late_block_the_reorg_orphaned_stays_orphaned(
        self, sink: Any, raw_rows: RawRows
    ) -> None:
        """An old block arriving after the record that named it old never displaces the new one."""
        await self.store(sink, raw_rows, branch("a", 1, 9))
        await self.store(
            sink, raw_rows, [reorg(9, [bh("a", 10)], [bh("b", 10)])], branch("b", 10, 10, "a")
        )
        await self.store(sink, raw_rows, [block(10)])  # sent before the record, stored after it
        assert (await self.canonical(sink))[-1] == bh("b", 10)
        assert {r[2]: r[3] for r in raw_rows()}[bh("a", 10)] == 0

    @pytest_twisted.ensureDeferred
    async def test_children_stored_before_their_parent_follow_it(
        self, sink: Any, raw_rows: RawRows
    ) -> None:
        """Blocks that arrive before their parent (a later batch committed first) join the chain."""
        await self.store(sink, raw_rows, branch("a", 1, 10))
        await self.store(
            sink, raw_rows, [reorg(8, [bh("a", 9), bh("a", 10)], [bh("b", 9), bh("b", 10)])]
        )
        await self.store(sink, raw_rows, branch("b", 11, 12))  # before b9/b10: parent unknown
        await self.store(sink, raw_rows, branch("b", 9, 10, "a"))
        assert await self.canonical(sink) == [bh("a", n) for n in range(1, 9)] + [
            bh("b", n) for n in range(9, 13)
        ]

    @pytest_twisted.ensureDeferred
    async def test_finality_moves(self, sink: Any, raw_rows: RawRows) -> None:
        """Finality records mark the canonical chain up to them, and later blocks at or below too."""
        await self.store(sink, raw_rows, branch("a", 1, 10), [finalized(4, safe=6)])
        rows = await sink.chain_blocks(1, 0, 100, 1000)
        assert [r.block_number for r in rows if r.finalized] == [1, 2, 3, 4]
        await self.store(sink, raw_rows, [finalized(8)], branch("a", 11, 12), [finalized(7)])
        rows = await sink.chain_blocks(1, 0, 100, 1000)
        assert [r.block_number for r in rows if r.finalized] == list(range(1, 9))
        (summary,) = await sink.chains(10)
        assert (summary.finalized_number, summary.finalized_hash) == (8, bh("a", 8))
        assert summary.violations == 0  # an older record is no violation and changes nothing

    @pytest_twisted.ensureDeferred
    async def test_reorg_below_finality_is_a_flagged_violation(
        self, sink: Any, raw_rows: RawRows
    ) -> None:
        """A reorg at or below the finalized block is applied, flagged, counted and alarmed once."""
        alarms: list[Any] = []
        sink.chain_alarms.append(alarms.append)
        await self.store(sink, raw_rows, branch("a", 1, 10), [finalized(8)])
        record = reorg(6, [bh("a", n) for n in range(7, 11)], [bh("b", n) for n in range(7, 11)])
        await self.store(sink, raw_rows, [record], branch("b", 7, 10, "a"))
        assert await self.canonical(sink) == [bh("a", n) for n in range(1, 7)] + [
            bh("b", n) for n in range(7, 11)
        ]
        (last,) = await sink.chain_reorgs(1, 10)
        assert last.below_finality and last.finalized_number == 8
        (summary,) = await sink.chains(10)
        assert summary.violations == 1
        assert [(a.kind, a.block_number) for a in alarms] == [("reorg", 7)]
        await self.store(sink, raw_rows, [record])  # a DUP: no second alarm
        assert len(alarms) == 1

    @pytest_twisted.ensureDeferred
    async def test_finality_naming_another_hash_is_a_violation(
        self, sink: Any, raw_rows: RawRows
    ) -> None:
        """A finality record whose hash is not the canonical block at its height is a violation."""
        alarms: list[Any] = []
        sink.chain_alarms.append(alarms.append)
        await self.store(sink, raw_rows, branch("a", 1, 5), [finalized(3, "e")])
        (summary,) = await sink.chains(10)
        assert summary.violations == 1 and [a.kind for a in alarms] == ["finalized"]

    @pytest_twisted.ensureDeferred
    async def test_two_chains_are_independent(self, sink: Any, raw_rows: RawRows) -> None:
        """Two chains at the same heights keep their own canonical chains, reorgs and finality."""
        await self.store(
            sink,
            raw_rows,
            branch("a", 1, 5, chain=1) + branch("a", 1, 5, chain=2),
            [reorg(4, [bh("a", 5, 2)], [bh("b", 5, 2)], chain=2), finalized(3, chain=1)],
            branch("b", 5, 5, "a", chain=2),
        )
        assert await self.canonical(sink, 1) == [bh("a", n, 1) for n in range(1, 6)]
        assert await self.canonical(sink, 2) == [bh("a", n, 2) for n in range(1, 5)] + [
            bh("b", 5, 2)
        ]
        one, two = await sink.chains(10)
        assert (one.chain_id, one.reorgs, one.finalized_number) == (1, 0, 3)
        assert (two.chain_id, two.reorgs, two.finalized_number) == (2, 1, None)
        assert [s.chain_id for s in await sink.chains(10, after=1)] == [2]

    @pytest_twisted.ensureDeferred
    async def test_replays_change_nothing(self, sink: Any, raw_rows: RawRows) -> None:
        """Every message replayed (DUPs, in another order) leaves the status exactly as it was."""
        batches = [
            branch("a", 1, 10),
            [reorg(7, [bh("a", n) for n in (8, 9, 10)], [bh("b", n) for n in (8, 9, 10)])],
            branch("b", 8, 10, "a"),
            [finalized(9, "b")],
        ]
        await self.store(sink, raw_rows, *batches)
        before, chains = sorted(raw_rows()), await sink.chains(10)
        everything = [m for b in batches for m in b]
        outcomes = await self.store(sink, raw_rows, list(reversed(everything)), everything)
        assert set(outcomes) == {Outcome.DUPLICATE}
        assert sorted(raw_rows()) == before and await sink.chains(10) == chains

    @pytest_twisted.ensureDeferred
    async def test_hostile_kinds_are_stored_as_other(self, sink: Any, raw_rows: RawRows) -> None:
        """Unknown kinds, wrong types and malformed hashes are stored (OK) as kind other."""
        hostile = [
            b'{"kind":"launch","chain_id":1}',
            b'{"kind":"reorg","chain_id":1,"fork_number":"7","depth":0,"old_hashes":[],'
            b'"new_hashes":[],"detected_at":1}',
            b'{"kind":"reorg","chain_id":1,"fork_number":7,"depth":1,"old_hashes":["0x12"],'
            b'"new_hashes":[],"detected_at":1}',
            b'{"kind":"finalized","chain_id":-1,"block_number":1,"block_hash":"0x00"}',
            b'{"kind":"finalized","chain_id":1,"block_number":99999999999999999999999,'
            b'"block_hash":"' + bh("a", 1).encode() + b'"}',
            b'{"kind":["reorg"],"chain_id":1}',
        ]
        messages = [recognised(p) for p in hostile]
        assert all(m.chain is None and m.kind == "other" for m in messages)
        assert await self.store(sink, raw_rows, messages) == [Outcome.STORED] * len(hostile)
        records = {r.hash: r for r in await sink.recent(20)}
        assert {records[m.hash].kind for m in messages} == {"other"}
        assert await sink.chains(10) == []

    @pytest_twisted.ensureDeferred
    async def test_by_block_shows_chain_status(self, sink: Any, raw_rows: RawRows) -> None:
        """Records at one height carry their chain, kind, canonical status and finality."""
        await self.store(
            sink,
            raw_rows,
            branch("a", 1, 3),
            [reorg(2, [bh("a", 3)], [bh("b", 3)])],
            branch("b", 3, 3, "a"),
            [finalized(3, "b")],
        )
        records = await sink.by_block(3)
        assert [(r.kind, r.chain_id, r.block_hash, r.canonical, r.finalized) for r in records] == [
            ("block", 1, bh("a", 3), False, False),
            ("block", 1, bh("b", 3), True, True),
        ]
