"""The RPC client over real loopback HTTP against nodes that lie, redirect, gzip, need auth, or do not exist.

The honest node is a real anvil; the liars are the fault node
(:mod:`tests.faults.rpcfault`) in front of it, served in this process, or
:class:`FakeEthereumNode` on a real port. The log-volume test runs the real
``eth client`` as a subprocess.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.web.server import Site

from eth_twisted.client.endpoints import RPCSettings
from eth_twisted.client.jsonrpc import RPCFailure
from eth_twisted.client.poller import BlockPoller, PollSettings
from eth_twisted.client.rpc import RPCClient
from eth_twisted.metrics import ClientMetrics
from eth_twisted.testing import FakeEthereumNode, MemoryOutbox, url_of
from tests.faults.rpcfault import RPCFaultNode
from tests.faults.services import EthProcess
from tests.support import ROOT, Anvil, async_wait_until, free_port, wait_until

pytestmark = [pytest.mark.live]


class Served:
    """Listening ports opened by a test, closed at its end."""

    def __init__(self) -> None:
        self.ports: list[Any] = []

    def fault_node(self, anvil: Anvil, mode: str, *args: Any) -> tuple[RPCFaultNode, str]:
        node = RPCFaultNode(anvil.url)
        node.set_mode(mode, *map(str, args))
        site = Site(node)
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.ports.append(port)
        return node, url_of(port)

    def fake(self, node: FakeEthereumNode) -> str:
        port = node.listen(reactor)
        self.ports.append(port)
        return url_of(port)


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    yield s
    for port in s.ports:
        pytest_twisted.blockon(port.stopListening())


class Rig:
    """A poller on the real reactor over ``urls``, feeding a MemoryOutbox (json payloads)."""

    def __init__(self, urls: list[str]) -> None:
        self.outbox = MemoryOutbox()
        self.fatal: list[str] = []
        self.metrics = ClientMetrics(CollectorRegistry())
        self.rpc = RPCClient(
            RPCSettings(rpc=tuple(urls), rpc_timeout=5.0), clock=reactor, metrics=self.metrics
        )
        self.poller = BlockPoller(
            self.rpc,
            self.outbox,
            PollSettings(interval=0.5, format="json"),
            clock=reactor,
            metrics=self.metrics,
            fatal=self.fatal.append,
        )

    def delivered(self) -> list[dict[str, Any]]:
        return [json.loads(payload) for payload, _ in self.outbox.log]

    def cursor(self) -> int:
        cursor = self.outbox.cursor()
        return -1 if cursor is None else cursor.block_number

    def polls(self, result: str) -> float:
        return (
            self.metrics.registry.get_sample_value("eth_client_polls_total", {"result": result})
            or 0.0
        )


def assert_only_real_blocks(rig: Rig, anvil: Anvil) -> None:
    """Every delivered block is anvil's block at that height, contiguous, none twice."""
    blocks = rig.delivered()
    numbers = [b["block_number"] for b in blocks]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
    for b in blocks:
        real = anvil.rpc("eth_getBlockByNumber", hex(b["block_number"]), False)
        assert real is not None, f"block {b['block_number']} does not exist"
        assert real["hash"] == b["block_hash"], f"block {b['block_number']} is not anvil's"


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_honest_anvil_plus_liar_delivers_only_real_blocks(anvil: Anvil, served: Served) -> Any:
    """With an honest anvil and a lying node, only anvil's blocks are delivered.

    The lying node claims 2,293 blocks more and is listed first; the client keeps up with anvil.
    """
    liar, liar_url = served.fault_node(anvil, "liar", 2293)
    rig = Rig([liar_url, anvil.url])
    rig.poller.startService()
    try:
        start = anvil.head()
        yield async_wait_until(
            lambda: rig.cursor() >= start + 5, timeout=30, what="five new blocks"
        )
        target = anvil.head()
        yield async_wait_until(
            lambda: rig.cursor() >= target, timeout=10, what="the client to keep up"
        )
        assert rig.cursor() <= anvil.head()
        assert_only_real_blocks(rig, anvil)
        assert liar.stats["faulted"] > 0
        assert rig.rpc.endpoints[0].distrust == "far-ahead"
        assert rig.fatal == [] and rig.polls("error") == 0
    finally:
        yield rig.poller.stopService()


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_unbounded_answers_cost_only_their_endpoints(anvil: Anvil, served: Served) -> Any:
    """Nodes answering a 1,200-bit head, 4,000-digit timestamps or a 2**256 head beside anvil stop nothing."""
    _, huge_head = served.fault_node(anvil, "huge-head")
    _, huge_time = served.fault_node(anvil, "huge-timestamp")
    _, liar_max = served.fault_node(anvil, "liar", "max")
    rig = Rig([huge_head, huge_time, liar_max, anvil.url])
    rig.poller.startService()
    try:
        start = anvil.head()
        yield async_wait_until(
            lambda: rig.cursor() >= start + 4, timeout=30, what="four new blocks"
        )
        assert_only_real_blocks(rig, anvil)
        assert rig.polls("error") == 0 and rig.fatal == []
        bad = {
            ep.label: rig.metrics.registry.get_sample_value(
                "eth_client_rpc_failures_total", {"endpoint": ep.label, "kind": "bad-result"}
            )
            or 0
            for ep in rig.rpc.endpoints
        }
        assert bad[rig.rpc.endpoints[0].label] > 0 and bad[rig.rpc.endpoints[2].label] > 0
        assert bad[rig.rpc.endpoints[3].label] == 0
    finally:
        yield rig.poller.stopService()


