"""Choosing the head and the chain by agreement: a lying endpoint among honest ones costs only itself."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from eth_twisted.client.agreement import agree
from eth_twisted.client.endpoints import AGREEMENT_MEMORY
from eth_twisted.errors import ChainMismatch
from tests.support.rpc import A, B, C, Lines, World, captured_lines, count, failure_of, result_of

HUGE = 2**63 - 1


@pytest.fixture
def lines() -> Iterator[Lines]:
    yield from captured_lines()


def state(world: World, label: str) -> str:
    """The eth_client_rpc_endpoint_state metric's current state for one endpoint."""
    from eth_twisted.client.endpoints import STATES

    for name in STATES:
        if (
            world.metrics.registry.get_sample_value(
                "eth_client_rpc_endpoint_state",
                {"endpoint": label, "eth_client_rpc_endpoint_state": name},
            )
            == 1
        ):
            return name
    raise AssertionError(f"no state for {label}")


@pytest.mark.parametrize(
    "heads, expected",
    [
        ([100], 100),
        ([100, 100], 100),
        ([100, 101], 100),  # a block only one endpoint has waits for a second
        ([100, 101, 101], 101),  # ...and is followed once two have it
        ([100, 2**255], 100),  # two that disagree: the lower
        ([2**255, 100], 100),
        ([100, 100, HUGE], 100),  # one liar among three
        ([100, 104, HUGE], 104),  # a liar does not move the median past the honest answers
        ([100, 200, 201], 200),  # the majority moved on; the laggard does not hold it back
        ([100, 101, 102, 106], 102),  # the lower median 101, its group 101..106
        ([100, 5000, 2**62], 5000),  # no two agree: the median
        ([100, 100, HUGE, HUGE - 1], 100),  # two colluding liars do not outvote two honest nodes
        ([100, HUGE, HUGE - 1], HUGE - 1),  # ...but a majority of them does (nothing can tell)
        ([94, 100, 99], 99),  # everyone close: the newest that two have reached
    ],
)
def test_agree_table(heads: list[int], expected: int) -> None:
    """agree() follows the median, up to the newest head within the threshold that two endpoints reached."""
    assert agree(heads, 5) == expected


def test_one_liar_among_three_is_distrusted(lines: Lines) -> None:
    """An endpoint claiming a head far ahead of the other two is far-ahead.

    It is not followed, it is counted, and it is logged in one line.
    """
    w = World(urls=[A, B, C])
    w.c.fabricate(2293)
    for _ in range(5):
        assert result_of(w.rpc.head_round()) == 100
        w.clock.advance(5)
    ep = w.rpc.endpoints[2]
    assert ep.distrust == "far-ahead" and not ep.trusted
    assert count(w.metrics, "http://c.example", "far-ahead") == 5
    assert state(w, "http://c.example") == "far-ahead"
    assert w.metrics.registry.get_sample_value("eth_client_rpc_agreed_head") == 100
    assert len(lines.matching("c.example", "far-ahead")) == 1


def test_far_ahead_endpoint_is_never_asked_for_blocks() -> None:
    """Blocks are fetched from trusted endpoints only: a far-ahead one is not asked even when they fail."""
    w = World(urls=[C, A, B])  # the liar first in the configured order
    w.c.fabricate(2293)
    assert result_of(w.rpc.head_round()) == 100
    block = result_of(w.rpc.get_block(100))
    assert block["hash"] == w.a.block(100)["hash"]
    w.a.fail("http-5xx", method="eth_getBlockByNumber", times=-1)
    w.b.fail("http-5xx", method="eth_getBlockByNumber", times=-1)
    assert failure_of(w.rpc.get_block(100)).kind == "http-5xx"
    assert failure_of(w.rpc.get_block(101)).kind == "http-5xx"
    asked = [p for m, p in w.c.requests if m == "eth_getBlockByNumber" and p[0] != "0x0"]
    assert asked == []


def test_two_endpoints_that_disagree_follow_the_lower() -> None:
    """With two endpoints far apart the lower head is followed and the higher is far-ahead."""
    w = World(urls=[A, B])
    w.b.fabricate(2293)
    assert result_of(w.rpc.head_round()) == 100
    assert w.rpc.endpoints[1].distrust == "far-ahead"
    assert w.rpc.endpoints[0].trusted


def test_single_endpoint_is_believed() -> None:
    """With one endpoint there is nothing to compare: its head is the head, even a big jump."""
    w = World(urls=[A])
    assert result_of(w.rpc.head_round()) == 100
    w.a.mine(300)
    assert result_of(w.rpc.head_round()) == 400


def test_a_block_or_two_ahead_is_normal() -> None:
    """Endpoints one and two blocks ahead are trusted; the newest head two of them reached is followed."""
    w = World(urls=[A, B, C])
    w.b.mine(2)
    w.c.mine(2)
    assert result_of(w.rpc.head_round()) == 102
    assert all(ep.trusted for ep in w.rpc.endpoints)
    w.c.mine(1)
    assert result_of(w.rpc.head_round()) == 102
    assert all(ep.trusted for ep in w.rpc.endpoints)


def test_known_liar_alone_is_not_believed() -> None:
    """When only the far-ahead endpoint answers, the round fails far-ahead instead of following it."""
    w = World(urls=[A, B, C])
    w.c.fabricate(2293)
    assert result_of(w.rpc.head_round()) == 100
    w.a.fail("http-5xx", times=-1)
    w.b.fail("http-5xx", times=-1)
    w.clock.advance(5)
    assert failure_of(w.rpc.head_round()).kind == "far-ahead"
    assert w.rpc.agreed_head == 100


