"""A TCP fault proxy written with Twisted, switchable at run time over a line-based control port.

It listens on a loopback port and forwards every accepted connection to a
target. Modes, switched with ``mode NAME [ARGS]`` on the control port (each
command answers one line, ``ok ...`` or ``err ...``):

- ``pass``: forward bytes as they come (half-closes are forwarded too);
- ``delay MS``: hold every chunk, in both directions, ``MS`` milliseconds
  before forwarding it (order is kept);
- ``blackhole``: accept and drop: bytes are read and discarded, nothing is
  sent, new connections are accepted and never reach the target. A connection
  that lost bytes stays a black hole until it closes (its stream has a hole),
  even after the mode goes back to ``pass``, like a peer that gave up;
- ``hold``: stop forwarding and stop reading (TCP back-pressure), keeping
  every byte; leaving ``hold`` delivers them: a partition that heals;
- ``reset``: abort every open connection on both sides (an RST) and abort
  every new one as soon as it is accepted, until the mode changes;
- ``cut N [up|down]``: forward only the first ``N`` bytes of the next chunk
  in that direction (``up`` = client to target, the default), then reset both
  sides; one-shot: the mode returns to ``pass`` afterwards.

Other commands: ``status`` (counters as ``key=value``), ``kick`` (abort the
open connections without changing the mode), ``ping``.

``--record FILE`` parses the netstrings flowing back to the client and
appends each one, as a line, to ``FILE``: an independent record of every
``OK <sha256>`` the server sent, which the oracle checks against SQL.

Run it as a subprocess::

    python -m tests.faults.proxy LISTEN_PORT TARGET_HOST TARGET_PORT CONTROL_PORT [--record FILE]

and drive it from a test with :class:`ProxyProcess` (blocking sockets), or
in-process with :class:`FaultProxy` on the test's reactor.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from twisted.internet import protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTCP
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

ROOT = Path(__file__).resolve().parent.parent.parent

UP = "up"
"""Client to target."""

DOWN = "down"
"""Target to client."""

MODES = ("pass", "delay", "blackhole", "hold", "reset", "cut")

# How long a cut waits for its last bytes to leave before it aborts: an
# abort throws away whatever is still in the transport's write buffer.
CUT_FLUSH_DELAY = 0.05


class NetstringTap:
    """A tolerant incremental netstring parser for observing a stream.

    It never raises: at the first malformed byte it stops parsing and keeps
    quiet (``broken`` becomes true).
    """

    def __init__(self, on_frame: Callable[[bytes], None]) -> None:
        self._on_frame = on_frame
        self._buf = bytearray()
        self.broken = False

    def feed(self, data: bytes) -> None:
        """Add bytes; call ``on_frame`` for each netstring they complete."""
        if self.broken:
            return
        self._buf += data
        buf = self._buf
        while True:
            colon = buf.find(b":", 0, 12)
            if colon < 0:
                if len(buf) > 11 or (buf and not buf.isdigit()):
                    self.broken = True
                return
            digits = bytes(buf[:colon])
            if not digits.isdigit():
                self.broken = True
                return
            length = int(digits)
            end = colon + 1 + length
            if len(buf) <= end:
                return
            if buf[end] != ord(","):
                self.broken = True
                return
            self._on_frame(bytes(buf[colon + 1 : end]))
            del buf[: end + 1]


class ReplyRecorder:
    """Appends every netstring sent back to a client as one line of a file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[bytes] = open(path, "ab", buffering=0)  # noqa: SIM115 - lives with the proxy

    def tap(self) -> NetstringTap:
        """A parser for one connection's downstream bytes."""
        return NetstringTap(self.record)

    def record(self, frame: bytes) -> None:
        """Write one reply as a line (newlines inside it become spaces)."""
        self._file.write(frame.replace(b"\n", b" ") + b"\n")

    def close(self) -> None:
        """Close the file."""
        self._file.close()


