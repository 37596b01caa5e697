"""The exactly-once oracle.

Every block the node produced is in SQL once, Redis agrees, no OK without a commit.

Usage in a scenario::

    oracle = Oracle(node, db_info, redis=("127.0.0.1", port, "eth:"))
    ...                                  # start things, wait for the first block stored
    oracle.begin()                       # the range starts at the oldest block stored now
    ...                                  # mine, inject the fault, heal it
    oracle.freeze()                      # stop mining: the range ends at the head now
    oracle.wait_stored(timeout=60)       # every block of the range in SQL (returns when)
    oracle.wait_redis(timeout=30)        # Redis equal to SQL (after reconciliation)
    verdict = oracle.check(wire_replies=proxy.replies(), outbox=path)
    verdict.assert_ok()

Checks, by block number over ``[first, last]``:

- none missing: every block number in the range has a row;
- none stored twice: one row per block number (html payloads make the block
  number the identity) and one row per hash; every row's hash is the SHA-256
  of its payload and its payload is exactly the rendered page for its block;
- Redis: the ``hashes`` set equals SQL's hash set, and the ``ip_addresses``
  counts sum to the SQL row count;
- no OK for anything not committed: every ``OK <sha>`` seen on the wire (the
  fault proxy's reply record) names a row in SQL; and every hash of the range
  that the client no longer holds (it left the outbox: acked) is in SQL and
  not in the dead letters.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pymysql

from eth_twisted.link.payload import render_html
from eth_twisted.model import sha256_hex
from tests.faults.services import redis_command
from tests.support import Anvil, wait_until


@dataclass
class Verdict:
    """What the oracle found; ``problems`` is empty when the promise held."""

    first: int
    last: int
    produced: int
    stored: int
    rows: int
    missing: list[int] = field(default_factory=list)
    duplicated: dict[int, int] = field(default_factory=dict)
    duplicate_hashes: int = 0
    bad_payloads: list[int] = field(default_factory=list)
    unrecognised_rows: int = 0
    redis_missing: int = 0
    redis_extra: int = 0
    redis_ip_sum: int | None = None
    wire_ok: int = 0
    wire_dup: int = 0
    wire_err: dict[str, int] = field(default_factory=dict)
    acked_not_stored: list[str] = field(default_factory=list)
    outbox_pending: int | None = None
    dead_letters: int | None = None
    gaps: list[tuple[int, int, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        """Blocks of the range with no row."""
        return len(self.missing)

    @property
    def duplicates(self) -> int:
        """Extra rows: for a block stored n times, n-1."""
        return sum(n - 1 for n in self.duplicated.values()) + self.duplicate_hashes

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems

    def summary(self) -> str:
        """One line for logs and assertion messages."""
        return (
            f"blocks {self.first}..{self.last}: produced {self.produced}, stored {self.stored}, "
            f"lost {self.lost}, duplicated {self.duplicates}, OK on wire {self.wire_ok}, "
            f"problems: {'; '.join(self.problems) or 'none'}"
        )

    def assert_ok(self) -> None:
        """Fail the test with every problem listed."""
        assert self.ok, self.summary()


def _short(items: Iterable[Any], n: int = 10) -> str:
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(map(str, items[:n])) + more


def parse_wire_replies(lines: Iterable[str]) -> tuple[set[str], set[str], dict[str, int]]:
    """Split recorded reply lines into (OK hashes, DUP hashes, ERR code counts)."""
    ok: set[str] = set()
    dup: set[str] = set()
    err: dict[str, int] = {}
    for line in lines:
        words = line.split()
        if not words:
            continue
        if words[0] == "OK" and len(words) == 2:
            ok.add(words[1])
        elif words[0] == "DUP" and len(words) == 2:
            dup.add(words[1])
        elif words[0] == "ERR":
            code = words[2] if len(words) > 2 else "?"
            err[code] = err.get(code, 0) + 1
    return ok, dup, err


def read_outbox(path: str) -> dict[str, Any]:
    """Pending hashes, dead-letter hashes, the cursor and the gaps of a client's outbox file (read-only)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        pending = {row[0] for row in conn.execute("SELECT hash FROM outbox")}
        dead = {row[0] for row in conn.execute("SELECT hash FROM dead_letters")}
        cursor = conn.execute("SELECT block_number FROM cursor").fetchone()
        gaps = [tuple(r) for r in conn.execute("SELECT first_block, last_block, reason FROM gaps")]
    finally:
        conn.close()
    return {"pending": pending, "dead": dead, "cursor": cursor[0] if cursor else None, "gaps": gaps}


