"""PushSource and its watchdog on a Clock: a fake socket pushes headers of a fake node."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer

from eth_twisted.client.push import PushSettings, PushSource, stall_threshold
from tests.support.rpc import Rig


class FakeSocket:
    """The NodeSocket surface PushSource uses, answering from a FakeEthereumNode."""

    label = "ws://node.example"

    def __init__(self, node: Any) -> None:
        self.node = node
        self.state = "down"
        self.last_push_at: float | None = None
        self.reconnects = 0
        self.resubscribes = 0
        self.actions: list[str] = []
        self.on_head: Any = None
        self.on_subscribed: Any = None

    @property
    def connected(self) -> bool:
        return self.state == "subscribed"

    def start(self) -> None:
        self.state = "subscribed"
        self.on_subscribed()

    def stop(self) -> defer.Deferred[None]:
        self.state = "down"
        return defer.succeed(None)

    def request(self, method: str, params: list[Any]) -> defer.Deferred[Any]:
        result, error = self.node.answer(method, params)
        assert error is None, error
        return defer.succeed(result)

    def push(self, number: int) -> None:
        self.on_head(self.node.block(number))

    def resubscribe(self) -> defer.Deferred[None]:
        self.actions.append("resubscribe")
        self.resubscribes += 1
        self.on_subscribed()
        return defer.succeed(None)

    def reconnect(self) -> None:
        self.actions.append("reconnect")
        self.reconnects += 1
        self.on_subscribed()  # reconnected at once


def rig_with_push(**settings: Any) -> tuple[Rig, FakeSocket, PushSource]:
    rig = Rig(format="json", interval=5.0).start()  # the poll enqueues the head (100)
    socket = FakeSocket(rig.node)
    source = PushSource(
        socket,
        rig.rpc.endpoints[0],
        rig.rpc,
        rig.poller.pipeline,
        clock=rig.clock,
        polled_head=lambda: rig.poller.last_head,
        settings=PushSettings(**settings),
        metrics=rig.metrics,
    )
    source.start()
    return rig, socket, source


def test_pushes_append_at_once_without_any_call() -> None:
    """A pushed header that extends the tip is appended from the header itself: no RPC call."""
    rig, socket, _ = rig_with_push()
    rig.node.mine(1)
    asked = len(rig.node.requests)
    socket.push(101)
    assert rig.numbers() == [100, 101]
    assert len(rig.node.requests) == asked
    assert (
        rig.outbox.log[-1][0]
        == json.dumps(
            {
                "block_hash": rig.node.block(101)["hash"],
                "block_number": 101,
                "chain_id": 1337,
                "parent_hash": rig.node.block(100)["hash"],
                "timestamp": int(rig.node.block(101)["timestamp"], 16),
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
    )


def test_duplicates_from_push_and_poll_are_sent_once() -> None:
    """The same block pushed twice and polled is one message."""
    rig, socket, _ = rig_with_push()
    rig.node.mine(2)
    socket.push(101)
    socket.push(101)
    rig.tick()
    socket.push(102)
    assert rig.numbers() == [100, 101, 102]
    dups = rig.metrics.registry.get_sample_value(
        "eth_client_heads_duplicate_total", {"source": "push"}
    )
    assert dups == 2


def test_gap_in_pushes_is_walked_by_parent_hash() -> None:
    """Only the newest of five blocks is pushed (geth's catch-up): the four before are fetched."""
    rig, socket, _ = rig_with_push()
    rig.node.mine(5)
    socket.push(105)
    assert rig.numbers() == [100, 101, 102, 103, 104, 105]
    assert rig.outbox.cursor() == rig.cursor_at(105)


def test_replacement_burst_is_one_reorg_record() -> None:
    """anvil_reorg pushes every replacement header: one record, then the new blocks in order."""
    rig, socket, _ = rig_with_push()
    rig.node.mine(5)
    socket.push(105)
    old = [rig.node.block(n)["hash"] for n in (103, 104, 105)]
    rig.node.reorg(3)
    for n in (103, 104, 105):
        socket.push(n)
    assert rig.numbers()[6:] == [None, 103, 104, 105]
    record = json.loads(rig.outbox.log[6][0])
    assert record["kind"] == "reorg" and record["fork_number"] == 102
    assert record["old_hashes"] == old
    assert record["new_hashes"] == [rig.node.block(103)["hash"]]  # the first push of the burst
    assert rig.outbox.cursor() == rig.cursor_at(105)


def test_only_the_new_head_after_a_reorg() -> None:
    """A node that pushes only the new head of a reorg (geth): walked back to the fork point."""
    rig, socket, _ = rig_with_push()
    rig.node.mine(5)
    socket.push(105)
    rig.node.reorg(3)
    rig.node.mine(1)
    socket.push(106)
    record = json.loads(rig.outbox.log[6][0])
    assert (record["fork_number"], record["depth"], len(record["new_hashes"])) == (102, 3, 4)
    assert rig.numbers()[7:] == [103, 104, 105, 106]


def test_pushes_before_the_sync_are_held_then_taken() -> None:
    """Pushes that arrive before the chain is checked after a subscribe wait, then go in order."""
    rig, socket, source = rig_with_push()
    rig.node.mine(3)
    source.synced = False
    socket.push(101)
    socket.push(102)
    assert rig.numbers() == [100]
    source.subscribed()
    assert rig.numbers() == [100, 101, 102, 103]  # the head fetched, the gap walked


def test_quiet_chain_raises_nothing() -> None:
    """No push for long, and the polled head has not moved either: no stall, no action."""
    rig, socket, source = rig_with_push(stall_after=30.0)
    for _ in range(40):
        rig.tick()  # 200 s without a block
    assert source.checks > 0
    assert socket.actions == []
    assert rig.metrics.registry.get_sample_value("eth_client_subscription_stalls_total") is None


def test_silent_subscription_escalates_resubscribe_reconnect_poll() -> None:
    """Pushes stop while the poll sees new blocks: resubscribe, then reconnect, then poll mode.

    Nothing is missed meanwhile (the poll carries the blocks), and the next push ends the
    poll mode.
    """
    rig, socket, source = rig_with_push(stall_after=30.0)
    rig.node.mine(1)
    socket.push(101)
    for _ in range(30):  # 150 s: the node mines every 5 s, the subscription says nothing
        rig.node.mine(1)
        rig.tick()
    assert socket.actions[:3] == ["resubscribe", "reconnect", "reconnect"]
    assert source.mode == "poll"
    assert rig.numbers() == list(range(100, 132))
    stalls = rig.metrics.registry.get_sample_value(
        "eth_client_subscription_stalls_total",
        {"endpoint": socket.label, "action": "resubscribe"},
    )
    assert stalls == 1
    rig.node.mine(1)
    socket.push(132)
    assert source.mode == "push"
    assert rig.numbers()[-1] == 132


def test_stall_threshold_follows_block_time() -> None:
    """clamp(30 x block time, 30 s, 5 min): 12 s blocks wait 5 min, 1 s blocks 30 s."""
    assert stall_threshold(12.0) == 300.0
    assert stall_threshold(2.0) == 60.0
    assert stall_threshold(0.25) == 30.0
    rig, socket, source = rig_with_push()
    assert source.stall_after == 300.0  # mainnet's 12 s until pushes say otherwise
    rig.node.block_time = 2
    for _ in range(4):
        rig.node.mine(1)
        socket.push(rig.node.head)
    assert source.block_time == 2.0  # the median step of the pushed timestamps
    assert source.stall_after == 60.0


def test_distrusted_endpoint_pushes_are_ignored() -> None:
    """Pushes of an endpoint the pool finds far ahead (or on another chain) are not followed."""
    rig, socket, source = rig_with_push()
    rig.node.mine(1)
    source.endpoint.distrust = "far-ahead"
    socket.push(101)
    assert rig.numbers() == [100]


def test_a_push_older_than_anything_held_is_ignored() -> None:
    """A push from before the first poll's block (held while syncing) is not a node out of step."""
    rig, socket, _ = rig_with_push()
    socket.push(99)
    assert rig.numbers() == [100]
    assert (
        rig.metrics.registry.get_sample_value(
            "eth_client_heads_duplicate_total", {"source": "push"}
        )
        == 1
    )
