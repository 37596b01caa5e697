"""Hostile or broken RPC answers cost only the endpoint that gave them.

Covered: bounds, encodings, redirects, auth, logs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from zope.interface import implementer

from eth_twisted.client.endpoints import RPCSettings
from eth_twisted.client.jsonrpc import MAX_CHAIN_ID, RPCFailure, Target, check_block, hex_quantity
from eth_twisted.client.rpc import RPCClient
from eth_twisted.outage import FLAP_WINDOW, Episode
from eth_twisted.testing import FakeEthereumNode
from tests.support.rpc import (
    A,
    B,
    Lines,
    Rig,
    World,
    captured_lines,
    count,
    failure_of,
    lag_keeping_blocks,
    result_of,
)


@pytest.fixture
def lines() -> Iterator[Lines]:
    yield from captured_lines()


HUGE_HEX = "0x" + "f" * 300  # a 1,200-bit block number


# -- item 9: every quantity bounded while parsing ------------------------------


@pytest.mark.parametrize(
    "value",
    [
        HUGE_HEX,
        "0x8000000000000000",
        "0x" + "0" * 17 + "1",
        "0x",
        "0xg1",
        12345,
        None,
        ["0x1"],
        "0x-1",
        " 0x1",
    ],
)
def test_bad_head_is_that_endpoints_bad_result(value: Any) -> None:
    """A head that is not a hex quantity below 2**63 is that endpoint's bad-result.

    The others' answer stands.
    """
    w = World(urls=[A, B])
    w.a.fail("result", result=value, method="eth_blockNumber", times=-1)
    assert result_of(w.rpc.head_round()) == 100
    assert count(w.metrics, "http://a.example", "bad-result") == 1
    assert (
        w.metrics.registry.get_sample_value("eth_client_rpc_head", {"endpoint": "http://a.example"})
        is None
    )


def test_quantity_bounds() -> None:
    """hex_quantity takes 0 .. 2**63-1 and refuses longer hex before int().

    Chain ids are taken up to EIP-2294's bound.
    """
    assert hex_quantity("0x0", "n") == 0
    assert hex_quantity("0x7fffffffffffffff", "n") == 2**63 - 1
    assert hex_quantity(hex(MAX_CHAIN_ID), "chain id", limit=MAX_CHAIN_ID) == MAX_CHAIN_ID
    for bad in ("0x8000000000000000", "0x" + "1" * 17, "0x" + "f" * 4000):
        with pytest.raises(RPCFailure) as info:
            hex_quantity(bad, "n")
        assert info.value.kind == "bad-result" and len(str(info.value)) < 200
    with pytest.raises(RPCFailure):
        hex_quantity(hex(MAX_CHAIN_ID + 1), "chain id", limit=MAX_CHAIN_ID)


@pytest.mark.parametrize(
    "field, value",
    [
        ("timestamp", "0x" + "f" * 4000),
        ("timestamp", "0x8000000000000000"),
        ("hash", "0x" + "ab" * 32 + "00"),
        ("parentHash", "0x" + "zz" * 32),
        ("number", HUGE_HEX),
    ],
)
def test_bad_block_field_is_that_endpoints_bad_result(field: str, value: str) -> None:
    """A block with an unbounded or malformed field is that endpoint's bad-result.

    Another endpoint's block is used.
    """
    w = World(urls=[A, B])
    result_of(w.rpc.head_round())
    w.a.fail(
        "result",
        method="eth_getBlockByNumber",
        times=-1,
        result=lambda block: (
            {**block, field: value} if block and block["number"] != "0x0" else block
        ),
    )
    block = result_of(w.rpc.get_block(50))
    assert block == {k: w.b.block(50)[k] for k in ("number", "hash", "parentHash", "timestamp")}
    assert count(w.metrics, "http://a.example", "bad-result") == 1


def test_checked_block_keeps_only_the_payload_fields() -> None:
    """check_block returns the four fields the payloads use, however much else the node sent."""
    node = FakeEthereumNode(height=3)
    block = {
        **node.block(3),
        "transactions": ["0x" + "aa" * 32] * 10_000,
        "extraData": "0x" + "00" * 100_000,
    }
    checked = check_block(block, 3)
    assert sorted(checked) == ["hash", "number", "parentHash", "timestamp"]
    assert sum(len(v) for v in checked.values()) < 200


def test_huge_chain_id_is_bad_result() -> None:
    """A chain id past EIP-2294's bound fails that endpoint's verification as bad-result, not the client."""
    w = World(urls=[A, B])
    w.a.fail("result", result="0x" + "f" * 20, method="eth_chainId", times=-1)
    assert result_of(w.rpc.verify_chain(None)) == (1337, w.b.genesis_hash)
    assert count(w.metrics, "http://a.example", "bad-result") == 1


def test_any_exception_from_a_check_is_the_endpoints_bad_result() -> None:
    """Whatever a check raises about one endpoint's answer is that endpoint's bad-result.

    The next endpoint is asked.
    """
    w = World(urls=[A, B])
    calls: list[str] = []

    def check(result: Any, label: str) -> Any:
        calls.append(label)
        if label == "http://a.example":
            raise ZeroDivisionError("odd answer")
        return result

    ep, result = result_of(defer.ensureDeferred(w.rpc._call("eth_blockNumber", [], check=check)))
    assert ep.label == "http://b.example:8545" and result == hex(100)
    assert count(w.metrics, "http://a.example", "bad-result") == 1


def test_poller_survives_a_1200_bit_head() -> None:
    """A 1,200-bit head from the only endpoint is a bad-result poll; the loop runs on and recovers."""
    rig = Rig(height=100)
    rig.node.fail("result", result=HUGE_HEX, method="eth_blockNumber", times=3)
    rig.start()
    rig.tick()
    rig.tick()
    assert rig.polls("bad-result") == 3
    assert rig.polls("error") == 0
    rig.tick()
    assert rig.numbers() == [100]
    assert rig.poller._loop is not None and rig.poller._loop.running


def test_poller_survives_a_4000_digit_timestamp() -> None:
    """A 4,000-digit timestamp in the head block is a bad-result poll, never a rendering crash."""
    rig = Rig(height=100, format="json")
    rig.node.fail(
        "result",
        method="eth_getBlockByNumber",
        times=-1,
        result=lambda block: (
            {**block, "timestamp": "0x" + "f" * 4000} if block["number"] == "0x64" else block
        ),
    )
    rig.start()
    rig.tick()
    assert rig.polls("bad-result") == 2 and rig.polls("error") == 0
    assert rig.numbers() == []
    rig.node.faults.clear()
    rig.tick()
    assert rig.numbers() == [100]


# -- item 10: no compression --------------------------------------------------------


def test_gzip_answer_is_bad_encoding_and_never_inflated() -> None:
    """An answer gzip-encoded although identity was asked for is bad-encoding.

    The request asked for identity.
    """
    w = World(urls=[A, B])
    w.a.fail("gzip", size=64 * 1024 * 1024, method="eth_blockNumber")
    assert result_of(w.rpc.block_number()) == 100
    assert count(w.metrics, "http://a.example", "bad-encoding") == 1
    assert count(w.metrics, "http://a.example", "too-large") == 0
    sent = w.a.headers[-1]
    assert sent.get(b"Accept-Encoding") == [b"identity"]


# -- item 11: redirects are never followed --------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_is_http_3xx_and_never_followed(status: int) -> None:
    """A 3xx (to any host) is that endpoint's http-3xx; nothing is sent to the place it names."""
    w = World(urls=[A, B])
    result_of(w.rpc.verify_chain(None))
    w.a.fail("redirect", status=status, location="http://c.example/steal", method="eth_blockNumber")
    before = list(w.network.requests)
    assert result_of(w.rpc.block_number()) == 100
    after = w.network.requests[len(before) :]
    assert all(host != "c.example" for _, host in after), after
    assert w.c.requests == []
    assert count(w.metrics, "http://a.example", "http-3xx") == 1


