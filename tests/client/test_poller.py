"""BlockPoller on a Clock, with a fake node through RequestTraversalAgent and a MemoryOutbox."""

from __future__ import annotations

import json
from typing import Any

import pytest

from eth_twisted.client.outbox import Cursor
from eth_twisted.client.poller import PollSettings
from eth_twisted.errors import OutboxFull
from eth_twisted.link.payload import render
from eth_twisted.testing import FakeEthereumNode, MemoryOutbox
from tests.support.rpc import Rig, lag_keeping_blocks


def test_first_poll_enqueues_current_head() -> None:
    """With no cursor the first poll enqueues the head block itself and moves the cursor there."""
    rig = Rig(height=100).start()
    assert rig.numbers() == [100]
    cursor = rig.outbox.cursor()
    assert cursor == rig.cursor_at(100)
    assert rig.woken == 1
    assert rig.poller.last_success == rig.clock.seconds()


def test_cadence_one_poll_per_interval() -> None:
    """Polls happen at start and then once per interval, on the injected clock."""
    rig = Rig(interval=5.0).start()
    heads = lambda: sum(1 for m, _ in rig.node.requests if m == "eth_blockNumber")  # noqa: E731
    assert heads() == 1
    rig.clock.advance(4.9)
    assert heads() == 1
    rig.clock.advance(0.1)
    assert heads() == 2
    rig.clock.advance(5)
    rig.clock.advance(5)
    assert heads() == 4


def test_no_head_movement_nothing_enqueued() -> None:
    """A head that does not move enqueues nothing (the seed's behaviour) and counts an idle poll."""
    rig = Rig().start()
    rig.tick()
    rig.tick()
    assert rig.numbers() == [100]
    assert rig.polls("idle") == 2
    assert rig.woken == 1


@pytest.mark.parametrize("fmt", ["html", "json"])
def test_new_blocks_in_order_with_exact_payloads(fmt: str) -> None:
    """Head moving N -> N+3 enqueues N+1..N+3 in order, bytes equal to payload.render of the node's blocks."""
    rig = Rig(format=fmt).start()
    rig.node.mine(3)
    rig.tick()
    assert rig.numbers() == [100, 101, 102, 103]
    expected = [render(fmt, rig.node.block(n), 1337) for n in (100, 101, 102, 103)]
    assert [p for p, _ in rig.outbox.log] == expected
    assert rig.outbox.cursor() == rig.cursor_at(103)


def test_backfill_walks_gap_over_several_polls() -> None:
    """300 new blocks with max_backfill 128 arrive over three polls, contiguous, none twice."""
    rig = Rig(max_backfill=128).start()
    rig.node.mine(300)
    rig.tick()
    assert rig.numbers()[-1] == 228
    rig.tick()
    assert rig.numbers()[-1] == 356
    rig.tick()
    assert rig.numbers() == list(range(100, 401))
    assert rig.metrics.registry.get_sample_value("eth_client_blocks_enqueued_total") == 301
    assert rig.metrics.registry.get_sample_value("eth_client_cursor_block") == 400


def test_outbox_bound_limits_and_full_stops_advancing() -> None:
    """The outbox bound limits a fetch; a full outbox stops advancing, counted, until space frees."""
    rig = Rig(outbox=MemoryOutbox(max_outbox=5)).start()
    rig.node.mine(10)
    rig.tick()
    assert rig.numbers() == [100, 101, 102, 103, 104]
    rig.tick()
    assert rig.numbers() == [100, 101, 102, 103, 104]
    assert rig.polls("outbox-full") == 1
    assert rig.metrics.registry.get_sample_value("eth_client_outbox_full_total") == 1
    assert rig.outbox.cursor().block_number == 104
    rig.outbox.ack_all()
    rig.tick()
    assert rig.numbers() == list(range(100, 110))


