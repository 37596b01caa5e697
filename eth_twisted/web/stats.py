"""Running totals of what the server stored, for the stats API and the dashboard.

:class:`ServerStats` is seeded once from the record, kept current by the router after every
batch, and serves an encoded snapshot built at most once a second; its docstring says how
clients are counted and bounded. docs/architecture.md (section 1, "Web") places it between
the router and the stats site.
"""

from __future__ import annotations

import heapq
import json
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from eth_twisted.interfaces import IRecord
from eth_twisted.model import Message, Outcome, Record, RecordSummary, Totals, peer_group

CHART_POINTS = 600
"""How many (received_at, block_number) points the chart ring keeps."""

SAME_POINT = 0.01
"""Seconds within which two chart points of one block number are the same record."""

SNAPSHOT_TTL = 1.0
"""Seconds a snapshot is served from cache."""

TOP_CLIENTS = 20
"""Client groups a snapshot lists (the busiest by messages); ``totals.clients`` counts them all."""

MAX_GROUPS = 100_000
"""Client groups kept in memory; past it, new groups are counted together as :data:`OTHER`."""

OTHER = "other"
"""The group every address past :data:`MAX_GROUPS` is counted in."""

_GROUP_CACHE = 4096
"""IPv6 addresses whose group is remembered (the cache is emptied when full)."""

_STORED = Outcome.STORED.value
_DUPLICATE = Outcome.DUPLICATE.value


@dataclass(slots=True)
class ClientCounts:
    """What the server knows about one client address."""

    records: int = 0
    """Records this address was first to deliver."""
    messages: int = 0
    """Every message it delivered, duplicates included."""
    latest_block: int | None = None
    """Block number of the newest record it was first to deliver."""
    last_seen: float | None = None
    """When it last delivered a message (since this process started)."""


