"""The chain side of the SQL record: the rule's reads and writes, and the chain read paths.

:class:`SQLChainStore` is the :class:`~eth_twisted.sinks.chain.ChainStore` of one write
transaction; :class:`ChainRecordMixin` gives :class:`~eth_twisted.sinks.sql.record.SQLSink`
the record's row form with its chain columns, the step it runs inside each batch's
transaction, and the reads behind ``/api/chains``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from eth_twisted.model import (
    ChainRow,
    ChainSummary,
    ChainViolation,
    FinalityEvent,
    Message,
    Record,
    ReorgEvent,
    ReorgRow,
    storable_client_ip,
)
from eth_twisted.sinks.chain import ChainState, ChainStore, Row, apply_chain_events
from eth_twisted.sinks.sql.pool import ErrorKind, describe_error

if TYPE_CHECKING:
    from eth_twisted.sinks.sql.pool import ReconnectingConnectionPool

log = Logger(namespace="eth_twisted.sinks.sql")

COLUMNS = (
    "id, hash, payload, block_number, client_ip, client_id, received_at, "
    "kind, chain_id, block_hash, parent_hash, canonical, finalized"
)
"""The columns of ``ethereum_data`` a :class:`~eth_twisted.model.Record` is read from."""

_ROW = "hash, block_number, block_hash, parent_hash, canonical, finalized"

_REORG = (
    "id, chain_id, fork_number, depth, replaced, old_head, new_head, detected_at, "
    "received_at, client_ip, hash, below_finality, finalized_number"
)

_CHAIN = "chain_id, finalized_number, finalized_hash, safe_number, safe_hash, reorgs, violations"

CHUNK = 500

_HEX_ID = frozenset("0123456789abcdef")


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _row(r: Sequence[Any]) -> Row:
    sha, n, block_hash, parent, canonical, finalized = r
    return Row(sha, int(n), block_hash, parent, canonical == 1, finalized == 1)


class SQLChainStore(ChainStore):
    """The chain rule's reads and writes in one write transaction of ``sink``.

    MySQL reads the rows the rule decides on with locking reads (the latest
    committed rows, whatever the transaction's snapshot), after the chains' rows
    are locked: two batches of one chain are decided one after the other. The
    children read skips rows other transactions hold (their own step decides
    them). SQLite has one writer, so its reads are plain.
    """

    def __init__(self, sink: ChainRecordMixin, txn: Any) -> None:
        self.sink = sink
        self.txn = txn
        mysql = sink.dialect == "mysql"
        self.mysql = mysql
        self.lock = " FOR UPDATE" if mysql else ""
        self.share = " LOCK IN SHARE MODE" if mysql else ""
        self.skip = " FOR UPDATE SKIP LOCKED" if mysql else ""
        # The canonical block of a height: the generated column under the unique key (MySQL),
        # the partial unique index (SQLite).
        self.canon_col = "canonical_number" if mysql else "block_number"
        self.canon_and = "" if mysql else " AND canonical = 1"
        self.ignore = " ON DUPLICATE KEY UPDATE hash = hash" if mysql else " ON CONFLICT DO NOTHING"

    def _x(self, sql: str, args: Sequence[Any] = ()) -> None:
        self.txn.execute(self.sink._q(sql), tuple(args))

    def _marks(self, n: int) -> str:
        return ",".join(["%s"] * n)

    def lock_chains(self, chain_ids: Sequence[int], now: float) -> dict[int, ChainState]:
        at = self.sink._time_value(now)
        values = ",".join(["(%s, %s)"] * len(chain_ids))
        args = [v for c in chain_ids for v in (c, at)]
        tail = (
            " ON DUPLICATE KEY UPDATE chain_id = chain_id"
            if self.mysql
            else " ON CONFLICT (chain_id) DO NOTHING"
        )
        self._x(f"INSERT INTO chains (chain_id, first_seen_at) VALUES {values}{tail}", args)
        self._x(
            f"SELECT {_CHAIN} FROM chains WHERE chain_id IN ({self._marks(len(chain_ids))}) "
            f"ORDER BY chain_id{self.lock}",
            chain_ids,
        )
        states = {}
        for c, fn, fh, sn, sh, reorgs, violations in self.txn.fetchall():
            states[int(c)] = ChainState(
                int(c),
                None if fn is None else int(fn),
                fh,
                None if sn is None else int(sn),
                sh,
                int(reorgs),
                int(violations),
            )
        return states

    def canonical_at(self, chain_id: int, heights: Collection[int]) -> dict[int, Row]:
        found: dict[int, Row] = {}
        for part in _chunks(sorted(heights)):
            self._x(
                f"SELECT {_ROW} FROM ethereum_data WHERE chain_id = %s{self.canon_and} AND "
                f"{self.canon_col} IN ({self._marks(len(part))}){self.lock}",
                [chain_id, *part],
            )
            for r in self.txn.fetchall():
                row = _row(r)
                found[row.block_number] = row
        return found

    def rows_by_block_hash(self, chain_id: int, hashes: Collection[str]) -> dict[str, Row]:
        found: dict[str, Row] = {}
        for part in _chunks(sorted(hashes)):
            self._x(
                f"SELECT {_ROW} FROM ethereum_data WHERE chain_id = %s AND block_hash IN "
                f"({self._marks(len(part))}) AND canonical IS NOT NULL ORDER BY id{self.skip}",
                [chain_id, *part],
            )
            for r in self.txn.fetchall():
                row = _row(r)
                held = found.get(row.block_hash)
                if held is None or (row.canonical and not held.canonical):
                    found[row.block_hash] = row
        return found

    def verdicts(self, chain_id: int, hashes: Collection[str]) -> dict[str, bool]:
        latest: dict[str, tuple[int, bool]] = {}
        for part in _chunks(sorted(set(hashes))):
            self._x(
                "SELECT block_hash, reorg_id, canonical FROM reorg_blocks WHERE chain_id = %s "
                f"AND block_hash IN ({self._marks(len(part))}){self.share}",
                [chain_id, *part],
            )
            for h, rid, word in self.txn.fetchall():
                if h not in latest or int(rid) > latest[h][0]:
                    latest[h] = (int(rid), word == 1)
        return {h: word for h, (_, word) in latest.items()}

    def children(self, chain_id: int, parents: Mapping[int, str], limit: int) -> list[Row]:
        found: list[Row] = []
        for part in _chunks(sorted(parents)):
            self._x(
                f"SELECT {_ROW} FROM ethereum_data WHERE chain_id = %s AND block_number IN "
                f"({self._marks(len(part))}) AND canonical = 0 ORDER BY id LIMIT %s{self.skip}",
                [chain_id, *part, limit],
            )
            for r in self.txn.fetchall():
                row = _row(r)
                if parents.get(row.block_number) == row.parent_hash:
                    found.append(row)
        return found[:limit]

    def set_status(
        self, chain_id: int, demote: Sequence[str], promote: Sequence[tuple[str, bool]]
    ) -> None:
        groups: list[tuple[str, list[str]]] = [
            ("canonical = 0, finalized = 0", list(demote)),
            ("canonical = 1, finalized = 0", [sha for sha, fin in promote if not fin]),
            ("canonical = 1, finalized = 1", [sha for sha, fin in promote if fin]),
        ]
        for assignment, shas in groups:  # orphans first: their heights are free before promotions
            for part in _chunks(shas):
                sql = f"UPDATE ethereum_data SET {assignment} WHERE hash IN "
                if all(_HEX_ID.issuperset(h) for h in part):  # message ids: literals, no mogrify
                    self.txn.execute(sql + "(" + ",".join(f"'{h}'" for h in part) + ")")
                else:
                    self._x(sql + f"({self._marks(len(part))})", part)

    def add_reorg(
        self,
        message: Message,
        event: ReorgEvent,
        below_finality: bool,
        finalized_number: int | None,
    ) -> int | None:
        self._x(
            "INSERT INTO reorgs (chain_id, fork_number, depth, replaced, old_head, new_head, "
            "detected_at, received_at, client_ip, hash, below_finality, finalized_number) "
            f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s){self.ignore}",
            [
                event.chain_id,
                event.fork_number,
                event.depth,
                len(event.new_hashes),
                event.old_hashes[-1] if event.old_hashes else None,
                event.new_hashes[-1] if event.new_hashes else None,
                event.detected_at,
                self.sink._time_value(message.received_at),
                storable_client_ip(message.client_ip),
                message.hash,
                int(below_finality),
                finalized_number,
            ],
        )
        if self.txn.rowcount != 1:
            return None
        return int(self.txn.lastrowid)

    def add_verdicts(self, chain_id: int, reorg_id: int, verdicts: Mapping[str, bool]) -> None:
        items = list(verdicts.items())
        for part in _chunks(items):
            self._x(
                "INSERT INTO reorg_blocks (chain_id, block_hash, reorg_id, canonical) VALUES "
                + ",".join(["(%s, %s, %s, %s)"] * len(part)),
                [v for h, word in part for v in (chain_id, h, reorg_id, int(word))],
            )

    def add_finality(self, message: Message, event: FinalityEvent, violation: bool) -> None:
        self._x(
            "INSERT INTO finality (chain_id, block_number, block_hash, safe_number, safe_hash, "
            "received_at, client_ip, hash, violation) "
            f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s){self.ignore}",
            [
                event.chain_id,
                event.block_number,
                event.block_hash,
                event.safe_number,
                event.safe_hash,
                self.sink._time_value(message.received_at),
                storable_client_ip(message.client_ip),
                message.hash,
                int(violation),
            ],
        )

    def mark_finalized(self, chain_id: int, number: int) -> None:
        # The highest finalized canonical row at or below ``number``: a walk down the
        # canonical index that stops there, so only the rows about to be marked are passed.
        self._x(
            f"SELECT {self.canon_col} FROM ethereum_data WHERE chain_id = %s{self.canon_and} "
            f"AND {self.canon_col} <= %s AND finalized = 1 ORDER BY {self.canon_col} DESC LIMIT 1",
            [chain_id, number],
        )
        found = self.txn.fetchone()
        low = -1 if found is None else int(found[0])
        self._x(
            f"UPDATE ethereum_data SET finalized = 1 WHERE chain_id = %s{self.canon_and} AND "
            f"{self.canon_col} > %s AND {self.canon_col} <= %s AND finalized = 0",
            [chain_id, low, number],
        )

    def save_chain(self, state: ChainState) -> None:
        self._x(
            "UPDATE chains SET finalized_number = %s, finalized_hash = %s, safe_number = %s, "
            "safe_hash = %s, reorgs = %s, violations = %s WHERE chain_id = %s",
            [
                state.finalized_number,
                state.finalized_hash,
                state.safe_number,
                state.safe_hash,
                state.reorgs,
                state.violations,
                state.chain_id,
            ],
        )


class ChainRecordMixin:
    """The chain parts of :class:`~eth_twisted.sinks.sql.record.SQLSink` (see the module)."""

    dialect: str
    reader: ReconnectingConnectionPool | None
    chain_alarms: list[Callable[[ChainViolation], None]]

    if TYPE_CHECKING:

        def _q(self, sql: str) -> str: ...

        def _run(
            self, pool: ReconnectingConnectionPool | None, fn: Callable[..., Any], *args: Any
        ) -> Deferred[Any]: ...

        def _time_value(self, ts: float) -> Any: ...

        def _time_float(self, value: Any) -> float | None: ...

        def _classify(self, error: BaseException) -> ErrorKind: ...

        def _data_to_unavailable(self, failure: Any) -> None: ...

    def _record(self, row: Sequence[Any]) -> Record:
        rid, h, payload, bn, ip, cid, at, kind, chain, bh, ph, canonical, fin = row
        return Record(
            int(rid),
            h,
            bytes(payload),
            None if bn is None else int(bn),
            ip,
            cid,
            self._time_float(at) or 0.0,
            kind or ("other" if bn is None else "block"),  # a row an older server wrote
            None if chain is None else int(chain),
            bh,
            ph,
            None if canonical is None else canonical == 1,
            fin == 1,
        )

    def _chain_step(self, txn: Any, messages: Sequence[Message]) -> list[ChainViolation]:
        """Apply the batch's chain messages under a savepoint; a refused value costs no payload.

        A data error (which the rule should never cause) rolls the chain step
        back and is logged: the batch's rows stay stored, with the status they
        were inserted with.
        """
        if not any(m.chain is not None for m in messages):
            return []
        txn.execute("SAVEPOINT eth_chain")
        try:
            found = apply_chain_events(SQLChainStore(self, txn), messages, messages[0].received_at)
        except Exception as e:
            if self._classify(e) is not ErrorKind.DATA:
                raise
            txn.execute("ROLLBACK TO SAVEPOINT eth_chain")
            log.failure(
                "The chain step of a batch was refused ({reason})", reason=describe_error(e)
            )
            found = []
        txn.execute("RELEASE SAVEPOINT eth_chain")
        return found

    def _report(self, violations: Sequence[ChainViolation]) -> None:
        """Log each finality violation once and tell the alarms (in the reactor, after commit)."""
        for v in violations:
            log.warn(
                "Finality violation on chain {chain} at block {number}: {detail}",
                chain=v.chain_id,
                number=v.block_number,
                detail=v.detail,
            )
            for alarm in list(self.chain_alarms):
                alarm(v)

    # -- reads -----------------------------------------------------------------

    def _chains_txn(self, txn: Any, limit: int, after: int) -> list[ChainSummary]:
        txn.execute(
            self._q(
                "SELECT chain_id, first_seen_at, finalized_number, finalized_hash, safe_number, "
                "safe_hash, reorgs, violations FROM chains WHERE chain_id > %s "
                "ORDER BY chain_id LIMIT %s"
            ),
            (after, limit),
        )
        rows = txn.fetchall()
        canon, canon_and = (
            ("canonical_number", "")
            if self.dialect == "mysql"
            else ("block_number", " AND canonical = 1")
        )
        out = []
        for c, first, fn, fh, sn, sh, reorgs, violations in rows:
            txn.execute(
                self._q(
                    f"SELECT {canon}, block_hash FROM ethereum_data WHERE chain_id = %s{canon_and}"
                    f" AND {canon} IS NOT NULL ORDER BY {canon} DESC LIMIT 1"
                ),
                (c,),
            )
            head = txn.fetchone()
            txn.execute(
                self._q(
                    f"SELECT {_REORG} FROM reorgs WHERE chain_id = %s ORDER BY id DESC LIMIT 1"
                ),
                (c,),
            )
            last = txn.fetchone()
            out.append(
                ChainSummary(
                    int(c),
                    self._time_float(first) or 0.0,
                    None if head is None else int(head[0]),
                    None if head is None else head[1],
                    None if fn is None else int(fn),
                    fh,
                    None if sn is None else int(sn),
                    sh,
                    int(reorgs),
                    int(violations),
                    None if last is None else self._reorg_row(last),
                )
            )
        return out

    def _reorg_row(self, r: Sequence[Any]) -> ReorgRow:
        rid, c, fork, depth, replaced, old, new, detected, at, ip, h, below, fin = r
        return ReorgRow(
            int(rid),
            int(c),
            int(fork),
            int(depth),
            int(replaced),
            old,
            new,
            int(detected),
            self._time_float(at) or 0.0,
            ip,
            h,
            below == 1,
            None if fin is None else int(fin),
        )

    def _read_chain(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d = self._run(self.reader, fn, *args)
        d.addErrback(self._data_to_unavailable)
        return d

    def chains(self, limit: int, after: int | None = None) -> Deferred[list[ChainSummary]]:
        """One page of chains in chain id order, those above ``after`` when given."""
        return self._read_chain(
            self._chains_txn, max(0, int(limit)), -1 if after is None else int(after)
        )

    def _blocks_txn(
        self, txn: Any, chain_id: int, start: int, end: int, limit: int
    ) -> list[ChainRow]:
        canon, canon_and = (
            ("canonical_number", "")
            if self.dialect == "mysql"
            else ("block_number", " AND canonical = 1")
        )
        txn.execute(
            self._q(
                "SELECT block_number, block_hash, parent_hash, finalized, hash, received_at "
                f"FROM ethereum_data WHERE chain_id = %s{canon_and} AND {canon} >= %s AND "
                f"{canon} <= %s ORDER BY {canon} LIMIT %s"
            ),
            (chain_id, start, end, limit),
        )
        return [
            ChainRow(int(n), bh, ph, fin == 1, h, self._time_float(at) or 0.0)
            for n, bh, ph, fin, h, at in txn.fetchall()
        ]

    def chain_blocks(
        self, chain_id: int, start: int, end: int, limit: int
    ) -> Deferred[list[ChainRow]]:
        """The canonical blocks of ``chain_id`` from ``start`` to ``end``, in order, at most ``limit``."""
        return self._read_chain(
            self._blocks_txn, int(chain_id), int(start), int(end), max(0, int(limit))
        )

    def _reorgs_txn(
        self, txn: Any, chain_id: int, limit: int, before: int | None
    ) -> list[ReorgRow]:
        sql, args = f"SELECT {_REORG} FROM reorgs WHERE chain_id = %s", [chain_id]
        if before is not None:
            sql, args = sql + " AND id < %s", [*args, before]
        txn.execute(self._q(sql + " ORDER BY id DESC LIMIT %s"), (*args, limit))
        return [self._reorg_row(r) for r in txn.fetchall()]

    def chain_reorgs(
        self, chain_id: int, limit: int, before: int | None = None
    ) -> Deferred[list[ReorgRow]]:
        """The reorg records of ``chain_id``, newest first, ids below ``before`` when given."""
        return self._read_chain(
            self._reorgs_txn,
            int(chain_id),
            max(0, int(limit)),
            None if before is None else int(before),
        )


__all__ = ["COLUMNS", "ChainRecordMixin", "SQLChainStore"]
