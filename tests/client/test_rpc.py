"""The JSON-RPC client against fake nodes through treq's RequestTraversalAgent, on a Clock."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from eth_twisted.client.endpoints import DEFAULT_RPC_URLS, RPCSettings
from eth_twisted.client.jsonrpc import RPCFailure, endpoint_label, parse_retry_after
from eth_twisted.client.rpc import RPCClient
from eth_twisted.errors import ChainMismatch, RPCError
from eth_twisted.testing import FakeEthereumNode, url_of
from tests.support.rpc import A, B, C, World, count, failure_of, result_of


@pytest.fixture
def world() -> World:
    return World()


def test_label_hides_path_query_and_userinfo() -> None:
    """Endpoint labels keep scheme, host and port only: API keys in paths or queries never leak."""
    assert endpoint_label(A) == "http://a.example"
    assert (
        endpoint_label("https://user:pw@rpc.example.org:8443/key/abc?x=1")
        == "https://rpc.example.org:8443"
    )
    assert endpoint_label("http://[::1]:8545/") == "http://[::1]:8545"


def test_default_urls_are_public_https() -> None:
    """The default endpoint list is a few HTTPS URLs without keys."""
    assert 3 <= len(DEFAULT_RPC_URLS) <= 5
    assert all(u.startswith("https://") and "?" not in u for u in DEFAULT_RPC_URLS)


def test_settings_default_to_the_public_urls_and_check_names_rpc() -> None:
    """RPCSettings default to DEFAULT_RPC_URLS; check() refuses an unusable URL.

    The refusal names --rpc, never the URL's password.
    """
    assert RPCSettings().rpc == DEFAULT_RPC_URLS and RPCSettings().rpc_timeout == 10.0
    RPCSettings().check()
    with pytest.raises(ValueError, match="--rpc") as info:
        RPCSettings(rpc=("ftp://alice:hunter2@rpc.example/",)).check()
    assert "hunter2" not in str(info.value)
    with pytest.raises(ValueError, match="--rpc"):
        RPCSettings(rpc=()).check()
    with pytest.raises(ValueError, match="--rpc-timeout"):
        RPCSettings(rpc_timeout=0.0).check()


def test_block_number_and_block(world: World) -> None:
    """block_number and get_block answer from the node, with the fields the payloads need."""
    assert result_of(world.rpc.block_number()) == 100
    block = result_of(world.rpc.get_block(42))
    assert block["hash"] == world.a.block(42)["hash"]
    assert block["parentHash"] == world.a.block(41)["hash"]
    assert result_of(world.rpc.chain_id()) == 1337
    assert result_of(world.rpc.genesis_hash()) == world.a.genesis_hash


def test_request_is_a_jsonrpc_post(world: World) -> None:
    """The request is a JSON-RPC 2.0 POST naming the method and hex params."""
    result_of(world.rpc.get_block(7))
    assert world.a.requests[-1] == ("eth_getBlockByNumber", ["0x7", False])


@pytest.mark.parametrize(
    "mode, kind",
    [
        ("garbage", "bad-json"),
        ("html", "bad-json"),
        ("truncated", "bad-json"),
        ("http-5xx", "http-5xx"),
        ("http-4xx", "http-4xx"),
        ("http-429", "http-429"),
        ("rpc-error", "rpc-error"),
        ("rate-limit", "rate-limit"),
        ("wrong-id", "bad-envelope"),
        ("both", "bad-envelope"),
        ("no-version", "bad-envelope"),
        ("big", "too-large"),
    ],
)
def test_failure_kinds_counted_and_failed_over(world: World, mode: str, kind: str) -> None:
    """Each kind of bad answer is classified, counted for its endpoint, and the next endpoint answers."""
    world.a.fail(mode, method="eth_blockNumber")
    assert result_of(world.rpc.block_number()) == 100
    assert count(world.metrics, "http://a.example", kind) == 1
    assert world.b.requests == [
        ("eth_chainId", []),
        ("eth_getBlockByNumber", ["0x0", False]),
        ("eth_blockNumber", []),
    ]


@pytest.mark.parametrize(
    "mode, kind",
    [
        ("garbage", "bad-json"),
        ("rpc-error", "rpc-error"),
        ("wrong-id", "bad-envelope"),
        ("http-5xx", "http-5xx"),
    ],
)
def test_all_endpoints_failing_raises_kind(mode: str, kind: str) -> None:
    """When every endpoint fails the same way, the call fails with that kind (an RPCError)."""
    w = World()
    for node in (w.a, w.b):
        node.fail(mode, method="eth_blockNumber")
    e = failure_of(w.rpc.block_number())
    assert isinstance(e, RPCError)
    assert e.kind == kind
    assert "SECRETKEY" not in str(e)


def test_body_over_cap_is_refused() -> None:
    """A body over max_body fails too-large without being kept."""
    w = World(urls=[A], max_body=1000)
    w.a.fail("big", size=2000, method="eth_blockNumber")
    assert failure_of(w.rpc.block_number()).kind == "too-large"


def test_stalled_body_times_out(world: World) -> None:
    """A body that never finishes ends in a timeout at the deadline, then the next endpoint answers."""
    world.a.fail("stall-body", method="eth_blockNumber")
    d = world.rpc.block_number()
    world.stub.flush()
    box: list[Any] = []
    d.addBoth(box.append)
    assert box == []
    world.clock.advance(9.9)
    assert box == []
    world.clock.advance(0.2)
    assert box == [100]
    assert count(world.metrics, "http://a.example", "timeout") == 1


def test_stalled_headers_time_out() -> None:
    """No answer at all ends in a timeout of kind 'timeout' at the deadline."""
    w = World(urls=[A], rpc_timeout=3.0)
    w.a.fail("stall-headers", method="eth_blockNumber")
    d = w.rpc.block_number()
    w.stub.flush()
    w.clock.advance(3.1)
    assert failure_of(d).kind == "timeout"


def test_dropped_connection_retried_once(world: World) -> None:
    """A connection closed before any answer is retried once on the same endpoint.

    That is a stale pooled connection.
    """
    world.a.fail("drop", method="eth_blockNumber")
    assert result_of(world.rpc.block_number()) == 100
    assert [m for m, _ in world.b.requests] == []
    assert [m for m, _ in world.a.requests].count("eth_blockNumber") == 2


def test_dropped_twice_is_connection_lost(world: World) -> None:
    """Two drops in a row are a connection-lost failure and fail over."""
    world.a.fail("drop", method="eth_blockNumber", times=2)
    assert result_of(world.rpc.block_number()) == 100
    assert count(world.metrics, "http://a.example", "connection-lost") == 1


def test_null_block_tries_another_endpoint(world: World) -> None:
    """A null block (node behind the head it reported) is not a skip: another endpoint is asked."""
    world.a.fail("null", method="eth_getBlockByNumber", times=2)  # genesis check too
    block = result_of(world.rpc.get_block(50))
    assert block["hash"] == world.b.block(50)["hash"]
    assert count(world.metrics, "http://a.example", "null-result") >= 1


def test_null_everywhere_fails_null_result() -> None:
    """When no endpoint has the block, the call fails null-result (retry later, never skip)."""
    w = World(urls=[A])
    result_of(w.rpc.block_number())
    w.a.fail("null", method="eth_getBlockByNumber")
    assert failure_of(w.rpc.get_block(50)).kind == "null-result"


def test_retry_after_seconds_honoured() -> None:
    """429 with Retry-After: 30 keeps the endpoint unasked for 30 s on the clock."""
    w = World(urls=[A])
    result_of(w.rpc.block_number())
    w.a.fail("http-429", retry_after="30", method="eth_blockNumber")
    assert failure_of(w.rpc.block_number()).kind == "http-429"
    asked = len(w.a.requests)
    w.clock.advance(29)
    e = failure_of(w.rpc.block_number())
    assert e.kind == "rate-limit" and len(w.a.requests) == asked
    w.clock.advance(1.5)
    assert result_of(w.rpc.block_number()) == 100


def test_retry_after_http_date_honoured() -> None:
    """Retry-After as an HTTP date is measured against the clock."""
    w = World(urls=[A, B])
    w.a.fail("http-429", retry_after="Tue, 14 Nov 2023 22:14:20 GMT", method="eth_blockNumber")
    # clock is 1_700_000_000 = Tue, 14 Nov 2023 22:13:20 GMT: 60 s to wait.
    assert result_of(w.rpc.block_number()) == 100
    w.clock.advance(59)
    result_of(w.rpc.block_number())
    assert [m for m, _ in w.a.requests].count("eth_blockNumber") == 1
    w.clock.advance(2)
    result_of(w.rpc.block_number())
    assert [m for m, _ in w.a.requests].count("eth_blockNumber") == 2


def test_rate_limit_without_retry_after_backs_off_exponentially() -> None:
    """JSON-RPC -32005 without Retry-After cools the endpoint 1 s, then 2 s, then 4 s."""
    w = World(urls=[A])
    result_of(w.rpc.block_number())
    for expected in (1.0, 2.0, 4.0):
        w.a.fail("rate-limit", method="eth_blockNumber")
        failure_of(w.rpc.block_number())
        assert w.rpc.endpoints[0].cooldown_until - w.clock.seconds() == expected
        w.clock.advance(expected)


def test_parse_retry_after() -> None:
    """Retry-After parses delta seconds and HTTP dates, clamps, and ignores junk."""
    assert parse_retry_after(b"12", 0) == 12
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:40 GMT", 40) == 60
    assert parse_retry_after("999999", 0) == 600
    assert parse_retry_after("soon", 0) is None
    assert parse_retry_after(None, 0) is None


def test_failing_endpoint_moves_back_of_queue(world: World) -> None:
    """After a failure the endpoint is asked after the healthy ones for a while."""
    world.a.fail("http-5xx", method="eth_blockNumber")
    result_of(world.rpc.block_number())
    result_of(world.rpc.block_number())
    assert [m for m, _ in world.a.requests].count("eth_blockNumber") == 1
    assert [m for m, _ in world.b.requests].count("eth_blockNumber") == 2


def test_head_round_best_trusted(world: World) -> None:
    """head_round answers the head the endpoints agree on and shows each endpoint's own head."""
    world.b.mine(3)
    assert result_of(world.rpc.head_round()) == 100
    assert (
        world.metrics.registry.get_sample_value(
            "eth_client_rpc_head", {"endpoint": "http://a.example"}
        )
        == 100
    )
    assert (
        world.metrics.registry.get_sample_value(
            "eth_client_rpc_head", {"endpoint": "http://b.example:8545"}
        )
        == 103
    )
    world.a.mine(3)
    assert result_of(world.rpc.head_round()) == 103