def test_outbox_full_on_append_does_not_advance() -> None:
    """OutboxFull raised by append leaves the cursor where it was; the next poll enqueues the blocks."""
    rig = Rig().start()
    rig.node.mine(2)
    rig.outbox.fail_with = OutboxFull("full")
    rig.tick()
    assert rig.outbox.cursor().block_number == 100
    assert rig.polls("outbox-full") == 1
    rig.tick()
    assert rig.numbers() == [100, 101, 102]


def test_max_gap_skip_recorded() -> None:
    """Past max_gap the poller skips to the last min(max_gap, max_backfill) blocks.

    It records and counts the gap.
    """
    rig = Rig(max_gap=50, max_backfill=128).start()
    rig.node.mine(1000)
    rig.tick()
    assert rig.numbers() == [100] + list(range(1051, 1101))
    assert [g[:2] for g in rig.outbox.gaps] == [(101, 1050)]
    assert "max-gap" in rig.outbox.gaps[0][2]
    assert rig.metrics.registry.get_sample_value("eth_client_gap_blocks_skipped_total") == 950
    rig.node.mine(3)
    rig.tick()
    assert rig.numbers()[-3:] == [1101, 1102, 1103]
    assert len(rig.outbox.gaps) == 1


def test_gap_within_max_gap_is_not_skipped() -> None:
    """A gap no larger than max_gap is walked, never skipped."""
    rig = Rig(max_gap=300, max_backfill=128).start()
    rig.node.mine(300)
    for _ in range(3):
        rig.tick()
    assert rig.numbers() == list(range(100, 401))
    assert rig.outbox.gaps == []


def test_max_gap_zero_follows_head() -> None:
    """max_gap 0 enqueues only the head block each poll, recording what it skipped."""
    rig = Rig(max_gap=0).start()
    rig.node.mine(5)
    rig.tick()
    assert rig.numbers() == [100, 105]
    assert [g[:2] for g in rig.outbox.gaps] == [(101, 104)]


@pytest.mark.parametrize(
    "mode, kind",
    [
        ("garbage", "bad-json"),
        ("html", "bad-json"),
        ("truncated", "bad-json"),
        ("rpc-error", "rpc-error"),
        ("http-5xx", "http-5xx"),
        ("wrong-id", "bad-envelope"),
    ],
)
def test_loop_survives_rpc_failures(mode: str, kind: str) -> None:
    """A failing head poll is logged and counted, the loop keeps running, and blocks arrive afterwards."""
    rig = Rig().start()
    rig.node.fail(mode, method="eth_blockNumber")
    rig.node.mine(1)
    rig.tick()
    assert rig.polls(kind) == 1
    assert rig.numbers() == [100]
    rig.clock.advance(60)
    assert rig.numbers() == [100, 101]
    assert rig.poller._loop is not None and rig.poller._loop.running


def test_loop_survives_unexpected_exception() -> None:
    """A bug-like exception (outbox append raising RuntimeError) is logged, counted, and the loop goes on."""
    rig = Rig().start()
    rig.node.mine(1)
    rig.outbox.fail_with = RuntimeError("disk on fire")
    rig.tick()
    assert rig.polls("error") == 1
    rig.tick()
    assert rig.numbers() == [100, 101]


def test_null_head_block_enqueues_the_rest_then_retries() -> None:
    """A null block at the head (node behind itself) stops the fetch there; nothing is skipped."""
    rig = Rig().start()
    rig.node.mine(3)
    real = rig.node.answer

    def lagging(method: str, params: list[Any]) -> Any:
        if method == "eth_getBlockByNumber" and params[0] == hex(103):
            return None, None
        return real(method, params)

    rig.node.answer = lagging  # type: ignore[method-assign]
    rig.tick()
    assert rig.numbers() == [100, 101, 102]
    assert rig.polls("null-result") == 1
    rig.node.answer = real  # type: ignore[method-assign]
    rig.tick()
    assert rig.numbers() == [100, 101, 102, 103]


