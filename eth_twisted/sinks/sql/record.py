"""The dialect-neutral SQL record: one batch in one transaction with exact OK/DUP, and the read paths."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from eth_twisted.errors import SinkError, SinkTimeout, SinkUnavailable
from eth_twisted.interfaces import IRecord, maybe_global_reactor
from eth_twisted.model import (
    DEFAULT_SUMMARY_PAGE_BYTES,
    MAX_BLOCK_NUMBER,
    MAX_CLIENT_ID,
    MAX_CLIENT_IP,
    SUMMARY_FIXED_BYTES,
    ChainViolation,
    Message,
    Outcome,
    Record,
    RecordSummary,
    Totals,
    ascii_metadata,
    storable_client_id,
    storable_client_ip,
    take_page,
)
from eth_twisted.sinks.sql.chain import COLUMNS as _COLUMNS
from eth_twisted.sinks.sql.chain import ChainRecordMixin
from eth_twisted.sinks.sql.migrations import apply_migrations
from eth_twisted.sinks.sql.pool import (
    DataRefused,
    ErrorKind,
    ReconnectingConnectionPool,
    describe_error,
)

log = Logger(namespace="eth_twisted.sinks.sql")


MEDIUMBLOB_MAX = 2**24 - 1
"""The largest payload a MEDIUMBLOB holds; larger messages are REJECTED."""


IN_CHUNK = 500
"""Hashes per ``WHERE hash IN (...)`` query (SQLite's variable limit is 999 in old builds)."""


STATEMENT_OVERHEAD = 400
"""Bytes of SQL per inserted row besides the escaped payload (hash, ip, id, time, separators)."""


_SUMMARY_COLUMNS = "id, hash, block_number, client_ip, received_at"


_SUMMARY_MIN_BYTES = SUMMARY_FIXED_BYTES + 64
"""The least a summary counts (its hash is always 64 characters): bounds the rows a page asks for."""


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class _StoreState:
    """Shared between the attempts of one store interaction (the pool may re-run it)."""

    __slots__ = ("attempted", "violations")

    def __init__(self) -> None:
        self.attempted: set[str] = set()
        self.violations: list[ChainViolation] = []


@implementer(IRecord)
class SQLSink(ChainRecordMixin):
    """The dialect-neutral part of the SQL record; see :class:`MySQLSink`, :class:`SQLiteSink`."""

    name = "sql"
    dialect = "mysql"
    placeholder = "%s"
    insert_sql = ""
    in_chunk = IN_CHUNK

    def __init__(
        self, reactor: Any = None, *, migrate: bool = True, ping_timeout: float = 5.0
    ) -> None:
        reactor = maybe_global_reactor(reactor)
        self._reactor = reactor
        self.migrate = migrate
        self.ping_timeout = ping_timeout
        self.writer: ReconnectingConnectionPool | None = None
        self.reader: ReconnectingConnectionPool | None = None
        self.max_statement_bytes = 4 * 2**20
        self.max_payload_bytes = MEDIUMBLOB_MAX
        self.migrations_applied: list[int] = []
        self._inflight: set[Deferred[Any]] = set()
        self._running = False
        self._stopping = False
        self._starting: Deferred[None] | None = None
        self.chain_alarms = []  # called with each finality violation once its batch is stored

    # pools are built by the subclasses
    def _make_pools(self) -> tuple[ReconnectingConnectionPool, ReconnectingConnectionPool]:
        raise NotImplementedError

    def _prepare(self, conn: Any) -> list[int]:
        """Writer-side start: migrations (or the version check) and server limits."""
        return apply_migrations(
            conn, self.dialect, allow_create=self.migrate, clock=self._reactor.seconds
        )

    def _describe(self) -> str:
        return self.name

    def _q(self, sql: str) -> str:
        return sql if self.placeholder == "%s" else sql.replace("%s", self.placeholder)

    @property
    def retried(self) -> int:
        """Interactions re-run after a lost connection or conflict, over both pools."""
        return sum(p.retried for p in (self.writer, self.reader) if p is not None)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Open the pools, migrate (or check the schema version), learn the server's limits.

        A failed start closes the pools it opened (each exactly once); the sink
        may be started again. :meth:`stop` during a start makes it fail with
        :class:`~eth_twisted.errors.SinkUnavailable` once its attempt ends
        (bounded by the connect timeout), and waits for that.
        """
        if self._starting is not None:
            return defer.fail(SinkUnavailable(self.name, "already starting"))
        self._stopping = False
        d: Deferred[None] = self._start()
        self._starting = d

        def done(result: Any) -> Any:
            self._starting = None
            return result

        return d.addBoth(done)

    @defer.inlineCallbacks
    def _start(self) -> Any:
        self._close_pools()  # a running sink started again gets fresh pools
        self._running = False
        self.writer, self.reader = self._make_pools()
        try:
            applied = yield self.writer.runWithConnection(self._prepare)
            if not self._stopping:
                yield self.reader.runInteraction(self._ping_txn)
            if self._stopping:
                raise SinkUnavailable(self.name, "stopped while starting")
        except BaseException as e:
            self._close_pools()
            if isinstance(e, DataRefused):
                raise SinkUnavailable(self.name, str(e)) from e
            raise
        self.migrations_applied = applied
        self._running = True
        log.info(
            "SQL sink {sink} ready ({where}); migrations applied now: {applied}",
            sink=self.name,
            where=self._describe(),
            applied=self.migrations_applied or "none",
        )

    def _close_pools(self) -> None:
        """Close the pools, each once (adbapi's second close raises ``AlreadyQuit``), and forget them."""
        pools = (self.reader, self.writer)
        self.reader = self.writer = None
        for pool in pools:
            if pool is not None:
                pool.close()

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Wait for a start in progress and in-flight work (bounded by the driver timeouts), then close.

        Safe to call at any time, any number of times: after a start that never
        succeeded, during a start, twice.
        """
        self._running = False
        self._stopping = True
        if self._starting is not None:
            # Last in the start's chain: its caller sees the outcome first. A
            # failed start has closed its own pools by then.
            waiter: Deferred[None] = Deferred()

            def release(result: Any) -> Any:
                waiter.callback(None)
                return result

            self._starting.addBoth(release)
            yield waiter
        while self._inflight:
            yield defer.DeferredList(list(self._inflight), consumeErrors=True)
        self._close_pools()

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        self._inflight.add(d)

        def done(result: Any) -> Any:
            self._inflight.discard(d)
            return result

        d.addBoth(done)
        return d

    def _run(
        self, pool: ReconnectingConnectionPool | None, fn: Callable[..., Any], *args: Any
    ) -> Deferred[Any]:
        if not self._running or pool is None:
            return defer.fail(SinkUnavailable(self.name, "the sink is not running"))
        d = pool.runInteraction(fn, *args)
        d.addErrback(self._as_sink_error)
        return self._track(d)

    def _as_sink_error(self, failure: Failure) -> Failure | None:
        if failure.check(SinkError, DataRefused, defer.CancelledError):
            return failure  # ours, or a caller's timeout (addTimeout turns it into TimeoutError)
        log.failure("Unexpected error from {sink}", failure, sink=self.name)
        raise SinkUnavailable(self.name, describe_error(failure.value))

    # -- ping ------------------------------------------------------------------

    def _ping_txn(self, txn: Any) -> None:
        txn.execute("SELECT 1")
        txn.fetchall()

    def ping(self) -> Deferred[None]:
        """``SELECT 1`` on the read pool; SinkTimeout after ``ping_timeout`` seconds."""
        d = self._run(self.reader, self._ping_txn)

        def timed_out(failure: Failure) -> Failure:
            failure.trap(defer.TimeoutError, defer.CancelledError)
            raise SinkTimeout(self.name, f"no answer to ping in {self.ping_timeout}s")

        d.addTimeout(self.ping_timeout, self._reactor)
        d.addErrback(timed_out)
        return d

    # -- writes ----------------------------------------------------------------

    def _row(self, m: Message) -> tuple[Any, ...]:
        raise NotImplementedError

    def _time_value(self, ts: float) -> Any:
        raise NotImplementedError

    def _time_float(self, value: Any) -> float | None:
        raise NotImplementedError

    def _payload_fits(self, payload: bytes) -> bool:
        return len(payload) <= self.max_payload_bytes

    def _row_bytes(self, payload: bytes) -> int:
        return len(payload) + STATEMENT_OVERHEAD

    def _begin_write(self, txn: Any) -> None:
        """Start the write transaction (SQLite: take the write lock now)."""

    def _select_existing(self, txn: Any, hashes: Sequence[str]) -> dict[str, tuple[str, Any]]:
        found: dict[str, tuple[str, Any]] = {}
        for chunk in _chunks(hashes, self.in_chunk):
            self._execute_in(
                txn,
                "SELECT hash, client_ip, received_at FROM ethereum_data WHERE hash IN ({})",
                chunk,
            )
            for h, ip, at in txn.fetchall():
                found[h] = (ip, at)
        return found

    def _execute_in(self, txn: Any, sql: str, hashes: Sequence[str]) -> None:
        """Run ``sql`` with ``{}`` replaced by the placeholders for ``hashes``."""
        txn.execute(sql.format(",".join([self.placeholder] * len(hashes))), tuple(hashes))

    def _insert(self, txn: Any, rows: Sequence[tuple[Any, ...]], sizes: Sequence[int]) -> int:
        """executemany in chunks no bigger than ``max_statement_bytes``; rows inserted."""
        inserted = 0
        start = 0
        while start < len(rows):
            end, size = start, 0
            while end < len(rows) and (
                end == start or size + sizes[end] <= self.max_statement_bytes
            ):
                size += sizes[end]
                end += 1
            txn.executemany(self.insert_sql, rows[start:end])
            inserted += max(txn.rowcount, 0)
            start = end
        return inserted

    def _insert_isolating(
        self,
        txn: Any,
        messages: Sequence[Message],
        idx: list[int],
        rows: list[tuple[Any, ...]],
        sizes: list[int],
        rejected: set[int],
        depth: int = 0,
    ) -> None:
        """Insert ``rows``; on a data error split in halves under savepoints to find the bad rows.

        A single row refused is tried once more with its client metadata as
        ASCII (:meth:`_insert_ascii_metadata`): metadata never costs a payload.
        """
        savepoint = f"eth_sp{depth}"
        txn.execute(f"SAVEPOINT {savepoint}")
        try:
            self._insert(txn, rows, sizes)
        except Exception as e:
            if self._classify(e) is not ErrorKind.DATA:
                raise
            txn.execute(f"ROLLBACK TO SAVEPOINT {savepoint}")
            txn.execute(f"RELEASE SAVEPOINT {savepoint}")
            if len(rows) == 1:
                if self._insert_ascii_metadata(txn, messages[idx[0]], sizes[0], depth + 1, e):
                    return
                rejected.add(idx[0])
                log.warn(
                    "{sink} refused one message ({reason}); answering rejected",
                    sink=self.name,
                    reason=describe_error(e),
                )
                return
            half = len(rows) // 2
            self._insert_isolating(
                txn, messages, idx[:half], rows[:half], sizes[:half], rejected, depth + 1
            )
            self._insert_isolating(
                txn, messages, idx[half:], rows[half:], sizes[half:], rejected, depth + 1
            )
        else:
            txn.execute(f"RELEASE SAVEPOINT {savepoint}")

    def _insert_ascii_metadata(
        self, txn: Any, m: Message, size: int, depth: int, refusal: BaseException
    ) -> bool:
        """Insert ``m`` with ASCII-only client metadata; False when that changes nothing or fails too.

        For a column that cannot hold the characters the storable form keeps
        (an operator's ``utf8mb3`` or ``latin1`` column and a non-BMP or
        non-Latin character): ASCII fits every charset in play.
        """
        ip, cid = storable_client_ip(m.client_ip), storable_client_id(m.client_id)
        plain_ip = ascii_metadata(ip, MAX_CLIENT_IP)
        plain_id = None if cid is None else ascii_metadata(cid, MAX_CLIENT_ID)
        if (plain_ip, plain_id) == (ip, cid):
            return False  # the metadata was ASCII already: something else was refused
        savepoint = f"eth_sp{depth}"
        txn.execute(f"SAVEPOINT {savepoint}")
        try:
            self._insert(
                txn, [self._row(m._replace(client_ip=plain_ip, client_id=plain_id))], [size]
            )
        except Exception as e:
            if self._classify(e) is not ErrorKind.DATA:
                raise
            txn.execute(f"ROLLBACK TO SAVEPOINT {savepoint}")
            txn.execute(f"RELEASE SAVEPOINT {savepoint}")
            return False
        txn.execute(f"RELEASE SAVEPOINT {savepoint}")
        log.warn(
            "{sink} could not hold a message's client metadata ({reason}); stored it with the "
            "metadata as ASCII escapes",
            sink=self.name,
            reason=describe_error(refusal),
        )
        return True

    def _classify(self, error: BaseException) -> ErrorKind:
        raise NotImplementedError

    def _insert_all_new(
        self, txn: Any, messages: Sequence[Message], candidates: list[int], state: _StoreState
    ) -> bool:
        """Insert every candidate at once; True when every one was new (the common case).

        The duplicate-ignoring insert reports how many rows it added. When that
        is all of them, each is this delivery's: OK, and the ``SELECT ... IN``
        round is saved. Otherwise the transaction is rolled back (it has done
        nothing else), a new one begins, and the caller takes the SELECT-first
        path, so OK/DUP stay exact. A data error propagates (the batch is then
        re-run isolating the bad rows).
        """
        hashes = [messages[i].hash for i in candidates]
        rows = [self._row(messages[i]) for i in candidates]
        sizes = [self._row_bytes(messages[i].payload) for i in candidates]
        state.attempted.update(hashes)  # a lost COMMIT reply must find these on the re-run
        try:
            inserted = self._insert(txn, rows, sizes)
        except Exception:
            state.attempted.difference_update(hashes)
            raise
        if inserted == len(candidates):
            return True
        txn.execute("ROLLBACK")
        state.attempted.difference_update(hashes)
        self._begin_write(txn)
        return False

    def _store_txn(
        self, txn: Any, messages: Sequence[Message], careful: bool, state: _StoreState
    ) -> list[Outcome]:
        """One batch, one transaction. Runs in a writer thread; may be re-run by the pool.

        The chain step (:meth:`_chain_step`) runs in the same transaction, over
        the messages this attempt inserted: an OK is only sent once the canonical
        and finalized status it implies is committed too.
        """
        outcomes, fresh = self._store_rows(txn, messages, careful, state)
        state.violations = self._chain_step(txn, [messages[i] for i in fresh]) if fresh else []
        return outcomes

    def _store_rows(
        self, txn: Any, messages: Sequence[Message], careful: bool, state: _StoreState
    ) -> tuple[list[Outcome], list[int]]:
        """Insert the batch's rows: the outcomes, and the indexes of the rows inserted now."""
        self._begin_write(txn)
        outcomes: list[Outcome | None] = [None] * len(messages)
        first: dict[str, int] = {}
        candidates: list[int] = []
        for i, m in enumerate(messages):
            if m.hash in first:
                prior = outcomes[first[m.hash]]
                outcomes[i] = Outcome.REJECTED if prior is Outcome.REJECTED else Outcome.DUPLICATE
                continue
            first[m.hash] = i
            bn = m.block_number
            if bn is not None and not (isinstance(bn, int) and 0 <= bn <= MAX_BLOCK_NUMBER):
                outcomes[i] = Outcome.REJECTED
            elif not self._payload_fits(m.payload):
                log.warn(
                    "{sink}: a {size}-byte payload is larger than this database takes; "
                    "answering rejected",
                    sink=self.name,
                    size=len(m.payload),
                )
                outcomes[i] = Outcome.REJECTED
            else:
                candidates.append(i)
        if (
            candidates
            and not careful
            and not state.attempted
            and self._insert_all_new(txn, messages, candidates, state)
        ):
            for i in candidates:
                outcomes[i] = Outcome.STORED
            return [o if o is not None else Outcome.DUPLICATE for o in outcomes], candidates
        existing = self._select_existing(txn, [messages[i].hash for i in candidates])
        new: list[int] = []
        for i in candidates:
            m = messages[i]
            row = existing.get(m.hash)
            if row is None:
                new.append(i)
            elif m.hash in state.attempted and self._same_delivery(m, row):
                # An earlier attempt of this very interaction inserted it and its COMMIT
                # reply was lost: the row is this delivery's.
                outcomes[i] = Outcome.STORED
            else:
                outcomes[i] = Outcome.DUPLICATE
        if new:
            state.attempted.update(messages[i].hash for i in new)
            rows = [self._row(messages[i]) for i in new]
            sizes = [self._row_bytes(messages[i].payload) for i in new]
            rejected: set[int] = set()
            if careful:
                self._insert_isolating(txn, messages, new, rows, sizes, rejected)
                inserted = -1
            else:
                inserted = self._insert(txn, rows, sizes)
            for i in rejected:
                outcomes[i] = Outcome.REJECTED
            kept = [i for i in new if i not in rejected]
            if inserted == len(kept):
                for i in kept:
                    outcomes[i] = Outcome.STORED
            elif kept:
                # Someone else inserted some of these since our SELECT (or the careful
                # path ran): a snapshot read shows exactly the rows this transaction wrote.
                mine = self._select_existing(txn, [messages[i].hash for i in kept])
                for i in kept:
                    outcomes[i] = Outcome.STORED if messages[i].hash in mine else Outcome.DUPLICATE
        fresh = [i for i in new if outcomes[i] is Outcome.STORED]
        return [o if o is not None else Outcome.DUPLICATE for o in outcomes], fresh

    def _same_delivery(self, m: Message, row: tuple[str, Any]) -> bool:
        ip, at = row
        stored = self._time_float(at)
        return (
            ip == storable_client_ip(m.client_ip)
            and stored is not None
            and abs(
                stored - self._time_float(self._time_value(m.received_at))  # type: ignore[operator]
            )
            < 1e-6
        )

    def store_batch(
        self, messages: Sequence[Message], verdicts: Sequence[Outcome] | None = None
    ) -> Deferred[list[Outcome]]:
        """Store a batch in one transaction; one Outcome per message, in order.

        ``verdicts`` is ignored: the record decides. A batch the database
        refuses for a data error is re-run with the bad rows isolated (REJECTED).
        """
        batch = list(messages)
        if not batch:
            return defer.succeed([])
        if not self._running:
            return defer.fail(SinkUnavailable(self.name, "the sink is not running"))
        state = _StoreState()
        d = self._run(self.writer, self._store_txn, batch, False, state)

        def isolate(failure: Failure) -> Deferred[list[Outcome]]:
            failure.trap(DataRefused)
            log.warn(
                "{sink} refused a value in a batch of {n} ({reason}); isolating it",
                sink=self.name,
                n=len(batch),
                reason=str(failure.value),
            )
            d2 = self._run(self.writer, self._store_txn, batch, True, state)
            d2.addErrback(self._data_to_unavailable)
            return d2

        d.addErrback(isolate)

        def report(outcomes: list[Outcome]) -> list[Outcome]:
            self._report(state.violations)
            return outcomes

        return d.addCallback(report)

    def _data_to_unavailable(self, failure: Failure) -> None:
        failure.trap(DataRefused)
        raise SinkUnavailable(self.name, str(failure.value))

    # -- reads -----------------------------------------------------------------

    def _select_records(self, txn: Any, sql: str, args: tuple[Any, ...]) -> list[Record]:
        txn.execute(self._q(sql), args)
        return [self._record(r) for r in txn.fetchall()]

    def _read(self, sql: str, *args: Any) -> Deferred[list[Record]]:
        d = self._run(self.reader, self._select_records, sql, args)
        d.addErrback(self._data_to_unavailable)
        return d

    def fetch_records(self, after_id: int, limit: int) -> Deferred[list[Record]]:
        """Records with ``id > after_id`` in id order, at most ``limit``."""
        return self._read(
            f"SELECT {_COLUMNS} FROM ethereum_data WHERE id > %s ORDER BY id LIMIT %s",
            int(after_id),
            max(0, int(limit)),
        )

    def recent(self, limit: int, before: int | None = None) -> Deferred[list[Record]]:
        """Newest first (by id), at most ``limit``, only ids below ``before`` if given."""
        if before is None:
            return self._read(
                f"SELECT {_COLUMNS} FROM ethereum_data ORDER BY id DESC LIMIT %s",
                max(0, int(limit)),
            )
        return self._read(
            f"SELECT {_COLUMNS} FROM ethereum_data WHERE id < %s ORDER BY id DESC LIMIT %s",
            int(before),
            max(0, int(limit)),
        )

    def _summary(self, row: Sequence[Any]) -> RecordSummary:
        rid, h, bn, ip, at = row
        return RecordSummary(
            int(rid), h, None if bn is None else int(bn), ip, self._time_float(at) or 0.0
        )

    def _select_summaries(
        self, txn: Any, sql: str, args: tuple[Any, ...], limit: int, max_bytes: int
    ) -> list[RecordSummary]:
        txn.execute(self._q(sql), args)

        def rows() -> Iterator[Sequence[Any]]:
            while True:
                chunk = txn.fetchmany(256)
                if not chunk:
                    return
                yield from chunk

        return take_page(map(self._summary, rows()), limit, max_bytes)

    def _summaries(
        self, sql: str, args: tuple[Any, ...], limit: int, max_bytes: int
    ) -> Deferred[list[RecordSummary]]:
        # Never ask for more rows than the page can hold: the payload column is not
        # selected, and the driver buffers at most this many small rows.
        rows = max(0, min(int(limit), int(max_bytes) // _SUMMARY_MIN_BYTES + 1))
        d = self._run(self.reader, self._select_summaries, sql, (*args, rows), rows, int(max_bytes))
        d.addErrback(self._data_to_unavailable)
        return d

    def fetch_summaries(
        self, after_id: int, limit: int, max_bytes: int = DEFAULT_SUMMARY_PAGE_BYTES
    ) -> Deferred[list[RecordSummary]]:
        """One page of summaries (no payloads) with ``id > after_id``, in id order (keyset pagination)."""
        return self._summaries(
            f"SELECT {_SUMMARY_COLUMNS} FROM ethereum_data WHERE id > %s ORDER BY id LIMIT %s",
            (int(after_id),),
            limit,
            max_bytes,
        )

    def recent_summaries(
        self, limit: int, before: int | None = None, max_bytes: int = DEFAULT_SUMMARY_PAGE_BYTES
    ) -> Deferred[list[RecordSummary]]:
        """One page of summaries newest first, ids below ``before`` if given."""
        if before is None:
            return self._summaries(
                f"SELECT {_SUMMARY_COLUMNS} FROM ethereum_data ORDER BY id DESC LIMIT %s",
                (),
                limit,
                max_bytes,
            )
        return self._summaries(
            f"SELECT {_SUMMARY_COLUMNS} FROM ethereum_data WHERE id < %s ORDER BY id DESC LIMIT %s",
            (int(before),),
            limit,
            max_bytes,
        )

    def by_block(
        self, block_number: int, limit: int | None = None, after: int | None = None
    ) -> Deferred[list[Record]]:
        """Records whose recognised block number is ``block_number``, in id order.

        Only ids above ``after``, and at most ``limit`` of them.
        """
        if not 0 <= int(block_number) <= MAX_BLOCK_NUMBER:
            return defer.succeed([])
        sql, args = (
            f"SELECT {_COLUMNS} FROM ethereum_data WHERE block_number = %s",
            [int(block_number)],
        )
        if after is not None:
            sql, args = sql + " AND id > %s", [*args, int(after)]
        sql += " ORDER BY id"
        if limit is not None:
            sql, args = sql + " LIMIT %s", [*args, max(0, int(limit))]
        return self._read(sql, *args)

    def _begin_read(self, txn: Any) -> None:
        """Start a read transaction, so several queries see one snapshot."""

    def _totals_txn(self, txn: Any) -> Totals:
        self._begin_read(txn)
        t = Totals()
        txn.execute("SELECT COUNT(*), MIN(received_at), MAX(received_at) FROM ethereum_data")
        count, lo, hi = txn.fetchone()
        t.records = int(count)
        t.first_received_at = None if lo is None else self._time_float(lo)
        t.last_received_at = None if hi is None else self._time_float(hi)
        txn.execute("SELECT client_ip, COUNT(*) FROM ethereum_data GROUP BY client_ip")
        t.first_by_ip = {ip: int(n) for ip, n in txn.fetchall()}
        txn.execute(
            "SELECT block_number, received_at FROM ethereum_data "
            "WHERE block_number IS NOT NULL ORDER BY received_at DESC, block_number DESC LIMIT 1"
        )
        row = txn.fetchone()
        if row is not None:
            t.latest_block, t.latest_block_at = int(row[0]), self._time_float(row[1])
        txn.execute(
            "SELECT d.client_ip, d.block_number FROM ethereum_data d JOIN ("
            "SELECT MAX(id) AS id FROM ethereum_data WHERE block_number IS NOT NULL "
            "GROUP BY client_ip) m ON d.id = m.id"
        )
        t.latest_block_by_ip = {ip: int(bn) for ip, bn in txn.fetchall()}
        return t

    def totals(self) -> Deferred[Totals]:
        """Aggregate counts over every record (a handful of aggregate queries, one snapshot)."""
        d = self._run(self.reader, self._totals_txn)
        d.addErrback(self._data_to_unavailable)
        return d