class _Link:
    """One proxied connection: the accepted client side and the target side."""

    def __init__(self, proxy: FaultProxy, inbound: _Inbound) -> None:
        self.proxy = proxy
        self.inbound = inbound
        self.outbound: _Outbound | None = None
        # Per direction, FIFO of [due time or None while held, data, abort after].
        self.queues: dict[str, deque[list[Any]]] = {UP: deque(), DOWN: deque()}
        self.timers: dict[str, IDelayedCall | None] = {UP: None, DOWN: None}
        self.eof = {UP: False, DOWN: False}
        self.eof_sent = {UP: False, DOWN: False}
        self.poisoned = False
        self.closed = False
        self.tap = proxy.recorder.tap() if proxy.recorder is not None else None

    # -- data

    def received(self, direction: str, data: bytes) -> None:
        """Bytes read from one side, to be forwarded (or not) to the other."""
        proxy = self.proxy
        if self.closed:
            return
        mode = proxy.mode
        if self.poisoned or mode == "blackhole":
            self.poisoned = True
            proxy.stats["dropped_bytes"] += len(data)
            return
        if mode == "reset":
            self.abort()
            return
        now = proxy.reactor.seconds()
        if mode == "cut" and direction == proxy.cut_direction:
            proxy.mode = "pass"
            proxy.stats["cuts"] += 1
            proxy.stats["dropped_bytes"] += max(0, len(data) - proxy.cut_bytes)
            self._enqueue(direction, [now, data[: proxy.cut_bytes], True])
            return
        if mode == "hold":
            self._enqueue(direction, [None, data, False])
            return
        due = now + proxy.delay if mode == "delay" else now
        self._enqueue(direction, [due, data, False])

    def _enqueue(self, direction: str, item: list[Any]) -> None:
        self.queues[direction].append(item)
        self.pump(direction)

    def _sink(self, direction: str) -> Any:
        if direction == UP:
            return self.outbound.transport if self.outbound is not None else None
        return self.inbound.transport

    def pump(self, direction: str) -> None:
        """Forward every queued chunk that is due, in order."""
        if self.closed:
            return
        queue = self.queues[direction]
        reactor = self.proxy.reactor
        while queue:
            due, data, abort_after = queue[0]
            if due is None:
                return
            now = reactor.seconds()
            if due > now:
                if self.timers[direction] is None:
                    self.timers[direction] = reactor.callLater(
                        due - now, self._timer_fired, direction
                    )
                return
            sink = self._sink(direction)
            if sink is None:
                return
            queue.popleft()
            if data:
                sink.write(data)
                self.proxy.stats[direction + "_bytes"] += len(data)
                if direction == DOWN and self.tap is not None:
                    self.tap.feed(data)
            if abort_after:
                self.closed = True
                self._cancel_timers()
                reactor.callLater(CUT_FLUSH_DELAY, self._abort_transports)
                return
        if self.eof[direction] and not self.eof_sent[direction]:
            self._forward_eof(direction)

    def _timer_fired(self, direction: str) -> None:
        self.timers[direction] = None
        self.pump(direction)

    def release(self) -> None:
        """Leaving ``hold``: make held chunks due now and read again."""
        now = self.proxy.reactor.seconds()
        for direction in (UP, DOWN):
            for item in self.queues[direction]:
                if item[0] is None:
                    item[0] = now
        self.resume()
        self.pump(UP)
        self.pump(DOWN)

    def pause(self) -> None:
        """Stop reading from both sides."""
        for p in (self.inbound, self.outbound):
            if p is not None and p.transport is not None:
                p.transport.pauseProducing()

    def resume(self) -> None:
        """Read from both sides again."""
        for p in (self.inbound, self.outbound):
            if p is not None and p.transport is not None:
                p.transport.resumeProducing()

    # -- connection life

    def outbound_connected(self, outbound: _Outbound) -> None:
        """The target accepted: forward what was waiting, start reading the client."""
        if self.closed:
            assert outbound.transport is not None
            outbound.transport.abortConnection()
            return
        self.outbound = outbound
        if self.proxy.mode == "hold":
            self.pause()
        else:
            self.inbound.transport.resumeProducing()
        self.pump(UP)

    def outbound_failed(self, reason: Failure) -> None:
        """The target refused or timed out: close the client's side."""
        self.proxy.log.info("target unreachable: {reason}", reason=reason.getErrorMessage())
        self.abort()

    def read_closed(self, direction: str) -> None:
        """The sender of ``direction`` half-closed (or closed cleanly)."""
        self.eof[direction] = True
        self.pump(direction)

    def _forward_eof(self, direction: str) -> None:
        self.eof_sent[direction] = True
        sink = self._sink(direction)
        if self.eof[UP] and self.eof[DOWN]:
            self.close()
        elif sink is not None:
            sink.loseWriteConnection()

    def lost(self, side: str, reason: Failure) -> None:
        """One side's connection is gone; carry a clean close or an abort across."""
        direction = UP if side == "inbound" else DOWN
        if self.closed:
            self._finish()
            return
        if reason.check(ConnectionDone):
            self.read_closed(direction)
            if self.eof_sent[direction]:
                self.close()
        else:
            self.abort()
        self._finish()

    def close(self) -> None:
        """Close both sides gracefully."""
        for p in (self.inbound, self.outbound):
            if p is not None and p.transport is not None:
                p.transport.loseConnection()

    def abort(self) -> None:
        """Reset both sides now."""
        if not self.closed:
            self.closed = True
            self.proxy.stats["resets"] += 1
        self._cancel_timers()
        self._abort_transports()

    def _abort_transports(self) -> None:
        for p in (self.inbound, self.outbound):
            if p is not None and p.transport is not None:
                p.transport.abortConnection()

    def _cancel_timers(self) -> None:
        for direction, timer in self.timers.items():
            if timer is not None and timer.active():
                timer.cancel()
            self.timers[direction] = None

    def _finish(self) -> None:
        inbound_gone = not self.inbound.connected
        outbound_gone = self.outbound is None or not self.outbound.connected
        if inbound_gone and outbound_gone:
            self.closed = True
            self._cancel_timers()
            self.proxy.links.discard(self)