def test_no_overlap_while_a_tick_is_slow() -> None:
    """A tick stalled on a slow answer is not overlapped: no new poll starts until it ends."""
    rig = Rig(interval=1.0, rpc_timeout=10.0).start()
    rig.node.fail("stall-headers", method="eth_blockNumber")
    rig.tick()
    heads = lambda: sum(1 for m, _ in rig.node.requests if m == "eth_blockNumber")  # noqa: E731
    assert heads() == 2
    for _ in range(8):
        rig.clock.advance(1.0)
        assert heads() == 2
    rig.clock.advance(2.5)  # the call's timeout fires; the loop resumes on its schedule
    assert rig.polls("timeout") == 1
    rig.node.mine(1)
    rig.clock.advance(1.0)
    assert rig.numbers() == [100, 101]


def test_tick_deadline_cancels_and_loop_goes_on() -> None:
    """A tick over its own deadline is cancelled and counted; later polls proceed."""
    rig = Rig(interval=1.0, rpc_timeout=100.0, tick_timeout=5.0).start()
    rig.node.fail("stall-body", method="eth_blockNumber")
    rig.tick()
    rig.stub.flush()
    rig.clock.advance(5.0)
    assert rig.polls("tick-timeout") == 1
    rig.node.mine(1)
    rig.clock.advance(1.0)
    assert rig.numbers() == [100, 101]


def test_parent_mismatch_does_not_advance() -> None:
    """A block not naming the cursor's block as parent is not enqueued; it is retried next poll.

    That is a node out of step.
    """
    rig = Rig().start()
    rig.node.mine(2)
    good_parent = rig.node.blocks[101]["parentHash"]
    rig.node.blocks[101]["parentHash"] = "0x" + "ee" * 32
    rig.tick()
    assert rig.numbers() == [100]
    assert rig.outbox.cursor().block_number == 100
    assert rig.polls("reorg") == 1
    rig.node.blocks[101]["parentHash"] = good_parent
    rig.tick()
    assert rig.numbers() == [100, 101, 102]


def test_reorg_rewinds_to_common_ancestor() -> None:
    """A reorg replacing enqueued blocks sends a reorg record, then the canonical blocks again.

    The record names the fork point and the old and new hashes; then the poller goes on.
    """
    rig = Rig(format="json").start()
    rig.node.mine(5)
    rig.tick()
    old = [rig.node.block(n)["hash"] for n in (103, 104, 105)]
    rig.node.reorg(3)  # 103, 104, 105 replaced
    rig.node.mine(1)
    rig.tick()
    assert rig.numbers() == [100, 101, 102, 103, 104, 105, None, 103, 104, 105, 106]
    assert rig.outbox.cursor() == rig.cursor_at(106)
    record = json.loads(rig.outbox.log[6][0])
    assert record == {
        "kind": "reorg",
        "chain_id": 1337,
        "fork_number": 102,
        "depth": 3,
        "old_hashes": old,
        "new_hashes": [rig.node.block(n)["hash"] for n in (103, 104, 105, 106)],
        "detected_at": int(rig.clock.seconds()),
    }
    assert [p for p, _ in rig.outbox.log[-4:]] == [
        render("json", rig.node.block(n), 1337) for n in range(103, 107)
    ]
    assert rig.metrics.registry.get_sample_value("eth_client_reorgs_total") == 1
    rig.node.mine(1)
    rig.tick()
    assert rig.numbers()[-1] == 107


def test_reorg_in_html_sends_the_blocks_again_without_a_record() -> None:
    """With html payloads a reorg re-sends the replaced heights (no record: html has no kinds)."""
    rig = Rig(format="html").start()
    rig.node.mine(3)
    rig.tick()
    rig.node.reorg(2)
    rig.tick()
    assert rig.numbers() == [100, 101, 102, 103, 102, 103]


