"""The misbehaving RPC node in front of anvil does what each mode says."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.faults.rpcfault import RPCFaultProcess
from tests.support import Anvil

pytestmark = [pytest.mark.fault, pytest.mark.live]


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[Anvil, RPCFaultProcess]]:
    chain = Anvil(block_time=None)
    chain.start()
    chain.mine(20)
    fault = RPCFaultProcess(chain.url)
    fault.start()
    yield chain, fault
    fault.stop()
    chain.stop()


def call(
    url: str, method: str, *params: Any, timeout: float = 5
) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 7, "method": method, "params": list(params)}
    ).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_pass_forwards_to_the_node(node: Any) -> None:
    """In pass mode answers are the node's own."""
    chain, fault = node
    fault.mode("pass")
    code, _, body = call(fault.url, "eth_blockNumber")
    assert code == 200 and int(json.loads(body)["result"], 16) == chain.head()


def test_garbage_html_and_429(node: Any) -> None:
    """Garbage is not JSON, html is an HTML page, 429 carries Retry-After."""
    _, fault = node
    fault.mode("garbage")
    _, _, body = call(fault.url, "eth_blockNumber")
    with pytest.raises(ValueError):
        json.loads(body)
    fault.mode("html")
    _, headers, body = call(fault.url, "eth_blockNumber")
    assert body.startswith(b"<html>") and "text/html" in headers.get(
        "Content-Type", headers.get("content-type", "")
    )
    fault.mode("429", 3)
    code, headers, _ = call(fault.url, "eth_blockNumber")
    assert code == 429 and (headers.get("Retry-After") or headers.get("retry-after")) == "3"
    fault.mode("pass")


def test_stall_sends_headers_then_never_the_rest(node: Any) -> None:
    """Stall answers the headers and part of the body, then nothing until the client gives up."""
    _, fault = node
    fault.mode("stall")
    try:
        with pytest.raises((socket.timeout, TimeoutError)):
            code, _, _ = call(fault.url, "eth_blockNumber", timeout=1)
        assert fault.status()["stalled_open"] >= 1
    finally:
        fault.mode("pass")


def test_lag_and_null(node: Any) -> None:
    """A lagging node reports head-K and null above it.

    A null node reports the head but null for the newest.
    """
    chain, fault = node
    head = chain.head()
    fault.mode("lag", 5)
    _, _, body = call(fault.url, "eth_blockNumber")
    assert int(json.loads(body)["result"], 16) == head - 5
    _, _, body = call(fault.url, "eth_getBlockByNumber", hex(head - 2), False)
    assert json.loads(body)["result"] is None
    _, _, body = call(fault.url, "eth_getBlockByNumber", hex(head - 6), False)
    assert int(json.loads(body)["result"]["number"], 16) == head - 6
    fault.mode("null", 2)
    _, _, body = call(fault.url, "eth_blockNumber")
    assert int(json.loads(body)["result"], 16) == head
    _, _, body = call(fault.url, "eth_getBlockByNumber", hex(head), False)
    assert json.loads(body)["result"] is None
    fault.mode("pass")
    assert fault.status()["faulted"] >= 3