@implementer(IHalfCloseableProtocol)
class _Inbound(protocol.Protocol):
    """The connection a client made to the proxy."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.link = _Link(proxy, self)

    def connectionMade(self) -> None:
        proxy = self.proxy
        proxy.stats["accepted"] += 1
        if proxy.mode == "reset":
            proxy.stats["refused"] += 1
            self.link.closed = True
            self.transport.abortConnection()
            return
        proxy.links.add(self.link)
        if proxy.mode == "blackhole":
            self.link.poisoned = True
            return
        self.transport.pauseProducing()
        endpoint = TCP4ClientEndpoint(
            proxy.reactor, proxy.target_host, proxy.target_port, timeout=10
        )
        d = connectProtocol(endpoint, _Outbound(self.link))
        d.addCallbacks(self.link.outbound_connected, self.link.outbound_failed)

    def dataReceived(self, data: bytes) -> None:
        self.link.received(UP, data)

    def readConnectionLost(self) -> None:
        self.link.read_closed(UP)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected = False
        self.link.lost("inbound", reason)


@implementer(IHalfCloseableProtocol)
class _Outbound(protocol.Protocol):
    """The proxy's connection to the target."""

    def __init__(self, link: _Link) -> None:
        self.link = link

    def dataReceived(self, data: bytes) -> None:
        self.link.received(DOWN, data)

    def readConnectionLost(self) -> None:
        self.link.read_closed(DOWN)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected = False
        self.link.lost("outbound", reason)


