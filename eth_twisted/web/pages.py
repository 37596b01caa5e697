"""Pages of stored records for the stats API, bounded in bytes as well as in records.

``/api/messages`` and ``/api/blocks/<n>`` answer pages built by :func:`read_page`, which
reads, encodes and stops each page before its byte budget (how is in its docstring);
:func:`record_json` shows at most :data:`MAX_PAYLOAD` bytes of a record's payload. The
README ("Stats API and dashboard") gives the limits; docs/hostile-input.md (item 16) the
attack they stop.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from eth_twisted.model import Record
from eth_twisted.web.stats import iso

MAX_PAYLOAD = 128 * 1024
"""Payload bytes one record carries in the API: its JSON is at most about 6x that (every byte
escaped as ``\\u00XX``), under the smallest page budget."""

YIELD_EVERY = 256 * 1024
"""Encoded bytes between two turns given back to the reactor while a page is built."""

FIRST_BATCH = 32
"""Rows read by a page's first query; later ones are sized from the rows seen so far."""

PAGE_OVERHEAD = 512
"""Bytes of a page's JSON outside its records (keys, cursors), kept out of the budget."""


def json_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON (no NaN)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _text(payload: bytes, truncated: bool) -> str | None:
    """The payload (already cut to MAX_PAYLOAD) as text, or None when it is not UTF-8.

    A cut payload may end inside a character: those last bytes are dropped.
    """
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as e:
        if truncated and e.reason == "unexpected end of data" and e.start >= len(payload) - 3:
            try:
                return payload[: e.start].decode("utf-8")
            except UnicodeDecodeError:
                return None
        return None


def record_json(record: Record, max_payload: int = MAX_PAYLOAD) -> dict[str, Any]:
    """One stored record for the API: payload as text when UTF-8, else base64.

    At most ``max_payload`` bytes of the payload are shown.
    """
    truncated = len(record.payload) > max_payload
    shown = record.payload[:max_payload] if truncated else record.payload
    text = _text(shown, truncated)
    if text is not None:
        payload, encoding = text, "utf-8"
    else:
        payload, encoding = base64.b64encode(shown).decode("ascii"), "base64"
    return {
        "id": record.id,
        "hash": record.hash,
        "block_number": record.block_number,
        "client_ip": record.client_ip,
        "client_id": record.client_id,
        "received_at": record.received_at,
        "received_at_iso": iso(record.received_at),
        "size": len(record.payload),
        "payload_encoding": encoding,
        "payload": payload,
        "payload_truncated": truncated,
        "kind": record.kind,
        "chain_id": record.chain_id,
        "block_hash": record.block_hash,
        "parent_hash": record.parent_hash,
        "canonical": record.canonical,
        "finalized": record.finalized,
    }


Fetch = Callable[[int, "int | None"], "defer.Deferred[list[Record]]"]
"""``fetch(n, cursor)``: at most ``n`` records after ``cursor`` (the last id read; None at first)."""


@dataclass(slots=True)
class Page:
    """Encoded records of one page and where the next one starts."""

    items: list[bytes]
    last_id: int | None
    more: bool
    """True when a next page may hold records (the budget or the limit stopped this one)."""

    @property
    def next_cursor(self) -> int | None:
        """The id the next page starts after (or before), or None when this is the last page."""
        return self.last_id if self.more else None

    def body(self, head: dict[str, Any], key: str, tail: dict[str, Any]) -> bytes:
        """The page's JSON: ``head``'s fields, the records under ``key``, then ``tail``'s fields."""
        front = json_bytes(head)[:-1] + (b"," if head else b"") + json_bytes(key) + b":["
        back = b"]," + json_bytes(tail)[1:] if tail else b"]}"
        return front + b",".join(self.items) + back


@defer.inlineCallbacks
def read_page(fetch: Fetch, limit: int, budget: int, clock: IReactorTime) -> Any:
    """Read and encode up to ``limit`` records through ``fetch`` into a bounded :class:`Page`.

    The page holds at most ``budget`` bytes (``SiteLimits.page_bytes``). Records are read
    from the record's read path in batches sized to what is left of the page and encoded
    one at a time; the reactor gets a turn after every :data:`YIELD_EVERY` bytes encoded.
    The first record is always taken (it fits: a record carries at most
    :data:`MAX_PAYLOAD` bytes of its payload, ``payload_truncated`` says when it was cut
    and ``size`` is always the whole length, so one record fits a page however it
    escapes); after it, the page stops before a record that would take it past the
    budget, saying where the next page starts. Each query asks for the records left,
    estimated from the sizes seen so far, so a page of large records reads few more rows
    than it sends.
    """
    budget = max(1, budget - PAGE_OVERHEAD)
    items: list[bytes] = []
    used = 0
    last_id: int | None = None
    since_yield = 0
    want = min(limit, FIRST_BATCH)
    while True:
        rows = yield fetch(want, last_id)
        for row in rows:
            encoded = json_bytes(record_json(row))
            if items and used + len(encoded) + 1 > budget:
                return Page(items, last_id, True)
            items.append(encoded)
            used += len(encoded) + 1
            last_id = row.id
            since_yield += len(encoded)
            if since_yield >= YIELD_EVERY:
                since_yield = 0
                yield task.deferLater(clock, 0, lambda: None)
            if len(items) >= limit:
                return Page(items, last_id, True)
        if len(rows) < want:
            return Page(items, last_id, False)
        average = used / len(items)
        want = max(1, min(limit - len(items), int((budget - used) / average) + 1))


__all__ = ["MAX_PAYLOAD", "Page", "iso", "json_bytes", "read_page", "record_json"]