class ServerStats:
    """In-memory running totals, seeded from the record and updated per batch.

    Seeded once at start from the record (SQL totals, and Redis's per-client message
    counts when Redis is configured), then kept current in memory by the router after
    every batch (:meth:`observe`). The stats API reads :meth:`snapshot_bytes`, the
    encoded snapshot, built at most once a second on the injected clock: dashboards
    polling it never touch the writer, and ingest never waits for them.

    Clients are counted by address group (:func:`eth_twisted.model.peer_group`: the
    address, or its /64 for IPv6, the unit a single host controls). A snapshot lists the
    :data:`TOP_CLIENTS` busiest groups plus how many there are; building it costs the
    groups that delivered since the last one, not every group ever seen (counts only
    grow, so no other group can enter the top). At most :data:`MAX_GROUPS` groups are
    kept; the rest are counted together as :data:`OTHER`.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        chart_points: int = CHART_POINTS,
        ttl: float = SNAPSHOT_TTL,
        top_clients: int = TOP_CLIENTS,
        max_groups: int = MAX_GROUPS,
    ) -> None:
        self.clock = clock
        self.ttl = ttl
        self.top_clients = top_clients
        self.max_groups = max_groups
        self.started_at = clock.seconds()
        self.records = 0
        self.messages = 0
        self.clients: dict[str, ClientCounts] = {}
        self.first_received_at: float | None = None
        self.last_received_at: float | None = None
        self.latest_block: int | None = None
        self.latest_block_at: float | None = None
        self.messages_source = "sql"
        self.seeded = False
        self.chart: deque[tuple[float, int]] = deque(maxlen=chart_points)
        self.chart_seeded = False
        self._cache: dict[str, Any] | None = None
        self._cache_bytes = b""
        self._cache_at = 0.0
        self._top: list[str] = []
        self._touched: set[str] | None = None
        """Groups that delivered since the last snapshot; None: rank every group next time."""
        self._groups: dict[str, str] = {}

    # -- feeding -------------------------------------------------------------

    def group(self, ip: str) -> str:
        """The group ``ip`` is counted in: itself, its IPv6 /64, or :data:`OTHER` past the cap."""
        if ":" in ip:
            found = self._groups.get(ip)
            if found is None:
                if len(self._groups) >= _GROUP_CACHE:
                    self._groups.clear()
                found = self._groups[ip] = peer_group(ip)
            ip = found
        if ip not in self.clients and len(self.clients) >= self.max_groups:
            return OTHER
        return ip

    def _client(self, ip: str) -> ClientCounts:
        key = self.group(ip)
        counts = self.clients.get(key)
        if counts is None:
            counts = self.clients[key] = ClientCounts()
        if self._touched is not None:
            self._touched.add(key)
        return counts

    def seed(self, totals: Totals, ip_messages: dict[str, int] | None = None) -> None:
        """Start from the record's ``totals`` and, when Redis is configured, its message counts.

        Without ``ip_messages`` (no Redis) each client's message count starts at
        its record count: SQL holds first deliveries only, so duplicates
        delivered before this process started are unknown.
        """
        self.records = totals.records
        self.clients = {}
        self._touched = None
        for ip, n in totals.first_by_ip.items():
            self._client(ip).records += n
        for ip, block in totals.latest_block_by_ip.items():
            counts = self._client(ip)
            counts.latest_block = (
                block if counts.latest_block is None else max(counts.latest_block, block)
            )
        if ip_messages is not None:
            self.messages_source = "redis"
            for ip, n in ip_messages.items():
                self._client(ip).messages += int(n)
        else:
            self.messages_source = "sql"
            for counts in self.clients.values():
                counts.messages = counts.records
        for counts in self.clients.values():
            # Redis may lag SQL after a restart; never show fewer messages than records.
            counts.messages = max(counts.messages, counts.records)
        self.messages = sum(c.messages for c in self.clients.values())
        self.first_received_at = totals.first_received_at
        self.last_received_at = totals.last_received_at
        self.latest_block = totals.latest_block
        self.latest_block_at = totals.latest_block_at
        self.seeded = True
        self._cache = None

    def seed_chart(self, records: Iterable[Record | RecordSummary]) -> None:
        """Merge stored records (any order) into the chart ring, oldest first.

        Points observed since start are kept: the ring ends up holding the
        newest ``chart_points`` of both, each (time, block) once.
        """
        points = {
            (r.received_at, int(r.block_number)) for r in records if r.block_number is not None
        }
        points |= set(self.chart)
        merged: list[tuple[float, int]] = []
        # By block, then time: the same record seen live and read back (SQL keeps
        # microseconds) is one point even when other blocks share its time.
        for at, number in sorted(points, key=lambda p: (p[1], p[0])):
            if merged and merged[-1][1] == number and at - merged[-1][0] < SAME_POINT:
                continue
            merged.append((at, number))
        merged.sort()
        self.chart.clear()
        self.chart.extend(merged)
        self.chart_seeded = True
        self._cache = None

    @defer.inlineCallbacks
    def load(self, record: IRecord, ip_messages: dict[str, int] | None = None) -> Any:
        """Seed totals and chart from ``record`` (its read path); fire when done."""
        totals = yield record.totals()
        recent = yield record.recent_summaries(self.chart.maxlen or CHART_POINTS)  # no payloads
        self.seed(totals, ip_messages)
        self.seed_chart(recent)

    def observe(self, messages: Sequence[Message], outcomes: Sequence[Outcome | str]) -> None:
        """Count one stored batch: the router calls this with the batch's final outcomes.

        ``Outcome.STORED`` (``"OK"``) is a first delivery, ``Outcome.DUPLICATE``
        (``"DUP"``) a delivery of something already held; anything else (an ERR
        code) was not stored and is not counted as delivered.
        """
        now = self.clock.seconds()
        for message, outcome in zip(messages, outcomes, strict=True):
            code = outcome.value if isinstance(outcome, Outcome) else outcome
            if code != _STORED and code != _DUPLICATE:
                continue
            counts = self._client(message.client_ip)
            counts.messages += 1
            counts.last_seen = now
            self.messages += 1
            if code != _STORED:
                continue
            self.records += 1
            counts.records += 1
            at = message.received_at
            if self.first_received_at is None or at < self.first_received_at:
                self.first_received_at = at
            if self.last_received_at is None or at > self.last_received_at:
                self.last_received_at = at
            if message.block_number is not None:
                # The newest received (of one read's frames, the highest), not the last
                # stored: concurrent batches may commit a later message first.
                newest = (self.latest_block_at, self.latest_block or -1)
                if self.latest_block_at is None or (at, message.block_number) >= newest:
                    self.latest_block = message.block_number
                    self.latest_block_at = at
                counts.latest_block = message.block_number
                self.chart.append((at, message.block_number))

    # -- reading -------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The stats as a JSON-ready dict, computed at most once per ``ttl`` seconds.

        Batches observed meanwhile show up in the next snapshot, so however
        many dashboards poll, the work stays one build per second.
        """
        self._refresh()
        assert self._cache is not None
        return self._cache

    def snapshot_bytes(self) -> bytes:
        """:meth:`snapshot` encoded as the API's JSON, encoded once per build."""
        self._refresh()
        return self._cache_bytes

    def _refresh(self) -> None:
        now = self.clock.seconds()
        if self._cache is not None and now - self._cache_at < self.ttl:
            return
        self._cache = self._build(now)
        self._cache_bytes = json.dumps(
            self._cache, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
        self._cache_at = now

    def _ranked(self) -> list[str]:
        """The busiest :attr:`top_clients` groups, from the last top and the groups that delivered since."""

        def rank(key: str) -> tuple[int, str]:
            return -self.clients[key].messages, key

        candidates: Iterable[str] = (
            self.clients if self._touched is None else {*self._top, *self._touched}
        )
        self._top = heapq.nsmallest(
            self.top_clients, (k for k in candidates if k in self.clients), key=rank
        )
        self._touched = set()
        return self._top

    def _build(self, now: float) -> dict[str, Any]:
        clients = [
            {
                "ip": key,
                "records": c.records,
                "messages": c.messages,
                "latest_block": c.latest_block,
                "last_seen": c.last_seen,
            }
            for key, c in ((key, self.clients[key]) for key in self._ranked())
        ]
        latest: dict[str, Any] | None = None
        if self.latest_block is not None:
            latest = {
                "number": self.latest_block,
                "received_at": self.latest_block_at,
                "age_seconds": (
                    max(0.0, now - self.latest_block_at)
                    if self.latest_block_at is not None
                    else None
                ),
            }
        return {
            "now": now,
            "started_at": self.started_at,
            "uptime_seconds": max(0.0, now - self.started_at),
            "messages_source": self.messages_source,
            "totals": {
                "records": self.records,
                "messages": self.messages,
                "duplicates": max(0, self.messages - self.records),
                "clients": len(self.clients),
            },
            "first_received_at": self.first_received_at,
            "last_received_at": self.last_received_at,
            "first_received_at_iso": iso(self.first_received_at),
            "last_received_at_iso": iso(self.last_received_at),
            "latest_block": latest,
            "clients": clients,
            "clients_omitted": len(self.clients) - len(clients),
            "chart": [[at, number] for at, number in self.chart],
        }


def iso(ts: float | None) -> str | None:
    """Unix time as ISO 8601 in UTC, or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


__all__ = [
    "CHART_POINTS",
    "MAX_GROUPS",
    "OTHER",
    "TOP_CLIENTS",
    "ClientCounts",
    "ServerStats",
    "iso",
]
