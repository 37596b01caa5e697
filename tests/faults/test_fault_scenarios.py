"""Fault scenarios against the real eth server and client (subprocesses), checked by the oracle.

Each test starts a rig (anvil mining 1 block/s, private MariaDB and Redis,
a fault proxy between client and server recording every reply), waits for the
first stored block, injects one fault while blocks keep coming, heals it, and
then requires of the oracle: every block of the range in SQL exactly once,
Redis equal to SQL after reconciliation, every OK on the wire committed, no
block dropped from the outbox without a row. Each writes its row into
tests/artifacts/faults.json (render with ``python -m tests.faults.results``).

Outage lengths are counted in blocks mined during the outage (``rig.during``),
at 1 block/s. Budget: the whole file runs in about 8-10 minutes on 2 cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.faults.harness import Rig, RigOptions
from tests.faults.oracle import parse_wire_replies, read_outbox
from tests.faults.results import ResultLog
from tests.faults.services import FaultRedis, PrivateMariaDB
from tests.support import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.live]

MakeRig = Callable[..., Rig]


@pytest.fixture
def make_rig(
    scratch: str, private_mariadb: PrivateMariaDB, fault_redis: FaultRedis
) -> Iterator[MakeRig]:
    """Builds and starts this test's rig; stops it afterwards."""
    rigs: list[Rig] = []

    def make(**options: Any) -> Rig:
        rig = Rig(scratch, private_mariadb, fault_redis, RigOptions(**options))
        rigs.append(rig)
        rig.start()
        return rig

    yield make
    for rig in rigs:
        rig.stop()


def errs_on_wire(rig: Rig) -> dict[str, int]:
    """ERR codes the server sent so far (from the proxy's record)."""
    return parse_wire_replies(rig.link.replies())[2]


def finish(
    rig: Rig, results: ResultLog, name: str, injected: str, healed_at: float | None, **kw: Any
) -> None:
    """Ask the oracle, record the row, and fail with the logs when the promise broke."""
    verdict = rig.finish(results, name, injected, healed_at, **kw)
    assert verdict.ok, rig.explain(verdict)


# -- baseline


def test_baseline_no_fault(make_rig: MakeRig, fault_results: ResultLog) -> None:
    """With nothing broken, a burst and steady mining arrive exactly once."""
    rig = make_rig()
    rig.warm_up()
    rig.burst(50)
    rig.during(3)
    finish(rig, fault_results, "baseline", "nothing (burst of 50, 1 block/s)", None)


# -- the server process


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_server_killed_mid_burst(
    make_rig: MakeRig, fault_results: ResultLog, sig: signal.Signals
) -> None:
    """The server killed while a burst is being stored loses nothing and duplicates nothing.

    TERM is a graceful stop, KILL a crash.
    """
    rig = make_rig()
    rig.warm_up()
    base = rig.rows()
    rig.burst(400)
    rig.wait_rows(base + 30)
    assert rig.server is not None
    status = rig.server.kill(sig)
    at_kill = rig.rows()
    rig.notes.append(f"killed at {at_kill - base}/400 burst rows; exit status {status}")
    if sig == signal.SIGTERM:
        assert status == 0, f"SIGTERM should stop the server cleanly:\n{rig.tail('server')}"
    rig.during(2)
    rig.start_server()
    healed = time.monotonic()
    finish(
        rig,
        fault_results,
        f"server {sig.name} mid-burst",
        f"{sig.name} to eth server during a 400-block burst, restarted 2 s later",
        healed,
    )


# -- MariaDB


def test_mariadb_sigkill_and_restart(
    make_rig: MakeRig, fault_results: ResultLog, private_mariadb: PrivateMariaDB
) -> None:
    """MariaDB SIGKILLed mid-burst and restarted: no OK while down, everything stored once afterwards."""
    rig = make_rig()
    rig.warm_up()
    base = rig.rows()
    rig.burst(200)
    rig.wait_rows(base + 10)
    private_mariadb.kill(signal.SIGKILL)
    rig.during(5)
    took = private_mariadb.start()
    healed = time.monotonic()
    rig.notes.append(f"down ~5 s; restart took {took:.1f} s; ERR on wire {errs_on_wire(rig)}")
    finish(
        rig,
        fault_results,
        "MariaDB SIGKILL + restart",
        "SIGKILL mariadbd during a 200-block burst, restart after 5 blocks",
        healed,
    )


