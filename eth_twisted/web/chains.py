"""The chain endpoints: ``/api/chains``, ``/api/chains/<id>/blocks`` and ``/api/chains/<id>/reorgs``.

Every answer is one bounded page read through the record's read path (a chain row is a
few hundred bytes, so a page of at most :data:`MAX_BLOCKS` is far under the page budget);
the shapes are in static/openapi.json.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.web.server import Request

from eth_twisted.interfaces import IRecord
from eth_twisted.model import MAX_BLOCK_NUMBER, ChainRow, ChainSummary, ReorgRow
from eth_twisted.web.app import (
    JSON_TYPE,
    MAX_ID,
    Response,
    Route,
    parse_int,
    single_arg,
)
from eth_twisted.web.pages import json_bytes
from eth_twisted.web.stats import iso

MAX_BLOCKS = 1000
"""Canonical blocks per ``/api/chains/<id>/blocks`` page."""

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
"""Chains or reorgs per page: the default and the cap."""

Place = Callable[[Callable[[], "defer.Deferred[Any]"]], "defer.Deferred[Any]"]
"""Runs a read in one of the site's heavy-read places (``held_place``)."""


def reorg_json(r: ReorgRow) -> dict[str, Any]:
    """One reorg record for the API."""
    return {
        "id": r.id,
        "chain_id": r.chain_id,
        "fork_number": r.fork_number,
        "depth": r.depth,
        "replaced": r.replaced,
        "old_head": r.old_head,
        "new_head": r.new_head,
        "detected_at": r.detected_at,
        "received_at": r.received_at,
        "received_at_iso": iso(r.received_at),
        "client_ip": r.client_ip,
        "hash": r.hash,
        "below_finality": r.below_finality,
        "finalized_number": r.finalized_number,
    }


def _point(number: int | None, block_hash: str | None) -> dict[str, Any] | None:
    return None if number is None else {"number": number, "hash": block_hash}


def chain_json(c: ChainSummary) -> dict[str, Any]:
    """One chain for ``/api/chains``."""
    return {
        "chain_id": c.chain_id,
        "first_seen_at": c.first_seen_at,
        "head": _point(c.head_number, c.head_hash),
        "safe": _point(c.safe_number, c.safe_hash),
        "finalized": _point(c.finalized_number, c.finalized_hash),
        "reorgs": c.reorgs,
        "violations": c.violations,
        "last_reorg": None if c.last_reorg is None else reorg_json(c.last_reorg),
    }


def block_json(b: ChainRow) -> dict[str, Any]:
    """One canonical block for ``/api/chains/<id>/blocks``."""
    return {
        "number": b.block_number,
        "hash": b.block_hash,
        "parent_hash": b.parent_hash,
        "finalized": b.finalized,
        "record": b.hash,
        "received_at": b.received_at,
    }


def _answer(body: dict[str, Any]) -> Response:
    return Response(json_bytes(body), JSON_TYPE, 200, {"Cache-Control": "no-store"})


def _limit(request: Request, cap: int, default: int) -> int:
    limit = parse_int(single_arg(request, "limit"), "limit", 1, MAX_ID)
    return min(limit if limit is not None else default, cap)


def _chain_id(match: re.Match[str]) -> int:
    chain_id = parse_int(match["chain"], "chain id", 0, MAX_BLOCK_NUMBER)
    assert chain_id is not None
    return chain_id


def chain_routes(record: IRecord, place: Place) -> list[Route]:
    """The three chain routes over ``record``'s read path, each read in one of ``place``'s places."""

    @defer.inlineCallbacks
    def chains(request: Request, match: re.Match[str]) -> Any:
        limit = _limit(request, MAX_LIMIT, DEFAULT_LIMIT)
        after = parse_int(single_arg(request, "after"), "after", 0, MAX_BLOCK_NUMBER)
        rows = yield place(lambda: record.chains(limit + 1, after))
        more = len(rows) > limit
        rows = rows[:limit]
        return _answer(
            {
                "limit": limit,
                "after": after,
                "chains": [chain_json(c) for c in rows],
                "next_after": rows[-1].chain_id if more else None,
            }
        )

    @defer.inlineCallbacks
    def blocks(request: Request, match: re.Match[str]) -> Any:
        chain_id = _chain_id(match)
        start = parse_int(single_arg(request, "from"), "from", 0, MAX_BLOCK_NUMBER)
        end = parse_int(single_arg(request, "to"), "to", 0, MAX_BLOCK_NUMBER)
        limit = _limit(request, MAX_BLOCKS, MAX_BLOCKS)
        low = 0 if start is None else start
        high = MAX_BLOCK_NUMBER if end is None else end
        rows: list[ChainRow] = []
        if low <= high:
            rows = yield place(lambda: record.chain_blocks(chain_id, low, high, limit + 1))
        more = len(rows) > limit
        rows = rows[:limit]
        return _answer(
            {
                "chain_id": chain_id,
                "from": start,
                "to": end,
                "limit": limit,
                "blocks": [block_json(b) for b in rows],
                "next_from": rows[-1].block_number + 1 if more else None,
            }
        )

    @defer.inlineCallbacks
    def reorgs(request: Request, match: re.Match[str]) -> Any:
        chain_id = _chain_id(match)
        limit = _limit(request, MAX_LIMIT, DEFAULT_LIMIT)
        before = parse_int(single_arg(request, "before"), "before", 1, MAX_ID)
        rows = yield place(lambda: record.chain_reorgs(chain_id, limit + 1, before))
        more = len(rows) > limit
        rows = rows[:limit]
        return _answer(
            {
                "chain_id": chain_id,
                "limit": limit,
                "before": before,
                "reorgs": [reorg_json(r) for r in rows],
                "next_before": rows[-1].id if more else None,
            }
        )

    return [
        Route.at(r"/api/chains", chains),
        Route.at(r"/api/chains/(?P<chain>[^/]*)/blocks", blocks),
        Route.at(r"/api/chains/(?P<chain>[^/]*)/reorgs", reorgs),
    ]


__all__ = ["MAX_BLOCKS", "block_json", "chain_json", "chain_routes", "reorg_json"]
