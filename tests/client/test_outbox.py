"""The durable outbox: persistence, order, bound, atomic cursor, dead letters, file lock."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eth_twisted.client.outbox import Cursor, Outbox, OutboxSettings, open_outbox
from eth_twisted.errors import ConfigError, OutboxFull, OutboxLocked
from eth_twisted.link.payload import render_html
from eth_twisted.model import sha256_hex


class FakeClock:
    """A settable seconds() callable."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cursor_at(n: int) -> Cursor:
    return Cursor(1, "0x" + "aa" * 32, n, f"0x{n:064x}")


def blocks(first: int, last: int) -> list[tuple[bytes, int | None]]:
    return [(render_html(n), n) for n in range(first, last + 1)]


@pytest.fixture
def spool(tmp_path: Path) -> str:
    return str(tmp_path / "spool.sqlite3")


@pytest.fixture
def outbox(spool: str) -> Outbox:
    box = open_outbox(OutboxSettings(spool=spool, max_outbox=10), clock=FakeClock())
    yield box
    box.close()


def test_new_outbox_is_empty(outbox: Outbox) -> None:
    """A fresh outbox has no cursor, no messages and every slot free."""
    assert outbox.cursor() is None
    assert outbox.depth() == 0
    assert outbox.free_slots() == 10
    assert outbox.pending(5) == []
    assert outbox.oldest_created_at() is None


def test_append_keeps_order_and_moves_cursor(outbox: Outbox) -> None:
    """Appended messages come back in append order with their hashes, and the cursor moves."""
    outbox.append(blocks(100, 102), cursor_at(102))
    outbox.append(blocks(103, 103), cursor_at(103))
    entries = outbox.pending(10)
    assert [e.block_number for e in entries] == [100, 101, 102, 103]
    assert [e.hash for e in entries] == [sha256_hex(render_html(n)) for n in range(100, 104)]
    assert entries[0].payload == render_html(100)
    assert entries[0].attempts == 0
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)
    assert outbox.cursor() == cursor_at(103)
    assert outbox.depth() == 4
    assert outbox.free_slots() == 6


def test_persists_across_reopen(spool: str) -> None:
    """Messages, cursor and dead letters survive closing and reopening the file."""
    clock = FakeClock(1000.0)
    box = open_outbox(OutboxSettings(spool=spool), clock=clock)
    box.append(blocks(1, 3), cursor_at(3))
    box.dead_letter(sha256_hex(render_html(2)), "rejected")
    box.close()
    again = open_outbox(OutboxSettings(spool=spool), clock=clock)
    try:
        assert again.cursor() == cursor_at(3)
        assert [e.block_number for e in again.pending(10)] == [1, 3]
        assert again.depth() == 2
        assert again.oldest_created_at() == 1000.0
        assert [d.block_number for d in again.dead_letters()] == [2]
    finally:
        again.close()


def test_bound_refuses_and_keeps_cursor(outbox: Outbox) -> None:
    """Over the bound, append raises OutboxFull, writes nothing and leaves the cursor alone."""
    outbox.append(blocks(1, 8), cursor_at(8))
    with pytest.raises(OutboxFull, match="8 of 10"):
        outbox.append(blocks(9, 11), cursor_at(11))
    assert outbox.cursor() == cursor_at(8)
    assert outbox.depth() == 8
    outbox.append(blocks(9, 10), cursor_at(10))
    assert outbox.free_slots() == 0
    with pytest.raises(OutboxFull):
        outbox.append(blocks(11, 11), cursor_at(11))
    assert outbox.cursor() == cursor_at(10)


def test_cursor_atomic_with_rows_when_cursor_write_fails(outbox: Outbox) -> None:
    """A failure after the rows are inserted but before the cursor is written rolls the rows back."""
    outbox.append(blocks(1, 1), cursor_at(1))
    bad = Cursor(None, "0x", 3, "0x")  # type: ignore[arg-type]  # NOT NULL fails mid-transaction
    with pytest.raises(sqlite3.IntegrityError):
        outbox.append(blocks(2, 3), bad)
    assert outbox.cursor() == cursor_at(1)
    assert [e.block_number for e in outbox.pending(10)] == [1]
    assert outbox.depth() == 1