# -- item 13: user:password@ is basic auth, never logged ------------------------------------


def test_url_credentials_become_basic_auth(lines: Lines) -> None:
    """user:password@ in an RPC URL is sent as HTTP basic auth and appears in no log or label.

    The credentials are percent-decoded.
    """
    w = World(urls=["http://alice:p%40ss-s3cret@a.example/v1/", B])
    w.a.auth = ("alice", "p@ss-s3cret")
    assert result_of(w.rpc.verify_chain(None))
    assert result_of(w.rpc.head_round()) == 100
    assert w.rpc.endpoints[0].verified and count(w.metrics, "http://a.example", "http-4xx") == 0
    assert w.rpc.endpoints[0].label == "http://a.example"
    assert all(h.get(b"Host") == [b"a.example"] for h in w.a.headers)
    assert "s3cret" not in repr(w.rpc.endpoints[0])
    w.a.auth = ("alice", "other")
    w.clock.advance(60)
    assert result_of(w.rpc.head_round()) == 100
    assert count(w.metrics, "http://a.example", "http-4xx") == 1
    assert not any("s3cret" in t or "alice" in t for t in lines.texts())


def test_target_refuses_bad_urls_without_repeating_them() -> None:
    """A malformed RPC URL is refused with a message that does not repeat it (it may hold a password)."""
    for url in ("ftp://u:hush@h/", "http://u:hush@/", "http://u:hush@h:99999/"):
        with pytest.raises(ValueError) as info:
            Target.from_url(url)
        assert "hush" not in str(info.value)


