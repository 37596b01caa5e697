"""Push heads, reorgs and finality end to end: real anvil, ``eth client`` over ws, ``eth server``.

Each test runs anvil on a free loopback port, ``eth server`` on SQLite and ``eth client
--rpc ws://...`` as subprocesses (the way users run them), makes the chain do something
(steady blocks, ``anvil_reorg``, ``anvil_rollback``, a burst, silence, a restart, a silent
subscription, a cut TCP path) and ends when the server's canonical chain is the node's:
``eth_getBlockByNumber`` for every height against the rows marked canonical.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.faults.services import EthProcess
from tests.support import Anvil, free_port, wait_until
from tests.support.wsrelay import WSRelay

pytestmark = [pytest.mark.live, pytest.mark.slow]

CHAIN = 31337


class Heads:
    """anvil, one ``eth server`` (SQLite) and one ``eth client`` on ``rpc`` URLs."""

    def __init__(self, tmp: Path, anvil: Anvil, rpc: list[str], *client_args: str) -> None:
        self.tmp = tmp
        self.anvil = anvil
        self.port = free_port()
        self.client_stats = free_port()
        self.db = tmp / "server.sqlite3"
        self.server = EthProcess(
            ["server", "--port", str(self.port), "--stats", "none", "--sqlite", str(self.db)],
            str(tmp / "server.log"),
            cwd=str(tmp),
        )
        self.client = self.client_for(rpc, "", f"tcp:{self.client_stats}:interface=127.0.0.1")
        self.client.args += list(client_args)

    def client_for(self, rpc: list[str], name: str, stats: str = "none") -> EthProcess:
        """An ``eth client`` of this server (json, 1 s polls), its files named by ``name``."""
        args = [
            "client",
            "--connect",
            f"tcp:host=127.0.0.1:port={self.port}",
            "--format",
            "json",
            "--interval",
            "1",
            "--spool",
            str(self.tmp / f"spool{name}.sqlite3"),
            "--stats",
            stats,
            "--finality-interval",
            "1",
        ]
        for url in rpc:
            args += ["--rpc", url]
        return EthProcess(args, str(self.tmp / f"client{name}.log"), cwd=str(self.tmp))

    def start(self) -> Heads:
        try:
            self.server.start()
            self.server.wait_port(self.port)
            self.client.start()
            self.client.wait_port(self.client_stats)
        except BaseException:
            self.stop()  # a client that fails to start must not leave its server behind
            raise
        return self

    def stop(self) -> None:
        self.client.stop()
        self.server.stop()

    def logs(self) -> str:
        return f"client:\n{self.client.log_tail(60)}\nserver:\n{self.server.log_tail(30)}"

    # -- what the server holds ---------------------------------------------------

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        if not self.db.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # not migrated yet
            return []
        finally:
            conn.close()

    def canonical(self) -> dict[int, str]:
        rows = self.query(
            "SELECT block_number, block_hash FROM ethereum_data "
            "WHERE kind = 'block' AND canonical = 1 AND chain_id = ?",
            CHAIN,
        )
        return {int(n): str(h) for n, h in rows}

    def reorgs(self) -> list[tuple[int, int, int]]:
        """(fork_number, depth, below_finality) of every reorg the server recorded."""
        return [
            (int(f), int(d), int(b))
            for f, d, b in self.query(
                "SELECT fork_number, depth, below_finality FROM reorgs WHERE chain_id = ? "
                "ORDER BY id",
                CHAIN,
            )
        ]

    def wait_canonical(self, timeout: float = 45.0, head: int | None = None) -> dict[int, str]:
        """Until the server's canonical chain equals the node's from its first block to the head."""
        last: list[Any] = [None]

        def equal() -> dict[int, str] | None:
            for proc in (self.server, self.client):
                if not proc.running():
                    raise AssertionError(f"{proc.args[0]} exited:\n{self.logs()}")
            node_head = self.anvil.head()
            if head is not None and node_head != head:
                return None
            ours = self.canonical()
            if not ours or max(ours) != node_head:
                last[0] = (node_head, max(ours) if ours else None)
                return None
            node = self.anvil.chain(min(ours), node_head)
            if ours != node:
                last[0] = sorted(n for n in node if ours.get(n) != node[n])
                return None
            return ours

        try:
            return wait_until(equal, timeout, interval=0.25, what="the canonical chain")  # type: ignore[no-any-return]
        except AssertionError as e:
            raise AssertionError(f"{e}; last difference {last[0]}\n{self.logs()}") from None

    def each_block_once(self) -> dict[int, str]:
        """The node's chain, contiguous, every block of it sent by the client exactly once."""
        chain = self.wait_canonical()
        assert sorted(chain) == list(range(min(chain), max(chain) + 1))
        assert self.metric("eth_client_blocks_enqueued_total") == len(chain), "a block sent twice"
        return chain

    # -- what the client says ----------------------------------------------------

    def metric(self, name: str, **labels: str) -> float:
        url = f"http://127.0.0.1:{self.client_stats}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total


