"""BlockPoller against a real anvil dev node over real HTTP (treq), on the real reactor."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import reactor

from eth_twisted.client.endpoints import RPCSettings
from eth_twisted.client.poller import BlockPoller, PollSettings
from eth_twisted.client.rpc import RPCClient
from eth_twisted.metrics import ClientMetrics
from eth_twisted.testing import MemoryOutbox
from tests.support import Anvil, async_wait_until

pytestmark = [pytest.mark.live, pytest.mark.slow]


class Live:
    """A poller on the real reactor against ``anvil``, feeding a MemoryOutbox."""

    def __init__(self, anvil: Anvil, **settings: Any) -> None:
        self.anvil = anvil
        self.outbox = MemoryOutbox()
        self.fatal: list[str] = []
        self.metrics = ClientMetrics(CollectorRegistry())
        self.rpc = RPCClient(
            RPCSettings(rpc=(anvil.url,), rpc_timeout=5.0), clock=reactor, metrics=self.metrics
        )
        settings.setdefault("interval", 1.0)
        self.poller = BlockPoller(
            self.rpc,
            self.outbox,
            PollSettings(**settings),
            clock=reactor,
            metrics=self.metrics,
            fatal=self.fatal.append,
        )

    def numbers(self) -> list[int]:
        return [n for n in self.outbox.logged_numbers() if n is not None]

    def cursor_number(self) -> int:
        cursor = self.outbox.cursor()
        return -1 if cursor is None else cursor.block_number

    def assert_contiguous_once(self) -> None:
        numbers = self.numbers()
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "gap or duplicate"


@pytest.fixture
def live(anvil: Anvil) -> Iterator[Live]:
    rig = Live(anvil)
    rig.poller.startService()
    yield rig
    if rig.poller.running:
        pytest_twisted.blockon(rig.poller.stopService())


@pytest_twisted.inlineCallbacks
def test_every_mined_block_enqueued_once_in_order(live: Live) -> Any:
    """Over several seconds of 1 s blocks, every block is enqueued exactly once.

    The blocks are contiguous, up to the head.
    """
    yield async_wait_until(lambda: len(live.numbers()) >= 6, timeout=20, what="six blocks")
    target = live.anvil.head()
    yield async_wait_until(lambda: live.cursor_number() >= target, timeout=10, what="the head")
    live.assert_contiguous_once()
    cursor = live.outbox.cursor()
    assert cursor is not None
    assert (
        cursor.block_hash
        == live.anvil.rpc("eth_getBlockByNumber", hex(cursor.block_number), False)["hash"]
    )
    assert live.fatal == []


@pytest_twisted.inlineCallbacks
def test_mining_300_at_once_arrives_over_several_polls(live: Live) -> Any:
    """anvil_mine of 300 blocks arrives completely over several polls of at most max_backfill (128)."""
    yield async_wait_until(
        lambda: live.outbox.cursor() is not None, timeout=10, what="a first block"
    )
    appends_before = len(live.outbox.cursors)
    live.anvil.mine(300)
    target = live.anvil.head()
    yield async_wait_until(lambda: live.cursor_number() >= target, timeout=30, what="300 blocks")
    live.assert_contiguous_once()
    sizes = [
        b.block_number - a.block_number
        for a, b in pairwise(live.outbox.cursors[appends_before - 1 :])
    ]
    assert max(sizes) <= 128
    assert sum(1 for s in sizes if s > 1) >= 3, f"expected several big appends, got {sizes}"


@pytest_twisted.inlineCallbacks
def test_anvil_reorg_crashes_nothing(anvil: Anvil) -> Any:
    """anvil_reorg replacing enqueued blocks crashes nothing; the poller follows the new chain (json)."""
    rig = Live(anvil, format="json")
    rig.poller.startService()
    try:
        yield async_wait_until(lambda: len(rig.numbers()) >= 4, timeout=20, what="four blocks")
        target = anvil.head()
        yield async_wait_until(lambda: rig.cursor_number() >= target, timeout=10, what="the head")
        anvil.rpc("anvil_reorg", 3, [])
        after = anvil.head() + 2

        def on_canonical_chain() -> bool:
            cursor = rig.outbox.cursor()
            if cursor is None or cursor.block_number < after:
                return False
            block = anvil.rpc("eth_getBlockByNumber", hex(cursor.block_number), False)
            return bool(block and block["hash"] == cursor.block_hash)

        yield async_wait_until(
            on_canonical_chain, timeout=20, what="the cursor on the reorganised chain"
        )
        assert rig.fatal == []
        assert rig.poller._loop is not None and rig.poller._loop.running
        assert (
            rig.metrics.registry.get_sample_value("eth_client_polls_total", {"result": "error"})
            is None
        )
    finally:
        yield rig.poller.stopService()


@pytest_twisted.inlineCallbacks
def test_anvil_restarted_from_scratch_is_fatal(anvil: Anvil) -> Any:
    """anvil restarted as a new chain on the same port makes the poller call fatal naming --reset-cursor."""
    rig = Live(anvil)
    rig.poller.startService()
    try:
        yield async_wait_until(lambda: len(rig.numbers()) >= 3, timeout=20, what="three blocks")
        before = list(rig.numbers())
        anvil.stop()
        anvil.start()
        yield async_wait_until(lambda: rig.fatal, timeout=30, what="fatal to be called")
        assert "--reset-cursor" in rig.fatal[0]
        assert "changed chains" in rig.fatal[0] or "stored cursor" in rig.fatal[0]
        assert rig.numbers()[: len(before)] == before
        rig.assert_contiguous_once()
    finally:
        yield rig.poller.stopService()