# -- item 13: expected network trouble is one classified line per outage -------------


@implementer(IAgent)
class FailingAgent:
    """An agent whose every request fails with ``error`` (until ``error`` is None: then it delegates)."""

    def __init__(self, err: Exception | None, fallback: Any = None) -> None:
        self.error = err
        self.fallback = fallback
        self.calls = 0

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> Any:
        self.calls += 1
        if self.error is None:
            return self.fallback.request(method, uri, headers, bodyProducer)
        return defer.fail(self.error)


@pytest.mark.parametrize(
    "err, kind",
    [
        (error.DNSLookupError("no results for hostname lookup: nonexistent.invalid"), "dns"),
        (error.ConnectionRefusedError(), "connect"),
        (error.TimeoutError(), "timeout"),
        (error.NoRouteError(), "connect"),
    ],
)
def test_network_trouble_is_classified(err: Exception, kind: str) -> None:
    """DNS, refused, unroutable and connect-timeout failures get their own kind (never 'other')."""
    w = World(urls=[A])
    w.rpc.agent = FailingAgent(err)
    assert failure_of(w.rpc.block_number()).kind == kind


def test_tls_failure_is_tls_and_not_retried() -> None:
    """A TLS verification failure is kind tls, tried once (not retried as a stale connection)."""
    from twisted.web.client import ResponseNeverReceived

    w = World(urls=[A])
    agent = FailingAgent(
        ResponseNeverReceived(
            [Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))]
        )
    )
    w.rpc.agent = agent
    assert failure_of(w.rpc.block_number()).kind == "tls"
    assert agent.calls == 1


def test_dns_outage_logs_one_line_each_way(lines: Lines) -> None:
    """An unresolvable endpoint polled 200 times logs its outage in two lines.

    It writes one warning when its outage starts, one line when it ends.
    """
    w = World(urls=[A, B])
    agent = FailingAgent(error.DNSLookupError("no results"), fallback=w.stub)
    w.rpc.agent = agent
    for _ in range(200):
        failure_of(w.rpc.head_round())
        w.clock.advance(1)
    agent.error = None
    w.clock.advance(60)
    result_of(w.rpc.verify_chain(None))
    texts = lines.texts()
    assert len(lines.matching("a.example", "is failing (dns)")) == 1
    assert len(lines.matching("a.example", "answers again after")) == 1
    assert not [e for e in lines.events if e.get("log_failure") is not None]
    assert len(texts) <= 6, texts


def test_unexpected_error_traceback_once_per_outage(lines: Lines) -> None:
    """An unexpected exception is logged with its traceback once per outage, not once per call."""
    w = World(urls=[A])
    w.rpc.agent = FailingAgent(KeyError("surprise"))
    for _ in range(50):
        assert failure_of(w.rpc.block_number()).kind == "other"
        w.clock.advance(1)
    assert len([e for e in lines.events if e.get("log_failure") is not None]) == 1


