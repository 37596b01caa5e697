"""Load generator for the eth server: K persistent netstring clients over raw sockets.

Runs as its own process (``python bench/loadgen.py ...``) so its CPU is measured
apart from the server's. It uses no Twisted: one epoll loop over non-blocking
sockets, frames built before the clock starts, replies parsed in bulk, so it
costs a few microseconds per message and is not the bottleneck.

Modes:

* ``flood``: every client keeps up to ``--window`` frames unanswered (the
  server's per-connection bound) until its share of ``--messages`` is acked;
* ``paced``: ``--rate`` messages per second offered in total, round robin over
  the clients (latency at a fixed offered load);
* ``idle``: open ``--idle`` connections from ``--source-ips`` and hold them
  while a small ``flood`` runs beside them; report how many were held.

Every reply is checked: its hash must be the hash of the frame it answers
(replies are in frame order per connection). The result is one JSON object on
stdout: counts per reply kind, wrong replies, elapsed seconds, ack latency
percentiles and this process's CPU seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import selectors
import socket
import sys
import time
from array import array
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eth_twisted.link.payload import render_html  # noqa: E402


def netstring(payload: bytes) -> bytes:
    """``payload`` as one netstring."""
    return b"%d:%s," % (len(payload), payload)


class Conn:
    """One client connection: its frames, what is in flight, and the replies so far."""

    __slots__ = (
        "sock",
        "frames",
        "hashes",
        "next",
        "sent_at",
        "inbuf",
        "outbuf",
        "window",
        "counts",
        "wrong",
        "done_at",
        "fd",
    )

    def __init__(
        self, sock: socket.socket, frames: list[bytes], hashes: list[bytes], window: int
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.frames = frames
        self.hashes = hashes
        self.next = 0
        self.sent_at: deque[tuple[float, int]] = deque()  # (time, index of the frame)
        self.inbuf = b""
        self.outbuf = b""
        self.window = window
        self.counts: dict[str, int] = {}
        self.wrong = 0
        self.done_at: float | None = None

    @property
    def unanswered(self) -> int:
        return len(self.sent_at)

    @property
    def finished(self) -> bool:
        return self.next >= len(self.frames) and not self.sent_at


def connect(
    host: str, port: int, source: str | None = None, blocking: bool = False
) -> socket.socket:
    """A TCP connection to the server, optionally from a given loopback source address."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if source:
        s.bind((source, 0))
    s.settimeout(10)
    s.connect((host, port))
    s.setblocking(blocking)
    return s


def parse_replies(conn: Conn, now: float, latencies: array) -> None:
    """Consume every complete reply netstring in ``conn.inbuf``, matching it to its frame."""
    buf = conn.inbuf
    pos = 0
    end = len(buf)
    sent_at = conn.sent_at
    counts = conn.counts
    hashes = conn.hashes
    while pos < end:
        colon = buf.find(b":", pos, pos + 12)
        if colon < 0:
            break
        n = int(buf[pos:colon])
        stop = colon + 1 + n
        if stop >= end:
            break
        body = buf[colon + 1 : stop]
        pos = stop + 1
        t, idx = sent_at.popleft()
        latencies.append(now - t)
        space = body.find(b" ")
        kind = body[:space].decode()
        if kind == "ERR":
            rest = body[space + 1 :].split(b" ")
            kind = "ERR " + rest[-1].decode()
            digest = rest[0]
        else:
            digest = body[space + 1 :]
        counts[kind] = counts.get(kind, 0) + 1
        if digest != hashes[idx]:
            conn.wrong += 1
    conn.inbuf = buf[pos:]


def build(start: int, count: int) -> tuple[list[bytes], list[bytes]]:
    """Frames and expected hex hashes for blocks ``start .. start+count-1``."""
    frames, hashes = [], []
    for n in range(start, start + count):
        p = render_html(n)
        frames.append(netstring(p))
        hashes.append(hashlib.sha256(p).hexdigest().encode())
    return frames, hashes