def test_lagging_endpoint_not_trusted() -> None:
    """An endpoint more than lag_threshold behind the agreed head is lagging.

    It is counted and asked last for blocks.
    """
    w = World(urls=[A, B, C], lag_threshold=5)
    w.a.set_lag(6)
    assert result_of(w.rpc.head_round()) == 100
    assert count(w.metrics, "http://a.example", "lagging") == 1
    assert not w.rpc.endpoints[0].trusted
    block = result_of(w.rpc.get_block(100))
    assert block["number"] == hex(100)
    assert ("eth_getBlockByNumber", ["0x64", False]) not in w.a.requests
    w.a.set_lag(5)
    assert result_of(w.rpc.head_round()) == 100
    assert w.rpc.endpoints[0].trusted


def test_backwards_endpoint_not_trusted(world: World) -> None:
    """An endpoint whose head goes below its previous answer is distrusted for that round."""
    world.a.mine(2)
    world.b.mine(2)
    assert result_of(world.rpc.head_round()) == 102
    world.b.set_lag(3)
    assert result_of(world.rpc.head_round()) == 102  # a alone votes; b's 99 does not count
    assert count(world.metrics, "http://b.example:8545", "went-backwards") == 1
    assert not world.rpc.endpoints[1].trusted


def test_only_endpoint_backwards_fails_round() -> None:
    """With a single endpoint going backwards the round fails went-backwards (nothing is believed)."""
    w = World(urls=[A])
    result_of(w.rpc.head_round())
    w.a.set_lag(1)
    assert failure_of(w.rpc.head_round()).kind == "went-backwards"
    assert result_of(w.rpc.head_round()) == 99