@pytest.fixture
def on_demand(tmp_path: Path) -> Iterator[Anvil]:
    """anvil mining only when told (anvil_mine), past block 0."""
    node = Anvil(block_time=None)
    node.start()
    node.mine(5)
    yield node
    node.stop()


def heads(tmp: Path, anvil: Anvil, *args: str, rpc: list[str] | None = None) -> Heads:
    return Heads(tmp, anvil, rpc or [anvil.ws_url], *args).start()


def test_steady_blocks_over_ws_no_duplicates_no_gaps(tmp_path: Path, anvil: Anvil) -> None:
    """1 s blocks pushed over ws: every block once, contiguous, equal to the node's chain."""
    relay = heads(tmp_path, anvil)
    try:
        first = relay.wait_canonical()
        start = anvil.head()
        wait_until(lambda: anvil.head() >= start + 8, 30, what="eight more blocks")
        chain = relay.wait_canonical()
        assert sorted(chain) == list(range(min(chain), max(chain) + 1))
        assert len(chain) >= len(first) + 8
        assert relay.metric("eth_client_blocks_enqueued_total") == len(chain), "a block sent twice"
        assert relay.metric("eth_client_heads_received_total", source="push") >= 8
        assert relay.reorgs() == []
    finally:
        relay.stop()


@pytest.mark.parametrize("depth", [1, 3, 10])
def test_anvil_reorg_ends_on_the_nodes_chain(tmp_path: Path, on_demand: Anvil, depth: int) -> None:
    """anvil_reorg of depth 1, 3, 10: one reorg record of that depth, and the node's chain."""
    on_demand.mine(15)
    relay = heads(tmp_path, on_demand)
    try:
        relay.wait_canonical()
        on_demand.mine(depth + 2)  # the client holds more than the reorg replaces
        relay.wait_canonical()
        before = on_demand.head()
        on_demand.rpc("anvil_reorg", depth, [])
        on_demand.mine(1)
        chain = relay.wait_canonical(head=before + 1)
        assert relay.reorgs() == [(before - depth, depth, 0)]
        orphaned = relay.query(
            "SELECT COUNT(*) FROM ethereum_data WHERE canonical = 0 AND chain_id = ?", CHAIN
        )
        assert orphaned == [(depth,)]
        assert len(chain) == len(set(chain.values()))
    finally:
        relay.stop()


def test_reorg_below_finality_is_an_alarm(tmp_path: Path) -> None:
    """--slots-in-an-epoch 1 (finalized = head - 2): a reorg of 5 rewrites finality; flagged."""
    node = Anvil(block_time=None, extra=["--slots-in-an-epoch", "1"])
    node.start()
    try:
        node.mine(20)
        relay = heads(tmp_path, node)
        try:
            relay.wait_canonical()
            node.mine(8)
            relay.wait_canonical()
            wait_until(
                lambda: (
                    relay.query("SELECT finalized_number FROM chains WHERE chain_id = ?", CHAIN)
                    == [(node.head() - 2,)]
                ),
                30,
                what="the finalized block on the server",
            )
            node.rpc("anvil_reorg", 5, [])
            relay.wait_canonical()
            assert relay.reorgs() == [(node.head() - 5, 5, 1)]
            assert relay.metric("eth_client_finality_violations_total", kind="reorg") == 1
            assert "FINALITY VIOLATION" in relay.client.log_tail(200)
        finally:
            relay.stop()
    finally:
        node.stop()


def test_anvil_rollback_is_followed(tmp_path: Path, on_demand: Anvil) -> None:
    """The head goes back without any push: the blocks above are orphaned, then replaced."""
    on_demand.mine(15)
    relay = heads(tmp_path, on_demand)
    try:
        relay.wait_canonical()
        on_demand.mine(5)
        relay.wait_canonical()
        top = on_demand.head()
        on_demand.rpc("anvil_rollback", 3)
        chain = relay.wait_canonical(head=top - 3)
        assert max(chain) == top - 3
        assert relay.reorgs() == [(top - 3, 3, 0)]
        on_demand.mine(4)
        relay.wait_canonical(head=top + 1)
    finally:
        relay.stop()


