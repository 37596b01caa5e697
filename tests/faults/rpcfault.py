"""A misbehaving JSON-RPC node: an HTTP proxy in front of a real node (anvil), faults switched at run time.

Modes (``mode NAME [ARGS]`` on the line-based control port, as for the TCP
fault proxy):

- ``pass``: forward every request to the node and its answer back;
- ``garbage``: 200 with bytes that are not JSON;
- ``html``: 200 with an HTML error page (a gateway in front of the node);
- ``429 [SECONDS]``: ``429 Too Many Requests`` with ``Retry-After: SECONDS``;
- ``stall``: headers and half of a body, then nothing (the connection stays
  open until the client gives up, or the mode leaves ``stall``);
- ``lag K``: a node K blocks behind: ``eth_blockNumber`` answers head-K and
  blocks above that are ``null``;
- ``null K``: a load-balanced node that reports the true head but answers
  ``null`` for the newest K blocks;
- ``liar K``: a lying node: ``eth_blockNumber`` answers head+K (``liar max``:
  2**256-1) and the blocks above the real head are invented, chained to it;
- ``huge-head``: ``eth_blockNumber`` answers a 1,200-bit number;
- ``huge-timestamp``: every block's timestamp has 4,000 hex digits;
- ``redirect CODE URL``: answers CODE (301, 302, 303, 307, 308) pointing at URL;
- ``gzip SIZE``: the true answer, gzip-encoded, padded with SIZE bytes of spaces
  before compression (a decompression bomb of SIZE bytes).

``status`` answers ``requests=``, ``faulted=`` and the mode.

Run it as ``python -m tests.faults.rpcfault LISTEN_PORT NODE_URL CONTROL_PORT``
and drive it with :class:`RPCFaultProcess`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import treq
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.faults.proxy import ControlFactory, ControlledProcess

MODES = (
    "pass",
    "garbage",
    "html",
    "429",
    "stall",
    "lag",
    "null",
    "liar",
    "huge-head",
    "huge-timestamp",
    "redirect",
    "gzip",
)

HTML_PAGE = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>\n"


class RPCFaultNode(Resource):
    """The twisted.web resource: every POST goes through the current fault."""

    isLeaf = True
    log = Logger()

    def __init__(self, node_url: str, http: Any = None) -> None:
        super().__init__()
        self.node_url = node_url
        self.http = http or treq
        self.mode = "pass"
        self.arg = 0
        self.location = ""
        self.stats = {"requests": 0, "faulted": 0, "stalled_open": 0}
        self._stalled: list[Request] = []

    def set_mode(self, mode: str, *args: str) -> None:
        """Switch the fault; raises ValueError on bad input."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        if mode in ("lag", "null"):
            if len(args) != 1 or int(args[0]) < 0:
                raise ValueError(f"usage: mode {mode} BLOCKS")
            self.arg = int(args[0])
        elif mode == "429":
            self.arg = int(args[0]) if args else 1
        elif mode == "liar":
            if len(args) != 1:
                raise ValueError("usage: mode liar BLOCKS|max")
            self.arg = 2**256 - 1 if args[0] == "max" else int(args[0])
        elif mode == "redirect":
            if len(args) != 2 or int(args[0]) not in (301, 302, 303, 307, 308):
                raise ValueError("usage: mode redirect 301|302|303|307|308 URL")
            self.arg, self.location = int(args[0]), args[1]
        elif mode == "gzip":
            if len(args) != 1 or int(args[0]) < 0:
                raise ValueError("usage: mode gzip SIZE")
            self.arg = int(args[0])
        elif args:
            raise ValueError(f"mode {mode} takes no arguments")
        previous, self.mode = self.mode, mode
        self.log.info(
            "mode {previous} -> {mode} {args}", previous=previous, mode=mode, args=" ".join(args)
        )
        if previous == "stall" and mode != "stall":
            for request in self._stalled:
                if not request.finished and request.channel is not None:
                    request.channel.transport.abortConnection()
            self._stalled.clear()

    def control(self, words: list[str]) -> str:
        """Answer one control command."""
        if not words:
            return "err empty command"
        cmd, args = words[0].lower(), words[1:]
        try:
            if cmd == "ping":
                return "ok pong"
            if cmd == "mode":
                if args:
                    self.set_mode(args[0].lower(), *args[1:])
                return f"ok {self.mode}"
            if cmd == "status":
                self.stats["stalled_open"] = sum(1 for r in self._stalled if not r.finished)
                fields = dict(self.stats, mode=self.mode, arg=self.arg)
                return "ok " + " ".join(f"{k}={v}" for k, v in sorted(fields.items()))
        except ValueError as e:
            return f"err {e}"
        return f"err unknown command {cmd!r}"

    def render_POST(self, request: Request) -> bytes | int:
        self.stats["requests"] += 1
        body = request.content.read() if request.content is not None else b""
        mode = self.mode
        if mode == "garbage":
            self.stats["faulted"] += 1
            request.setHeader(b"content-type", b"application/json")
            return b"\x00\xff{not json at all"
        if mode == "html":
            self.stats["faulted"] += 1
            request.setHeader(b"content-type", b"text/html")
            return HTML_PAGE
        if mode == "429":
            self.stats["faulted"] += 1
            request.setResponseCode(429)
            request.setHeader(b"retry-after", str(self.arg).encode())
            request.setHeader(b"content-type", b"application/json")
            return b'{"jsonrpc":"2.0","error":{"code":429,"message":"Too Many Requests"},"id":null}'
        if mode == "redirect":
            self.stats["faulted"] += 1
            request.setResponseCode(self.arg)
            request.setHeader(b"location", self.location.encode())
            return b"moved"
        if mode == "stall":
            self.stats["faulted"] += 1
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"1000")
            request.write(b'{"jsonrpc":"2.0","id":1,"result":')
            self._stalled.append(request)
            return NOT_DONE_YET
        d = defer.ensureDeferred(self._forward(body, mode))
        d.addCallback(self._answer, request, mode)
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    async def _node(self, body: bytes) -> Any:
        response = await self.http.post(
            self.node_url, data=body, headers={b"content-type": [b"application/json"]}, timeout=10
        )
        return json.loads(await response.content())

    async def _forward(self, body: bytes, mode: str) -> bytes:
        if mode in ("pass", "gzip"):
            return json.dumps(await self._node(body)).encode()
        if mode in ("liar", "huge-head", "huge-timestamp"):
            return json.dumps(await self._lie(json.loads(body), mode)).encode()
        call = json.loads(body)
        method = call.get("method") if isinstance(call, dict) else None
        if method not in ("eth_blockNumber", "eth_getBlockByNumber"):
            return json.dumps(await self._node(body)).encode()
        head_call = json.dumps(
            {"jsonrpc": "2.0", "id": 0, "method": "eth_blockNumber", "params": []}
        ).encode()
        head = int((await self._node(head_call))["result"], 16)
        visible = max(0, head - self.arg)
        if method == "eth_blockNumber":
            reported = visible if mode == "lag" else head
            if reported != head:
                self.stats["faulted"] += 1
            return json.dumps(
                {"jsonrpc": "2.0", "id": call.get("id"), "result": hex(reported)}
            ).encode()
        tag = (call.get("params") or ["latest"])[0]
        number: int | None = None
        if tag in ("latest", "pending"):
            number = head
        elif isinstance(tag, str) and tag.startswith("0x"):
            number = int(tag, 16)
        if number is not None and number > visible:
            self.stats["faulted"] += 1
            return json.dumps({"jsonrpc": "2.0", "id": call.get("id"), "result": None}).encode()
        return json.dumps(await self._node(body)).encode()

    async def _lie(self, call: Any, mode: str) -> Any:
        """The answer of a lying node to one call (``liar``, ``huge-head``, ``huge-timestamp``)."""
        method = call.get("method") if isinstance(call, dict) else None
        reply = await self._node(json.dumps(call).encode())
        if method == "eth_blockNumber" and mode in ("liar", "huge-head"):
            self.stats["faulted"] += 1
            head = int(reply["result"], 16)
            reply["result"] = hex(head + self.arg) if mode == "liar" else "0x" + "f" * 300
        elif method == "eth_getBlockByNumber":
            if mode == "huge-timestamp" and isinstance(reply.get("result"), dict):
                self.stats["faulted"] += 1
                reply["result"]["timestamp"] = "0x" + "f" * 4000
            elif mode == "liar" and reply.get("result") is None:
                tag = (call.get("params") or ["latest"])[0]
                if isinstance(tag, str) and tag.startswith("0x"):
                    self.stats["faulted"] += 1
                    reply["result"] = await self._invented(int(tag, 16))
        return reply

    async def _invented(self, number: int) -> dict[str, Any]:
        """A block the chain does not have, chained to the real head below it."""
        import hashlib

        head_call = {"jsonrpc": "2.0", "id": 0, "method": "eth_blockNumber", "params": []}
        head = int((await self._node(json.dumps(head_call).encode()))["result"], 16)
        real = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "eth_getBlockByNumber",
            "params": [hex(head), False],
        }
        base = (await self._node(json.dumps(real).encode()))["result"]

        def fake(n: int) -> str:
            return "0x" + hashlib.sha256(f"liar:{base['hash']}:{n}".encode()).hexdigest()

        parent = base["hash"] if number - 1 <= head else fake(number - 1)
        return {
            "number": hex(number),
            "hash": fake(number),
            "parentHash": parent,
            "timestamp": hex(int(base["timestamp"], 16) + number - head),
            "transactions": [],
        }

    def _answer(self, data: bytes, request: Request, mode: str = "pass") -> None:
        if request.finished or request.channel is None:
            return
        request.setHeader(b"content-type", b"application/json")
        if mode == "gzip":
            import zlib

            self.stats["faulted"] += 1
            squash = zlib.compressobj(9, zlib.DEFLATED, 31)
            reply = json.loads(data)
            reply["padding"] = ""
            text = json.dumps(reply).encode()
            parts = [squash.compress(text[:-2])]
            chunk = b" " * (1 << 20)
            for offset in range(0, self.arg, len(chunk)):
                parts.append(squash.compress(chunk[: self.arg - offset]))
            parts.append(squash.compress(text[-2:]) + squash.flush())
            request.setHeader(b"content-encoding", b"gzip")
            data = b"".join(parts)
        request.write(data)
        request.finish()

    def _failed(self, failure: Any, request: Request) -> None:
        self.log.warn("node request failed: {f}", f=failure.getErrorMessage())
        if request.finished or request.channel is None:
            return
        request.setResponseCode(502)
        request.write(HTML_PAGE)
        request.finish()