def test_verify_chain_agreeing(world: World) -> None:
    """verify_chain answers (chain id, genesis) when every endpoint agrees."""
    ident = result_of(world.rpc.verify_chain(None, 1337))
    assert ident == (1337, world.a.genesis_hash)


def test_verify_chain_endpoints_disagree(world: World) -> None:
    """Two endpoints on different chains are a ChainMismatch naming --reset-cursor."""
    world.b.reset(seed="other")
    with pytest.raises(ChainMismatch, match="--reset-cursor"):
        result_of(world.rpc.verify_chain(None))


def test_verify_chain_option_mismatch(world: World) -> None:
    """--chain-id different from the endpoints' is a ChainMismatch."""
    with pytest.raises(ChainMismatch, match="--chain-id is 1"):
        result_of(world.rpc.verify_chain(None, 1))


def test_verify_chain_cursor_mismatch(world: World) -> None:
    """A stored cursor of another genesis is a ChainMismatch naming --reset-cursor."""
    with pytest.raises(ChainMismatch, match="stored cursor.*--reset-cursor"):
        result_of(world.rpc.verify_chain((1337, "0x" + "ab" * 32)))


def test_verify_chain_nobody_answers() -> None:
    """With no endpoint answering, verify_chain fails with an RPCFailure (retry), not a mismatch."""
    w = World(urls=[A])
    w.a.fail("http-5xx", times=-1)
    assert failure_of(w.rpc.verify_chain(None)).kind == "http-5xx"