def test_mariadb_sigstop_longer_than_read_timeout(
    make_rig: MakeRig, fault_results: ResultLog, private_mariadb: PrivateMariaDB
) -> None:
    """MariaDB frozen for longer than the server's read timeout: nothing acked uncommitted.

    MariaDB is frozen with SIGSTOP for longer than the server's 3 s read timeout; all is stored
    after SIGCONT.
    """
    rig = make_rig(mysql_read_timeout=3.0)
    rig.warm_up()
    base = rig.rows()
    rig.burst(100)
    rig.wait_rows(base + 5)
    private_mariadb.pause()
    try:
        rig.during(8)
    finally:
        private_mariadb.resume()
    healed = time.monotonic()
    rig.notes.append(f"stopped 8 s, read timeout 3 s; ERR on wire {errs_on_wire(rig)}")
    finish(
        rig,
        fault_results,
        "MariaDB SIGSTOP > read timeout",
        "SIGSTOP mariadbd 8 s (server --mysql-read-timeout 3) during a burst, then SIGCONT",
        healed,
    )


def test_mariadb_wait_timeout_reaps_idle_connections(
    make_rig: MakeRig, fault_results: ResultLog, private_mariadb: PrivateMariaDB
) -> None:
    """With wait_timeout=1 every idle pool connection is reaped between bursts; no message fails."""
    private_mariadb.set_global("wait_timeout", 1)
    try:
        rig = make_rig()
        rig.warm_up()
        rig.anvil.rpc("evm_setIntervalMining", 0)
        for _ in range(4):
            rows = rig.rows()
            rig.burst(5)
            rig.wait_rows(rows + 5)
            # idle for longer than wait_timeout: wait until MariaDB has reaped the server's sessions
            wait_until(
                lambda: not [r for r in private_mariadb.processlist() if r[2] == "Sleep"],
                15,
                what="MariaDB to reap the idle pool connections",
            )
        rig.anvil.rpc("evm_setIntervalMining", 1)
        rig.during(2)
    finally:
        private_mariadb.set_global("wait_timeout", 28800)
    errors = errs_on_wire(rig)
    rig.notes.append(f"4 idle gaps with every session reaped; ERR on wire {errors or 'none'}")
    finish(
        rig,
        fault_results,
        "MariaDB wait_timeout reaping",
        "SET GLOBAL wait_timeout=1; 4 bursts separated by idle gaps",
        None,
    )
    assert not errors, (
        f"a reaped connection should be retried transparently, got ERR replies {errors}"
    )


def test_slow_database(make_rig: MakeRig, fault_results: ResultLog) -> None:
    """Every MariaDB packet delayed 150 ms each way: throughput drops, nothing is lost or doubled."""
    rig = make_rig(mysql_proxy=True)
    rig.warm_up()
    assert rig.mysql_link is not None
    rig.mysql_link.mode("delay", 150)
    rig.burst(150)
    rig.during(10)
    rig.mysql_link.mode("pass")
    healed = time.monotonic()
    rig.notes.append(f"ERR on wire {errs_on_wire(rig) or 'none'}")
    finish(
        rig,
        fault_results,
        "slow database",
        "proxy delays every MariaDB packet 150 ms both ways for 10 s, burst of 150",
        healed,
    )


# -- Redis


def test_redis_sigkill_restart_empty(
    make_rig: MakeRig, fault_results: ResultLog, fault_redis: FaultRedis
) -> None:
    """Redis SIGKILLed mid-burst and restarted empty: SQL complete, Redis rebuilt to equal it."""
    rig = make_rig()
    rig.warm_up()
    base = rig.rows()
    rig.burst(200)
    rig.wait_rows(base + 10)
    fault_redis.restart_empty()
    healed = time.monotonic()
    rig.during(3)
    finish(
        rig,
        fault_results,
        "Redis SIGKILL + restart empty",
        "SIGKILL redis during a 200-block burst, restarted empty at once",
        healed,
    )