class FaultProxy(protocol.Factory):
    """The proxy's listening factory and its switchable fault state."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        target_host: str,
        target_port: int,
        recorder: ReplyRecorder | None = None,
    ) -> None:
        self.reactor = reactor
        self.target_host = target_host
        self.target_port = target_port
        self.recorder = recorder
        self.mode = "pass"
        self.delay = 0.0
        self.cut_bytes = 0
        self.cut_direction = UP
        self.links: set[_Link] = set()
        self.stats = {
            "accepted": 0,
            "refused": 0,
            "resets": 0,
            "cuts": 0,
            "up_bytes": 0,
            "down_bytes": 0,
            "dropped_bytes": 0,
        }

    def buildProtocol(self, addr: Any) -> _Inbound:
        return _Inbound(self)

    def set_mode(self, mode: str, *args: str) -> None:
        """Switch the fault mode (see the module docstring); raises ValueError on bad input."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        previous = self.mode
        if mode == "delay":
            if len(args) != 1:
                raise ValueError("usage: mode delay MS")
            ms = float(args[0])
            if ms < 0:
                raise ValueError("delay must be >= 0")
            self.delay = ms / 1000.0
        elif mode == "cut":
            if not 1 <= len(args) <= 2:
                raise ValueError("usage: mode cut N [up|down]")
            n = int(args[0])
            direction = args[1] if len(args) == 2 else UP
            if n < 0 or direction not in (UP, DOWN):
                raise ValueError("usage: mode cut N [up|down]")
            self.cut_bytes, self.cut_direction = n, direction
        elif args:
            raise ValueError(f"mode {mode} takes no arguments")
        self.mode = mode
        self.log.info(
            "mode {previous} -> {mode} {args}", previous=previous, mode=mode, args=" ".join(args)
        )
        if mode == "reset":
            self.kick()
        elif mode == "hold":
            for link in list(self.links):
                link.pause()
        if previous == "hold" and mode != "hold":
            for link in list(self.links):
                link.release()

    def kick(self) -> int:
        """Abort every open connection; return how many there were."""
        links = list(self.links)
        for link in links:
            link.abort()
        return len(links)

    def status(self) -> dict[str, Any]:
        """The mode and the counters."""
        return dict(
            self.stats,
            mode=self.mode,
            delay_ms=int(self.delay * 1000),
            open=len(self.links),
        )

    def control(self, words: list[str]) -> str:
        """Answer one control command (already split into words)."""
        if not words:
            return "err empty command"
        cmd, args = words[0].lower(), words[1:]
        try:
            if cmd == "ping":
                return "ok pong"
            if cmd == "mode":
                if not args:
                    return f"ok {self.mode}"
                self.set_mode(args[0].lower(), *args[1:])
                return f"ok {self.mode}"
            if cmd == "status":
                return "ok " + " ".join(f"{k}={v}" for k, v in sorted(self.status().items()))
            if cmd == "kick":
                return f"ok {self.kick()}"
        except ValueError as e:
            return f"err {e}"
        return f"err unknown command {cmd!r}"


class ControlProtocol(LineOnlyReceiver):
    """One command per line in, one ``ok ...``/``err ...`` line out."""

    delimiter = b"\n"
    MAX_LENGTH = 1024

    def __init__(self, handler: Callable[[list[str]], str]) -> None:
        self.handler = handler

    def lineReceived(self, line: bytes) -> None:
        try:
            answer = self.handler(line.decode("ascii", "replace").strip().split())
        except Exception as e:  # noqa: BLE001 - a control bug must not kill the proxy
            answer = f"err {type(e).__name__}: {e}"
        self.sendLine(answer.replace("\n", " ").encode())


class ControlFactory(protocol.Factory):
    """Serves :class:`ControlProtocol` for one handler."""

    def __init__(self, handler: Callable[[list[str]], str]) -> None:
        self.handler = handler

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self.handler)


# -- the blocking side, for tests that drive subprocesses