def test_restarted_node_reverified_after_transport_failure() -> None:
    """A node that failed at the transport and came back on a new chain is caught before it is believed."""
    w = World(urls=[A])
    result_of(w.rpc.verify_chain(None))
    assert result_of(w.rpc.head_round()) == 100
    w.a.fail("drop", times=2)
    failure_of(w.rpc.head_round())
    w.a.reset(height=3)
    with pytest.raises(ChainMismatch, match="changed chains.*--reset-cursor"):
        result_of(w.rpc.head_round())


def test_unverified_endpoint_checked_before_use(world: World) -> None:
    """An endpoint down during verify_chain that comes back on another chain is wrong-chain.

    Its head never counts.
    """
    world.b.fail("http-5xx")
    result_of(world.rpc.verify_chain(None))
    world.b.reset(seed="other", height=500)
    world.clock.advance(60)
    assert result_of(world.rpc.head_round()) == 100
    assert world.rpc.endpoints[1].distrust == "wrong-chain"
    assert count(world.metrics, "http://b.example:8545", "wrong-chain") >= 1
    assert ("eth_blockNumber", []) not in world.b.requests


def test_close_with_injected_http_is_noop(world: World) -> None:
    """close() fires at once when the http client was injected."""
    assert result_of(world.rpc.close()) is None


class _StreamedResponse:
    """An IResponse of unknown length delivering ``chunks`` then a clean end."""

    length = object()  # UNKNOWN_LENGTH stand-in: not an int

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.closed = False

    def deliverBody(self, protocol: Any) -> None:
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseDone

        outer = self

        class Transport:
            def loseConnection(self) -> None:
                outer.closed = True

        protocol.makeConnection(Transport())
        for chunk in self.chunks:
            protocol.dataReceived(chunk)
        protocol.connectionLost(Failure(ResponseDone()))


def test_streamed_body_over_cap_closes_connection() -> None:
    """A body of unknown length is cut at the cap: too-large, and the connection is closed."""
    from eth_twisted.client.jsonrpc import collect_capped

    response = _StreamedResponse([b"x" * 600, b"y" * 600])
    assert failure_of(collect_capped(response, 1000, "http://a.example")).kind == "too-large"
    assert response.closed
    small = _StreamedResponse([b"ab", b"cd"])
    assert result_of(collect_capped(small, 1000)) == b"abcd"


def test_default_http_client_has_own_pool() -> None:
    """Without an injected agent, RPCClient builds a twisted.web Agent on its own pool.

    close() closes that pool.
    """
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    rpc = RPCClient(RPCSettings(rpc=(A,)), clock=reactor)
    assert rpc._pool is not None and rpc._pool._reactor is reactor
    from twisted.web.client import Agent

    assert isinstance(rpc.agent, Agent)
    assert result_of(rpc.close()) is None


@pytest_twisted.inlineCallbacks
def test_real_http_loopback_timeout_covers_body() -> Any:
    """Over real loopback HTTP (default treq client and pool), a stalled body ends at the call's timeout."""
    from twisted.internet import reactor

    node = FakeEthereumNode(height=7)
    port = node.listen(reactor)
    rpc = RPCClient(RPCSettings(rpc=(url_of(port),), rpc_timeout=0.5), clock=reactor)
    try:
        assert (yield rpc.block_number()) == 7
        node.fail("stall-body", method="eth_blockNumber")
        started = reactor.seconds()
        with pytest.raises(RPCFailure) as info:
            yield rpc.block_number()
        assert info.value.kind == "timeout"
        assert 0.4 < reactor.seconds() - started < 3.0
        node.fail("drop", method="eth_blockNumber")
        assert (yield rpc.block_number()) == 7
    finally:
        node.release_stalled()
        yield rpc.close()
        yield port.stopListening()