def test_burst_of_fifty(tmp_path: Path, on_demand: Anvil) -> None:
    """anvil_mine 50: fifty pushes back to back, every block once, in order."""
    relay = heads(tmp_path, on_demand)
    try:
        relay.wait_canonical()
        on_demand.mine(50)
        relay.each_block_once()
    finally:
        relay.stop()


def test_quiet_chain_raises_nothing(tmp_path: Path, on_demand: Anvil) -> None:
    """No blocks for many stall thresholds: the watchdog looks, finds the polled head still, acts not."""
    relay = heads(tmp_path, on_demand, "--stall-after", "1")
    try:
        relay.wait_canonical()
        wait_until(lambda: relay.metric("eth_client_watchdog_checks_total") >= 4, 30, what="checks")
        assert relay.metric("eth_client_subscription_stalls_total") == 0
        assert relay.metric("eth_client_ws_reconnects_total") == 0
        on_demand.mine(1)
        relay.wait_canonical()
    finally:
        relay.stop()


def test_node_restarted_with_state_on_the_same_port(tmp_path: Path) -> None:
    """anvil stopped and started again with --state: reconnected, resubscribed, nothing missed."""
    node = Anvil(block_time=None, extra=["--state", str(tmp_path / "anvil-state.json")])
    node.start()
    try:
        node.mine(10)
        relay = heads(tmp_path, node)
        try:
            relay.wait_canonical()
            node.stop()
            time.sleep(1.5)
            node.start()
            node.mine(5)
            chain = relay.wait_canonical()
            assert sorted(chain) == list(range(min(chain), max(chain) + 1))
            wait_until(
                lambda: relay.metric("eth_client_ws_reconnects_total") >= 1, 30, what="reconnect"
            )
        finally:
            relay.stop()
    finally:
        node.stop()


def test_silent_subscription_is_found_and_healed(tmp_path: Path, anvil: Anvil) -> None:
    """A relay drops every eth_subscription frame but answers requests: stall, heal, nothing lost."""
    ws = WSRelay(anvil.port).start()
    relay = heads(tmp_path, anvil, "--stall-after", "3", rpc=[ws.url])
    try:
        relay.wait_canonical()
        ws.drop_subscriptions = True
        wait_until(
            lambda: relay.metric("eth_client_subscription_stalls_total", action="resubscribe") >= 1,
            40,
            what="the watchdog to find the silent subscription",
        )
        relay.wait_canonical()  # the poll carried the blocks meanwhile
        ws.drop_subscriptions = False
        pushed = relay.metric("eth_client_heads_received_total", source="push")
        wait_until(
            lambda: relay.metric("eth_client_heads_received_total", source="push") > pushed + 2,
            40,
            what="pushes again",
        )
        relay.each_block_once()
    finally:
        relay.stop()
        ws.stop()


def test_tcp_path_cut_mid_burst(tmp_path: Path, on_demand: Anvil) -> None:
    """The TCP path to the node is cut while 50 blocks are mined: reconnected, nothing missed."""
    ws = WSRelay(on_demand.port).start()
    relay = heads(tmp_path, on_demand, rpc=[ws.url])
    try:
        relay.wait_canonical()
        burst = threading.Thread(target=on_demand.mine, args=(50,))
        burst.start()
        time.sleep(0.02)
        ws.cut()
        burst.join(30)
        time.sleep(1.0)
        ws.heal()
        relay.each_block_once()
    finally:
        relay.stop()
        ws.stop()


def test_two_chains_into_one_server(tmp_path: Path, on_demand: Anvil) -> None:
    """One client per chain into one server: each chain's canonical chain is its node's."""
    other = Anvil(block_time=None, chain_id=31338)
    other.start()
    relay = heads(tmp_path, on_demand)
    second = relay.client_for([other.ws_url], "-2")
    second.start()
    try:
        on_demand.mine(4)
        other.mine(7)

        def both() -> bool:
            mine = relay.canonical()
            theirs = {
                int(n): str(h)
                for n, h in relay.query(
                    "SELECT block_number, block_hash FROM ethereum_data "
                    "WHERE kind = 'block' AND canonical = 1 AND chain_id = 31338"
                )
            }
            return (
                bool(mine and theirs)
                and mine == on_demand.chain(min(mine), on_demand.head())
                and theirs == other.chain(min(theirs), other.head())
            )

        wait_until(both, 45, interval=0.25, what="both chains canonical on the server")
        assert on_demand.block(3)["hash"] != other.block(3)["hash"]
    finally:
        second.stop()
        relay.stop()
        other.stop()