def control_command(port: int, line: str, host: str = "127.0.0.1", timeout: float = 5.0) -> str:
    """Send one control line on a fresh connection and return the answer without ``ok``.

    Raises RuntimeError when the answer is ``err ...``.
    """
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(line.encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    text = answer.decode().strip()
    if not text.startswith("ok"):
        raise RuntimeError(f"control {line!r}: {text or 'no answer'}")
    return text[2:].strip()


def parse_status(text: str) -> dict[str, Any]:
    """``key=value`` words into a dict, integers converted."""
    out: dict[str, Any] = {}
    for word in text.split():
        key, _, value = word.partition("=")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


class ControlledProcess:
    """A subprocess serving a control port, started from ``python -m MODULE ARGS``."""

    module = ""

    def __init__(self, args: list[str], control_port: int, log_path: str | None = None) -> None:
        self.args = args
        self.control_port = control_port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        """Start it and wait until its control port answers ``ping``."""
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            cwd=str(ROOT),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        if log is not subprocess.DEVNULL:
            log.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.module} exited with {self.proc.returncode}; see {self.log_path}"
                )
            try:
                control_command(self.control_port, "ping", timeout=1)
                return
            except (OSError, RuntimeError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"{self.module} did not answer on control port {self.control_port}"
                    )
                time.sleep(0.05)

    def command(self, line: str) -> str:
        """One control command; returns the answer after ``ok``."""
        return control_command(self.control_port, line)

    def status(self) -> dict[str, Any]:
        """The ``status`` counters."""
        return parse_status(self.command("status"))

    def stop(self) -> None:
        """Terminate it (SIGTERM, then SIGKILL after 5 s)."""
        from tests.support import stop_process

        stop_process(self.proc)


class ProxyProcess(ControlledProcess):
    """The fault proxy as a subprocess, driven over its control port with blocking sockets."""

    module = "tests.faults.proxy"

    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        listen_port: int | None = None,
        control_port: int | None = None,
        record: str | None = None,
        log_path: str | None = None,
    ) -> None:
        from tests.support import free_port

        self.listen_port = listen_port or free_port()
        self.target_host = target_host
        self.target_port = target_port
        self.record = record
        control_port = control_port or free_port()
        args = [str(self.listen_port), target_host, str(target_port), str(control_port)]
        if record:
            args += ["--record", record]
        super().__init__(args, control_port, log_path)

    def mode(self, mode: str, *args: Any) -> str:
        """Switch mode, e.g. ``mode("delay", 200)`` or ``mode("cut", 10, "up")``."""
        return self.command(" ".join(["mode", mode, *map(str, args)]))

    def kick(self) -> int:
        """Abort the open connections."""
        return int(self.command("kick"))

    def replies(self) -> list[str]:
        """Every reply recorded so far (needs ``record``)."""
        if not self.record or not os.path.exists(self.record):
            return []
        with open(self.record, "rb") as f:
            return [line.decode("ascii", "replace") for line in f.read().splitlines()]


def main(argv: list[str] | None = None) -> None:
    """Run the proxy until SIGTERM."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    parser = argparse.ArgumentParser(
        prog="python -m tests.faults.proxy", description=__doc__.split("\n")[0]
    )
    parser.add_argument("listen_port", type=int)
    parser.add_argument("target_host")
    parser.add_argument("target_port", type=int)
    parser.add_argument("control_port", type=int)
    parser.add_argument("--record", help="append every netstring sent to clients to this file")
    ns = parser.parse_args(argv)

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    tcp: IReactorTCP = reactor  # type: ignore[assignment]
    recorder = ReplyRecorder(ns.record) if ns.record else None
    proxy = FaultProxy(reactor, ns.target_host, ns.target_port, recorder)
    listening = tcp.listenTCP(ns.listen_port, proxy, interface="127.0.0.1")
    control = tcp.listenTCP(ns.control_port, ControlFactory(proxy.control), interface="127.0.0.1")
    print(
        f"ready listen={listening.getHost().port} control={control.getHost().port}",
        flush=True,
    )
    reactor.run()  # type: ignore[attr-defined]
    if recorder is not None:
        recorder.close()


if __name__ == "__main__":
    main()
