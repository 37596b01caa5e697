"""The client's durable outbox, its cursor and its dead letters, in one SQLite file.

:class:`Outbox` keeps every rendered block until the server acknowledges it, and moves the
cursor past blocks in the same transaction that stores them, so a crash leaves both or
neither; the durability rules (WAL, ``synchronous=FULL``, the ``flock``) are in its
docstring. docs/architecture.md (section 1, "Outbox", and section 3) places it on the data
path and on the reactor thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from eth_twisted.errors import ConfigError, OutboxFull, OutboxLocked
from eth_twisted.interfaces import maybe_global_reactor
from eth_twisted.model import sha256_hex
from eth_twisted.options import int_in, setting

MEMORY = ":memory:"

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    hash         TEXT    NOT NULL UNIQUE,
    payload      BLOB    NOT NULL,
    block_number INTEGER,
    created_at   REAL    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS cursor (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    chain_id     INTEGER NOT NULL,
    genesis_hash TEXT    NOT NULL,
    block_number INTEGER NOT NULL,
    block_hash   TEXT    NOT NULL,
    updated_at   REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    hash         TEXT    NOT NULL,
    payload      BLOB    NOT NULL,
    block_number INTEGER,
    created_at   REAL    NOT NULL,
    attempts     INTEGER NOT NULL,
    code         TEXT    NOT NULL,
    dead_at      REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS recent_blocks (
    block_number INTEGER PRIMARY KEY,
    block_hash   TEXT    NOT NULL,
    parent_hash  TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS state (
    key          TEXT    PRIMARY KEY,
    value        TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS gaps (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    first_block  INTEGER NOT NULL,
    last_block   INTEGER NOT NULL,
    reason       TEXT    NOT NULL,
    recorded_at  REAL    NOT NULL
);
"""

Clock = Callable[[], float]

RECENT_BLOCKS = 1024
"""Canonical blocks the outbox remembers for the head pipeline (fork points after a restart)."""


@dataclass(frozen=True)
class OutboxSettings:
    """Where the outbox lives and how much it holds; each field is the client option of its name."""

    spool: str = setting(
        "eth-client-spool.sqlite3",
        "Outbox file, or ':memory:' (not durable); "
        "the default file goes in $STATE_DIRECTORY when that is set",
    )
    """The SQLite file (the tap puts the default name in ``$STATE_DIRECTORY``), or ``:memory:``."""
    max_outbox: int = setting(
        100_000,
        "Most messages the outbox holds; when full the poller waits",
        int_in(1, 100_000_000),
    )

    def check(self) -> None:
        """Raise ValueError naming the option of a value that makes no sense."""
        if not self.spool:
            raise ValueError("--spool: a file name or ':memory:' is needed")
        if self.max_outbox < 1:
            raise ValueError(f"--max-outbox: must be at least 1, got {self.max_outbox}")


@dataclass(frozen=True)
class Cursor:
    """Where the poller stands: the last block enqueued, on which chain."""

    chain_id: int
    genesis_hash: str
    """Lowercase 0x hex hash of block 0."""
    block_number: int
    """Number of the last block enqueued."""
    block_hash: str
    """Its hash (lowercase 0x hex), the parent the next block must name."""


@dataclass(frozen=True)
class Entry:
    """One message waiting in the outbox."""

    seq: int
    """Append order; strictly increasing, never reused."""
    hash: str
    """SHA-256 (lowercase hex) of ``payload``: the message id the server answers with."""
    payload: bytes
    block_number: int | None
    created_at: float
    attempts: int
    """How many times it was written to a connection before (persisted by :meth:`Outbox.mark_sent`)."""


@dataclass(frozen=True)
class DeadLetter:
    """A message the server refused for good (a final ``ERR``)."""

    hash: str
    payload: bytes
    block_number: int | None
    created_at: float
    attempts: int
    code: str
    dead_at: float


@dataclass(frozen=True)
class Gap:
    """A range of blocks deliberately skipped (``--max-gap``)."""

    first: int
    last: int
    reason: str
    recorded_at: float


def _as_clock(clock: IReactorTime | Clock | None) -> Clock:
    if clock is None:
        return maybe_global_reactor().seconds  # type: ignore[no-any-return]
    seconds = getattr(clock, "seconds", None)
    if callable(seconds):
        return seconds  # type: ignore[no-any-return]
    if callable(clock):
        return clock
    raise TypeError(f"clock must be an IReactorTime or a callable, not {clock!r}")


