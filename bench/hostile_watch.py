"""The observer beside every attack of ``bench/hostile.py``: a well-behaved client, a health probe, samplers.

Runs as its own process (so the attacker's work in ``hostile.py`` never delays
it) and records raw events with ``time.monotonic()`` (CLOCK_MONOTONIC, the same
clock in every process of the machine), so the driver can cut them into phases:

* the good client: one netstring connection from ``--source`` (127.0.0.2) that
  sends a fresh seed HTML page every ``--every`` seconds (at most ``--window``
  unanswered, like ``eth client``), checks every reply against its frame's hash,
  and on a close, a reset or no reply within ``--ack-timeout`` counts every
  unanswered frame as failed and reconnects (as ``eth client`` would);
* the stats probe: ``GET /healthz`` every ``--probe-every`` seconds, a new
  connection each time, from the same source address;
* the server's RSS and CPU (``/proc/<pid>``) every ``--sample-every`` seconds;
* optionally ``eth_server_pending_messages`` from ``/metrics`` every
  ``--metrics-every`` seconds.

It prints ``ready`` once the good client's first message is acknowledged, runs
until a line ``stop`` (or end of file) arrives on stdin, then writes every
event to ``--out`` as JSON and prints ``done``.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import select
import socket
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eth_twisted.link.payload import render_html  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def parse_netstrings(buf: bytes) -> tuple[list[bytes], bytes]:
    """Complete netstrings at the start of ``buf`` and the bytes left over (raises ValueError on garbage)."""
    out = []
    pos = 0
    while True:
        colon = buf.find(b":", pos, pos + 12)
        if colon < 0:
            if len(buf) - pos > 11:
                raise ValueError("no netstring length")
            break
        n = int(buf[pos:colon])
        stop = colon + 1 + n
        if stop >= len(buf):
            break
        if buf[stop : stop + 1] != b",":
            raise ValueError("netstring without its comma")
        out.append(buf[colon + 1 : stop])
        pos = stop + 1
    return out, buf[pos:]


class GoodClient(threading.Thread):
    """The well-behaved sender; ``events`` holds one [seq, sent, answered, outcome] per frame."""

    def __init__(self, opts: argparse.Namespace, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.opts = opts
        self.stop = stop
        self.frames: list[list[Any]] = []  # [sent_at, answered_at | None, outcome | None]
        self.connects: list[list[Any]] = []  # [at, "ok" | error text]
        self.closes: list[list[Any]] = []  # [at, why]
        self.first_ok = threading.Event()
        self.seq = 0

    def _connect(self) -> socket.socket | None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.bind((self.opts.source, 0))
            s.settimeout(5)
            s.connect((self.opts.host, self.opts.port))
            s.setblocking(False)
        except OSError as e:
            s.close()
            self.connects.append([time.monotonic(), f"{type(e).__name__}: {e}"])
            return None
        self.connects.append([time.monotonic(), "ok"])
        return s

    def _fail_all(self, inflight: deque[tuple[int, bytes]], outcome: str, why: str) -> None:
        now = time.monotonic()
        for idx, _ in inflight:
            self.frames[idx][1] = now
            self.frames[idx][2] = outcome
        inflight.clear()
        self.closes.append([now, why])

    def run(self) -> None:
        opts = self.opts
        inflight: deque[tuple[int, bytes]] = deque()
        sock: socket.socket | None = None
        buf = b""
        pending_out = b""
        next_send = time.monotonic()
        while not self.stop.is_set():
            if sock is None:
                sock = self._connect()
                buf, pending_out = b"", b""
                if sock is None:
                    time.sleep(0.2)
                    continue
            now = time.monotonic()
            if inflight and now - self.frames[inflight[0][0]][0] > opts.ack_timeout:
                self._fail_all(inflight, "timeout", f"no reply in {opts.ack_timeout:.0f} s")
                sock.close()
                sock = None
                continue
            if now >= next_send and len(inflight) < opts.window and not pending_out:
                payload = render_html(opts.start_block + self.seq)
                self.seq += 1
                digest = hashlib.sha256(payload).hexdigest().encode()
                self.frames.append([now, None, None])
                inflight.append((len(self.frames) - 1, digest))
                pending_out = b"%d:%s," % (len(payload), payload)
                next_send = max(next_send + opts.every, now)
            try:
                if pending_out:
                    sent = sock.send(pending_out)
                    pending_out = pending_out[sent:]
            except BlockingIOError:
                pass
            except OSError as e:
                self._fail_all(inflight, "closed", f"send: {type(e).__name__}")
                sock.close()
                sock = None
                continue
            wait = max(0.0, min(next_send - time.monotonic(), 0.05))
            r, _, _ = select.select([sock], [], [], wait)
            if not r:
                continue
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as e:
                self._fail_all(inflight, "closed", f"recv: {type(e).__name__}")
                sock.close()
                sock = None
                continue
            if not chunk:
                self._fail_all(inflight, "closed", "closed by the server")
                sock.close()
                sock = None
                continue
            now = time.monotonic()
            try:
                replies, buf = parse_netstrings(buf + chunk)
            except ValueError:
                self._fail_all(inflight, "closed", "garbage from the server")
                sock.close()
                sock = None
                continue
            for reply in replies:
                if not inflight:
                    self.closes.append([now, "reply for no frame"])
                    continue
                idx, digest = inflight.popleft()
                self.frames[idx][1] = now
                if reply == b"OK " + digest:
                    self.frames[idx][2] = "OK"
                    self.first_ok.set()
                elif reply.startswith(b"ERR "):
                    self.frames[idx][2] = "ERR " + reply.rsplit(b" ", 1)[-1].decode(
                        errors="replace"
                    )
                else:
                    self.frames[idx][2] = reply[:20].decode(errors="replace")
        if sock is not None:
            sock.close()


class HealthProbe(threading.Thread):
    """``GET /healthz`` every ``--probe-every`` seconds; ``events`` holds [started, seconds, status]."""

    def __init__(self, opts: argparse.Namespace, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.opts = opts
        self.stop = stop
        self.events: list[list[Any]] = []

    def run(self) -> None:
        opts = self.opts
        while not self.stop.is_set():
            t0 = time.monotonic()
            status: Any
            try:
                conn = http.client.HTTPConnection(
                    opts.host,
                    opts.stats_port,
                    timeout=opts.probe_timeout,
                    source_address=(opts.source, 0),
                )
                conn.request("GET", "/healthz", headers={"Host": f"127.0.0.1:{opts.stats_port}"})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                conn.close()
            except (OSError, http.client.HTTPException) as e:
                status = type(e).__name__
            took = time.monotonic() - t0
            self.events.append([t0, took, status])
            self.stop.wait(max(0.0, opts.probe_every - took))


class Sampler(threading.Thread):
    """The server's RSS (KiB) and CPU (utime+stime, seconds) every ``--sample-every`` seconds."""

    def __init__(self, opts: argparse.Namespace, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.opts = opts
        self.stop = stop
        self.samples: list[list[float]] = []  # [at, rss_kib, cpu_seconds]

    def run(self) -> None:
        pid = self.opts.pid
        while not self.stop.is_set():
            try:
                rss = 0
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1])
                        break
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
            except OSError:
                return
            self.samples.append([time.monotonic(), rss, cpu])
            self.stop.wait(self.opts.sample_every)