class RPCFaultProcess(ControlledProcess):
    """The misbehaving node as a subprocess in front of ``node_url``."""

    module = "tests.faults.rpcfault"

    def __init__(self, node_url: str, log_path: str | None = None) -> None:
        from tests.support import free_port

        self.port = free_port()
        control_port = free_port()
        super().__init__([str(self.port), node_url, str(control_port)], control_port, log_path)

    @property
    def url(self) -> str:
        """Where clients should send JSON-RPC."""
        return f"http://127.0.0.1:{self.port}"

    def mode(self, mode: str, *args: Any) -> str:
        """Switch the fault, e.g. ``mode("429", 2)`` or ``mode("lag", 5)``."""
        return self.command(" ".join(["mode", mode, *map(str, args)]))


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    parser = argparse.ArgumentParser(prog="python -m tests.faults.rpcfault")
    parser.add_argument("listen_port", type=int)
    parser.add_argument("node_url")
    parser.add_argument("control_port", type=int)
    ns = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    node = RPCFaultNode(ns.node_url)
    site = Site(node)
    site.noisy = False
    reactor.listenTCP(ns.listen_port, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.listenTCP(ns.control_port, ControlFactory(node.control), interface="127.0.0.1")  # type: ignore[attr-defined]
    print(f"ready listen={ns.listen_port} control={ns.control_port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