def test_lone_jump_after_agreement_waits_for_confirmation() -> None:
    """A lone answer far past a head several endpoints agreed on moments ago is not believed."""
    w = World(urls=[A, B, C])
    assert result_of(w.rpc.head_round()) == 100
    w.a.fail("http-5xx", times=-1)
    w.b.fail("http-5xx", times=-1)
    w.c.fabricate(2293)
    w.clock.advance(5)
    assert failure_of(w.rpc.head_round()).kind == "far-ahead"
    w.a.faults.clear()
    w.b.faults.clear()
    w.clock.advance(60)
    assert result_of(w.rpc.head_round()) == 100
    assert w.rpc.endpoints[2].distrust == "far-ahead"


def test_lone_survivor_is_followed_once_the_memory_expires() -> None:
    """An honest endpoint left alone after a jump is followed once the agreement memory has expired."""
    w = World(urls=[A, B, C])
    assert result_of(w.rpc.head_round()) == 100
    w.a.fail("http-5xx", times=-1)
    w.b.fail("http-5xx", times=-1)
    w.c.mine(20)
    w.clock.advance(5)
    assert failure_of(w.rpc.head_round()).kind == "far-ahead"
    w.clock.advance(AGREEMENT_MEMORY)
    assert result_of(w.rpc.head_round()) == 120


def test_far_ahead_endpoint_trusted_again_when_back_in_range(lines: Lines) -> None:
    """A far-ahead endpoint that comes back within the agreed range is trusted again, with one line."""
    w = World(urls=[A, B, C])
    w.c.set_lag(-10)  # claims ten blocks it does not have
    assert result_of(w.rpc.head_round()) == 100
    assert w.rpc.endpoints[2].distrust == "far-ahead"
    w.a.mine(10)
    w.b.mine(10)  # the honest chain reaches what it claimed
    w.clock.advance(5)
    assert result_of(w.rpc.head_round()) == 110
    assert w.rpc.endpoints[2].trusted
    assert len(lines.matching("c.example", "trusted again")) == 1


def test_ranking_prefers_trusted_endpoints_that_have_the_block() -> None:
    """get_block(want) asks trusted endpoints whose head reaches ``want`` first."""
    w = World(urls=[A, B, C])
    w.b.mine(1)
    w.c.mine(1)
    assert result_of(w.rpc.head_round()) == 101
    result_of(w.rpc.get_block(101))
    assert ("eth_getBlockByNumber", ["0x65", False]) not in w.a.requests
    assert ("eth_getBlockByNumber", ["0x65", False]) in w.b.requests


def test_one_endpoint_on_another_chain_costs_only_itself(lines: Lines) -> None:
    """Among three endpoints, one on another chain is wrong-chain; the other two carry on."""
    w = World(urls=[A, B, C])
    w.c.reset(seed="other", height=5000)
    identity = result_of(w.rpc.verify_chain(None))
    assert identity == (1337, w.a.genesis_hash)
    assert w.rpc.endpoints[2].distrust == "wrong-chain"
    for _ in range(3):
        w.clock.advance(60)
        assert result_of(w.rpc.head_round()) == 100
    assert len(lines.matching("c.example", "wrong-chain")) == 1


def test_stored_cursor_wins_over_a_majority_on_another_chain() -> None:
    """With a stored cursor, the endpoint still on its chain is followed; the others are wrong-chain."""
    w = World(urls=[A, B, C])
    expected = (1337, w.a.genesis_hash)
    w.b.reset(seed="other")
    w.c.reset(seed="other")
    assert result_of(w.rpc.verify_chain(expected)) == expected
    assert [ep.distrust for ep in w.rpc.endpoints] == [None, "wrong-chain", "wrong-chain"]


def test_no_endpoint_on_the_cursor_chain_is_fatal() -> None:
    """When no answering endpoint is on the stored cursor's chain, it is a ChainMismatch."""
    w = World(urls=[A, B])
    expected = (1337, "0x" + "ab" * 32)
    with pytest.raises(ChainMismatch, match="stored cursor.*--reset-cursor"):
        result_of(w.rpc.verify_chain(expected))


def test_majority_chooses_the_chain_without_a_cursor() -> None:
    """At the first start, two endpoints of three on one chain choose it; no majority is a ChainMismatch."""
    w = World(urls=[A, B, C])
    w.c.reset(seed="other")
    assert result_of(w.rpc.verify_chain(None)) == (1337, w.a.genesis_hash)
    w2 = World(urls=[A, B, C])
    w2.b.reset(seed="two")
    w2.c.reset(seed="three")
    with pytest.raises(ChainMismatch, match="no chain has a majority"):
        result_of(w2.rpc.verify_chain(None))


def test_chain_id_filters_before_the_majority() -> None:
    """--chain-id leaves out endpoints of other chain ids before the majority is counted."""
    w = World(urls=[A, B, C])
    w.b.reset(chain_id=5, seed="goerli")
    w.c.reset(chain_id=5, seed="goerli")
    assert result_of(w.rpc.verify_chain(None, 1337)) == (1337, w.a.genesis_hash)
    assert w.rpc.endpoints[1].distrust == w.rpc.endpoints[2].distrust == "wrong-chain"


def test_every_endpoint_changing_chains_is_fatal() -> None:
    """When every endpoint has moved to another chain, the next round is a ChainMismatch.

    Every endpoint has moved since verification.
    """
    w = World(urls=[A, B])
    result_of(w.rpc.verify_chain(None))
    w.a.reset(seed="new")
    w.b.reset(seed="new")
    w.rpc.invalidate()
    with pytest.raises(
        ChainMismatch, match="no RPC endpoint is on the followed chain.*--reset-cursor"
    ):
        result_of(w.rpc.head_round())
