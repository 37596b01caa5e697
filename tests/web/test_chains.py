"""The chain endpoints (web/chains.py) over a memory record: shapes, pages and the violation flag."""

from __future__ import annotations

from tests.support.chain_contract import bh, branch, finalized, reorg
from tests.support.web import ServerFixture, server_fixture


def chained() -> ServerFixture:
    """Chain 1: blocks 1..12, finalized 9, then a reorg after 7 (below finality) onto branch b."""
    s = server_fixture()
    s.store(branch("a", 1, 12) + [finalized(9, safe=10)])
    s.store([reorg(7, [bh("a", n) for n in range(8, 13)], [bh("b", 8), bh("b", 9)])])
    s.store(branch("b", 8, 9, "a"))
    s.store(branch("a", 1, 2, chain=2))
    return s


def test_chains_lists_head_finality_and_the_flagged_reorg() -> None:
    """/api/chains shows each chain's head, safe and finalized blocks, and its reorgs."""
    body = chained().http.get("/api/chains").json()
    one, two = body["chains"]
    assert one["head"] == {"number": 9, "hash": bh("b", 9)}
    assert one["finalized"] == {"number": 9, "hash": bh("a", 9)}
    assert one["safe"] == {"number": 10, "hash": bh("a", 10)}
    assert (one["reorgs"], one["violations"]) == (1, 1)
    assert one["last_reorg"]["below_finality"] is True and one["last_reorg"]["depth"] == 5
    assert two["chain_id"] == 2 and two["head"]["number"] == 2 and two["last_reorg"] is None
    assert body["next_after"] is None


def test_chains_pages_by_chain_id() -> None:
    """limit=1 gives one chain and the cursor to the next."""
    s = chained()
    first = s.http.get("/api/chains?limit=1").json()
    assert [c["chain_id"] for c in first["chains"]] == [1] and first["next_after"] == 1
    second = s.http.get("/api/chains?limit=1&after=1").json()
    assert [c["chain_id"] for c in second["chains"]] == [2] and second["next_after"] is None


def test_blocks_are_the_canonical_chain_in_pages() -> None:
    """/api/chains/1/blocks is the canonical chain; from, to and limit page it with next_from."""
    s = chained()
    body = s.http.get("/api/chains/1/blocks").json()
    assert [b["hash"] for b in body["blocks"]] == [bh("a", n) for n in range(1, 8)] + [
        bh("b", 8),
        bh("b", 9),
    ]
    assert [b["finalized"] for b in body["blocks"]] == [True] * 7 + [True, True]
    page = s.http.get("/api/chains/1/blocks?from=3&to=8&limit=4").json()
    assert [b["number"] for b in page["blocks"]] == [3, 4, 5, 6] and page["next_from"] == 7
    rest = s.http.get("/api/chains/1/blocks?from=7&to=8&limit=4").json()
    assert [b["number"] for b in rest["blocks"]] == [7, 8] and rest["next_from"] is None


def test_blocks_page_is_capped_at_a_thousand() -> None:
    """A limit above 1,000 is capped: 1,200 canonical blocks come in two pages."""
    s = server_fixture()
    s.store(branch("a", 1, 1200))
    body = s.http.get("/api/chains/1/blocks?limit=5000").json()
    assert body["limit"] == 1000 and len(body["blocks"]) == 1000 and body["next_from"] == 1001


def test_reorgs_newest_first_with_a_cursor() -> None:
    """/api/chains/1/reorgs lists the reorgs newest first; before pages back."""
    s = chained()
    s.store([reorg(8, [bh("b", 9)], [])])
    body = s.http.get("/api/chains/1/reorgs?limit=1").json()
    assert [(r["id"], r["below_finality"], r["replaced"]) for r in body["reorgs"]] == [(2, True, 0)]
    assert body["next_before"] == 2
    older = s.http.get("/api/chains/1/reorgs?before=2").json()
    assert [r["id"] for r in older["reorgs"]] == [1] and older["next_before"] is None


def test_blocks_of_n_lists_every_record_with_its_status() -> None:
    """/api/blocks/<n> keeps its fields and adds chain, kind, canonical and finalized."""
    records = chained().http.get("/api/blocks/9").json()["records"]
    seen = [
        (r["kind"], r["chain_id"], r["block_hash"], r["canonical"], r["finalized"]) for r in records
    ]
    assert seen == [("block", 1, bh("a", 9), False, False), ("block", 1, bh("b", 9), True, True)]
    assert {"payload", "hash", "client_ip", "block_number"} <= set(records[0])
