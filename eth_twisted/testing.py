"""Fakes that ship with the package, for our tests and for anyone embedding it.

:class:`FakeEthereumNode` is an in-memory chain served over JSON-RPC (alone, or several
behind one :class:`FakeNetwork`); :class:`MemoryOutbox` is the client outbox's
poller-facing half, in memory. Their docstrings say how to drive them; docs/architecture.md
(section 4) lists them in the folder map.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from eth_twisted.client.outbox import Cursor, OutboxSettings
from eth_twisted.errors import OutboxFull
from eth_twisted.interfaces import maybe_global_reactor
from eth_twisted.model import sha256_hex

ZERO_HASH = "0x" + "00" * 32

FAULT_MODES = (
    "garbage",  # 200 with bytes that are not JSON
    "html",  # 200 with an HTML error page
    "truncated",  # 200 with the right answer cut in half
    "http-429",  # 429 Too Many Requests (``retry_after`` sets the header)
    "http-5xx",  # 503 Service Unavailable (``retry_after`` sets the header)
    "http-4xx",  # 403 Forbidden
    "rpc-error",  # a JSON-RPC error object (``code``, ``message``)
    "rate-limit",  # JSON-RPC error -32005 "limit exceeded"
    "null",  # result null (a load-balanced node behind the head it reported)
    "wrong-id",  # an envelope answering another id
    "both",  # result and error both present
    "no-version",  # no "jsonrpc": "2.0"
    "big",  # a valid answer padded past ``size`` bytes
    "stall-headers",  # never answers
    "stall-body",  # headers and part of the body, then nothing
    "drop",  # closes the connection without answering
    "redirect",  # ``status`` (default 303) with ``Location: location``
    "gzip",  # the answer gzip-compressed, padded with ``size`` zero bytes before compression
    "result",  # the answer's result replaced by ``result`` (a value, or a function of the real one)
)


@dataclass
class Fault:
    """One scheduled misbehaviour of a :class:`FakeEthereumNode`."""

    mode: str
    times: int = 1
    """How many matching requests it spoils; -1 for every one until cleared."""
    method: str | None = None
    """Only requests for this JSON-RPC method (None: any)."""
    retry_after: str | None = None
    code: int = -32000
    message: str = "internal error"
    size: int = 5 * 1024 * 1024
    status: int = 303
    location: str = "http://elsewhere.example/"
    result: Any = None


def _block_hash(seed: str, salt: int, number: int, parent: str) -> str:
    return "0x" + hashlib.sha256(f"{seed}:{salt}:{number}:{parent}".encode()).hexdigest()


class FakeEthereumNode(Resource):
    """An Ethereum node in memory: a chain of headers behind a JSON-RPC resource.

    ``seed`` makes the chain's hashes (a different seed is a different chain,
    genesis included). Answers ``eth_blockNumber``, ``eth_chainId``,
    ``net_version``, ``eth_getBlockByHash`` and ``eth_getBlockByNumber`` (number,
    ``latest``, ``earliest``, ``safe`` and ``finalized`` at :attr:`safe_depth` and
    :attr:`finalized_depth` below the head; the ``full`` flag is ignored).

    Drive it in unit tests with ``treq.testing.StubTreq(node)`` (or several nodes behind
    one :class:`FakeNetwork`, routed by host name), or listen on a real port with
    :meth:`listen` for live tests. It mines, reorganises, lags, and misbehaves on demand
    (:meth:`fail`).
    """

    isLeaf = True

    def __init__(
        self,
        chain_id: int = 1337,
        *,
        seed: str = "fake",
        height: int = 0,
        genesis_timestamp: int = 1_700_000_000,
        block_time: int = 12,
        auth: tuple[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.chain_id = chain_id
        self.seed = seed
        self.genesis_timestamp = genesis_timestamp
        self.block_time = block_time
        self.blocks: list[dict[str, Any]] = []
        self.lag = 0
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, list[Any]]] = []
        """Every (method, params) received, in order."""
        self.stalled: list[Request] = []
        self.auth = auth
        """(user, password) HTTP basic auth requires; 401 without it."""
        self.headers: list[dict[bytes, list[bytes]]] = []
        """The request headers of every request, in order."""
        self.safe_depth: int | None = 32
        """``safe`` is this many blocks below the head (None: the tag is unknown)."""
        self.finalized_depth: int | None = 64
        """``finalized`` is this many blocks below the head (None: the tag is unknown)."""
        self._salt = 0
        self._append_block()
        self.mine(height)

    # -- the chain -----------------------------------------------------------

    @property
    def head(self) -> int:
        """Number of the newest block."""
        return len(self.blocks) - 1

    @property
    def genesis_hash(self) -> str:
        """Hash of block 0."""
        return str(self.blocks[0]["hash"])

    def _append_block(self) -> None:
        number = len(self.blocks)
        parent = self.blocks[-1]["hash"] if self.blocks else ZERO_HASH
        self.blocks.append(
            {
                "number": hex(number),
                "hash": _block_hash(self.seed, self._salt, number, parent),
                "parentHash": parent,
                "timestamp": hex(self.genesis_timestamp + number * self.block_time),
                "transactions": [],
            }
        )

    def mine(self, blocks: int = 1) -> int:
        """Add ``blocks`` blocks; return the new head number."""
        for _ in range(blocks):
            self._append_block()
        return self.head

    def fabricate(self, blocks: int) -> int:
        """Mine ``blocks`` blocks no honest node of this chain will ever have (a liar's chain)."""
        self._salt += 1
        return self.mine(blocks)

    def reorg(self, depth: int) -> None:
        """Replace the newest ``depth`` blocks with others at the same heights."""
        if not 0 < depth <= self.head:
            raise ValueError(f"reorg depth must be 1..{self.head}")
        keep = len(self.blocks) - depth
        del self.blocks[keep:]
        self._salt += 1
        for _ in range(depth):
            self._append_block()

    def rollback(self, depth: int) -> None:
        """Drop the newest ``depth`` blocks without replacing them (``anvil_rollback``)."""
        if not 0 < depth <= self.head:
            raise ValueError(f"rollback depth must be 1..{self.head}")
        del self.blocks[len(self.blocks) - depth :]
        self._salt += 1

    def reset(self, chain_id: int | None = None, seed: str | None = None, height: int = 0) -> None:
        """Start a new chain from scratch (a dev node restarted): new genesis, ``height`` blocks."""
        if chain_id is not None:
            self.chain_id = chain_id
        self.seed = seed if seed is not None else self.seed + "'"
        self._salt = 0
        self.blocks = []
        self._append_block()
        self.mine(height)

    def set_lag(self, blocks: int) -> None:
        """Report a head ``blocks`` below the real one and know nothing above it."""
        self.lag = blocks

    def block(self, number: int) -> dict[str, Any]:
        """The block at ``number`` (a copy of the RPC object)."""
        return dict(self.blocks[number])

    # -- misbehaviour --------------------------------------------------------

    def fail(
        self, mode: str, *, times: int = 1, method: str | None = None, **options: Any
    ) -> Fault:
        """Spoil the next ``times`` requests (for ``method`` only, if given) with ``mode``."""
        if mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}; one of {', '.join(FAULT_MODES)}")
        fault = Fault(mode, times=times, method=method, **options)
        self.faults.append(fault)
        return fault

    def release_stalled(self) -> None:
        """Finish every stalled request (their clients have usually given up)."""
        stalled, self.stalled = self.stalled, []
        for request in stalled:
            if not request.finished and not getattr(request, "_disconnected", False):
                request.finish()

    def _take_fault(self, method: str) -> Fault | None:
        for fault in self.faults:
            if fault.method is None or fault.method == method:
                if fault.times > 0:
                    fault.times -= 1
                    if fault.times == 0:
                        self.faults.remove(fault)
                return fault
        return None

    # -- JSON-RPC ------------------------------------------------------------

    def answer(self, method: str, params: list[Any]) -> tuple[Any, dict[str, Any] | None]:
        """``(result, error)`` for one call on the current chain."""
        visible = self.head - self.lag
        if method == "eth_blockNumber":
            return hex(visible), None
        if method == "eth_chainId":
            return hex(self.chain_id), None
        if method == "net_version":
            return str(self.chain_id), None
        if method == "eth_getBlockByHash":
            wanted = str(params[0]).lower() if params else ""
            for block in self.blocks[: visible + 1]:
                if block["hash"] == wanted:
                    return dict(block), None
            return None, None
        if method == "eth_getBlockByNumber":
            tag = params[0] if params else "latest"
            if tag in ("latest", "pending"):
                number = visible
            elif tag in ("safe", "finalized"):
                depth = self.safe_depth if tag == "safe" else self.finalized_depth
                if depth is None:
                    return None, {"code": -39001, "message": f"unknown block tag {tag}"}
                number = max(visible - depth, 0)
            elif tag == "earliest":
                number = 0
            else:
                try:
                    number = int(tag, 16)
                except (TypeError, ValueError):
                    return None, {"code": -32602, "message": "invalid block number"}
            if 0 <= number <= visible:
                return self.block(number), None
            return None, None
        return None, {"code": -32601, "message": f"the method {method} does not exist"}

    def render_POST(self, request: Request) -> bytes | int:
        """Serve one JSON-RPC request (batches are refused), with any scheduled fault."""
        self.headers.append({k: list(v) for k, v in request.requestHeaders.getAllRawHeaders()})
        if self.auth is not None:
            import base64

            expected = b"Basic " + base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode())
            if request.getHeader(b"authorization") != expected:
                request.setResponseCode(401)
                request.setHeader(b"www-authenticate", b'Basic realm="node"')
                return b"unauthorized"
        try:
            call = json.loads(request.content.read())  # type: ignore[attr-defined]
            method = str(call["method"])
            params = list(call.get("params") or [])
            call_id = call.get("id")
        except (ValueError, KeyError, TypeError, AttributeError):
            request.setResponseCode(400)
            return self._json(
                {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse error"}},
                request,
            )
        self.requests.append((method, params))
        result, err = self.answer(method, params)
        envelope: dict[str, Any] = {"jsonrpc": "2.0", "id": call_id}
        if err is not None:
            envelope["error"] = err
        else:
            envelope["result"] = result
        fault = self._take_fault(method)
        if fault is None:
            return self._json(envelope, request)
        return self._misbehave(fault, envelope, request)

    def _json(self, obj: Any, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(obj).encode()

    def _misbehave(self, fault: Fault, envelope: dict[str, Any], request: Request) -> bytes | int:
        mode = fault.mode
        if mode == "garbage":
            return b"\x00\x17not json at all {{{"
        if mode == "html":
            request.setHeader(b"content-type", b"text/html")
            return b"<html><body><h1>502 Bad Gateway</h1></body></html>"
        if mode == "truncated":
            body = self._json(envelope, request)
            return body[: len(body) // 2]
        if mode in ("http-429", "http-5xx", "http-4xx"):
            request.setResponseCode({"http-429": 429, "http-5xx": 503, "http-4xx": 403}[mode])
            if fault.retry_after is not None:
                request.setHeader(b"retry-after", fault.retry_after.encode())
            return b'{"message":"slow down or go away"}'
        if mode == "rpc-error":
            envelope.pop("result", None)
            envelope["error"] = {"code": fault.code, "message": fault.message}
            return self._json(envelope, request)
        if mode == "rate-limit":
            envelope.pop("result", None)
            envelope["error"] = {"code": -32005, "message": "limit exceeded"}
            return self._json(envelope, request)
        if mode == "null":
            envelope.pop("error", None)
            envelope["result"] = None
            return self._json(envelope, request)
        if mode == "wrong-id":
            envelope["id"] = (envelope["id"] or 0) + 1000 if isinstance(envelope["id"], int) else 1
            return self._json(envelope, request)
        if mode == "both":
            envelope.setdefault("result", None)
            envelope["error"] = {"code": -32000, "message": "both"}
            return self._json(envelope, request)
        if mode == "no-version":
            del envelope["jsonrpc"]
            return self._json(envelope, request)
        if mode == "big":
            envelope["padding"] = "x" * fault.size
            return self._json(envelope, request)
        if mode == "stall-headers":
            self.stalled.append(request)
            return NOT_DONE_YET
        if mode == "stall-body":
            body = self._json(envelope, request)
            request.setHeader(b"content-length", str(len(body)).encode())
            request.write(body[: len(body) // 2])
            self.stalled.append(request)
            return NOT_DONE_YET
        if mode == "redirect":
            request.setResponseCode(fault.status)
            request.setHeader(b"location", fault.location.encode())
            return b"moved"
        if mode == "gzip":
            import zlib

            envelope["padding"] = ""
            text = json.dumps(envelope).encode()
            squash = zlib.compressobj(9, zlib.DEFLATED, 31)
            parts = [squash.compress(text[:-2])]
            chunk = b" " * (1 << 20)
            for offset in range(0, fault.size, len(chunk)):
                parts.append(squash.compress(chunk[: fault.size - offset]))
            parts.append(squash.compress(text[-2:]) + squash.flush())
            body = b"".join(parts)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-encoding", b"gzip")
            return body
        if mode == "result":
            envelope.pop("error", None)
            envelope["result"] = (
                fault.result(envelope.get("result")) if callable(fault.result) else fault.result
            )
            return self._json(envelope, request)
        if mode == "drop":
            request.channel.transport.loseConnection()  # type: ignore[union-attr]
            return NOT_DONE_YET
        raise AssertionError(mode)  # pragma: no cover

    # -- a real port -----------------------------------------------------------

    def listen(
        self, reactor: Any = None, port: int = 0, interface: str = "127.0.0.1"
    ) -> IListeningPort:
        """Serve on a real TCP port (0: any free one); ``url_of(port)`` gives the URL."""
        reactor = maybe_global_reactor(reactor)
        return reactor.listenTCP(port, Site(self), interface=interface)  # type: ignore[no-any-return]


def url_of(port: IListeningPort) -> str:
    """``http://host:port`` of a listening port from :meth:`FakeEthereumNode.listen`."""
    address = port.getHost()
    return f"http://{address.host}:{address.port}"  # type: ignore[attr-defined]


class FakeNetwork(Resource):
    """Several fake nodes behind one resource, chosen by the request's Host header.

    ``StubTreq(FakeNetwork({"a.example": node_a, "b.example:8545": node_b}))``
    lets one RPC client talk to ``http://a.example/`` and
    ``http://b.example:8545/key`` as two endpoints.
    """

    isLeaf = True

    def __init__(self, nodes: dict[str, FakeEthereumNode]) -> None:
        super().__init__()
        self.nodes = dict(nodes)
        self.requests: list[tuple[str, str]] = []
        """(method, Host header) of every request, in order (redirects followed show here)."""

    def render(self, request: Request) -> bytes | int:
        """Hand the request to the node named by its Host header (404 for none)."""
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        self.requests.append((request.method.decode("ascii", "replace"), host))
        node = self.nodes.get(host) or self.nodes.get(host.split(":")[0])
        if node is None:
            request.setResponseCode(404)
            return b"no such node"
        return node.render(request)  # type: ignore[no-any-return]


@dataclass
class MemoryOutbox:
    """The poller-facing half of the outbox, in memory.

    ``items`` holds what waits for an ack (a payload already waiting is kept
    once, like the real outbox); ``log`` holds every item ever appended,
    duplicates included, so tests can prove there were none.
    ``fail_with`` makes the next :meth:`append` raise it instead.
    """

    max_outbox: int = field(default_factory=lambda: OutboxSettings().max_outbox)
    initial_cursor: Cursor | None = None
    items: list[tuple[bytes, int | None]] = field(default_factory=list)
    log: list[tuple[bytes, int | None]] = field(default_factory=list)
    gaps: list[tuple[int, int, str]] = field(default_factory=list)
    cursors: list[Cursor] = field(default_factory=list)
    fail_with: Exception | None = None
    chain: dict[int, str] = field(default_factory=dict)
    state: dict[str, str] = field(default_factory=dict)
    on_append: Callable[[list[tuple[bytes, int | None]], Cursor], None] | None = None

    def __post_init__(self) -> None:
        self._cursor = self.initial_cursor

    def cursor(self) -> Cursor | None:
        """The last block enqueued, or None before the first."""
        return self._cursor

    def free_slots(self) -> int:
        """How many more messages fit."""
        return max(self.max_outbox - len(self.items), 0)

    def append(
        self,
        items: list[tuple[bytes, int | None]],
        cursor: Cursor,
        *,
        chain: Sequence[tuple[int, str, str]] = (),
        rewind_to: int | None = None,
    ) -> None:
        """Add items and move the cursor together; OutboxFull (nothing changed) if they do not fit."""
        if self.fail_with is not None:
            exc, self.fail_with = self.fail_with, None
            raise exc
        if any(not payload for payload, _ in items):
            raise ValueError("an empty payload cannot be a message")
        if len(items) > self.free_slots():
            raise OutboxFull(f"memory outbox holds {len(self.items)} of {self.max_outbox}")
        waiting = {sha256_hex(p) for p, _ in self.items}
        for payload, number in items:
            self.log.append((payload, number))
            h = sha256_hex(payload)
            if h not in waiting:
                waiting.add(h)
                self.items.append((payload, number))
        self._cursor = cursor
        self.cursors.append(cursor)
        if rewind_to is not None:
            self.chain = {n: h for n, h in self.chain.items() if n <= rewind_to}
        self.chain.update({n: h for n, h, _ in chain})
        if self.on_append is not None:
            self.on_append(items, cursor)

    def recent_blocks(self, limit: int) -> list[tuple[int, str]]:
        """The newest ``limit`` remembered canonical blocks, oldest first."""
        return sorted(self.chain.items())[-limit:]

    def get_state(self, key: str) -> str | None:
        """A remembered value."""
        return self.state.get(key)

    def set_state(self, key: str, value: str) -> None:
        """Remember a value."""
        self.state[key] = value

    def payloads(self) -> list[bytes]:
        """Every payload ever appended, in order."""
        return [p for p, _ in self.log]

    def record_gap(self, first: int, last: int, reason: str) -> None:
        """Remember a skipped range."""
        self.gaps.append((first, last, reason))

    def reset_cursor(self) -> None:
        """Forget the cursor."""
        self._cursor = None
        self.chain.clear()
        self.state.clear()

    def ack_all(self) -> list[tuple[bytes, int | None]]:
        """Remove and return every waiting item (as if the server acknowledged them)."""
        items, self.items = self.items, []
        return items

    def logged_numbers(self) -> list[int | None]:
        """Block numbers of every item ever appended, in order."""
        return [number for _, number in self.log]