def test_redis_down_for_half_a_minute(
    make_rig: MakeRig, fault_results: ResultLog, fault_redis: FaultRedis
) -> None:
    """Redis down for 30 s while blocks keep coming: nothing lost, Redis converges after it returns."""
    rig = make_rig()
    rig.warm_up()
    fault_redis.down()
    rig.burst(50)
    rig.during(30)
    fault_redis.start()
    healed = time.monotonic()
    rig.notes.append(f"down 30 s (budget); ERR on wire {errs_on_wire(rig) or 'none'}")
    finish(
        rig,
        fault_results,
        "Redis down 30 s",
        "redis killed and kept down 30 s (+ burst of 50)",
        healed,
    )


# -- the client <-> server link


def test_link_blackhole(make_rig: MakeRig, fault_results: ResultLog) -> None:
    """A blackholed link is detected by the ack timeout; after healing all arrive once.

    The link drops bytes silently.
    """
    rig = make_rig(client_args=["--ack-timeout", "20", "--heartbeat", "4"])
    rig.warm_up()
    rig.link.mode("blackhole")
    rig.burst(30)
    rig.during(30)
    accepted_in_hole = rig.link.status()["accepted"]
    rig.link.mode("pass")
    healed = time.monotonic()
    finish(
        rig,
        fault_results,
        "link blackhole",
        "proxy drops every byte both ways for 30 s (+ burst of 30)",
        healed,
    )
    st = rig.link.status()
    rig.notes.append(
        f"30 s black hole, client ack timeout 20 s; dropped {st['dropped_bytes']} bytes; "
        f"{accepted_in_hole - 1} reconnects into the hole, {st['accepted']} connections in all"
    )
    rig.finish_notes(fault_results, "link blackhole")
    assert accepted_in_hole >= 2, "the client never gave up on the dead connection (ack timeout)"


def test_link_reset(make_rig: MakeRig, fault_results: ResultLog) -> None:
    """Every connection reset for a while, mid-burst: the client reconnects and resends, nothing doubled.

    The connections are reset with RST.
    """
    rig = make_rig()
    rig.warm_up()
    base = rig.rows()
    rig.burst(300)
    rig.wait_rows(base + 10)
    rig.link.mode("reset")
    rig.during(5)
    rig.link.mode("pass")
    healed = time.monotonic()
    st = rig.link.status()
    rig.notes.append(
        f"{st['resets']} open connections reset, {st['refused']} new ones refused with RST"
    )
    finish(
        rig,
        fault_results,
        "link reset",
        "proxy RSTs every connection for 5 s during a 300-block burst",
        healed,
    )


def test_link_cut_mid_frame(make_rig: MakeRig, fault_results: ResultLog) -> None:
    """Frames and replies cut mid-way, then RST: no partial store, no loss.

    Frames are cut mid-way client->server and replies mid-way server->client.
    """
    rig = make_rig()
    rig.warm_up()
    cuts = 0
    for n, direction in ((7, "up"), (120, "up"), (30, "down"), (5, "down")):
        rig.link.mode("cut", n, direction)
        rig.burst(40)
        wait_until(lambda c=cuts: rig.link.status()["cuts"] > c, 30, what=f"cut {n} {direction}")
        cuts += 1
    healed = time.monotonic()
    rig.notes.append("cuts after 7 and 120 bytes up, 30 and 5 bytes down")
    finish(
        rig,
        fault_results,
        "link cut mid-frame",
        "4 one-shot cuts: first N bytes of a chunk then RST, both directions",
        healed,
    )


# -- the client process and its outbox


def test_client_sigkill_with_durable_outbox(make_rig: MakeRig, fault_results: ResultLog) -> None:
    """The client SIGKILLed mid-burst restarts from its durable outbox and cursor: no gap, no duplicate."""
    rig = make_rig()
    rig.warm_up()
    base = rig.rows()
    rig.burst(300)
    rig.wait_rows(base + 20)
    assert rig.client is not None
    rig.client.kill(signal.SIGKILL)
    rig.during(3)
    rig.client.start()
    healed = time.monotonic()
    finish(
        rig,
        fault_results,
        "client SIGKILL",
        "SIGKILL eth client during a 300-block burst, restart after 3 blocks",
        healed,
    )