class _FileLock:
    """An exclusive, non-blocking ``flock`` on ``<path>.lock`` holding our pid."""

    def __init__(self, db_path: str) -> None:
        self.path = db_path + ".lock"
        self.db_path = db_path
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock and write our pid in the file; raise OutboxLocked if another client holds it."""
        try:
            handle = open(self.path, "a+", encoding="ascii")  # noqa: SIM115 - held until release
        except OSError as e:
            raise ConfigError(
                f"outbox {self.db_path}: cannot create lock file {self.path}: {e.strerror}"
            )
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                handle.close()
                raise ConfigError(f"outbox {self.db_path}: cannot lock {self.path}: {e.strerror}")
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise OutboxLocked(
                f"outbox {self.db_path} is in use by another eth-client{who}; "
                f"stop it, or give this one its own --spool PATH"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Drop the lock and close the file (the lock file itself stays)."""
        if self._file is not None:
            # The lock file stays: unlinking it would race with a new opener.
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


class Outbox:
    """Messages waiting for an ack, the poller's cursor, dead letters and gaps.

    Every rendered block goes into the outbox *in the same transaction* that
    moves the cursor past it, so a crash at any instant leaves either both or
    neither: on restart the poller resumes right after the last block enqueued
    and every message it enqueued is still waiting to be sent. A message leaves
    the outbox only when the server answers ``OK``/``DUP`` for its hash
    (:meth:`ack`) or a final ``ERR`` (:meth:`dead_letter`, which keeps it in a
    table of its own: never resent, counted, listable).

    The file is opened in WAL mode with ``synchronous=FULL``: a commit is on disk
    (fsync'd) before :meth:`append` returns, so a power cut cannot move the
    cursor past a message that was not kept. The file is locked with ``flock``
    on ``<path>.lock`` so two clients never share one outbox.

    All methods are synchronous and short (one small transaction each); they run
    on the reactor thread. Several calls can share one transaction with
    :meth:`transaction` (the sender settles a whole read's worth of replies with
    one fsync).

    Build one with :func:`open_outbox`. ``max_outbox`` bounds the number of
    waiting messages: :meth:`append` raises :class:`OutboxFull` rather than
    drop anything, and the cursor stays where it was.
    """

    log = Logger()

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        path: str,
        max_outbox: int,
        clock: Clock,
        lock: _FileLock | None = None,
    ) -> None:
        if max_outbox < 1:
            raise ValueError("max_outbox must be at least 1")
        self.path = path
        self.max_outbox = max_outbox
        self._conn: sqlite3.Connection | None = conn
        self._clock = clock
        self._lock = lock
        self._depth_in_tx = 0
        self._tx_depth = 0
        self._depth = self._scalar("SELECT COUNT(*) FROM outbox") or 0

    # -- plumbing -------------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        """The open connection (raises once closed)."""
        if self._conn is None:
            raise ConfigError(f"outbox {self.path} is closed")
        return self._conn

    def _scalar(self, sql: str, args: Iterable[Any] = ()) -> Any:
        row = self.conn.execute(sql, tuple(args)).fetchone()
        return None if row is None else row[0]

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group several calls into one transaction (one fsync); nests."""
        conn = self.conn
        if self._tx_depth:
            self._tx_depth += 1
            try:
                yield
            finally:
                self._tx_depth -= 1
            return
        conn.execute("BEGIN IMMEDIATE")
        self._tx_depth = 1
        self._depth_in_tx = 0
        try:
            yield
        except BaseException:
            self._tx_depth = 0
            conn.execute("ROLLBACK")
            raise
        self._tx_depth = 0
        try:
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._depth += self._depth_in_tx

    def _changed(self, delta: int) -> None:
        self._depth_in_tx += delta

    # -- the poller's side ----------------------------------------------------

    def cursor(self) -> Cursor | None:
        """The stored cursor, or None before the first block was enqueued."""
        row = self.conn.execute(
            "SELECT chain_id, genesis_hash, block_number, block_hash FROM cursor WHERE id = 1"
        ).fetchone()
        return None if row is None else Cursor(int(row[0]), row[1], int(row[2]), row[3])

    def free_slots(self) -> int:
        """How many more messages fit before the bound."""
        return max(0, self.max_outbox - self._depth)

    def append(
        self,
        items: list[tuple[bytes, int | None]],
        cursor: Cursor,
        *,
        chain: Sequence[tuple[int, str, str]] = (),
        rewind_to: int | None = None,
    ) -> None:
        """Add ``(payload, block_number)`` items and move the cursor, atomically.

        Raises :class:`OutboxFull` (nothing written, cursor unchanged) when the
        items do not all fit. A payload already waiting (same hash) is kept
        once; the cursor still moves. Empty payloads are refused: the empty
        frame is the heartbeat probe and can never be a message.

        In the same transaction the remembered canonical chain (``recent_blocks``,
        what the head pipeline finds fork points in after a restart) forgets the
        blocks above ``rewind_to`` and takes ``chain`` (number, hash, parent), keeping
        the newest :data:`RECENT_BLOCKS`.
        """
        if any(not payload for payload, _ in items):
            raise ValueError("an empty payload cannot be a message (it is the heartbeat probe)")
        if len(items) > self.free_slots():
            raise OutboxFull(
                f"outbox {self.path} holds {self._depth} of {self.max_outbox} messages; "
                f"{len(items)} more do not fit"
            )
        now = self._clock()
        rows = [(sha256_hex(payload), payload, number, now) for payload, number in items]
        try:
            with self.transaction():
                conn = self.conn
                before = conn.total_changes
                conn.executemany(
                    "INSERT OR IGNORE INTO outbox (hash, payload, block_number, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    rows,
                )
                self._changed(conn.total_changes - before)
                self._write_cursor(cursor, now)
                self._write_chain(chain, rewind_to)
        except sqlite3.OperationalError as e:
            # SQLITE_FULL: the disk (or its quota) is full. The transaction rolled
            # back, the cursor did not move: the poller waits, as for a full outbox.
            if "full" in str(e).lower():
                raise OutboxFull(f"outbox {self.path}: the disk is full ({e})")
            raise

    def _write_cursor(self, cursor: Cursor, now: float) -> None:
        self.conn.execute(
            "INSERT INTO cursor (id, chain_id, genesis_hash, block_number, block_hash, updated_at) "
            "VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET chain_id = excluded.chain_id, "
            "genesis_hash = excluded.genesis_hash, block_number = excluded.block_number, "
            "block_hash = excluded.block_hash, updated_at = excluded.updated_at",
            (cursor.chain_id, cursor.genesis_hash, cursor.block_number, cursor.block_hash, now),
        )

    def _write_chain(self, chain: Sequence[tuple[int, str, str]], rewind_to: int | None) -> None:
        conn = self.conn
        if rewind_to is not None:
            conn.execute("DELETE FROM recent_blocks WHERE block_number > ?", (rewind_to,))
        if chain:
            conn.executemany(
                "INSERT OR REPLACE INTO recent_blocks (block_number, block_hash, parent_hash) "
                "VALUES (?, ?, ?)",
                chain,
            )
            conn.execute(
                "DELETE FROM recent_blocks WHERE block_number <= ?",
                (chain[-1][0] - RECENT_BLOCKS,),
            )

    def recent_blocks(self, limit: int) -> list[tuple[int, str]]:
        """The newest ``limit`` remembered canonical blocks (number, hash), oldest first."""
        rows = self.conn.execute(
            "SELECT block_number, block_hash FROM recent_blocks ORDER BY block_number DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [(int(n), str(h)) for n, h in reversed(rows)]

    def get_state(self, key: str) -> str | None:
        """A small remembered value (the last finalized block), or None."""
        value = self._scalar("SELECT value FROM state WHERE key = ?", (key,))
        return None if value is None else str(value)

    def set_state(self, key: str, value: str) -> None:
        """Remember ``value`` under ``key`` (its own transaction, or the caller's)."""
        with self.transaction():
            self.conn.execute(
                "INSERT INTO state (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def record_gap(self, first: int, last: int, reason: str) -> None:
        """Remember that blocks ``first..last`` were skipped, and why."""
        with self.transaction():
            self.conn.execute(
                "INSERT INTO gaps (first_block, last_block, reason, recorded_at) VALUES (?, ?, ?, ?)",
                (first, last, reason, self._clock()),
            )

    def gaps(self, limit: int = 100) -> list[Gap]:
        """Recorded gaps, newest first."""
        rows = self.conn.execute(
            "SELECT first_block, last_block, reason, recorded_at FROM gaps ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [Gap(int(r[0]), int(r[1]), r[2], float(r[3])) for r in rows]

    def reset_cursor(self) -> None:
        """Forget the cursor (``--reset-cursor``): the poller starts again at the head.

        Waiting messages stay and are still delivered; the remembered chain goes too.
        """
        with self.transaction():
            self.conn.execute("DELETE FROM cursor")
            self.conn.execute("DELETE FROM recent_blocks")
            self.conn.execute("DELETE FROM state")

    # -- the sender's side ----------------------------------------------------

    def pending(
        self, limit: int, exclude: set[str] | frozenset[str] = frozenset(), after: int = 0
    ) -> list[Entry]:
        """Up to ``limit`` waiting messages in append order.

        Skips hashes in ``exclude`` (frames already in flight) and, when
        ``after`` is given, every entry with ``seq <= after``.
        """
        if limit <= 0:
            return []
        rows = self.conn.execute(
            "SELECT seq, hash, payload, block_number, created_at, attempts FROM outbox "
            "WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit + len(exclude)),
        ).fetchall()
        out = []
        for r in rows:
            if r[1] in exclude:
                continue
            out.append(Entry(int(r[0]), r[1], bytes(r[2]), r[3], float(r[4]), int(r[5])))
            if len(out) == limit:
                break
        return out

    def mark_sent(self, hashes: Iterable[str]) -> None:
        """Count one more delivery attempt for each of ``hashes``."""
        with self.transaction():
            self.conn.executemany(
                "UPDATE outbox SET attempts = attempts + 1 WHERE hash = ?", [(h,) for h in hashes]
            )

    def ack(self, hash: str) -> bool:
        """The server holds ``hash`` (OK or DUP): forget it. False if it was not waiting."""
        with self.transaction():
            cur = self.conn.execute("DELETE FROM outbox WHERE hash = ?", (hash,))
            self._changed(-cur.rowcount)
        return cur.rowcount > 0

    def dead_letter(self, hash: str, code: str) -> bool:
        """Move ``hash`` to the dead letters (a final ERR ``code``). False if it was not waiting."""
        with self.transaction():
            conn = self.conn
            conn.execute(
                "INSERT INTO dead_letters (hash, payload, block_number, created_at, attempts, code, dead_at) "
                "SELECT hash, payload, block_number, created_at, attempts, ?, ? FROM outbox WHERE hash = ?",
                (code, self._clock(), hash),
            )
            cur = conn.execute("DELETE FROM outbox WHERE hash = ?", (hash,))
            self._changed(-cur.rowcount)
        if cur.rowcount:
            self.log.warn(
                "Message {hash} moved to the dead letters: the server answered ERR {code}",
                hash=hash,
                code=code,
            )
        return cur.rowcount > 0

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Dead letters, newest first."""
        rows = self.conn.execute(
            "SELECT hash, payload, block_number, created_at, attempts, code, dead_at FROM dead_letters "
            "ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [
            DeadLetter(r[0], bytes(r[1]), r[2], float(r[3]), int(r[4]), r[5], float(r[6]))
            for r in rows
        ]

    def dead_letter_count(self) -> int:
        """How many messages were dead-lettered, ever (in this file); for tests and operator tools."""
        return int(self._scalar("SELECT COUNT(*) FROM dead_letters") or 0)

    def depth(self) -> int:
        """How many messages wait for an ack."""
        return self._depth

    def oldest_created_at(self) -> float | None:
        """When the oldest waiting message was enqueued (clock seconds), or None."""
        value = self._scalar("SELECT created_at FROM outbox ORDER BY seq LIMIT 1")
        return None if value is None else float(value)

    def close(self) -> None:
        """Close the file and release the lock; idempotent."""
        if self._conn is not None:
            try:
                if self.path != MEMORY:
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                self.log.warn(
                    "Outbox {path}: checkpoint at close failed: {error}", path=self.path, error=e
                )
            self._conn.close()
            self._conn = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def open_outbox(settings: OutboxSettings, clock: IReactorTime | Clock | None = None) -> Outbox:
    """Open (creating if needed) and lock the outbox file ``settings.spool``.

    ``":memory:"`` keeps everything in memory (no durability, no lock).
    ``clock`` is an ``IReactorTime`` or a ``seconds()`` callable (default:
    the global reactor's). Raises :class:`OutboxLocked` when another process
    holds the file, :class:`ConfigError` when it cannot be opened.
    """
    path = settings.spool
    seconds = _as_clock(clock)
    lock: _FileLock | None = None
    if path != MEMORY:
        lock = _FileLock(path)
        lock.acquire()
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        try:
            if path != MEMORY:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise ConfigError(f"outbox {path}: cannot use WAL journal mode (got {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"outbox {path} has schema version {version}, newer than this client's "
                    f"{SCHEMA_VERSION}; upgrade eth-twisted or use another --spool"
                )
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            conn.close()
            raise ConfigError(f"outbox {path}: not a usable SQLite outbox: {e}")
    except sqlite3.OperationalError as e:
        if lock is not None:
            lock.release()
        raise ConfigError(f"outbox {path}: cannot open: {e}")
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Outbox(conn, path=path, max_outbox=settings.max_outbox, clock=seconds, lock=lock)