class Oracle:
    """Knows the blocks the node produced and checks the stores against them afterwards."""

    def __init__(
        self,
        node: Anvil,
        mysql: dict[str, Any],
        redis: tuple[str, int, str] | None = None,
        render: Callable[[int], bytes] = render_html,
        table: str = "ethereum_data",
    ) -> None:
        self.node = node
        self.mysql = dict(mysql)
        self.redis = redis
        self.render = render
        self.table = table
        self.first: int | None = None
        self.last: int | None = None
        self.heads: list[tuple[float, int]] = []

    # -- reading the stores

    def _connect(self) -> pymysql.connections.Connection:
        m = self.mysql
        return pymysql.connect(
            host=m["host"],
            port=m["port"],
            user=m["user"],
            password=m["password"],
            database=m["database"],
            autocommit=True,
            connect_timeout=5,
            read_timeout=30,
        )

    def rows(self) -> list[tuple[str, bytes, int | None]]:
        """Every (hash, payload, block_number) in SQL."""
        conn = self._connect()
        try:
            with conn.cursor() as c:
                c.execute(f"SELECT hash, payload, block_number FROM `{self.table}`")
                return [(h, bytes(p), b) for h, p, b in c.fetchall()]
        finally:
            conn.close()

    def stored_blocks(self) -> dict[int, int]:
        """Block number -> number of rows holding it."""
        conn = self._connect()
        try:
            with conn.cursor() as c:
                c.execute(
                    f"SELECT block_number, COUNT(*) FROM `{self.table}` "
                    "WHERE block_number IS NOT NULL GROUP BY block_number"
                )
                return {int(b): int(n) for b, n in c.fetchall()}
        finally:
            conn.close()

    def newest_stored(self) -> int | None:
        """The highest block number in SQL, or None (also while the table does not exist yet)."""
        try:
            blocks = self.stored_blocks()
        except pymysql.err.ProgrammingError:
            return None
        return max(blocks) if blocks else None

    def redis_state(self) -> tuple[set[str], dict[str, int]]:
        """(members of ``hashes``, ``ip_addresses`` counts)."""
        assert self.redis is not None
        host, port, prefix = self.redis
        members = redis_command(host, port, "ZRANGE", prefix + "hashes", 0, -1) or []
        flat = redis_command(host, port, "HGETALL", prefix + "ip_addresses") or []
        counts = {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        return {m.decode() for m in members}, counts

    # -- the range

    def head(self) -> int:
        """The node's head now (remembered)."""
        h = self.node.head()
        self.heads.append((time.monotonic(), h))
        return h

    def wait_first_stored(self, timeout: float = 60.0) -> int:
        """Block until SQL holds some block; return the newest."""
        return int(
            wait_until(self.newest_stored, timeout, interval=0.2, what="the first block in SQL")
        )

    def begin(self, first: int | None = None) -> int:
        """Start the checked range at ``first``, or at the oldest block stored now.

        The client starts at the head it first sees and never skips after
        that, so everything from its first block on must arrive.
        """
        if first is None:
            blocks = self.stored_blocks()
            if not blocks:
                raise AssertionError("begin(): nothing stored yet; call wait_first_stored() first")
            first = min(blocks)
        self.first = first
        return first

    def freeze(self) -> int:
        """Stop the node mining; the range ends at the head now."""
        self.node.rpc("evm_setIntervalMining", 0)
        self.last = self.head()
        return self.last

    def missing(self) -> list[int]:
        """Block numbers of the range with no row yet."""
        assert self.first is not None and self.last is not None, "begin() and freeze() first"
        have = self.stored_blocks()
        return [n for n in range(self.first, self.last + 1) if n not in have]

    def wait_stored(self, timeout: float = 60.0) -> float:
        """Block until the whole range is in SQL; return the monotonic time it was."""
        try:
            wait_until(
                lambda: not self.missing(),
                timeout,
                interval=0.2,
                what="every block of the range in SQL",
            )
        except AssertionError as e:
            try:
                gone = self.missing()
            except Exception as err:  # noqa: BLE001 - reported
                gone = [f"(cannot read SQL: {err!r})"]  # type: ignore[list-item]
            raise AssertionError(f"{e}; still missing: {_short(gone)}") from None
        return time.monotonic()

    def redis_converged(self) -> bool:
        """True when Redis's hash set equals SQL's and the per-IP counts sum to the row count."""
        rows = self.rows()
        members, counts = self.redis_state()
        return members == {h for h, _, _ in rows} and sum(counts.values()) == len(rows)

    def wait_redis(self, timeout: float = 60.0) -> float:
        """Block until Redis agrees with SQL; return the monotonic time it did."""
        wait_until(self.redis_converged, timeout, interval=0.25, what="Redis to agree with SQL")
        return time.monotonic()

    # -- the verdict

    def check(
        self,
        wire_replies: Iterable[str] = (),
        outbox: str | None = None,
    ) -> Verdict:
        """Compare everything; see the module docstring for what is checked."""
        assert self.first is not None and self.last is not None, "begin() and freeze() first"
        rows = self.rows()
        by_block: dict[int, int] = {}
        hashes: dict[str, int] = {}
        bad: list[int] = []
        unrecognised = 0
        for h, payload, block in rows:
            hashes[h] = hashes.get(h, 0) + 1
            if block is None:
                unrecognised += 1
                continue
            by_block[block] = by_block.get(block, 0) + 1
            if sha256_hex(payload) != h or payload != self.render(block):
                bad.append(block)
        span = range(self.first, self.last + 1)
        v = Verdict(
            first=self.first,
            last=self.last,
            produced=len(span),
            stored=sum(1 for n in span if n in by_block),
            rows=len(rows),
            unrecognised_rows=unrecognised,
        )
        v.missing = [n for n in span if n not in by_block]
        v.duplicated = {b: n for b, n in by_block.items() if n > 1}
        v.duplicate_hashes = sum(n - 1 for n in hashes.values() if n > 1)
        v.bad_payloads = sorted(bad)
        if v.missing:
            v.problems.append(f"missing blocks: {_short(v.missing)}")
        if v.duplicated:
            v.problems.append(
                f"blocks stored more than once: {_short(sorted(v.duplicated.items()))}"
            )
        if v.duplicate_hashes:
            v.problems.append(f"{v.duplicate_hashes} duplicate hash rows")
        if v.bad_payloads:
            v.problems.append(
                f"rows whose payload/hash is not the block's page: {_short(v.bad_payloads)}"
            )
        if unrecognised:
            v.problems.append(f"{unrecognised} rows without a block number")

        if self.redis is not None:
            members, counts = self.redis_state()
            sql_hashes = set(hashes)
            v.redis_missing = len(sql_hashes - members)
            v.redis_extra = len(members - sql_hashes)
            v.redis_ip_sum = sum(counts.values())
            if v.redis_missing or v.redis_extra:
                v.problems.append(
                    f"Redis hashes differ from SQL: {v.redis_missing} missing, {v.redis_extra} extra"
                )
            if v.redis_ip_sum != len(rows):
                v.problems.append(f"sum(ip_addresses)={v.redis_ip_sum} != rows={len(rows)}")

        ok, dup, err = parse_wire_replies(wire_replies)
        v.wire_ok, v.wire_dup, v.wire_err = len(ok), len(dup), err
        not_committed = sorted((ok | dup) - set(hashes))
        if not_committed:
            v.acked_not_stored.extend(not_committed)
            v.problems.append(
                f"{len(not_committed)} OK/DUP on the wire for hashes not in SQL: {_short(not_committed, 3)}"
            )

        if outbox is not None:
            box = read_outbox(outbox)
            v.outbox_pending = len(box["pending"])
            v.dead_letters = len(box["dead"])
            v.gaps = box["gaps"]
            expected = {sha256_hex(self.render(n)): n for n in span}
            left = {h: n for h, n in expected.items() if h not in box["pending"]}
            dropped = sorted(n for h, n in left.items() if h not in hashes)
            if dropped:
                v.acked_not_stored.extend(str(n) for n in dropped)
                v.problems.append(f"blocks gone from the outbox but not in SQL: {_short(dropped)}")
            dead_in_range = sorted(expected[h] for h in box["dead"] if h in expected)
            if dead_in_range:
                v.problems.append(f"blocks dead-lettered by the client: {_short(dead_in_range)}")
            if v.gaps:
                v.problems.append(f"client recorded gaps: {_short(v.gaps)}")
        return v