def run_clients(
    conns: list[Conn], *, rate: float | None = None, timeout: float = 600.0
) -> dict[str, Any]:
    """Drive ``conns`` until every frame is answered; flood, or paced at ``rate`` msgs/s in all."""
    sel = selectors.DefaultSelector()
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
    latencies: array = array("d")
    writing: set[Conn] = set()
    started = time.perf_counter()
    deadline = started + timeout
    total = sum(len(c.frames) for c in conns)
    offered = 0  # paced mode: frames released so far
    rr = 0
    live = [c for c in conns if c.frames]

    def push(c: Conn, count: int, now: float) -> None:
        i = c.next
        j = min(len(c.frames), i + count)
        if j <= i:
            return
        c.sent_at.extend((now, k) for k in range(i, j))
        c.next = j
        c.outbuf += b"".join(c.frames[i:j])
        flush(c)

    def flush(c: Conn) -> None:
        if not c.outbuf:
            return
        try:
            sent = c.sock.send(c.outbuf)
        except BlockingIOError:
            sent = 0
        c.outbuf = c.outbuf[sent:]
        if c.outbuf and c not in writing:
            writing.add(c)
            sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
        elif not c.outbuf and c in writing:
            writing.discard(c)
            sel.modify(c.sock, selectors.EVENT_READ, c)

    now = time.perf_counter()
    if rate is None:
        for c in live:
            push(c, c.window, now)
    remaining = len(live)
    while remaining:
        now = time.perf_counter()
        if now > deadline:
            raise SystemExit(f"loadgen: timed out with {remaining} clients unfinished")
        wait = 0.5
        if rate is not None and offered < total:
            due = int((now - started) * rate) + 1
            skipped = 0
            while offered < min(due, total) and skipped < len(live):
                c = live[rr % len(live)]
                rr += 1
                if c.next < len(c.frames) and c.unanswered < c.window:
                    push(c, 1, now)
                    offered += 1
                    skipped = 0
                else:
                    skipped += 1
            wait = max(0.0, started + (offered + 1) / rate - time.perf_counter())
        for key, events in sel.select(wait):
            c = key.data
            if events & selectors.EVENT_WRITE:
                flush(c)
            if events & selectors.EVENT_READ:
                try:
                    data = c.sock.recv(262144)
                except BlockingIOError:
                    continue
                if not data:
                    raise SystemExit(
                        f"loadgen: server closed a connection with {c.unanswered} unanswered"
                    )
                c.inbuf += data
                t = time.perf_counter()
                parse_replies(c, t, latencies)
                if rate is None:
                    room = c.window - c.unanswered
                    if room >= 32 or (room > 0 and c.next + room >= len(c.frames)):
                        push(c, room, t)
                if c.finished and c.done_at is None:
                    c.done_at = t
                    remaining -= 1
    elapsed = time.perf_counter() - started
    sel.close()
    counts: dict[str, int] = {}
    for c in conns:
        for k, v in c.counts.items():
            counts[k] = counts.get(k, 0) + v
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return {
        "messages": total,
        "answered": len(lat),
        "counts": counts,
        "wrong": sum(c.wrong for c in conns),
        "elapsed": elapsed,
        "rate": len(lat) / elapsed if elapsed else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": lat[-1] * 1000 if lat else float("nan"),
    }


def cpu_seconds() -> float:
    """User + system CPU of this process so far."""
    t = os.times()
    return t.user + t.system


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def open_idle(
    host: str, port: int, count: int, sources: list[str], burst: int = 40, pause: float = 0.01
) -> tuple[list[socket.socket], float]:
    """Open ``count`` connections spread over ``sources``; return them and the seconds it took.

    Connections go out in bursts smaller than the server's listen backlog (50
    in Twisted), each burst finished before the next, so no SYN is dropped and
    retried a second later.
    """
    started = time.perf_counter()
    socks: list[socket.socket] = []
    while len(socks) < count:
        batch = []
        for i in range(len(socks), min(count, len(socks) + burst)):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((sources[i % len(sources)], 0))
            s.setblocking(False)
            s.connect_ex((host, port))
            batch.append(s)
        _, writable, _ = select_all(batch, 30.0)
        for s in batch:
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err or s not in writable:
                raise SystemExit(
                    f"loadgen: idle connect failed ({os.strerror(err) if err else 'timeout'})"
                )
        socks.extend(batch)
        time.sleep(pause)
    return socks, time.perf_counter() - started


def select_all(socks: list[socket.socket], timeout: float) -> tuple[list, set, list]:
    """Wait until every socket in ``socks`` is writable (connected), or ``timeout``."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_WRITE)
    done: set[socket.socket] = set()
    deadline = time.monotonic() + timeout
    while len(done) < len(socks) and time.monotonic() < deadline:
        for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
            done.add(key.fileobj)  # type: ignore[arg-type]
            sel.unregister(key.fileobj)
    sel.close()
    return [], done, []


def check_alive(socks: list[socket.socket]) -> int:
    """How many held connections the server has not closed (no EOF pending)."""
    alive = 0
    for s in socks:
        s.setblocking(False)
        try:
            alive += 0 if s.recv(1) == b"" else 1
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    return alive


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run one mode, print the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=("flood", "paced", "idle"), default="flood")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--start-block", type=int, default=10_000_000)
    p.add_argument("--window", type=int, default=256)
    p.add_argument(
        "--rate", type=float, default=1000.0, help="paced mode: messages/s offered in all"
    )
    p.add_argument("--idle", type=int, default=10_000, help="idle mode: connections to hold")
    p.add_argument("--source-ips", default="127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5")
    p.add_argument(
        "--hold-file", help="idle mode: write the count held here, then wait for it to vanish"
    )
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args(argv)

    nofile = raise_nofile()
    frames, hashes = build(args.start_block, args.messages)
    k = max(1, min(args.clients, args.messages))
    conns = []
    for i in range(k):
        sock = connect(args.host, args.port)
        conns.append(Conn(sock, frames[i::k], hashes[i::k], args.window))
    result: dict[str, Any] = {"mode": args.mode, "clients": k, "nofile": nofile}
    held: list[socket.socket] = []
    if args.mode == "idle":
        held, took = open_idle(args.host, args.port, args.idle, args.source_ips.split(","))
        result["idle_opened"] = len(held)
        result["idle_open_seconds"] = took
    cpu0 = cpu_seconds()
    result.update(
        run_clients(conns, rate=args.rate if args.mode == "paced" else None, timeout=args.timeout)
    )
    result["cpu_seconds"] = cpu_seconds() - cpu0
    if args.mode == "idle":
        result["idle_alive"] = check_alive(held)
        if args.hold_file:
            # The orchestrator measures the server while we hold; it deletes the file when done.
            Path(args.hold_file).write_text(json.dumps(result))
            end = time.monotonic() + 120
            while Path(args.hold_file).exists() and time.monotonic() < end:
                time.sleep(0.1)
    for c in conns:
        c.sock.close()
    for s in held:
        s.close()
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