class MetricsProbe(threading.Thread):
    """``eth_server_pending_messages`` from ``/metrics``; ``events`` holds [at, value | None, seconds]."""

    def __init__(self, opts: argparse.Namespace, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.opts = opts
        self.stop = stop
        self.events: list[list[Any]] = []

    def run(self) -> None:
        opts = self.opts
        while not self.stop.is_set():
            t0 = time.monotonic()
            value = None
            try:
                conn = http.client.HTTPConnection(
                    opts.host,
                    opts.stats_port,
                    timeout=opts.probe_timeout,
                    source_address=(opts.source, 0),
                )
                conn.request("GET", "/metrics", headers={"Host": f"127.0.0.1:{opts.stats_port}"})
                text = conn.getresponse().read().decode(errors="replace")
                conn.close()
                for line in text.splitlines():
                    if line.startswith("eth_server_pending_messages "):
                        value = float(line.split()[1])
            except (OSError, http.client.HTTPException, ValueError):
                pass
            took = time.monotonic() - t0
            self.events.append([t0, value, took])
            self.stop.wait(max(0.0, opts.metrics_every - took))


def main(argv: list[str] | None = None) -> int:
    """Watch until told to stop; write the events."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="the receiver's port")
    p.add_argument("--stats-port", type=int, required=True)
    p.add_argument("--pid", type=int, required=True, help="the server's pid (for RSS and CPU)")
    p.add_argument("--source", default="127.0.0.2", help="the good client's and probe's address")
    p.add_argument("--start-block", type=int, default=900_000_000)
    p.add_argument(
        "--every", type=float, default=0.02, help="seconds between the good client's messages"
    )
    p.add_argument("--window", type=int, default=256)
    p.add_argument(
        "--ack-timeout",
        type=float,
        default=20.0,
        help="reconnect after this long without the oldest reply",
    )
    p.add_argument("--probe-every", type=float, default=0.1)
    p.add_argument("--probe-timeout", type=float, default=30.0)
    p.add_argument("--sample-every", type=float, default=0.05)
    p.add_argument("--metrics-every", type=float, default=0.0, help="0: do not read /metrics")
    p.add_argument("--out", required=True)
    opts = p.parse_args(argv)
    stop = threading.Event()
    good, probe, sampler = GoodClient(opts, stop), HealthProbe(opts, stop), Sampler(opts, stop)
    threads: list[threading.Thread] = [good, probe, sampler]
    metrics = MetricsProbe(opts, stop) if opts.metrics_every > 0 else None
    if metrics is not None:
        threads.append(metrics)
    for t in threads:
        t.start()
    if good.first_ok.wait(30):
        print("ready", flush=True)
    else:
        print("not ready: no OK in 30 s", flush=True)
    for line in sys.stdin:
        if line.strip() == "stop":
            break
    stop.set()
    for t in threads:
        t.join(opts.probe_timeout + 5)
    out = {
        "frames": good.frames,
        "connects": good.connects,
        "closes": good.closes,
        "healthz": probe.events,
        "samples": sampler.samples,
        "metrics": metrics.events if metrics is not None else [],
    }
    Path(opts.out).write_text(json.dumps(out))
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