def test_cursor_atomic_with_rows_on_crash_mid_append(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception between inserting rows and moving the cursor leaves neither behind."""

    def boom(*args: object) -> None:
        raise RuntimeError("power cut")

    monkeypatch.setattr(outbox, "_write_cursor", boom)
    with pytest.raises(RuntimeError):
        outbox.append(blocks(5, 6), cursor_at(6))
    monkeypatch.undo()
    assert outbox.cursor() is None
    assert outbox.pending(10) == []
    assert outbox.depth() == 0
    outbox.append(blocks(5, 6), cursor_at(6))
    assert outbox.depth() == 2


def test_process_killed_mid_append_leaves_cursor_and_rows_consistent(spool: str) -> None:
    """A process killed with os._exit inside the append transaction leaves no partial write."""
    script = textwrap.dedent(
        f"""
        import os
        from eth_twisted.client.outbox import open_outbox, Cursor, OutboxSettings
        from eth_twisted.link.payload import render_html
        box = open_outbox(OutboxSettings(spool={spool!r}), clock=lambda: 1.0)
        box.append([(render_html(1), 1)], Cursor(1, "0xg", 1, "0xh1"))
        def die(*a):
            os._exit(9)
        box._write_cursor = die
        box.append([(render_html(2), 2), (render_html(3), 3)], Cursor(1, "0xg", 3, "0xh3"))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    box = open_outbox(OutboxSettings(spool=spool), clock=lambda: 2.0)
    try:
        assert box.cursor() == Cursor(1, "0xg", 1, "0xh1")
        assert [e.block_number for e in box.pending(10)] == [1]
    finally:
        box.close()


def test_identical_payload_kept_once_but_cursor_moves(outbox: Outbox) -> None:
    """Appending the same bytes twice keeps one row and still moves the cursor."""
    page = render_html(7)
    outbox.append([(page, 7)], cursor_at(7))
    outbox.append([(page, 7)], cursor_at(8))
    assert outbox.depth() == 1
    assert len(outbox.pending(10)) == 1
    assert outbox.cursor() == cursor_at(8)


def test_empty_payload_refused(outbox: Outbox) -> None:
    """The empty payload is the heartbeat probe, never a message."""
    with pytest.raises(ValueError):
        outbox.append([(b"", None)], cursor_at(1))
    assert outbox.cursor() is None


def test_ack_removes_only_that_message(outbox: Outbox) -> None:
    """ack(hash) removes the message, answers True once, and frees a slot."""
    outbox.append(blocks(1, 3), cursor_at(3))
    h2 = sha256_hex(render_html(2))
    assert outbox.ack(h2) is True
    assert outbox.ack(h2) is False
    assert [e.block_number for e in outbox.pending(10)] == [1, 3]
    assert outbox.depth() == 2
    assert outbox.free_slots() == 8


def test_dead_letters_never_pending_and_listed(outbox: Outbox) -> None:
    """A dead-lettered message leaves the pending list and shows in dead_letters with its code."""
    clock = FakeClock(50.0)
    outbox._clock = clock
    outbox.append(blocks(1, 2), cursor_at(2))
    h1 = sha256_hex(render_html(1))
    outbox.mark_sent([h1])
    clock.now = 60.0
    assert outbox.dead_letter(h1, "rejected") is True
    assert outbox.dead_letter(h1, "rejected") is False
    assert [e.block_number for e in outbox.pending(10)] == [2]
    (dead,) = outbox.dead_letters()
    assert (dead.hash, dead.code, dead.block_number, dead.attempts) == (h1, "rejected", 1, 1)
    assert (dead.created_at, dead.dead_at) == (50.0, 60.0)
    assert dead.payload == render_html(1)
    assert outbox.dead_letter_count() == 1
    assert outbox.depth() == 1


def test_pending_exclude_and_after(outbox: Outbox) -> None:
    """pending skips excluded hashes and entries at or before ``after`` but still fills the limit."""
    outbox.append(blocks(1, 6), cursor_at(6))
    all_entries = outbox.pending(10)
    excluded = {all_entries[0].hash, all_entries[2].hash}
    got = outbox.pending(3, exclude=excluded)
    assert [e.block_number for e in got] == [2, 4, 5]
    got = outbox.pending(10, after=all_entries[3].seq)
    assert [e.block_number for e in got] == [5, 6]


def test_seq_never_reused_after_ack(outbox: Outbox) -> None:
    """After acking the newest message, the next one still gets a larger seq (AUTOINCREMENT)."""
    outbox.append(blocks(1, 1), cursor_at(1))
    (first,) = outbox.pending(1)
    outbox.ack(first.hash)
    outbox.append(blocks(2, 2), cursor_at(2))
    (second,) = outbox.pending(1)
    assert second.seq > first.seq


def test_transaction_groups_calls_and_rolls_back(outbox: Outbox) -> None:
    """Calls inside transaction() commit together, or not at all when it raises."""
    outbox.append(blocks(1, 3), cursor_at(3))
    hashes = [e.hash for e in outbox.pending(10)]
    with pytest.raises(RuntimeError):
        with outbox.transaction():
            outbox.ack(hashes[0])
            outbox.dead_letter(hashes[1], "auth")
            raise RuntimeError("stop")
    assert outbox.depth() == 3
    assert outbox.dead_letters() == []
    with outbox.transaction():
        outbox.ack(hashes[0])
        outbox.dead_letter(hashes[1], "auth")
    assert outbox.depth() == 1
    assert [d.code for d in outbox.dead_letters()] == ["auth"]


def test_gaps_and_reset_cursor(outbox: Outbox) -> None:
    """record_gap keeps the skipped range; reset_cursor clears the cursor but keeps the messages."""
    outbox.append(blocks(1, 2), cursor_at(2))
    outbox.record_gap(3, 99, "max-gap 50")
    (gap,) = outbox.gaps()
    assert (gap.first, gap.last, gap.reason) == (3, 99, "max-gap 50")
    outbox.reset_cursor()
    assert outbox.cursor() is None
    assert outbox.depth() == 2


def test_file_lock_refuses_second_opener(spool: str) -> None:
    """A second open of the same file fails with OutboxLocked naming the path and our pid."""
    first = open_outbox(OutboxSettings(spool=spool), clock=lambda: 0.0)
    try:
        with pytest.raises(OutboxLocked) as info:
            open_outbox(OutboxSettings(spool=spool), clock=lambda: 0.0)
        assert spool in str(info.value)
        assert f"pid {os.getpid()}" in str(info.value)
    finally:
        first.close()
    again = open_outbox(OutboxSettings(spool=spool), clock=lambda: 0.0)
    again.close()


def test_file_lock_refuses_another_process(spool: str) -> None:
    """Another process cannot open an outbox this process holds."""
    box = open_outbox(OutboxSettings(spool=spool), clock=lambda: 0.0)
    try:
        script = (
            "import sys\nfrom eth_twisted.client.outbox import OutboxSettings, open_outbox\n"
            "from eth_twisted.errors import OutboxLocked\n"
            f"try:\n    open_outbox(OutboxSettings(spool={spool!r}), clock=lambda: 0.0)\n"
            "except OutboxLocked as e:\n"
            "    print(e); sys.exit(3)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 3, proc.stderr
        assert spool in proc.stdout
    finally:
        box.close()


def test_memory_outbox_works_without_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """':memory:' keeps messages in memory, takes no lock and writes no file."""
    monkeypatch.chdir(tmp_path)
    a = open_outbox(OutboxSettings(spool=":memory:"), clock=lambda: 0.0)
    b = open_outbox(OutboxSettings(spool=":memory:"), clock=lambda: 0.0)
    try:
        a.append(blocks(1, 2), cursor_at(2))
        assert a.depth() == 2
        assert b.depth() == 0
    finally:
        a.close()
        b.close()
    assert list(tmp_path.iterdir()) == []


def test_wal_and_full_sync(outbox: Outbox) -> None:
    """The file is in WAL mode with synchronous=FULL (2)."""
    assert outbox.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert outbox.conn.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_settings_default_and_check_names_the_option() -> None:
    """OutboxSettings hold the --spool file name and --max-outbox bound; check() names a bad one."""
    assert (OutboxSettings().spool, OutboxSettings().max_outbox) == (
        "eth-client-spool.sqlite3",
        100_000,
    )
    OutboxSettings().check()
    with pytest.raises(ValueError, match="--max-outbox"):
        OutboxSettings(max_outbox=0).check()
    with pytest.raises(ValueError, match="--spool"):
        OutboxSettings(spool="").check()


def test_unopenable_path_is_a_config_error(tmp_path: Path) -> None:
    """A spool in a missing directory fails with a ConfigError naming the path."""
    path = str(tmp_path / "missing" / "spool.sqlite3")
    with pytest.raises(ConfigError, match="missing"):
        open_outbox(OutboxSettings(spool=path), clock=lambda: 0.0)


def test_not_an_sqlite_file_is_a_config_error(tmp_path: Path) -> None:
    """A spool path holding something else fails clearly and releases the lock."""
    path = tmp_path / "spool.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="spool.sqlite3"):
        open_outbox(OutboxSettings(spool=str(path)), clock=lambda: 0.0)
    with pytest.raises(ConfigError):
        open_outbox(
            OutboxSettings(spool=str(path)), clock=lambda: 0.0
        )  # not OutboxLocked: the lock was released