@pytest.fixture
def small_tmpfs(scratch: str) -> Iterator[str]:
    """A 32 MiB tmpfs for the client's outbox (root only).

    It has room for SQLite's WAL (up to ~4 MiB) until filled.
    """
    mount = os.path.join(scratch, "spool-tmpfs")
    os.makedirs(mount)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", mount], capture_output=True
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", mount], check=False)


def _fill(directory: str) -> str:
    """Fill the file system holding ``directory``; return the filler's path."""
    path = os.path.join(directory, "filler")
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0")
                f.flush()
        except OSError:
            pass
    return path


def test_outbox_disk_full_stops_the_client_advancing(
    make_rig: MakeRig, fault_results: ResultLog, small_tmpfs: str
) -> None:
    """With the outbox's disk full the client's cursor stops instead of dropping blocks.

    After space returns all arrive.
    """
    rig = make_rig(spool_dir=small_tmpfs)
    rig.warm_up()
    rig.during(2)
    filler = _fill(small_tmpfs)
    frozen_cursor = read_outbox(rig.spool)["cursor"]
    rig.during(8)
    cursor = read_outbox(rig.spool)["cursor"]
    head = rig.anvil.head()
    os.unlink(filler)
    healed = time.monotonic()
    rig.notes.append(
        f"32 MiB tmpfs filled; cursor {frozen_cursor} -> {cursor} while head reached {head}; "
        f"client {'running' if rig.client and rig.client.running() else 'exited'}"
    )
    if rig.client is not None and not rig.client.running():
        rig.client.start()
    assert cursor is not None and cursor <= frozen_cursor + 1, (
        "the cursor advanced while the disk was full"
    )
    finish(
        rig,
        fault_results,
        "outbox disk full",
        "client outbox on a 32 MiB tmpfs, filled up for 8 blocks",
        healed,
    )


# -- the Ethereum node


@pytest.mark.parametrize(
    ("mode", "args"),
    [("garbage", ()), ("html", ()), ("429", (3,)), ("stall", ())],
    ids=["garbage", "html", "429", "stall"],
)
def test_rpc_node_misbehaves(
    make_rig: MakeRig, fault_results: ResultLog, mode: str, args: tuple[Any, ...]
) -> None:
    """The only RPC node misbehaving for 8 s: the poller waits, then catches up.

    The node answers garbage / HTML / 429 Retry-After / a stalled body.
    """
    rig = make_rig(rpc_fault=True)
    rig.warm_up()
    assert rig.rpc_fault is not None
    rig.rpc_fault.mode(mode, *args)
    rig.during(8)
    st = rig.rpc_fault.status()
    rig.rpc_fault.mode("pass")
    healed = time.monotonic()
    rig.notes.append(f"{st['faulted']} of {st['requests']} RPC requests spoiled")
    assert rig.client is not None and rig.client.running(), (
        f"the client died:\n{rig.tail('client')}"
    )
    what = {
        "garbage": "bytes that are not JSON",
        "html": "an HTML 502 page",
        "429": "429 with Retry-After: 3",
        "stall": "headers and half a body, then nothing",
    }[mode]
    finish(rig, fault_results, f"RPC {mode}", f"the only RPC node answers {what} for 8 s", healed)


def test_rpc_lagging_node_among_healthy(make_rig: MakeRig, fault_results: ResultLog) -> None:
    """A node 5 blocks behind (null above its head) listed first beside a healthy one: no block skipped."""
    rig = make_rig(rpc_fault=True, healthy_rpc=True)
    rig.warm_up()
    assert rig.rpc_fault is not None
    rig.rpc_fault.mode("lag", 5)
    rig.burst(20)
    rig.during(8)
    rig.rpc_fault.mode("null", 3)
    rig.during(6)
    rig.rpc_fault.mode("pass")
    healed = time.monotonic()
    rig.notes.append(f"{rig.rpc_fault.status()['faulted']} answers spoiled")
    finish(
        rig,
        fault_results,
        "RPC lagging node",
        "first of two RPC nodes lags 5 blocks (8 s), then nulls the newest 3 (6 s)",
        healed,
    )