def test_chain_mismatch_with_cursor_is_fatal() -> None:
    """A stored cursor from another chain calls fatal with a message naming --reset-cursor.

    Nothing is enqueued.
    """
    outbox = MemoryOutbox(initial_cursor=Cursor(1337, "0x" + "ab" * 32, 90, "0x" + "cd" * 32))
    rig = Rig(outbox=outbox).start()
    assert len(rig.fatal) == 1 and "--reset-cursor" in rig.fatal[0]
    assert rig.outbox.log == []
    assert rig.polls("chain-mismatch") == 1
    rig.tick()
    assert len(rig.fatal) == 1


def test_chain_id_mismatch_is_fatal() -> None:
    """--chain-id differing from the node's is fatal."""
    rig = Rig(chain_id=1).start()
    assert rig.fatal and "--chain-id" in rig.fatal[0]


@pytest.mark.parametrize(
    "bad, named",
    [
        ({"format": "xml"}, "--format"),
        ({"interval": 0.0}, "--interval"),
        ({"max_backfill": 0}, "--max-backfill"),
        ({"max_gap": -1}, "--max-gap"),
        ({"parallel": 0}, "parallel"),
    ],
)
def test_settings_check_names_the_option(bad: dict[str, Any], named: str) -> None:
    """PollSettings.check() names the option of a bad value; the poller refuses such settings."""
    settings = PollSettings(**bad)
    with pytest.raises(ValueError, match=named):
        settings.check()
    with pytest.raises(ValueError, match=named):
        Rig(**bad)
    PollSettings(max_gap=0).check()  # 0 follows the head only


def test_resume_from_stored_cursor() -> None:
    """A stored cursor on the same chain resumes right after it, checking the parent hash."""
    probe = FakeEthereumNode(height=100)
    cursor = Cursor(probe.chain_id, probe.genesis_hash, 95, probe.block(95)["hash"])
    rig = Rig(outbox=MemoryOutbox(initial_cursor=cursor)).start()
    assert rig.numbers() == [96, 97, 98, 99, 100]
    assert rig.fatal == []


def test_node_restarted_on_new_chain_is_fatal() -> None:
    """A node that drops and comes back as a new chain stops the poller with the --reset-cursor message."""
    rig = Rig().start()
    rig.node.fail("drop", times=2)
    rig.tick()
    rig.node.reset(height=200)
    rig.tick()
    assert rig.fatal and "--reset-cursor" in rig.fatal[0]
    assert rig.numbers() == [100]


def test_head_below_cursor_enqueues_nothing() -> None:
    """A head below the cursor from a node that still has the held blocks is 'behind': nothing moves."""
    rig = Rig().start()
    lag_keeping_blocks(rig.node, 2)  # reports 98 but still serves block 100 by hash
    rig.tick()  # went backwards versus its own previous answer: not trusted
    rig.tick()  # trusted again, but below the cursor
    assert rig.polls("went-backwards") == 1
    assert rig.polls("behind") == 1
    assert rig.numbers() == [100]
    assert rig.outbox.cursor() == rig.cursor_at(100)
    assert rig.fatal == []


def test_rollback_without_push_orphans_the_blocks_above() -> None:
    """A chain that went back (the held tip is gone, as after anvil_rollback) is a reorg record.

    Its old hashes are the blocks above the new head and it names no new ones; the cursor
    goes back, and the next block at a held height is a replacement.
    """
    rig = Rig(format="json").start()
    rig.node.mine(3)
    rig.tick()
    gone = [rig.node.block(n)["hash"] for n in (102, 103)]
    rig.node.rollback(2)
    rig.tick()  # went backwards: not trusted this round
    rig.tick()
    rig.tick()
    assert rig.polls("behind") == 2, "a lagging node looks the same for a moment"
    assert rig.numbers() == [100, 101, 102, 103]
    rig.tick()
    assert rig.polls("reorg") == 1
    record = json.loads(rig.outbox.log[-1][0])
    assert (record["fork_number"], record["old_hashes"], record["new_hashes"]) == (101, gone, [])
    assert rig.outbox.cursor() == rig.cursor_at(101)
    rig.node.mine(1)
    rig.tick()
    assert rig.numbers()[-1] == 102
    assert rig.outbox.log[-1][0] == render("json", rig.node.block(102), 1337)


