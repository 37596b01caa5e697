"""NodeSocket on a task.Clock against an in-memory autobahn server, joined with iosim: no network."""

from __future__ import annotations

import json
from typing import Any

import pytest
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from prometheus_client import CollectorRegistry
from twisted.internet import defer, error, task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.test.iosim import FakeTransport, IOPump, connect
from zope.interface import implementer

from eth_twisted.client.jsonrpc import RPCFailure
from eth_twisted.client.ws import NodeSocket, SocketSettings, retry_policy
from eth_twisted.client.wsproto import WSTarget
from eth_twisted.metrics import ClientMetrics

SUB = "0x" + "ab" * 16


def header(number: int, parent: int | None = None) -> dict[str, Any]:
    """A newHeads push's result with the fields the payloads use (and one extra)."""
    parent = number - 1 if parent is None else parent
    return {
        "number": hex(number),
        "hash": "0x" + f"{number:064x}",
        "parentHash": "0x" + f"{parent:064x}",
        "timestamp": hex(1_700_000_000 + number),
        "miner": "0x" + "00" * 20,
    }


class FakeNode(WebSocketServerProtocol):
    """A node: records requests; answers eth_subscribe itself when ``auto`` is set."""

    def onConnect(self, request: Any) -> None:
        self.requests: list[dict[str, Any]] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        msg = json.loads(payload)
        self.requests.append(msg)
        rig = self.factory.rig
        if msg["method"] in rig.auto:
            answer = rig.auto[msg["method"]]
            self.reply(msg["id"], answer(msg) if callable(answer) else answer)

    def reply(self, request_id: int, result: Any) -> None:
        self.send({"jsonrpc": "2.0", "id": request_id, "result": result})

    def error(self, request_id: int, code: int, message: str) -> None:
        self.send({"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}})

    def push(self, result: Any, subscription: str = SUB) -> None:
        self.send(
            {
                "jsonrpc": "2.0",
                "method": "eth_subscription",
                "params": {"subscription": subscription, "result": result},
            }
        )

    def send(self, obj: Any) -> None:
        self.sendMessage(json.dumps(obj).encode())

    def waiting(self, method: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method]


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connects each attempt to a new FakeNode through iosim (or refuses, when told)."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.attempts = 0

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        self.attempts += 1
        if self.rig.refuse:
            return defer.fail(error.ConnectionRefusedError())
        addr = IPv4Address("TCP", "127.0.0.1", 8545)
        client = factory.buildProtocol(addr)
        server = self.rig.server_factory.buildProtocol(addr)
        pump = connect(
            server,
            FakeTransport(server, isServer=True),
            client,
            FakeTransport(client, isServer=False),
            greet=False,
            clock=self.rig.clock,
        )
        self.rig.pumps.append(pump)
        self.rig.nodes.append(server)
        return defer.succeed(client)


class Rig:
    """A NodeSocket, its clock, its fake node(s), and what its callbacks saw."""

    def __init__(self, **settings: Any) -> None:
        self.clock = task.Clock()
        self.refuse = False
        self.auto: dict[str, Any] = {"eth_subscribe": SUB, "eth_unsubscribe": True}
        self.pumps: list[IOPump] = []
        self.nodes: list[FakeNode] = []
        self.server_factory = WebSocketServerFactory("ws://127.0.0.1:8545")
        self.server_factory.protocol = FakeNode
        self.server_factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
        self.server_factory.rig = self
        self.endpoint = FakeEndpoint(self)
        self.heads: list[dict[str, Any]] = []
        self.subscribed = 0
        self.downs: list[str] = []
        self.metrics = ClientMetrics(CollectorRegistry())
        self.socket = NodeSocket(
            "ws://user:secret@127.0.0.1:8545/key",
            SocketSettings(**settings),
            clock=self.clock,
            endpoint=self.endpoint,
            on_head=self.heads.append,
            on_subscribed=self._subscribed,
            on_down=self.downs.append,
            metrics=self.metrics,
            jitter=lambda: 0.0,
        )

    def _subscribed(self) -> None:
        self.subscribed += 1

    @property
    def node(self) -> FakeNode:
        return self.nodes[-1]

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()

    def start(self) -> Rig:
        self.socket.start()
        self.flush()
        return self

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.flush()

    def metric(self, name: str, **labels: str) -> float:
        labels.setdefault("endpoint", self.socket.label)
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def result_of(d: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_connects_and_subscribes() -> None:
    """Start: the handshake, eth_subscribe newHeads, then subscribed and on_subscribed once."""
    rig = Rig().start()
    assert rig.socket.state == "subscribed"
    assert rig.socket.subscription == SUB
    assert rig.subscribed == 1
    assert rig.node.waiting("eth_subscribe")[0]["params"] == ["newHeads"]
    assert rig.metric("eth_client_ws_state", eth_client_ws_state="subscribed") == 1


def test_credentials_become_a_header_and_stay_out_of_the_label() -> None:
    """A URL's user:password@ is a basic auth header; the label holds neither it nor the path."""
    rig = Rig().start()
    assert rig.socket.label == "ws://127.0.0.1:8545"
    assert rig.node.http_headers["authorization"] == "Basic dXNlcjpzZWNyZXQ="
    assert rig.node.http_request_path == "/key"


def test_url_must_be_ws() -> None:
    """http:// is refused with a message that does not repeat the URL."""
    with pytest.raises(ValueError) as info:
        WSTarget.from_url("http://user:secret@host/")
    assert "secret" not in str(info.value)


def test_replies_matched_by_id_out_of_order() -> None:
    """Three requests answered in reverse order each get their own result."""
    rig = Rig().start()
    ds = [rig.socket.request("eth_getBlockByNumber", [hex(n), False]) for n in range(3)]
    rig.flush()
    asked = rig.node.waiting("eth_getBlockByNumber")
    for req in reversed(asked):
        rig.node.reply(req["id"], req["params"][0])
    rig.flush()
    assert [result_of(d) for d in ds] == ["0x0", "0x1", "0x2"]


def test_error_objects_are_classified() -> None:
    """A JSON-RPC error is rpc-error; -32005 is rate-limit, as over HTTP."""
    rig = Rig().start()
    d1 = rig.socket.request("eth_call", [])
    d2 = rig.socket.request("eth_call", [])
    rig.flush()
    first, second = rig.node.waiting("eth_call")
    rig.node.error(first["id"], -32601, "no such method")
    rig.node.error(second["id"], -32005, "slow down")
    rig.flush()
    first_failure = result_of(d1).value
    assert first_failure.kind == "rpc-error" and "eth_call: JSON-RPC error -32601" in str(
        first_failure
    )
    assert result_of(d2).value.kind == "rate-limit"


def test_request_deadline_fires_on_the_clock() -> None:
    """An unanswered request fails timeout after request_timeout; a late reply is dropped."""
    rig = Rig(request_timeout=3.0).start()
    d = rig.socket.request("eth_chainId", [])
    rig.flush()
    rig.advance(2.9)
    assert not d.called
    rig.advance(0.2)
    failure = result_of(d)
    assert failure.check(RPCFailure) and failure.value.kind == "timeout"
    rig.node.reply(rig.node.waiting("eth_chainId")[0]["id"], "0x1")
    rig.flush()
    assert rig.socket.state == "subscribed"
    assert rig.metric("eth_client_ws_invalid_messages_total", kind="unknown-id") == 1


def test_request_when_down_is_unavailable() -> None:
    """Before start, a request fails unavailable at once."""
    rig = Rig()
    assert result_of(rig.socket.request("eth_chainId", [])).value.kind == "unavailable"


def test_heartbeat_answered_keeps_the_connection() -> None:
    """Every heartbeat s an eth_blockNumber goes out; answered, the connection stays."""
    rig = Rig(heartbeat=20.0, heartbeat_timeout=10.0)
    rig.auto["eth_blockNumber"] = "0x10"
    rig.start()
    for _ in range(3):
        rig.advance(20.0)
    assert len(rig.node.waiting("eth_blockNumber")) == 3
    assert rig.socket.heartbeat_head == 16
    assert rig.socket.state == "subscribed" and len(rig.nodes) == 1


def test_missed_heartbeat_drops_and_reconnects() -> None:
    """An unanswered heartbeat drops the connection; it reconnects after the backoff and resubscribes."""
    rig = Rig(heartbeat=20.0, heartbeat_timeout=10.0, backoff_initial=1.0).start()
    rig.advance(20.0)
    assert rig.node.waiting("eth_blockNumber")
    rig.advance(10.0)
    assert rig.socket.state == "connecting"
    assert rig.downs and "heartbeat" in rig.downs[0]
    assert rig.metric("eth_client_ws_heartbeat_misses_total") == 1
    rig.advance(1.0)
    assert len(rig.nodes) == 2
    assert rig.socket.state == "subscribed" and rig.subscribed == 2
    assert rig.socket.reconnects == 1
    assert rig.metric("eth_client_ws_reconnects_total") == 1


def test_pushes_before_the_subscribe_reply_are_held() -> None:
    """Pushes of the coming id that beat the subscribe reply are delivered once it arrives."""
    rig = Rig()
    del rig.auto["eth_subscribe"]
    rig.start()
    request = rig.node.waiting("eth_subscribe")[0]
    rig.node.push(header(1))
    rig.node.push(header(2))
    rig.flush()
    assert rig.heads == [] and rig.socket.state == "open"
    rig.node.reply(request["id"], SUB)
    rig.flush()
    assert [h["number"] for h in rig.heads] == ["0x1", "0x2"]
    assert rig.subscribed == 1


def test_held_pushes_are_bounded() -> None:
    """Past max_pending_pushes the oldest held pushes go (and are counted)."""
    rig = Rig(max_pending_pushes=2)
    del rig.auto["eth_subscribe"]
    rig.start()
    request = rig.node.waiting("eth_subscribe")[0]
    for n in range(1, 5):
        rig.node.push(header(n))
    rig.flush()
    rig.node.reply(request["id"], SUB)
    rig.flush()
    assert [h["number"] for h in rig.heads] == ["0x3", "0x4"]
    assert rig.metric("eth_client_ws_invalid_messages_total", kind="overflow") == 2


def test_heads_are_checked_and_canonical() -> None:
    """on_head gets number, hash, parentHash, timestamp in lowercase hex, nothing else."""
    rig = Rig().start()
    h = header(7)
    h["hash"] = h["hash"].upper().replace("0X", "0x")
    rig.node.push(h)
    rig.flush()
    assert rig.heads == [
        {
            "number": "0x7",
            "hash": "0x" + f"{7:064x}",
            "parentHash": "0x" + f"{6:064x}",
            "timestamp": hex(1_700_000_007),
        }
    ]
    assert rig.socket.pushes == 1 and rig.socket.last_push_at == rig.clock.seconds()


def test_unknown_subscription_ignored() -> None:
    """A push for another subscription id is not delivered (and is not malformed)."""
    rig = Rig().start()
    rig.node.push(header(1), subscription="0x99")
    rig.flush()
    assert rig.heads == [] and rig.socket.invalid == 0


@pytest.mark.parametrize(
    "result",
    [
        None,
        "0x1",
        {**header(1), "hash": "0x12"},
        {**header(1), "number": "1"},
        {**header(1), "parentHash": None},
        {**header(1), "timestamp": "0x" + "f" * 17},
    ],
)
def test_invalid_push_counted_and_dropped(result: Any) -> None:
    """A malformed head is counted, logged once, dropped; the socket stays up and the next one arrives."""
    rig = Rig().start()
    rig.node.push(result)
    rig.node.push(header(2))
    rig.flush()
    assert [h["number"] for h in rig.heads] == ["0x2"]
    assert rig.metric("eth_client_ws_invalid_messages_total", kind="bad-push") == 1
    assert rig.socket.state == "subscribed"


def test_malformed_messages_counted_never_crash() -> None:
    """Non-JSON, binary, non-object and id-less messages are counted; the connection stays."""
    rig = Rig().start()
    rig.node.sendMessage(b"not json")
    rig.node.sendMessage(b"\x00\x01", isBinary=True)
    rig.node.sendMessage(b"[1, 2]")
    rig.node.sendMessage(b'{"jsonrpc": "2.0"}')
    rig.node.sendMessage(b'{"jsonrpc": "2.0", "method": "eth_subscription", "params": 5}')
    rig.flush()
    assert rig.socket.invalid == 5
    assert rig.socket.state == "subscribed"
    assert rig.socket.bad_input.lines == 1  # one line for the episode


def test_over_cap_message_drops_the_connection() -> None:
    """A message over max_message drops the connection (autobahn's limit); it reconnects."""
    rig = Rig(max_message=4096).start()
    rig.node.sendMessage(json.dumps({"x": "y" * 5000}).encode())
    rig.flush()
    assert rig.socket.state == "connecting"
    assert rig.downs == [
        "closed (1006): received WebSocket message size 5009 exceeds payload limit of 4096 octets"
    ]
    rig.advance(1.0)
    assert rig.socket.state == "subscribed" and len(rig.nodes) == 2


def test_stop_fails_pending_requests() -> None:
    """stop() fails every pending request with CancelledError and closes the connection."""
    rig = Rig().start()
    d = rig.socket.request("eth_chainId", [])
    stopped = rig.socket.stop()
    rig.flush()
    assert result_of(d).check(CancelledError)
    assert result_of(stopped) is None
    assert rig.socket.state == "down"
    rig.advance(60.0)
    assert len(rig.nodes) == 1  # no reconnect after stop


def test_connection_lost_fails_pending_requests() -> None:
    """A lost connection fails its requests connection-lost and calls on_down once."""
    rig = Rig().start()
    d = rig.socket.request("eth_chainId", [])
    rig.node.transport.loseConnection()
    rig.flush()
    assert result_of(d).value.kind == "connection-lost"
    assert len(rig.downs) == 1


def test_handshake_deadline_on_the_clock() -> None:
    """A server that accepts TCP and never answers the handshake is dropped after open_timeout."""
    rig = Rig(open_timeout=5.0)
    rig.socket.start()  # not flushed: the handshake never reaches the server
    rig.clock.advance(4.9)
    assert rig.socket.state == "connecting"
    rig.clock.advance(0.2)
    rig.flush()
    assert rig.endpoint.attempts == 1
    assert rig.socket.outage.kind == "timeout"


def test_failed_subscribe_does_not_reset_the_backoff() -> None:
    """A node that opens the WebSocket but refuses eth_subscribe is retried with growing delays."""
    rig = Rig(backoff_initial=1.0, backoff_max=15.0)
    rig.auto["eth_subscribe"] = None
    del rig.auto["eth_subscribe"]
    rig.start()
    starts = [rig.clock.seconds()]
    for _ in range(5):
        rig.node.error(rig.node.waiting("eth_subscribe")[-1]["id"], -32601, "no subscriptions")
        rig.flush()
        before = rig.endpoint.attempts
        while rig.endpoint.attempts == before:
            rig.advance(0.5)
        starts.append(rig.clock.seconds())
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps == [1.0, 2.0, 4.0, 8.0, 15.0]
    assert rig.socket.outage.lines == 1  # one line for the whole outage
    assert rig.subscribed == 0


def test_refused_connections_back_off_and_recover_with_one_pair_of_lines() -> None:
    """Refused connects back off; the outage is one start line and one end line."""
    rig = Rig()
    rig.refuse = True
    rig.socket.start()
    for _ in range(6):
        rig.advance(16.0)
    assert rig.endpoint.attempts == 7
    rig.refuse = False
    rig.advance(16.0)
    assert rig.socket.state == "subscribed"
    assert rig.socket.outage.lines == 2
    assert rig.socket.reconnects == 0  # the first subscription, late


def test_backoff_policy_caps_and_jitters() -> None:
    """The retry policy doubles from backoff_initial to backoff_max, plus the jitter."""
    policy = retry_policy(SocketSettings(backoff_initial=1.0, backoff_max=15.0), lambda: 0.25)
    assert [policy(n) for n in range(1, 8)] == [1.25, 2.25, 4.25, 8.25, 15.25, 15.25, 15.25]
    assert policy(10_000) == 15.25


def test_resubscribe_on_the_same_socket() -> None:
    """resubscribe() unsubscribes the old id, subscribes anew, then on_subscribed; old pushes ignored."""
    rig = Rig().start()
    new = "0x" + "cd" * 16
    rig.auto["eth_subscribe"] = new
    d = rig.socket.resubscribe()
    rig.flush()
    assert result_of(d) is None
    assert rig.node.waiting("eth_unsubscribe")[0]["params"] == [SUB]
    assert rig.socket.subscription == new and rig.subscribed == 2
    rig.node.push(header(1))  # the old id
    rig.node.push(header(2), subscription=new)
    rig.flush()
    assert [h["number"] for h in rig.heads] == ["0x2"]
    assert len(rig.nodes) == 1 and rig.socket.resubscribes == 1
    assert rig.metric("eth_client_ws_resubscribes_total") == 1


def test_resubscribe_ignores_a_failed_unsubscribe() -> None:
    """An eth_unsubscribe error does not stop the new subscription."""
    rig = Rig().start()
    del rig.auto["eth_unsubscribe"]
    d = rig.socket.resubscribe()
    rig.flush()
    rig.node.error(rig.node.waiting("eth_unsubscribe")[0]["id"], -32000, "gone")
    rig.flush()
    assert result_of(d) is None and rig.socket.state == "subscribed"


def test_reconnect_drops_and_comes_back() -> None:
    """reconnect() aborts the connection; a new one subscribes after the first backoff step."""
    rig = Rig().start()
    rig.socket.reconnect()
    rig.flush()
    assert rig.socket.state == "connecting" and len(rig.downs) == 1
    rig.advance(1.0)
    assert rig.socket.state == "subscribed" and rig.subscribed == 2 and len(rig.nodes) == 2


def test_settings_checked() -> None:
    """A zero deadline or an inverted backoff is refused at construction."""
    with pytest.raises(ValueError):
        SocketSettings(request_timeout=0).check()
    with pytest.raises(ValueError):
        SocketSettings(backoff_initial=20.0, backoff_max=15.0).check()


def test_stop_during_the_handshake() -> None:
    """stop() before the handshake completes ends the attempt; nothing reconnects."""
    rig = Rig()
    rig.socket.start()  # not flushed: the handshake is in flight
    stopped = rig.socket.stop()
    rig.flush()
    assert result_of(stopped) is None
    assert rig.socket.state == "down"
    rig.advance(60.0)
    assert rig.endpoint.attempts == 1


def test_stop_while_waiting_to_retry() -> None:
    """stop() between refused attempts cancels the retry at once."""
    rig = Rig()
    rig.refuse = True
    rig.socket.start()
    stopped = rig.socket.stop()
    assert result_of(stopped) is None
    rig.advance(60.0)
    assert rig.endpoint.attempts == 1 and rig.socket.state == "down"


def test_request_during_the_first_connect_waits_for_it() -> None:
    """A request made while the first connection is being made waits for it, then is sent.

    (The client's first poll starts with the socket: it must not fail 'not connected'.)
    A request made while reconnecting later fails at once, as the other endpoints answer.
    """
    rig = Rig(open_timeout=5.0)
    rig.auto["eth_chainId"] = "0x7a69"
    rig.socket.start()  # not flushed: the handshake is under way
    d = rig.socket.request("eth_chainId", [])
    assert not d.called
    rig.flush()
    assert result_of(d) == "0x7a69"
    rig.socket.reconnect()
    rig.flush()
    assert rig.socket.state == "connecting"
    assert result_of(rig.socket.request("eth_chainId", [])).value.kind == "unavailable"


def test_request_during_a_first_connect_that_never_opens_fails_after_open_timeout() -> None:
    """The wait is bounded: open_timeout, then 'unavailable'."""
    rig = Rig(open_timeout=5.0)
    rig.socket.start()
    d = rig.socket.request("eth_chainId", [])
    rig.clock.advance(4.9)
    assert not d.called
    rig.clock.advance(0.2)
    assert result_of(d).value.kind == "unavailable"
