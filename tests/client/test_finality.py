"""FinalityTracker on a Clock: tag and depth modes, records, never backwards, violations."""

from __future__ import annotations

import json
from typing import Any

import pytest

from eth_twisted.client.finality import FinalitySettings, FinalityTracker
from tests.support.rpc import Rig


def tracked(finality: str = "tag", fmt: str = "json", **rig: Any) -> tuple[Rig, FinalityTracker]:
    r = Rig(format=fmt, interval=5.0, **rig)
    tracker = FinalityTracker(
        r.rpc,
        r.poller.pipeline,
        FinalitySettings(finality=finality, finality_interval=5.0),
        fmt=fmt,
        clock=r.clock,
        metrics=r.metrics,
    )
    r.start()
    tracker.startService()
    return r, tracker


def records(rig: Rig) -> list[dict[str, Any]]:
    return [json.loads(p) for p, n in rig.outbox.log if n is None]


def test_tag_mode_sends_a_record_when_finality_moves() -> None:
    """The node's finalized and safe blocks become one record; an unchanged finality sends none."""
    rig, tracker = tracked()
    rig.tick()
    assert records(rig) == [
        {
            "kind": "finalized",
            "chain_id": 1337,
            "block_number": 36,
            "block_hash": rig.node.block(36)["hash"],
            "safe_number": 68,
            "safe_hash": rig.node.block(68)["hash"],
        }
    ]
    rig.tick()
    assert len(records(rig)) == 1
    rig.node.mine(1)
    rig.tick()
    assert [r["block_number"] for r in records(rig)] == [36, 37]
    assert rig.metrics.registry.get_sample_value("eth_client_finalized_block") == 37
    assert tracker.status()["finalized"] == {"number": 37, "hash": rig.node.block(37)["hash"]}


def test_finality_never_goes_backwards() -> None:
    """A finalized block below the last one (another endpoint, an earlier moment) is ignored."""
    rig, tracker = tracked()
    rig.tick()
    rig.node.finalized_depth = 70
    rig.tick()
    assert [r["block_number"] for r in records(rig)] == [36]
    assert tracker.finalized == (36, rig.node.block(36)["hash"])


def test_changed_hash_at_finalized_height_is_a_violation() -> None:
    """A reorg deep enough to replace the finalized block: followed, and an alarm twice over."""
    rig, tracker = tracked()
    rig.node.mine(80)
    rig.tick()  # holds 100..180, finalized 116
    assert tracker.finalized == (116, rig.node.block(116)["hash"])
    rig.node.reorg(70)  # replaces 111..180, the finalized 116 among them
    rig.tick()
    rig.tick()
    reorg = next(r for r in records(rig) if r.get("kind") == "reorg")
    assert (reorg["fork_number"], reorg["depth"]) == (110, 70)
    assert rig.outbox.cursor() == rig.cursor_at(180)
    sample = rig.metrics.registry.get_sample_value
    assert sample("eth_client_finality_violations_total", {"kind": "reorg"}) == 1
    assert sample("eth_client_finality_violations_total", {"kind": "finalized-hash"}) == 1
    assert rig.poller.pipeline.violations == 1 and tracker.violations == 1


def test_depth_mode_uses_the_held_chain() -> None:
    """depth:N finalizes the held block N below the tip, with no safe block."""
    rig, _ = tracked("depth:3")
    rig.node.mine(5)
    rig.tick()
    assert records(rig)[-1]["block_number"] == 102
    assert records(rig)[-1]["safe_number"] is None


def test_html_tracks_finality_without_records() -> None:
    """With html payloads finality is followed (metrics, alarms) but no record is sent."""
    rig, tracker = tracked(fmt="html")
    rig.tick()
    assert tracker.finalized is not None
    assert records(rig) == []


def test_finalized_ahead_of_the_tip_waits() -> None:
    """A finalized block above the held tip (tag and head from different moments) waits."""
    rig, tracker = tracked()
    rig.node.finalized_depth = 0
    rig.node.mine(3)  # the pipeline still holds 100 until the next poll
    tracker.tick()
    assert tracker.finalized is None


def test_restored_after_restart() -> None:
    """The last finalized block is kept in the outbox: a restart does not send it again."""
    rig, tracker = tracked()
    rig.tick()
    again = FinalityTracker(
        rig.rpc, rig.poller.pipeline, FinalitySettings(), fmt="json", clock=rig.clock
    )
    again.startService()
    assert again.finalized == tracker.finalized


@pytest.mark.parametrize(
    "value, named",
    [("maybe", "--finality"), ("depth:x", "--finality"), ("depth:-1", "--finality")],
)
def test_settings_name_the_option(value: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        FinalitySettings(finality=value).check()