def test_stop_service_cancels_in_flight_tick() -> None:
    """stopService cancels a stalled tick and fires; no poll runs afterwards."""
    rig = Rig(interval=1.0).start()
    rig.node.fail("stall-headers", method="eth_blockNumber")
    rig.tick()
    fired: list[Any] = []
    asked = len(rig.node.requests)
    rig.poller.stopService().addBoth(fired.append)
    assert fired == [None]
    assert len(rig.node.requests) == asked, "a cancelled call must not be retried"
    failures = [
        s for s in rig.metrics.rpc_failures.collect()[0].samples if s.name.endswith("_total")
    ]
    assert failures == [], "a cancellation is not the endpoint's failure"
    rig.clock.advance(30)
    assert len(rig.node.requests) == asked


def test_chain_verified_again_after_failed_poll() -> None:
    """After a poll in which no endpoint answered, the next poll verifies the chain again first."""
    rig = Rig().start()
    checks = lambda: sum(1 for m, _ in rig.node.requests if m == "eth_chainId")  # noqa: E731
    assert checks() == 1
    rig.node.fail("http-5xx", method="eth_blockNumber")
    rig.tick()
    rig.clock.advance(30)
    assert checks() == 2
    assert rig.fatal == []


def test_new_chain_behind_5xx_proxy_is_fatal_not_a_reorg() -> None:
    """A node replaced by a taller, different chain (no transport failure seen) is fatal, never mixed in."""
    rig = Rig(format="json").start()
    rig.node.reset(height=150)
    rig.tick()
    assert rig.fatal and "--reset-cursor" in rig.fatal[0]
    assert rig.numbers() == [100]


def test_blocks_back_after_a_rollback_are_named_canonical_again() -> None:
    """A 'rollback' that was a node far behind: the same blocks come back with a reorg record.

    The record has no old hashes and names the returning blocks, so the server's
    canonical chain is the node's again.
    """
    rig = Rig(format="json").start()
    rig.node.mine(2)
    rig.tick()
    hidden = [rig.node.block(n)["hash"] for n in (101, 102)]
    rig.node.set_lag(2)  # the node knows nothing above 100 for a while
    for _ in range(4):
        rig.tick()
    assert json.loads(rig.outbox.log[-1][0])["old_hashes"] == hidden
    rig.node.set_lag(0)
    rig.tick()
    back = json.loads(rig.outbox.log[-3][0])
    assert (back["fork_number"], back["old_hashes"], back["new_hashes"]) == (100, [], hidden)
    assert rig.outbox.cursor() == rig.cursor_at(102)


def test_reorg_while_stopped_is_found_after_a_restart(tmp_path: Any) -> None:
    """The outbox remembers the recent canonical chain: a reorg during downtime has its fork point.

    A fresh poller on the same outbox file finds the fork 5 blocks down and sends a reorg
    record naming exactly the blocks that were replaced.
    """
    from eth_twisted.client.outbox import OutboxSettings, open_outbox
    from eth_twisted.client.poller import BlockPoller

    outbox = open_outbox(OutboxSettings(spool=str(tmp_path / "spool.sqlite3")))
    try:
        rig = Rig(format="json", outbox=outbox).start()
        rig.node.mine(10)
        rig.tick()
        old = [rig.node.block(n)["hash"] for n in range(106, 111)]
        rig.poller.stopService()
        assert outbox.recent_blocks(3) == list(zip((108, 109, 110), old[2:], strict=True))
        rig.node.reorg(5)
        again = BlockPoller(
            rig.rpc, outbox, PollSettings(format="json"), clock=rig.clock, metrics=rig.metrics
        )
        again.startService()
        record = json.loads(outbox.pending(100)[11].payload)
        assert (record["kind"], record["fork_number"], record["old_hashes"]) == (
            "reorg",
            105,
            old,
        )
        assert outbox.cursor() == rig.cursor_at(110)
        again.stopService()
    finally:
        outbox.close()
