"""A world of fake RPC nodes behind StubTreq, a poller rig and log capture, for the client tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from eth_twisted.client.endpoints import RPCSettings
from eth_twisted.client.jsonrpc import RPCFailure
from eth_twisted.client.outbox import Cursor
from eth_twisted.client.poller import BlockPoller, PollSettings
from eth_twisted.client.rpc import RPCClient
from eth_twisted.metrics import ClientMetrics
from eth_twisted.testing import FakeEthereumNode, FakeNetwork, MemoryOutbox

A = "http://a.example/v3/SECRETKEY?token=hush"


B = "http://b.example:8545/"


C = "http://c.example/"


def result_of(d: Any) -> Any:
    """The synchronous result of ``d`` (the in-memory agent answers at once), raising its failure."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


def failure_of(d: Any) -> RPCFailure:
    """The RPCFailure ``d`` fired with."""
    with pytest.raises(RPCFailure) as info:
        result_of(d)
    return info.value


def count(metrics: ClientMetrics, endpoint: str, kind: str) -> float:
    """rpc_failures for one endpoint label and kind."""
    value = metrics.registry.get_sample_value(
        "eth_client_rpc_failures_total", {"endpoint": endpoint, "kind": kind}
    )
    return value or 0.0


class World:
    """Fake nodes a, b, c behind one in-memory agent, a Clock, metrics and a client."""

    def __init__(self, urls: list[str] | None = None, **kwargs: Any) -> None:
        self.a = FakeEthereumNode(height=100)
        self.b = FakeEthereumNode(height=100)
        self.c = FakeEthereumNode(height=100)
        self.network = FakeNetwork({"a.example": self.a, "b.example": self.b, "c.example": self.c})
        self.stub = RequestTraversalAgent(self.network)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.metrics = ClientMetrics(CollectorRegistry())
        self.rpc = RPCClient(
            RPCSettings(rpc=tuple(urls or [A, B]), **kwargs),
            agent=self.stub,
            clock=self.clock,
            metrics=self.metrics,
        )


class Lines:
    """Log lines (info and above) of the RPC client and the poller, as text."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if str(event.get("log_namespace", "")).startswith(
            ("eth_twisted.client.rpc", "eth_twisted.client.poller", "eth_twisted.client.heads")
        ):
            level = event.get("log_level")
            if level is not None and level >= LogLevel.info:
                self.events.append(event)

    def texts(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def matching(self, *words: str) -> list[str]:
        return [t for t in self.texts() if all(w in t for w in words)]


def captured_lines() -> Iterator[Lines]:
    """Collect the lines while the generator is suspended (the body of a fixture)."""
    observer = Lines()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


URL = "http://node.example/"


class Rig:
    """A fake node, a Clock, an RPC client, a MemoryOutbox and a poller (not started)."""

    def __init__(
        self,
        height: int = 100,
        outbox: MemoryOutbox | None = None,
        rpc_timeout: float = 10.0,
        **settings: Any,
    ) -> None:
        self.node = FakeEthereumNode(height=height)
        self.stub = RequestTraversalAgent(FakeNetwork({"node.example": self.node}))
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.metrics = ClientMetrics(CollectorRegistry())
        self.rpc = RPCClient(
            RPCSettings(rpc=(URL,), rpc_timeout=rpc_timeout),
            agent=self.stub,
            clock=self.clock,
            metrics=self.metrics,
        )
        self.outbox = outbox if outbox is not None else MemoryOutbox()
        self.woken = 0
        self.fatal: list[str] = []
        settings.setdefault("interval", 5.0)
        self.poller = BlockPoller(
            self.rpc,
            self.outbox,
            PollSettings(**settings),
            clock=self.clock,
            metrics=self.metrics,
            on_enqueued=self.wake,
            fatal=self.fatal.append,
        )

    def wake(self) -> None:
        self.woken += 1

    def start(self) -> Rig:
        self.poller.startService()
        return self

    def tick(self) -> None:
        """Advance the clock by one interval (one poll)."""
        self.clock.advance(self.poller.settings.interval)

    def polls(self, result: str) -> float:
        return (
            self.metrics.registry.get_sample_value("eth_client_polls_total", {"result": result})
            or 0.0
        )

    def numbers(self) -> list[int | None]:
        return self.outbox.logged_numbers()

    def cursor_at(self, number: int) -> Cursor:
        block = self.node.block(number)
        return Cursor(self.node.chain_id, self.node.genesis_hash, number, block["hash"])


def lag_keeping_blocks(node: FakeEthereumNode, blocks: int) -> None:
    """``node`` reports a head ``blocks`` lower but still serves every block by hash.

    A load balancer whose lagging backend answers the head while another has the blocks:
    behind, never a rollback.
    """
    node.set_lag(blocks)
    real = node.answer

    def lagging(method: str, params: list[Any]) -> Any:
        if method == "eth_getBlockByHash":
            node.lag, lag = 0, node.lag
            try:
                return real(method, params)
            finally:
                node.lag = lag
        return real(method, params)

    node.answer = lagging  # type: ignore[method-assign]