def test_poller_logs_one_line_per_outage(lines: Lines) -> None:
    """Fifty failed polls write one 'poll failed' line, and the first good poll one line with the duration."""
    rig = Rig(height=100)
    rig.node.fail("http-5xx", times=-1)
    rig.start()
    for _ in range(50):
        rig.tick()
    assert rig.polls("http-5xx") == 51
    rig.node.faults.clear()
    rig.clock.advance(60)
    assert rig.numbers() == [100]
    assert len(lines.matching("poll failed (http-5xx)")) == 1
    assert len(lines.matching("polls succeed again after")) == 1
    assert len(lines.texts()) <= 6, lines.texts()


def test_head_below_cursor_logged_once(lines: Lines) -> None:
    """A head below the cursor for many polls is one line when it starts and one when the chain catches up."""
    rig = Rig(height=100)
    rig.start()
    lag_keeping_blocks(rig.node, 3)
    for _ in range(20):
        rig.tick()
    assert (
        rig.polls("went-backwards") == 1
    )  # the only endpoint stepped back: that round is not believed
    assert rig.polls("behind") == 19
    rig.node.set_lag(0)
    rig.node.mine(1)
    rig.tick()
    assert rig.numbers() == [100, 101]
    assert len(lines.matching("below the cursor")) == 1
    assert len(lines.matching("reached the cursor again")) == 1


def test_node_out_of_step_logged_once(lines: Lines) -> None:
    """A node whose next block keeps naming a wrong parent is one line, not one per tick.

    Its cursor block stands meanwhile.
    """
    rig = Rig(height=100)
    rig.start()
    rig.node.mine(1)
    wrong = "0x" + "ee" * 32
    rig.node.fail(
        "result",
        method="eth_getBlockByNumber",
        times=-1,
        result=lambda block: (
            {**block, "parentHash": wrong} if block and block["number"] == "0x65" else block
        ),
    )
    for _ in range(20):
        rig.tick()
    assert rig.polls("reorg") == 20
    assert rig.numbers() == [100]
    assert len(lines.matching("out of step")) == 1


def test_flapping_subject_writes_about_two_lines_per_window() -> None:
    """A subject flapping every second for ten minutes writes at most two lines per flap window.

    It fails and recovers every second.
    """
    from twisted.internet.task import Clock
    from twisted.logger import Logger

    clock = Clock()
    episode = Episode(
        Logger(namespace="test.flap"),
        clock.seconds,
        "x",
        start="{subject} {kind}{note}",
        end="{subject} ok after {duration}",
    )
    for _ in range(600):
        episode.failed("connect", "refused")
        clock.advance(0.5)
        episode.recovered()
        clock.advance(0.5)
    assert 2 <= episode.lines <= 2 * (600 / FLAP_WINDOW) + 2


def test_long_outage_after_a_flap_is_still_logged() -> None:
    """An outage right after a logged one is logged once it has lasted the flap window.

    The outage starts right after the logged one and lasts.
    """
    from twisted.internet.task import Clock
    from twisted.logger import Logger

    clock = Clock()
    episode = Episode(
        Logger(namespace="test.flap"),
        clock.seconds,
        "x",
        start="{subject} {kind}{note}",
        end="{subject} ok after {duration}",
    )
    episode.failed("dns", "")
    clock.advance(1)
    episode.recovered()
    assert episode.lines == 2
    written = [episode.failed("dns", "") for _ in range(3)]
    assert written == [False, False, False]
    clock.advance(FLAP_WINDOW)
    assert episode.failed("dns", "")
    assert episode.lines == 3


def test_client_rejects_nothing_it_can_use() -> None:
    """RPCClient builds endpoints for http(s) and ws(s) URLs with credentials, refuses others."""
    client = RPCClient(
        RPCSettings(rpc=("https://u:p@h.example/", "wss://u:p@w.example:8546/x")), agent=object()
    )
    assert [ep.label for ep in client.endpoints] == ["https://h.example", "wss://w.example:8546"]
    assert [ep.kind for ep in client.endpoints] == ["http", "ws"]
    assert client.endpoints[1].target.authorization is not None
    with pytest.raises(ValueError):
        RPCClient(RPCSettings(rpc=("ftp://h.example/",)), agent=object())
