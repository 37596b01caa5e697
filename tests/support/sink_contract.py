"""One contract every sink keeps: the memory sink, the SQL sinks and the mirrors.

A test module subclasses :class:`SinkContract` and provides a ``sink`` pytest
fixture that yields a *started* sink and stops it afterwards, for example::

    @pytest_twisted.async_yield_fixture
    async def sink(tmp_path):
        s = make_sqlite_sink(SQLiteSettings(sqlite=str(tmp_path / "db.sqlite3")))
        await s.start()
        yield s
        await s.stop()

    class TestSQLiteSink(SinkContract):
        pass

Mirror sinks (Redis) set ``is_record = False``: the tests that need a record
(``REJECTED`` for out-of-range block numbers, ``fetch_records``/``recent``/
``by_block``/``totals``) are then skipped, and may override :meth:`store` to
pass the verdicts a record would have given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from eth_twisted.model import (
    MAX_CLIENT_ID,
    MAX_CLIENT_IP,
    Message,
    Outcome,
    Record,
    RecordSummary,
    Totals,
    bounded,
    summary_bytes,
)

OK = Outcome.STORED
DUP = Outcome.DUPLICATE
REJECTED = Outcome.REJECTED

T0 = 1_700_000_000.25

LONG_SUBJECT = (
    "CN=" + "a" * 300 + ",OU=Payments Platform,O=Example Corporation GmbH,L=Frankfurt,C=DE"
)
"""An ordinary corporate certificate subject, longer than the 255 characters client_id holds."""

HOSTILE_IDS = [
    LONG_SUBJECT,
    "CN=lone \udcff surrogate",
    "CN=nul\x00inside",
    "CN=" + "\U0001f600" * 300,  # non-BMP, and too long
    "CN=line\nbreak,O=tab\there",
    "\u202eCN=right-to-left override",
    "",
]
"""Client identities no column should be able to refuse."""

HOSTILE_IPS = [
    "x" * 100,
    "1.2.3.4\n5.6.7.8 1 1\n",
    "a b",
    "",
    "fe80::1%\udc80",
    "\x00",
    "\U0001f600" * 50,
]
"""Client addresses (e.g. from a PROXY header) that must not cost a payload its row."""


def storable_text(value: str) -> bool:
    """True when ``value`` encodes as strict UTF-8 and holds no control characters."""
    value.encode("utf-8")
    return all(ch.isprintable() or ch == " " for ch in value)


def msg(
    payload: bytes,
    ip: str = "10.0.0.1",
    at: float = T0,
    block: int | None = None,
    client_id: str | None = None,
) -> Message:
    """A message as the receiver would build it."""
    return Message.build(payload, ip, at, block, client_id)


def numbered(n: int, prefix: bytes = b"m", ip: str = "10.0.0.1", start: int = 0) -> list[Message]:
    """``n`` distinct messages with block numbers ``start..start+n-1``."""
    return [msg(prefix + b"-%d" % i, ip=ip, at=T0 + i / 1000, block=start + i) for i in range(n)]


class SinkContract:
    """Behaviour shared by every sink; subclasses provide the ``sink`` fixture."""

    is_record = True
    """True for the record (SQL, memory); False for mirrors, which skip record-only tests."""

    def store(self, sink: Any, messages: Sequence[Message]) -> Deferred[list[Outcome]]:
        """Store one batch the way the router would for this kind of sink."""
        return sink.store_batch(list(messages))

    def require_record(self) -> None:
        """Skip a record-only test on a mirror sink."""
        if not self.is_record:
            pytest.skip("record-only behaviour; this sink is a mirror")

    # -- storing -----------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_first_store_ok(self, sink: Any) -> None:
        """A payload never seen before is STORED."""
        assert await self.store(sink, [msg(b"hello")]) == [OK]

    @pytest_twisted.ensureDeferred
    async def test_same_bytes_again_dup(self, sink: Any) -> None:
        """The same bytes in a later batch are DUPLICATE."""
        await self.store(sink, [msg(b"hello")])
        assert await self.store(sink, [msg(b"hello", at=T0 + 5)]) == [DUP]

    @pytest_twisted.ensureDeferred
    async def test_same_bytes_from_other_ip_dup(self, sink: Any) -> None:
        """The record is content-addressed: the same bytes from another IP are DUPLICATE."""
        await self.store(sink, [msg(b"hello", ip="10.0.0.1")])
        assert await self.store(sink, [msg(b"hello", ip="10.9.9.9")]) == [DUP]

    @pytest_twisted.ensureDeferred
    async def test_duplicates_within_batch(self, sink: Any) -> None:
        """Within one batch the first occurrence is STORED and later ones DUPLICATE."""
        batch = [msg(b"a"), msg(b"b"), msg(b"a", ip="10.0.0.2"), msg(b"a"), msg(b"b")]
        assert await self.store(sink, batch) == [OK, OK, DUP, DUP, DUP]

    @pytest_twisted.ensureDeferred
    async def test_outcomes_in_input_order(self, sink: Any) -> None:
        """Outcomes line up with the input messages, old and new interleaved."""
        await self.store(sink, [msg(b"old-1"), msg(b"old-2")])
        batch = [msg(b"new-1"), msg(b"old-2"), msg(b"new-2"), msg(b"old-1"), msg(b"new-3")]
        assert await self.store(sink, batch) == [OK, DUP, OK, DUP, OK]

    @pytest_twisted.ensureDeferred
    async def test_empty_batch(self, sink: Any) -> None:
        """An empty batch answers an empty list."""
        assert await self.store(sink, []) == []

    @pytest_twisted.ensureDeferred
    async def test_block_number_bounds(self, sink: Any) -> None:
        """Block numbers 0 and 2**63-1 are stored; -1 and 2**63 are REJECTED, not stored."""
        self.require_record()
        batch = [
            msg(b"zero", block=0),
            msg(b"max", block=2**63 - 1),
            msg(b"neg", block=-1),
            msg(b"big", block=2**63),
            msg(b"huge", block=2**64 + 5),
        ]
        assert await self.store(sink, batch) == [OK, OK, REJECTED, REJECTED, REJECTED]
        totals: Totals = await sink.totals()
        assert totals.records == 2
        assert [r.block_number for r in await sink.by_block(2**63 - 1)] == [2**63 - 1]

    @pytest_twisted.ensureDeferred
    async def test_rejected_not_stored_retry_is_rejected_again(self, sink: Any) -> None:
        """A REJECTED message leaves no trace: sending it again is REJECTED again, not DUP."""
        self.require_record()
        assert await self.store(sink, [msg(b"neg", block=-3)]) == [REJECTED]
        assert await self.store(sink, [msg(b"neg", block=-3)]) == [REJECTED]

    @pytest_twisted.ensureDeferred
    async def test_ping(self, sink: Any) -> None:
        """A started sink answers ping."""
        assert await sink.ping() is None

    @pytest_twisted.ensureDeferred
    async def test_large_batch(self, sink: Any) -> None:
        """A batch of 2,000 messages is stored whole, then is all DUPLICATE."""
        batch = numbered(2000)
        assert await self.store(sink, batch) == [OK] * 2000
        again = await self.store(sink, batch[:10] + [msg(b"fresh")])
        assert again == [DUP] * 10 + [OK]

    @pytest_twisted.ensureDeferred
    async def test_payload_bytes_round_trip(self, sink: Any) -> None:
        """NUL, non-UTF-8 and 64 KiB payloads are distinct and stored as given."""
        weird = [
            b"\x00",
            b"\x00\x00",
            b"\xff\xfe\x80 not utf-8 \xc3(",
            os.urandom(65536),
            b"\x00" * 65536,
        ]
        assert await self.store(sink, [msg(p) for p in weird]) == [OK] * len(weird)
        assert await self.store(sink, [msg(p) for p in weird]) == [DUP] * len(weird)
        if self.is_record:
            rows: list[Record] = await sink.fetch_records(0, 100)
            assert [r.payload for r in rows] == weird

    # -- metadata never costs a payload -------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_long_client_id_is_stored_bounded(self, sink: Any) -> None:
        """A certificate subject over 255 characters is STORED, its client_id bounded to fit."""
        assert await self.store(sink, [msg(b"corporate", client_id=LONG_SUBJECT)]) == [OK]
        if self.is_record:
            [rec] = await sink.fetch_records(0, 10)
            assert rec.client_id == bounded(LONG_SUBJECT, MAX_CLIENT_ID)
            assert len(rec.client_id) == MAX_CLIENT_ID

    @pytest_twisted.ensureDeferred
    async def test_hostile_metadata_never_refuses_a_payload(self, sink: Any) -> None:
        """Lone surrogates, NUL, controls, non-BMP and overlong ids and IPs: every payload is STORED."""
        batch = [msg(b"id-%d" % i, client_id=cid) for i, cid in enumerate(HOSTILE_IDS)]
        batch += [msg(b"ip-%d" % i, ip=ip) for i, ip in enumerate(HOSTILE_IPS)]
        assert await self.store(sink, batch) == [OK] * len(batch)
        assert await self.store(sink, batch) == [DUP] * len(batch)
        if self.is_record:
            rows: list[Record] = await sink.fetch_records(0, 100)
            assert [r.hash for r in rows] == [m.hash for m in batch]
            for rec in rows:
                assert storable_text(rec.client_ip) and 0 < len(rec.client_ip) <= MAX_CLIENT_IP
                assert " " not in rec.client_ip
                assert rec.client_id is None or (
                    storable_text(rec.client_id) and len(rec.client_id) <= MAX_CLIENT_ID
                )
            ids = [r.client_id for r in rows[: len(HOSTILE_IDS)]]
            assert len(set(ids)) == len(HOSTILE_IDS)  # distinct identities stay distinct
            assert ids[-1] == ""  # printable values are kept as they are
            ips = [r.client_ip for r in rows[len(HOSTILE_IDS) :]]
            assert len(set(ips)) == len(HOSTILE_IPS)

    # -- record reads ------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_fetch_records_in_id_order(self, sink: Any) -> None:
        """fetch_records pages through every record in insertion order, fields intact."""
        self.require_record()
        await self.store(sink, numbered(5, ip="10.0.0.1"))
        await self.store(
            sink, [msg(b"no-block", ip="10.0.0.2", at=T0 + 7.123456, client_id="cli-7")]
        )
        first = await sink.fetch_records(0, 4)
        assert [r.payload for r in first] == [b"m-0", b"m-1", b"m-2", b"m-3"]
        rest = await sink.fetch_records(first[-1].id, 100)
        assert [r.payload for r in rest] == [b"m-4", b"no-block"]
        ids = [r.id for r in first + rest]
        assert ids == sorted(ids) and len(set(ids)) == 6
        last = rest[-1]
        assert last.hash == msg(b"no-block").hash
        assert last.block_number is None
        assert last.client_ip == "10.0.0.2"
        assert last.client_id == "cli-7"
        assert last.received_at == pytest.approx(T0 + 7.123456, abs=1e-6)
        assert rest[0].block_number == 4 and rest[0].client_id is None
        assert await sink.fetch_records(last.id, 10) == []

    @pytest_twisted.ensureDeferred
    async def test_fetch_summaries_page_through_every_record_without_payloads(
        self, sink: Any
    ) -> None:
        """fetch_summaries pages by id (keyset) through every record: its fields, never its payload."""
        self.require_record()
        await self.store(sink, numbered(5, ip="10.0.0.1"))
        await self.store(sink, [msg(b"no-block" * 1000, ip="10.0.0.2", at=T0 + 7.123456)])
        records: list[Record] = await sink.fetch_records(0, 100)
        pages: list[list[RecordSummary]] = []
        after = 0
        while page := await sink.fetch_summaries(after, 2):
            assert len(page) <= 2
            pages.append(page)
            after = page[-1].id
        assert [len(p) for p in pages] == [2, 2, 2]
        summaries = [s for p in pages for s in p]
        assert all(isinstance(s, RecordSummary) and not hasattr(s, "payload") for s in summaries)
        assert [(s.id, s.hash, s.block_number, s.client_ip) for s in summaries] == [
            (r.id, r.hash, r.block_number, r.client_ip) for r in records
        ]
        assert [s.received_at for s in summaries] == pytest.approx(
            [r.received_at for r in records], abs=1e-6
        )
        assert await sink.fetch_summaries(records[-1].id, 10) == []
        assert await sink.fetch_summaries(0, 0) == []

    @pytest_twisted.ensureDeferred
    async def test_summary_pages_are_bounded_by_bytes(self, sink: Any) -> None:
        """A page of summaries stops at max_bytes (never empty), and paging on still reaches every record."""
        self.require_record()
        await self.store(sink, numbered(10, ip="10.0.0.1"))
        one = summary_bytes((await sink.fetch_summaries(0, 1))[0])
        page = await sink.fetch_summaries(0, 100, max_bytes=3 * one + one // 2)
        assert len(page) == 3 and sum(map(summary_bytes, page)) <= 3 * one + one // 2
        assert len(await sink.fetch_summaries(0, 100, max_bytes=1)) == 1
        newest = await sink.recent_summaries(100, max_bytes=2 * one)
        assert [s.block_number for s in newest] == [9, 8]
        seen, after = [], 0
        while page := await sink.fetch_summaries(after, 100, max_bytes=4 * one):
            seen += [s.block_number for s in page]
            after = page[-1].id
        assert seen == list(range(10))

    @pytest_twisted.ensureDeferred
    async def test_recent_summaries_newest_first(self, sink: Any) -> None:
        """recent_summaries answers newest first, bounded by limit and by ``before``, like recent()."""
        self.require_record()
        await self.store(sink, numbered(6))
        newest = await sink.recent_summaries(3)
        assert [s.block_number for s in newest] == [5, 4, 3]
        assert [s.id for s in newest] == [r.id for r in await sink.recent(3)]
        older = await sink.recent_summaries(10, before=newest[-1].id)
        assert [s.block_number for s in older] == [2, 1, 0]
        assert await sink.recent_summaries(10, before=older[-1].id) == []

    @pytest_twisted.ensureDeferred
    async def test_duplicate_keeps_first_sender(self, sink: Any) -> None:
        """A DUPLICATE changes nothing: the record keeps its first sender and time."""
        self.require_record()
        await self.store(sink, [msg(b"x", ip="10.0.0.1", at=T0)])
        await self.store(sink, [msg(b"x", ip="10.0.0.2", at=T0 + 60, client_id="late")])
        [rec] = await sink.fetch_records(0, 10)
        assert (rec.client_ip, rec.client_id) == ("10.0.0.1", None)
        assert rec.received_at == pytest.approx(T0, abs=1e-6)

    @pytest_twisted.ensureDeferred
    async def test_recent_newest_first(self, sink: Any) -> None:
        """recent() answers newest first, bounded by limit and by ``before``."""
        self.require_record()
        await self.store(sink, numbered(6))
        newest = await sink.recent(3)
        assert [r.payload for r in newest] == [b"m-5", b"m-4", b"m-3"]
        older = await sink.recent(10, before=newest[-1].id)
        assert [r.payload for r in older] == [b"m-2", b"m-1", b"m-0"]
        assert await sink.recent(10, before=older[-1].id) == []

    @pytest_twisted.ensureDeferred
    async def test_by_block(self, sink: Any) -> None:
        """by_block answers every record with that block number, and nothing for others."""
        self.require_record()
        await self.store(sink, [msg(b"a", block=7), msg(b"b", block=8), msg(b"c", block=7)])
        assert sorted(r.payload for r in await sink.by_block(7)) == [b"a", b"c"]
        assert await sink.by_block(9) == []

    @pytest_twisted.ensureDeferred
    async def test_by_block_pages_by_id(self, sink: Any) -> None:
        """by_block with limit and after pages through one height in id order, without overlap."""
        self.require_record()
        await self.store(
            sink, [msg(b"p-%d" % i, block=5) for i in range(5)] + [msg(b"other", block=6)]
        )
        first = await sink.by_block(5, limit=2)
        assert [r.payload for r in first] == [b"p-0", b"p-1"]
        rest = await sink.by_block(5, limit=10, after=first[-1].id)
        assert [r.payload for r in rest] == [b"p-2", b"p-3", b"p-4"]
        assert await sink.by_block(5, limit=10, after=rest[-1].id) == []

    @pytest_twisted.ensureDeferred
    async def test_totals_empty(self, sink: Any) -> None:
        """Totals of an empty record are zero and None."""
        self.require_record()
        t: Totals = await sink.totals()
        assert t.records == 0 and t.first_by_ip == {} and t.latest_block_by_ip == {}
        assert t.first_received_at is None and t.last_received_at is None
        assert t.latest_block is None and t.latest_block_at is None

    @pytest_twisted.ensureDeferred
    async def test_totals(self, sink: Any) -> None:
        """Totals count first senders per IP and take the latest block by insertion order."""
        self.require_record()
        await self.store(
            sink,
            [
                msg(b"1", ip="10.0.0.1", at=T0 + 1, block=100),
                msg(b"2", ip="10.0.0.2", at=T0 + 2, block=105),
                msg(b"3", ip="10.0.0.1", at=T0 + 3, block=101),
                msg(b"4", ip="10.0.0.2", at=T0 + 4),
            ],
        )
        await self.store(sink, [msg(b"1", ip="10.0.0.3", at=T0 + 9, block=100)])  # DUP
        t: Totals = await sink.totals()
        assert t.records == 4
        assert t.first_by_ip == {"10.0.0.1": 2, "10.0.0.2": 2}
        assert t.first_received_at == pytest.approx(T0 + 1, abs=1e-6)
        assert t.last_received_at == pytest.approx(T0 + 4, abs=1e-6)
        # the row with the highest id among rows with a block number: b"3"
        assert t.latest_block == 101
        assert t.latest_block_at == pytest.approx(T0 + 3, abs=1e-6)
        assert t.latest_block_by_ip == {"10.0.0.1": 101, "10.0.0.2": 105}