GZIP_CHILD = r"""
import resource, sys
from twisted.internet import task
from eth_twisted.client.endpoints import RPCSettings
from eth_twisted.client.jsonrpc import RPCFailure
from eth_twisted.client.rpc import RPCClient

async def main(reactor):
    rpc = RPCClient(RPCSettings(rpc=(sys.argv[1],), rpc_timeout=30), clock=reactor)
    try:
        await rpc.block_number()
        outcome = "answered"
    except RPCFailure as e:
        outcome = e.kind
    await rpc.close()
    print(outcome, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)

task.react(lambda reactor: __import__("twisted.internet.defer").internet.defer.ensureDeferred(main(reactor)))
"""


def _child_rss(url: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", GZIP_CHILD, url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    outcome, rss = out.stdout.split()
    return outcome, int(rss)


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_gzip_bomb_is_refused_without_inflating(served: Served) -> Any:
    """A gzip answer inflating to 512 MiB is bad-encoding and costs no more memory than an ordinary one.

    The request asked for identity. Memory is the peak RSS of a client process, compared with one
    in the same test.
    """
    from twisted.internet import threads

    plain = FakeEthereumNode(height=5)
    bomb = FakeEthereumNode(height=5)
    bomb.fail("gzip", size=512 * 1024 * 1024, method="eth_chainId", times=-1)
    plain_url, bomb_url = served.fake(plain), served.fake(bomb)
    outcome, baseline = yield threads.deferToThread(_child_rss, plain_url)
    assert outcome == "answered"
    outcome, peak = yield threads.deferToThread(_child_rss, bomb_url)
    assert outcome == "bad-encoding"
    assert peak < 1.5 * baseline, (peak, baseline)
    assert all(h.get(b"Accept-Encoding") == [b"identity"] for h in bomb.headers)


class HeaderFlood:
    """A raw socket server (in threads) that answers a status line, then header lines forever."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.sent = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._flood, args=(conn,), daemon=True).start()

    def _flood(self, conn: Any) -> None:
        line = b"X-Pad: " + b"b" * 8000 + b"\r\n"
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while True:
                conn.sendall(line * 64)
                self.sent += len(line) * 64
        except OSError:
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_header_flood_is_cut_at_the_response_cap(served: Served) -> Any:
    """A node streaming header lines forever is too-large once a response passes its byte cap.

    It costs a client process no more memory than an ordinary answer (peak RSS compared in the
    same test).
    """
    from twisted.internet import threads

    plain_url = served.fake(FakeEthereumNode(height=5))
    flood = HeaderFlood()
    try:
        outcome, baseline = yield threads.deferToThread(_child_rss, plain_url)
        assert outcome == "answered"
        outcome, peak = yield threads.deferToThread(_child_rss, f"http://127.0.0.1:{flood.port}")
    finally:
        flood.close()
    assert outcome == "too-large"
    assert peak < 1.5 * baseline, (peak, baseline)


@pytest_twisted.inlineCallbacks
def test_redirects_never_followed_live(served: Served) -> Any:
    """Over real HTTP, 301/302/303/307/308 are the endpoint's http-3xx; the named host gets nothing."""
    elsewhere = FakeEthereumNode(height=9)
    elsewhere_url = served.fake(elsewhere)
    for status in (301, 302, 303, 307, 308):
        node = FakeEthereumNode(height=5)
        node.fail("redirect", status=status, location=elsewhere_url + "/steal", times=-1)
        rpc = RPCClient(RPCSettings(rpc=(served.fake(node),), rpc_timeout=5), clock=reactor)
        try:
            with pytest.raises(RPCFailure) as info:
                yield rpc.block_number()
            assert info.value.kind == "http-3xx", status
        finally:
            yield rpc.close()
    assert elsewhere.headers == []


@pytest_twisted.inlineCallbacks
def test_basic_auth_from_url_live(served: Served) -> Any:
    """An RPC URL with user:password@ authenticates with HTTP basic auth over a real socket."""
    node = FakeEthereumNode(height=7, auth=("alice", "s3cr%t@x"))
    url = served.fake(node).replace("http://", "http://alice:s3cr%25t%40x@")
    rpc = RPCClient(RPCSettings(rpc=(url,), rpc_timeout=5), clock=reactor)
    wrong = RPCClient(
        RPCSettings(rpc=(url.replace("alice:", "mallory:"),), rpc_timeout=5), clock=reactor
    )
    try:
        assert (yield rpc.head_round()) == 7
        with pytest.raises(RPCFailure) as info:
            yield wrong.head_round()
        assert info.value.kind == "http-4xx"
    finally:
        yield rpc.close()
        yield wrong.close()


@pytest_twisted.inlineCallbacks
def test_tls_failure_is_classified_live(tmp_path: Path) -> Any:
    """An https endpoint whose certificate does not verify is kind tls (no traceback)."""
    from twisted.internet import ssl

    from tests.support.certs import make_pki

    pki = make_pki(tmp_path)
    context = ssl.DefaultOpenSSLContextFactory(pki.server.key, pki.server.cert)
    port = reactor.listenSSL(
        0,
        Site(FakeEthereumNode(height=3)),
        context,  # type: ignore[attr-defined]
        interface="127.0.0.1",
    )
    rpc = RPCClient(
        RPCSettings(rpc=(f"https://127.0.0.1:{port.getHost().port}/",), rpc_timeout=5),
        clock=reactor,
    )
    try:
        with pytest.raises(RPCFailure) as info:
            yield rpc.block_number()
        assert info.value.kind == "tls"
    finally:
        yield rpc.close()
        yield port.stopListening()


def _polls(stats_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(v) for v in re.findall(r"^eth_client_polls_total\{[^}]*\} (\S+)$", text, re.M))


@pytest.mark.slow
def test_unreachable_endpoints_log_a_bounded_number_of_lines(tmp_path: Path) -> None:
    """A real eth client polling unreachable endpoints writes a bounded number of lines.

    It polls an unresolvable host and a refused port 60 times on a 0.05 s interval, and writes no
    traceback and at most one line per endpoint outage plus one for the failing polls.
    """
    stats, refused, server = free_port(), free_port(), free_port()
    log_path = tmp_path / "client.log"
    client = EthProcess(
        [
            "client",
            "--rpc",
            "http://nonexistent.invalid",
            "--rpc",
            f"http://127.0.0.1:{refused}",
            "--interval",
            "0.05",
            "--rpc-timeout",
            "2",
            "--spool",
            str(tmp_path / "spool.sqlite3"),
            "--stats",
            f"tcp:{stats}:interface=127.0.0.1",
            "--connect",
            f"tcp:host=127.0.0.1:port={server}",
        ],
        str(log_path),
        cwd=str(tmp_path),
    )
    client.start()
    try:
        wait_until(lambda: _polls(stats) >= 60, timeout=90, interval=0.5, what="60 polls")
    finally:
        client.kill(signal.SIGTERM)
    text = log_path.read_text()
    ours = [
        line
        for line in text.splitlines()
        if "[eth_twisted.client.rpc#" in line or "[eth_twisted.client.poller#" in line
    ]
    assert "Traceback" not in text and "#critical]" not in text, text[-3000:]
    assert len([line for line in ours if "is failing (dns)" in line]) == 1, ours
    assert len([line for line in ours if "is failing (connect)" in line]) == 1, ours
    assert len([line for line in ours if "poll failed" in line]) == 1, ours
    assert len(ours) <= 4, ours
