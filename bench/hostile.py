"""The adversarial benchmark: each of issue 13's receiver and stats-site attacks against a fresh real server.

``bench/hostile.py [--code DIR] [--label L] [--only NAME,...] [--storage sqlite|mysql|mysql+redis]``

For every attack it starts a fresh ``eth server`` subprocess (from ``--code``,
by default this checkout) with its stats site, its own SQLite file (or MariaDB
database and Redis prefix), its own ``TMPDIR``, and beside it
``bench/hostile_watch.py``: a well-behaved client on 127.0.0.2 sending a fresh
message every 20 ms, a ``/healthz`` probe every 100 ms, and a sampler of the
server's RSS and CPU. After a baseline it runs the attack from 127.0.0.10-.40
(Linux routes all of 127/8), lets the attacker leave, checks that a fresh
client whose frame spans two TCP writes (half, 50 ms, the rest) is answered
(issue 13 item 2's wedge), and reports: server RSS before, peak and after; the
good client's ack latency p50/p99/max and its longest wait without any answer
(the worst stall); the worst ``/healthz`` latency; whether the good client got
``OK`` for every message throughout (any ERR, timeout or close is FAIL); the
two-write client; and what each attack measures of its own.

Results: ``bench/results/hostile-LABEL.md`` and ``.json``. Each attack takes
at most about two minutes, the whole run about fifteen. Nothing here asserts a
speed: it is a benchmark (``bench/README.md``, "Adversarial benchmark").
"""

from __future__ import annotations

import argparse
import errno
import http.client
import json
import os
import platform
import resource
import secrets
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from hashlib import sha256
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from hostile_watch import parse_netstrings  # noqa: E402

import bench as suite  # noqa: E402  (bench/bench.py: servers, MariaDB, Redis helpers)
from eth_twisted.link.payload import render_html  # noqa: E402

PYTHON = sys.executable
GOOD = "127.0.0.2"
FRESH = "127.0.0.3"
PROBE = "127.0.0.4"
RECOVER = "127.0.0.5"
ATTACKERS = [f"127.0.0.{i}" for i in range(10, 41)]
MAX_LENGTH = 65536  # the server's default --max-length
REAL_ANSWER = ("OK", "DUP", "ERR")


def netstring(payload: bytes) -> bytes:
    """``payload`` as one netstring."""
    return b"%d:%s," % (len(payload), payload)


# -- the server under attack -----------------------------------------------------------


class Server:
    """``eth server`` from ``code`` with its stats site, private TMPDIR and storage; stopped on exit."""

    def __init__(
        self,
        code: Path,
        work: Path,
        storage: list[str],
        *,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
        nofile: int | None = None,
    ) -> None:
        self.port, self.stats_port = suite.free_port(), suite.free_port()
        self.tmpdir = work / "tmp"
        self.tmpdir.mkdir()
        self.log = work / "server.log"
        self.nofile = nofile
        args = ["--stats", f"tcp:{self.stats_port}:interface=127.0.0.1", *(extra or [])]
        cmd = suite.server_command(code, self.port, storage, args)
        full_env: dict[str, str] = {
            **os.environ,
            "ETH_MYSQL_PASS": str(suite.MYSQL["password"]),
            "TMPDIR": str(self.tmpdir),
            **(env or {}),
        }

        def limits() -> None:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (min(nofile, hard) if nofile else hard, hard)
            )

        with open(self.log, "wb") as out:
            self.popen = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, preexec_fn=limits
            )
        self.pid = self.popen.pid
        self.killed = False
        deadline = time.monotonic() + 60
        while not (b"Sinks ready" in self.log.read_bytes() and self._stats_up()):
            if self.popen.poll() is not None:
                raise RuntimeError(f"eth server exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"eth server not ready in 60 s: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def _stats_up(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.stats_port), timeout=1).close()
            return True
        except OSError:
            return False

    def alive(self) -> bool:
        """True while the process runs."""
        return self.popen.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s (a reactor frozen in a regex never sees the SIGTERM)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.popen.kill()
                self.popen.wait()

    def log_summary(self) -> dict[str, int]:
        """Lines the server logged, and how many of them were CRITICAL or tracebacks."""
        text = self.log.read_text(errors="replace")
        lines = text.splitlines()
        return {
            "lines": len(lines),
            "critical": sum("CRITICAL" in x for x in lines),
            "tracebacks": text.count("Traceback (most recent call last)"),
        }


def tcp_sockets(port: int) -> list[tuple[str, int, int]]:
    """(state, tx_queue, rx_queue) of every TCP socket on local ``port`` but the listener (/proc/net/tcp)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        out += parse_proc_net_tcp(lines, port)
    return out


TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def parse_proc_net_tcp(lines: list[str], port: int) -> list[tuple[str, int, int]]:
    """The sockets of ``lines`` (rows of /proc/net/tcp) whose local port is ``port``, LISTEN left out."""
    out = []
    for line in lines:
        f = line.split()
        if len(f) < 5 or f[1].rsplit(":", 1)[-1].upper() != f"{port:04X}":
            continue
        state = TCP_STATES.get(f[3].upper(), f[3])
        if state == "LISTEN":
            continue
        tx, rx = f[4].split(":")
        out.append((state, int(tx, 16), int(rx, 16)))
    return out


def close_wait(port: int) -> int:
    """Sockets of the server on ``port`` in CLOSE-WAIT: the peer closed, the server has not."""
    return sum(1 for s in tcp_sockets(port) if s[0] == "CLOSE_WAIT")


def tmp_bytes(pid: int, tmpdir: Path) -> int:
    """Bytes in files the server holds open under ``tmpdir`` plus files still listed there.

    Files it holds open count even when they have been unlinked.
    """
    total = 0
    prefix = str(tmpdir)
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        fds = []
    for fd in fds:
        try:
            if os.readlink(fd).startswith(prefix):
                total += os.stat(fd).st_size
        except OSError:
            pass
    for path in tmpdir.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except OSError:
            pass
    return total


def metrics_snapshot(stats_port: int, timeout: float = 10.0) -> dict[str, float] | str:
    """The server's Prometheus samples, or the error that stopped us reading them."""
    try:
        conn = http.client.HTTPConnection(
            "127.0.0.1", stats_port, timeout=timeout, source_address=(PROBE, 0)
        )
        conn.request("GET", "/metrics", headers={"Host": f"127.0.0.1:{stats_port}"})
        text = conn.getresponse().read().decode(errors="replace")
        conn.close()
    except (OSError, http.client.HTTPException) as e:
        return type(e).__name__
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                samples[name] = float(value)
            except ValueError:
                pass
    return samples


def pick(samples: dict[str, float] | str, *prefixes: str) -> dict[str, float] | str:
    """The samples whose names start with one of ``prefixes``."""
    if isinstance(samples, str):
        return samples
    return {k: v for k, v in samples.items() if k.startswith(prefixes) and "_created" not in k}


# -- clients -----------------------------------------------------------------------------


def reply_text(reply: bytes) -> str:
    """A reply netstring's content without its hash: ``OK``, ``DUP``, ``ERR timeout``, ``ERR - bad-frame``."""
    parts = reply.split(b" ")
    if parts[0] == b"ERR" and len(parts) >= 3:
        code = parts[-1].decode(errors="replace")
        return "ERR - " + code if parts[1] == b"-" else "ERR " + code
    return parts[0][:20].decode(errors="replace")


def fresh_client(
    port: int, block: int, *, source: str = FRESH, split: bool = True, wait: float = 15.0
) -> dict[str, Any]:
    """Send one message on a new connection and report whether it was answered OK.

    The message goes in two TCP writes 50 ms apart when ``split``.
    """
    payload = render_html(block)
    digest = sha256(payload).hexdigest().encode()
    frame = netstring(payload)
    t0 = time.monotonic()
    s = socket.socket()
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind((source, 0))
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
        except OSError as e:
            return {
                "answered": False,
                "reply": f"connect: {type(e).__name__}",
                "seconds": time.monotonic() - t0,
            }
        try:
            if split:
                s.sendall(frame[: len(frame) // 2])
                time.sleep(0.05)
                s.sendall(frame[len(frame) // 2 :])
            else:
                s.sendall(frame)
            buf = b""
            deadline = t0 + wait
            while True:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(4096)
                if not chunk:
                    return {"answered": False, "reply": "closed", "seconds": time.monotonic() - t0}
                replies, buf = parse_netstrings(buf + chunk)
                if replies:
                    return {
                        "answered": replies[0] == b"OK " + digest,
                        "reply": reply_text(replies[0]),
                        "seconds": time.monotonic() - t0,
                    }
        except TimeoutError:
            return {
                "answered": False,
                "reply": f"no reply in {wait:.0f} s",
                "seconds": time.monotonic() - t0,
            }
        except (OSError, ValueError) as e:
            return {"answered": False, "reply": type(e).__name__, "seconds": time.monotonic() - t0}
    finally:
        s.close()


def wait_recovered(ctx: Ctx) -> float | None:
    """Seconds from the attacker leaving until a fresh one-write client (127.0.0.5) is answered within 0.5 s.

    None when that did not happen within ``--recover-cap`` seconds.
    """
    deadline = time.monotonic() + ctx.opts.recover_cap
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        r = fresh_client(
            ctx.server.port, ctx.next_block(), source=RECOVER, split=False, wait=min(5.0, left)
        )
        if r["answered"] and r["seconds"] < 0.5:
            return ctx.since("leave")
        time.sleep(0.5)


class Crowd:
    """Many attacker sockets on non-blocking I/O: bytes still to send, replies read, closes seen."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.socks: list[socket.socket] = []
        self.out: dict[socket.socket, memoryview] = {}
        self.inbuf: dict[socket.socket, bytes] = {}
        self.gone: dict[socket.socket, float] = {}
        self.replies: Counter[str] = Counter()
        self.sent = 0
        self.received = 0
        self.failed: Counter[str] = Counter()

    def open(
        self,
        sources: list[str],
        n: int,
        data: bytes | Callable[[int], bytes] = b"",
        *,
        rcvbuf: int | None = None,
        burst: int = 40,
        timeout: float = 3.0,
    ) -> int:
        """Connect ``n`` sockets round robin from ``sources`` in bursts; send ``data``.

        The bursts stay below the listen backlog.
        """
        opened = 0
        for start in range(0, n, burst):
            sel = selectors.DefaultSelector()
            waiting: dict[socket.socket, int] = {}
            for i in range(start, min(n, start + burst)):
                s = socket.socket()
                s.setblocking(False)
                if rcvbuf:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                s.bind((sources[i % len(sources)], 0))
                err = s.connect_ex(("127.0.0.1", self.port))
                if err not in (0, errno.EINPROGRESS):
                    self.failed[errno.errorcode.get(err, str(err))] += 1
                    s.close()
                    continue
                waiting[s] = i
                sel.register(s, selectors.EVENT_WRITE)
            deadline = time.monotonic() + timeout
            while waiting and time.monotonic() < deadline:
                for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                    s = key.fileobj  # type: ignore[assignment]
                    assert isinstance(s, socket.socket)
                    i = waiting.pop(s)
                    sel.unregister(s)
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        self.failed[errno.errorcode.get(err, str(err))] += 1
                        s.close()
                        continue
                    opened += 1
                    self.socks.append(s)
                    payload = data(i) if callable(data) else data
                    if payload:
                        self.out[s] = memoryview(payload)
                        self._send(s)
            for s in waiting:
                self.failed["connect timeout"] += 1
                s.close()
            sel.close()
            time.sleep(0.005)
        return opened

    def _send(self, s: socket.socket) -> bool:
        """Send what ``s`` still owes; True when nothing is left (or the socket is gone)."""
        buf = self.out.get(s)
        if buf is None:
            return True
        try:
            n = s.send(buf)
        except BlockingIOError:
            return False
        except OSError:
            self.out.pop(s, None)
            self.gone.setdefault(s, time.monotonic())
            return True
        self.sent += n
        if n == len(buf):
            del self.out[s]
            return True
        self.out[s] = buf[n:]
        return False

    def _recv(self, s: socket.socket, parse: bool) -> None:
        try:
            chunk = s.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.gone.setdefault(s, time.monotonic())
            self.out.pop(s, None)
            return
        self.received += len(chunk)
        if parse:
            try:
                replies, rest = parse_netstrings(self.inbuf.get(s, b"") + chunk)
            except ValueError:
                replies, rest = [], b""
            self.inbuf[s] = rest
            for r in replies:
                self.replies[reply_text(r)] += 1

    def pump(
        self,
        seconds: float,
        *,
        read: bool = False,
        parse: bool = False,
        until: Callable[[], bool] | None = None,
    ) -> None:
        """For ``seconds``: send what is owed and, with ``read``, read (and with ``parse``, count replies)."""
        deadline = time.monotonic() + seconds
        sel = selectors.DefaultSelector()
        for s in self.socks:
            if s in self.gone:
                continue
            mask = (selectors.EVENT_WRITE if s in self.out else 0) | (
                selectors.EVENT_READ if read else 0
            )
            if mask:
                sel.register(s, mask)
        try:
            while time.monotonic() < deadline and sel.get_map():
                if until is not None and until():
                    return
                for key, events in sel.select(min(0.1, max(0.0, deadline - time.monotonic()))):
                    s = key.fileobj  # type: ignore[assignment]
                    assert isinstance(s, socket.socket)
                    if events & selectors.EVENT_WRITE and self._send(s):
                        if read and s not in self.gone:
                            sel.modify(s, selectors.EVENT_READ)
                        else:
                            sel.unregister(s)
                            continue
                    if events & selectors.EVENT_READ:
                        self._recv(s, parse)
                        if s in self.gone:
                            sel.unregister(s)
            if until is None:
                time.sleep(max(0.0, deadline - time.monotonic()) if read else 0)
        finally:
            sel.close()

    def alive(self) -> int:
        """Sockets not seen closed by the server."""
        return sum(1 for s in self.socks if s not in self.gone)

    def owed(self) -> int:
        """Bytes still waiting to be sent."""
        return sum(len(b) for b in self.out.values())

    def close(self, s: socket.socket) -> None:
        """Close one socket (a FIN, or a reset when it has unread data)."""
        self.out.pop(s, None)
        self.gone.setdefault(s, time.monotonic())
        s.close()

    def close_all(self) -> None:
        """The attacker leaves."""
        for s in self.socks:
            s.close()
        self.out.clear()


# -- the watcher and the numbers -------------------------------------------------------------


class Watcher:
    """``bench/hostile_watch.py`` beside the server: good client, /healthz probe, samplers."""

    def __init__(
        self, server: Server, out: Path, start_block: int, metrics_every: float = 0.0
    ) -> None:
        self.out = out
        cmd = [
            PYTHON,
            str(BENCH / "hostile_watch.py"),
            "--port",
            str(server.port),
            "--stats-port",
            str(server.stats_port),
            "--pid",
            str(server.pid),
            "--source",
            GOOD,
            "--start-block",
            str(start_block),
            "--metrics-every",
            str(metrics_every),
            "--out",
            str(out),
        ]
        self.popen = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline().strip()
        if line != "ready":
            self.popen.kill()
            raise RuntimeError(f"watcher: {line or 'exited'}")

    def stop(self) -> dict[str, Any]:
        """Stop it; its events."""
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write("stop\n")
            self.popen.stdin.close()
            self.popen.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            self.popen.kill()
            self.popen.wait()
        return dict(json.loads(self.out.read_text()))


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values (nearest rank); NaN when empty."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def worst_stall(answer_times: list[float], t0: float, t1: float) -> float:
    """The longest interval within [t0, t1] without any answer to the good client.

    The good client always has an answer to wait for.
    ``answer_times`` are the moments real replies (OK, DUP, ERR) arrived, sorted.
    The good client has a fresh message to send every 20 ms, so every gap between
    answers beyond that is time it was kept waiting.
    """
    lo, hi = bisect_right(answer_times, t0), bisect_left(answer_times, t1)
    points = [t0, *answer_times[lo:hi], t1]
    return max((b - a for a, b in pairwise(points)), default=0.0)


def good_client_numbers(data: dict[str, Any], t0: float, t1: float, stop: float) -> dict[str, Any]:
    """The good client's frames sent in [t0, t1]: outcomes, ack latency, worst stall, verdict."""
    outcomes: Counter[str] = Counter()
    latencies = []
    answers = []
    for sent, answered, outcome in data["frames"]:
        if answered is not None and (outcome or "").split(" ")[0] in REAL_ANSWER:
            answers.append(answered)
        if not t0 <= sent <= t1:
            continue
        if answered is None:
            outcome = "in flight at stop" if stop - sent < 2.0 else "unanswered"
        outcomes[outcome] += 1
        if answered is not None and outcome.split(" ")[0] in REAL_ANSWER:
            latencies.append(answered - sent)
    answers.sort()
    latencies.sort()
    connects = [c for c in data["connects"] if t0 <= c[0] <= t1]
    failed_connects = sum(1 for c in connects if c[1] != "ok")
    closes = [c for c in data["closes"] if t0 <= c[0] <= t1]
    bad = {k: v for k, v in outcomes.items() if k not in ("OK", "in flight at stop")}
    return {
        "sent": sum(outcomes.values()),
        "outcomes": dict(outcomes),
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "max_ms": 1000 * (latencies[-1] if latencies else float("nan")),
        "worst_stall_s": worst_stall(answers, t0, t1),
        "closes": [c[1] for c in closes],
        "failed_connects": failed_connects,
        "answered_throughout": not bad and not closes and not failed_connects and bool(latencies),
    }


def healthz_numbers(data: dict[str, Any], t0: float, t1: float) -> dict[str, Any]:
    """The /healthz probes started in [t0, t1]: count, failures, worst latency."""
    probes = [p for p in data["healthz"] if t0 <= p[0] <= t1]
    took = sorted(p[1] for p in probes)
    fails = Counter(str(p[2]) for p in probes if p[2] != 200)
    return {
        "probes": len(probes),
        "failures": dict(fails),
        "p50_ms": 1000 * percentile(took, 0.5),
        "worst_ms": 1000 * (took[-1] if took else float("nan")),
    }


def rss_numbers(data: dict[str, Any], t0: float, t1: float) -> dict[str, Any]:
    """Server RSS (MB) before t0 (median of the last 2 s), peak in [t0, t1], at t1; CPU seconds in between."""
    samples = data["samples"]
    if not samples:
        return {}
    before = [s[1] for s in samples if t0 - 2 <= s[0] <= t0] or [samples[0][1]]
    during = [s for s in samples if t0 <= s[0] <= t1] or samples[-1:]
    at0 = [s for s in samples if s[0] <= t0] or samples[:1]
    return {
        "rss_before_mb": statistics.median(before) / 1024,
        "rss_peak_mb": max(s[1] for s in during) / 1024,
        "rss_after_mb": during[-1][1] / 1024,
        "cpu_s": during[-1][2] - at0[-1][2],
    }


def series(data: dict[str, Any], t0: float, every: float = 1.0) -> list[list[float]]:
    """RSS (MB) every ``every`` seconds, time relative to the attack's start: for a plot later."""
    out: list[list[float]] = []
    for at, rss, _ in data["samples"]:
        if not out or at - t0 >= out[-1][0] + every:
            out.append([round(at - t0, 2), round(rss / 1024, 1)])
    return out


# -- attacks ----------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What an attack needs and what it records."""

    opts: argparse.Namespace
    server: Server
    work: Path
    block: int
    database: str | None = None
    marks: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    sent: int = 0

    def mark(self, name: str) -> float:
        """Note the time of ``name``."""
        self.marks[name] = time.monotonic()
        return self.marks[name]

    def since(self, name: str) -> float:
        """Seconds since mark ``name``."""
        return time.monotonic() - self.marks[name]

    def sleep_until(self, name: str, seconds: float) -> None:
        """Sleep until ``seconds`` after mark ``name``."""
        time.sleep(max(0.0, seconds - self.since(name)))

    def next_block(self) -> int:
        """A block number no other message of this run used."""
        self.block += 1
        return self.block


@dataclass
class Attack:
    """One attack: its issue item, what it does, and the server it needs."""

    name: str
    item: int
    what: str
    run: Callable[[Ctx], None]
    prepare: Callable[[Ctx], None] | None = None
    after: Callable[[Ctx], None] | None = None
    mysql: bool = False
    metrics_every: float = 0.0
    nofile: int | None = None
    env: dict[str, str] = field(default_factory=dict)


def one_frame(ctx: Ctx, payload: bytes) -> None:
    """Send one frame from an attacker address; wait (at most --freeze-cap) for its reply."""
    s = socket.socket()
    s.bind((ATTACKERS[0], 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", ctx.server.port))
    frame = netstring(payload)
    t0 = time.monotonic()
    s.sendall(frame)
    ctx.sent += len(frame)
    s.settimeout(ctx.opts.freeze_cap)
    try:
        replies, _ = parse_netstrings(s.recv(200))
        ctx.extras["attacker_reply"] = reply_text(replies[0]) if replies else "closed"
        ctx.extras["attacker_answered_after_s"] = time.monotonic() - t0
    except TimeoutError:
        ctx.extras["attacker_reply"] = (
            f"none within {ctx.opts.freeze_cap:.0f} s (server still busy)"
        )
    except (OSError, ValueError) as e:
        ctx.extras["attacker_reply"] = type(e).__name__
    s.close()
    ctx.extras["frame_bytes"] = len(payload)
    ctx.mark("leave")


def title_payload(size: int | None, reps: int = 1000) -> bytes:
    """``<title>`` + "ethereum block number " repeated, no ``</title>``.

    Padded to ``size`` bytes when given.
    """
    unit = b"ethereum block number "
    if size is None:
        return b"<title>" + unit * reps
    body = b"<title>" + unit * ((size - 7) // len(unit))
    return body + b" " * (size - len(body))


def attack_title_22k(ctx: Ctx) -> None:
    """Item 1: a 22 KB title-regex frame."""
    one_frame(ctx, title_payload(None, 1000))


def attack_title_64k(ctx: Ctx) -> None:
    """Item 1: a title-regex frame of the largest size the server accepts."""
    one_frame(ctx, title_payload(MAX_LENGTH))


def attack_body(ctx: Ctx) -> None:
    """Item 1: the body regex's quadratic input.

    A matching title, then ``<body>`` repeated, no ``</body>``.
    """
    head = b"<title>Ethereum block number</title>"
    one_frame(ctx, head + b"<body>" * ((MAX_LENGTH - len(head)) // 6))


PIECE = b"x" * 4000
PIECES = 15  # 60,000 bytes of a 65,536-byte frame that never ends


def hold_partials(ctx: Ctx, sources: list[str], n: int) -> Crowd:
    """``n`` connections round robin from ``sources``, each growing a large partial frame in 4 KB steps.

    Every connection gets its next 4,000 bytes in turn, 0.2 s a round, so the
    server reads each frame's growth separately (as over a real network) and
    the budget pauses connections at every size.
    """
    crowd = Crowd(ctx.server.port)
    ctx.extras["opened"] = crowd.open(sources, n, b"65536:" + PIECE)
    for _ in range(PIECES - 1):
        for s in crowd.socks:
            if s not in crowd.gone:
                owed = crowd.out.get(s)
                crowd.out[s] = memoryview(bytes(owed) + PIECE if owed is not None else PIECE)
        began = time.monotonic()
        crowd.pump(0.2)
        time.sleep(max(0.0, 0.2 - (time.monotonic() - began)))
    crowd.pump(3)
    ctx.sent += crowd.sent
    ctx.extras["partial_bytes_sent"] = crowd.sent
    ctx.extras["partial_bytes_not_taken"] = crowd.owed()
    ctx.extras["connect_failures"] = dict(crowd.failed)
    ctx.extras["closed_by_server_while_holding"] = len(crowd.gone)
    ctx.extras["metrics_holding"] = pick(
        metrics_snapshot(ctx.server.stats_port),
        "eth_server_paused",
        "eth_server_connections_total",
        "eth_server_protocol_errors_total",
    )
    return crowd


def attack_wedge(ctx: Ctx) -> None:
    """Item 2: ~1,000 partial-frame holders from 11 addresses, the oldest leaves, then the rest."""
    crowd = hold_partials(ctx, ATTACKERS[:11], ctx.opts.wedge_connections)
    time.sleep(2)
    crowd.close(crowd.socks[0])
    time.sleep(2)
    ctx.extras["two_write_after_oldest_left"] = fresh_client(ctx.server.port, ctx.next_block())
    crowd.close_all()
    ctx.mark("leave")


def after_wedge(ctx: Ctx) -> None:
    """Item 2: the two-write client soon after the attacker left, and again past the frame timeout."""
    ctx.extras["two_write_5s_after_leaving"] = fresh_client(ctx.server.port, ctx.next_block())
    ctx.extras["close_wait_5s"] = close_wait(ctx.server.port)
    ctx.sleep_until("leave", 35)
    ctx.extras["close_wait_35s"] = close_wait(ctx.server.port)


def attack_closewait(ctx: Ctx) -> None:
    """Item 3: 1,000 partial-frame holders (10 addresses, each at --max-per-ip 100), then all peers close."""
    crowd = hold_partials(ctx, ATTACKERS[:10], 1000)
    time.sleep(2)
    ctx.extras["server_sockets_holding"] = suite.open_sockets(ctx.server.pid)
    crowd.close_all()
    ctx.mark("leave")


def after_closewait(ctx: Ctx) -> None:
    """Item 3: CLOSE-WAIT sockets, held descriptors and a client from 127.0.0.11, at +5 s and +35 s.

    The client from 127.0.0.11 tries while that address's 100 places are held.
    """
    for at in (5, 35):
        ctx.sleep_until("leave", at)
        ctx.extras[f"close_wait_{at}s"] = close_wait(ctx.server.port)
        ctx.extras[f"server_sockets_{at}s"] = suite.open_sockets(ctx.server.pid)
        ctx.extras[f"client_from_attacker_address_{at}s"] = fresh_client(
            ctx.server.port, ctx.next_block(), source=ATTACKERS[1], split=False, wait=5
        )


def attack_amplify(ctx: Ctx) -> None:
    """Item 4: 400 connections each write 64 KiB of ``0:,`` in one burst and never read."""
    n = ctx.opts.amplify_connections
    crowd = Crowd(ctx.server.port)
    probes = b"0:," * (MAX_LENGTH // 3)
    ctx.extras["opened"] = crowd.open(
        ATTACKERS[:4], n, rcvbuf=4096
    )  # all connected first, then the burst
    ctx.extras["connect_failures"] = dict(crowd.failed)
    for s in crowd.socks:
        crowd.out[s] = memoryview(probes)
    held_until = time.monotonic() + ctx.opts.amplify_hold
    peak_tx = 0
    while time.monotonic() < held_until:
        crowd.pump(1)
        peak_tx = max(peak_tx, sum(s[1] for s in tcp_sockets(ctx.server.port)))
    ctx.sent += crowd.sent
    ctx.extras["bytes_sent"] = crowd.sent
    ctx.extras["bytes_not_taken"] = crowd.owed()
    ctx.extras["kernel_send_queue_peak_mb"] = peak_tx / 1e6
    ctx.extras["metrics_holding"] = pick(
        metrics_snapshot(ctx.server.stats_port),
        "eth_server_paused",
        "eth_server_connections",
        "eth_server_replies",
        "eth_server_protocol_errors",
    )
    crowd.close_all()
    ctx.mark("leave")


def attack_slowdb(ctx: Ctx) -> None:
    """Item 5: the record locked (LOCK TABLES ... WRITE from a second connection), tiny frames flood in."""
    n = ctx.opts.slowdb_connections
    per = MAX_LENGTH // 7  # "4:" + 4 bytes + "," = 7 bytes a frame
    lock = suite.mysql_conn(ctx.database)
    with lock.cursor() as c:
        c.execute("LOCK TABLES ethereum_data WRITE")
    ctx.mark("locked")
    crowd = Crowd(ctx.server.port)

    def frames(i: int) -> bytes:
        return b"".join(b"4:%s," % struct.pack(">I", i * per + j) for j in range(per))

    try:
        ctx.extras["opened"] = crowd.open(ATTACKERS[:2], n, frames)
        ctx.extras["frames_offered"] = per * ctx.extras["opened"]
        crowd.pump(max(0.0, ctx.opts.slowdb_hold - ctx.since("locked")), read=True, parse=True)
        ctx.extras["metrics_locked"] = pick(
            metrics_snapshot(ctx.server.stats_port),
            "eth_server_pending",
            "eth_server_replies",
            "eth_server_sink_up",
        )
        ctx.extras["replies_while_locked"] = dict(crowd.replies)
    finally:
        with lock.cursor() as c:
            c.execute("UNLOCK TABLES")
        lock.close()
    ctx.mark("unlocked")
    total = ctx.extras.get("frames_offered", 0)
    crowd.pump(
        ctx.opts.slowdb_drain,
        read=True,
        parse=True,
        until=lambda: sum(crowd.replies.values()) >= total,
    )
    ctx.extras["replies"] = dict(crowd.replies)
    # 0: every attacker frame had its answer (busy, timeout) before the table was unlocked
    ctx.extras["all_attacker_frames_answered_s_after_unlock"] = (
        round(ctx.since("unlocked"), 1) if sum(crowd.replies.values()) >= total else None
    )
    ctx.sent += crowd.sent
    crowd.close_all()
    ctx.mark("leave")


def trickle_request(i: int) -> bytes:
    """The start of a request whose headers never end."""
    return b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Trickle-%d: " % i


def attack_trickle(ctx: Ctx) -> None:
    """Item 14: 200 stats connections trickle a header byte every few seconds; then fill the descriptors."""
    opts = ctx.opts
    crowd = Crowd(ctx.server.stats_port)
    ctx.extras["opened"] = crowd.open(ATTACKERS[:4], 200, trickle_request)
    alive: dict[str, int] = {}
    checkpoints = [5, 10, 20, 30, opts.trickle_seconds]
    start = ctx.marks["attack"]
    while ctx.since("attack") < opts.trickle_seconds:
        for s in crowd.socks:
            if s not in crowd.gone:
                crowd.out[s] = memoryview(b"a")
        crowd.pump(opts.trickle_every, read=True)
        for at in checkpoints:
            if ctx.since("attack") >= at and f"{at}s" not in alive:
                alive[f"{at}s"] = crowd.alive()
    ctx.extras["trickle_alive"] = alive
    closed = sorted(t - start for t in crowd.gone.values())
    ctx.extras["trickle_first_closed_s"] = closed[0] if closed else None
    ctx.extras["trickle_last_closed_s"] = closed[-1] if closed else None
    # Then as many more as the server's descriptors allow (it runs with the usual soft limit of 1,024).
    more = crowd.open(ATTACKERS[4:8], opts.trickle_fill - 200, trickle_request, timeout=2)
    crowd.pump(2, read=True)
    ctx.extras["fill_opened"] = more
    ctx.extras["fill_failures"] = dict(crowd.failed)
    ctx.extras["stats_connections_alive"] = crowd.alive()
    ctx.extras["server_sockets_filled"] = suite.open_sockets(ctx.server.pid)
    receivers = Crowd(ctx.server.port)
    blocks = [ctx.next_block() for _ in range(50)]
    receivers.open([ATTACKERS[20]], 50, lambda i: netstring(render_html(blocks[i])), timeout=3)
    receivers.pump(10, read=True, parse=True, until=lambda: sum(receivers.replies.values()) >= 50)
    ctx.extras["new_receiver_clients"] = {
        "tried": 50,
        "connected": len(receivers.socks),
        "answered_ok": receivers.replies.get("OK", 0),
        "closed": len(receivers.gone),
        "connect_failures": dict(receivers.failed),
    }
    receivers.close_all()
    ctx.sent += crowd.sent + receivers.sent
    crowd.close_all()
    ctx.mark("leave")


BODY_SIZE = 300 * 1024 * 1024


def attack_stats_body(ctx: Ctx) -> None:
    """Item 15: a 300 MiB POST body to the stats site (which requires a token this request lacks)."""
    srv = ctx.server
    peak = {"tmp": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["tmp"] = max(peak["tmp"], tmp_bytes(srv.pid, srv.tmpdir))
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    s = socket.socket()
    s.bind((ATTACKERS[0], 0))
    s.settimeout(30)
    s.connect(("127.0.0.1", srv.stats_port))
    head = (
        b"POST /api/stats HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\n\r\n" % (srv.stats_port, BODY_SIZE)
    )
    chunk = b"\0" * (1 << 20)
    sent = 0
    t0 = time.monotonic()
    how = "sent whole"
    stalled_since: float | None = None
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ)
    try:
        s.sendall(head)
        s.settimeout(1)
        while sent < BODY_SIZE:
            if sel.select(0):  # an answer (413, 405, ...) or a close before the body is done
                how = "the server answered or closed before the body ended"
                break
            try:
                sent += s.send(chunk[: BODY_SIZE - sent])
                stalled_since = None
            except TimeoutError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 10:
                    how = "the server stopped reading (10 s)"
                    break
    except OSError as e:
        how = f"stopped by {type(e).__name__}"
    sel.close()
    ctx.extras["body_bytes_sent"] = sent
    ctx.extras["body_send"] = how
    ctx.extras["body_send_s"] = time.monotonic() - t0
    try:
        s.settimeout(30)
        status = (
            s.recv(200).split(b"\r\n", 1)[0].decode(errors="replace") or "closed without an answer"
        )
    except OSError as e:
        status = type(e).__name__
    ctx.extras["response"] = status
    ctx.extras["response_after_s"] = time.monotonic() - t0
    ctx.extras["tmp_after_response_mb"] = tmp_bytes(srv.pid, srv.tmpdir) / 1e6
    s.close()
    ctx.sent += sent + len(head)
    done.set()
    sampler.join()
    ctx.extras["tmp_peak_mb"] = peak["tmp"] / 1e6
    ctx.mark("leave")


PAGE_RECORDS = 200
PAGE_PAYLOAD = 60 * 1024


def prepare_pages(ctx: Ctx) -> None:
    r"""Item 16: store 200 records of 60 KiB of ``\x01`` (each ``\u0001`` in JSON: six bytes a byte)."""
    s = socket.socket()
    s.bind((ATTACKERS[0], 0))
    s.settimeout(60)
    s.connect(("127.0.0.1", ctx.server.port))
    s.sendall(b"".join(netstring(b"\x01" * PAGE_PAYLOAD + b"%d" % i) for i in range(PAGE_RECORDS)))
    buf, got = b"", list[bytes]()
    while len(got) < PAGE_RECORDS:
        chunk = s.recv(65536)
        if not chunk:
            break
        replies, buf = parse_netstrings(buf + chunk)
        got += replies
    s.close()
    ctx.extras["stored"] = sum(1 for r in got if r.startswith(b"OK "))


def attack_pages(ctx: Ctx) -> None:
    """Item 16: 20 parallel ``GET /api/messages?limit=200`` of those records."""
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    port = ctx.server.stats_port

    def get(i: int) -> None:
        t0 = time.monotonic()
        r: dict[str, Any] = {}
        try:
            conn = http.client.HTTPConnection(
                "127.0.0.1", port, timeout=120, source_address=(ATTACKERS[i % 10], 0)
            )
            # before=201: the 200 large records (ids 1-200, stored before the good client
            # began), not its pages
            conn.request(
                "GET",
                f"/api/messages?limit=200&before={PAGE_RECORDS + 1}",
                headers={"Host": f"127.0.0.1:{port}"},
            )
            resp = conn.getresponse()
            n = 0
            while True:
                block = resp.read(1 << 20)
                if not block:
                    break
                n += len(block)
            r = {"status": resp.status, "bytes": n}
            conn.close()
        except (OSError, http.client.HTTPException) as e:
            r = {"status": type(e).__name__, "bytes": 0}
        r["seconds"] = time.monotonic() - t0
        with lock:
            results.append(r)

    threads = [
        threading.Thread(target=get, args=(i,), daemon=True) for i in range(ctx.opts.pages_parallel)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(130)
    ctx.extras["responses"] = dict(Counter(str(r["status"]) for r in results))
    ctx.extras["response_mb"] = max((r["bytes"] for r in results), default=0) / 1e6
    ctx.extras["slowest_response_s"] = max((r["seconds"] for r in results), default=float("nan"))
    ctx.mark("leave")


ATTACKS = [
    Attack(
        "regex-title-22k",
        1,
        'one 22 KB frame: `<title>` + "ethereum block number " x 1,000, no `</title>`',
        attack_title_22k,
    ),
    Attack("regex-title-64k", 1, "the same at the largest frame (65,536 bytes)", attack_title_64k),
    Attack(
        "regex-body",
        1,
        "a matching title, then `<body>` repeated to 65,536 bytes, no `</body>`",
        attack_body,
    ),
    Attack(
        "wedge",
        2,
        "1,000 connections from 11 addresses each grow a 64 KiB frame to 60 KB in 4 KB "
        "steps and hold it; the oldest leaves, then all",
        attack_wedge,
        after=after_wedge,
    ),
    Attack(
        "closewait",
        3,
        "1,000 partial-frame holders grown as in `wedge` (10 addresses x 100, the "
        "per-address cap), then every peer closes",
        attack_closewait,
        after=after_closewait,
    ),
    Attack(
        "amplify",
        4,
        "400 connections each write 64 KiB of `0:,` at once and never read (receive buffer 4 KiB)",
        attack_amplify,
    ),
    Attack(
        "slowdb",
        5,
        "MariaDB record, `LOCK TABLES ethereum_data WRITE` held 25 s; 40 connections each "
        "write 64 KiB of 7-byte frames",
        attack_slowdb,
        mysql=True,
        metrics_every=0.5,
    ),
    Attack(
        "stats-trickle",
        14,
        "200 stats connections trickle a header byte every 3 s for 40 s; then up to "
        "1,000 (server soft RLIMIT_NOFILE 1,024) and 50 new receiver clients",
        attack_trickle,
        nofile=1024,
    ),
    Attack(
        "stats-body",
        15,
        "one unauthenticated 300 MiB POST to /api/stats (the site has a token)",
        attack_stats_body,
        env={"ETH_STATS_TOKEN": "hostile-" + secrets.token_hex(8)},
    ),
    Attack(
        "stats-pages",
        16,
        "200 records of 60 KiB of \\x01, then 20 parallel "
        "`/api/messages?limit=200&before=201` (those 200)",
        attack_pages,
        prepare=prepare_pages,
    ),
]


def selected(only: str | None) -> list[Attack]:
    """The attacks ``--only`` names: by name, name prefix (``regex``, ``stats``) or item number."""
    if not only:
        return list(ATTACKS)
    tokens = [t.strip() for t in only.split(",") if t.strip()]
    chosen = [a for a in ATTACKS if any(t == str(a.item) or a.name.startswith(t) for t in tokens)]
    unknown = [
        t for t in tokens if not any(t == str(a.item) or a.name.startswith(t) for a in ATTACKS)
    ]
    if unknown:
        raise SystemExit(
            f"hostile: no attack named {', '.join(unknown)}; attacks: "
            + ", ".join(f"{a.name} ({a.item})" for a in ATTACKS)
        )
    return chosen


# -- one run ------------------------------------------------------------------------------------------


@contextmanager
def storage_for(kind: str, work: Path) -> Iterator[tuple[list[str], str | None]]:
    """Storage options for ``kind`` (sqlite, mysql, mysql+redis); a database and prefix of our own."""
    with ExitStack() as stack:
        database = prefix = None
        if "mysql" in kind:
            database = stack.enter_context(suite.bench_database())
        if "redis" in kind:
            prefix = stack.enter_context(suite.bench_prefix())
        yield suite.storage_args(kind, work, database, prefix), database


def run_attack(attack: Attack, opts: argparse.Namespace, code: Path, block: int) -> dict[str, Any]:
    """Run one attack against a fresh server; its numbers."""
    kind = opts.storage if not attack.mysql or "mysql" in opts.storage else "mysql"
    result: dict[str, Any] = {
        "name": attack.name,
        "item": attack.item,
        "what": attack.what,
        "storage": kind,
    }
    begun = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="ethhostile-") as tmp,
        storage_for(kind, Path(tmp)) as (storage, db),
    ):
        work = Path(tmp)
        server = Server(code, work, storage, env=attack.env, nofile=attack.nofile)
        ctx = Ctx(opts, server, work, block + 500_000, database=db)
        data: dict[str, Any] = {}
        try:
            if attack.prepare is not None:
                attack.prepare(ctx)
            watcher = Watcher(server, work / "watch.json", block, attack.metrics_every)
            try:
                time.sleep(opts.baseline)
                ctx.mark("attack")
                try:
                    attack.run(ctx)
                except Exception:  # the attack's own failure: report it, go on with the next
                    result["error"] = traceback.format_exc(limit=4)
                ctx.marks.setdefault("leave", time.monotonic())
                ctx.extras["recovered_after_leaving_s"] = wait_recovered(ctx)
                ctx.sleep_until("leave", opts.settle)
                if attack.after is not None:
                    try:
                        attack.after(ctx)
                    except Exception:
                        result["error"] = traceback.format_exc(limit=4)
                ctx.extras["two_write_after"] = fresh_client(server.port, ctx.next_block())
                ctx.mark("end")
                time.sleep(0.3)
            finally:
                ctx.mark("stop")
                data = watcher.stop()
        finally:
            result["server_exited"] = None if server.alive() else server.popen.returncode
            server.stop()
            result["server_killed"] = server.killed
            result["log"] = server.log_summary()
        if opts.keep:
            keep = Path(opts.keep) / attack.name
            keep.mkdir(parents=True, exist_ok=True)
            for name in ("server.log", "watch.json"):
                if (work / name).exists():
                    shutil.copy(work / name, keep / name)
        if attack.name == "slowdb" and db:
            result["rows_stored"] = suite.count_rows(db, None)
    t0, t1, stop = ctx.marks["attack"], ctx.marks["end"], ctx.marks["stop"]
    result["marks_s"] = {k: round(v - t0, 2) for k, v in ctx.marks.items()}
    result["attacker_bytes"] = ctx.sent
    result.update(rss_numbers(data, t0, t1))
    result["baseline"] = good_client_numbers(data, t0 - opts.baseline, t0, stop)
    result["good"] = good_client_numbers(data, t0, t1, stop)
    result["healthz"] = healthz_numbers(data, t0, t1)
    if data.get("metrics"):
        pend = [(at, v) for at, v, _ in data["metrics"] if v is not None and t0 <= at <= t1]
        result["pending_peak"] = max((v for _, v in pend), default=None)
        unlocked = ctx.marks.get("unlocked")
        if unlocked is not None:
            drained = [at for at, v in pend if at >= unlocked and v == 0]
            result["pending_zero_after_unlock_s"] = drained[0] - unlocked if drained else None
        result["metrics_failed_reads"] = sum(
            1 for at, v, _ in data["metrics"] if v is None and t0 <= at <= t1
        )
    if "rows_stored" in result:
        oks = (
            sum(1 for f in data["frames"] if f[2] == "OK")
            + ctx.extras.get("replies", {}).get("OK", 0)
            + sum(1 for v in ctx.extras.values() if isinstance(v, dict) and v.get("answered"))
        )
        result["rows_stored_never_answered_ok"] = result["rows_stored"] - oks
    if "rss_peak_mb" in result:
        grew = result["rss_peak_mb"] - result["rss_before_mb"]
        if ctx.extras.get("opened"):
            result["rss_peak_growth_per_connection_kb"] = 1024 * grew / ctx.extras["opened"]
        if ctx.sent:
            result["rss_peak_growth_per_mb_sent"] = grew / (ctx.sent / 1e6)
    result["rss_series"] = series(data, t0)
    result["extras"] = ctx.extras
    result["wall_s"] = time.monotonic() - begun
    return result


# -- report -----------------------------------------------------------------------------------------


def yes_no(v: Any) -> str:
    """PASS/FAIL for a bool."""
    return "PASS" if v else "**FAIL**"


def fresh_text(r: dict[str, Any] | None) -> str:
    """A fresh client's outcome in a few words."""
    if not r:
        return "-"
    return f"yes ({r['seconds']:.2f} s)" if r["answered"] else f"**no**: {r['reply']}"


def recovered_text(v: float | None) -> str:
    """Seconds until the server answered promptly again, or that it did not."""
    return f"{v:.1f}" if v is not None else "**not within the cap**"


def ms(v: float) -> str:
    """Milliseconds, rounded for the table."""
    if v != v:  # NaN
        return "-"
    return f"{v:,.0f}" if v >= 10 else f"{v:.1f}"


def plain(v: Any) -> Any:
    """``v`` with floats rounded for reading (nested dicts and lists too)."""
    if isinstance(v, float):
        return round(v, 2) if abs(v) < 100 else round(v)
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


def size_text(n: float) -> str:
    """A byte count in B, KB or MB."""
    return f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:,.1f} KB" if n >= 1e3 else f"{n:.0f} B"


def detail_lines(r: dict[str, Any]) -> list[str]:
    """The attack-specific numbers as markdown bullets."""
    x = r.get("extras", {})
    g, h = r["good"], r["healthz"]
    out = [
        f"- good client (127.0.0.2): {g['sent']} messages sent during the attack, outcomes "
        f"{g['outcomes']}; closes {g['closes'] or 'none'}; failed connects {g['failed_connects']}; "
        f"baseline p50 {ms(r['baseline']['p50_ms'])} ms",
        f"- /healthz: {h['probes']} probes, failures {h['failures'] or 'none'}, p50 {ms(h['p50_ms'])} ms",
        f"- server: CPU {r.get('cpu_s', float('nan')):.1f} s during the attack for "
        f"{size_text(r['attacker_bytes'])} sent by the attacker; log {r['log']['lines']} lines "
        f"({r['log']['critical']} CRITICAL, {r['log']['tracebacks']} tracebacks)"
        + ("; **killed** (did not stop on SIGTERM within 10 s)" if r.get("server_killed") else "")
        + (f"; **exited** {r['server_exited']}" if r.get("server_exited") is not None else ""),
    ]
    skip = {"two_write_after"}
    for k, v in x.items():
        if k in skip:
            continue
        if isinstance(v, dict) and "answered" in v:
            v = fresh_text(v)
        out.append(f"- {k.replace('_', ' ')}: {plain(v)}")
    for k in (
        "rss_peak_growth_per_connection_kb",
        "rss_peak_growth_per_mb_sent",
        "pending_peak",
        "pending_zero_after_unlock_s",
        "metrics_failed_reads",
        "rows_stored",
        "rows_stored_never_answered_ok",
        "wall_s",
    ):
        if k in r:
            out.append(f"- {k.replace('_', ' ')}: {plain(r[k])}")
    if "error" in r:
        out.append(f"- **the attack itself failed**: `{r['error'].strip().splitlines()[-1]}`")
    return out


def report(res: dict[str, Any]) -> str:
    """The results as markdown: one table row per attack, then each attack's details."""
    m = res["meta"]
    lines = [
        f"# eth-twisted adversarial benchmark ({m['label']})",
        "",
        f"{m['when']} on {m['host']} ({m['cpus']} CPUs, Python {m['python']}), load average at start "
        f"{m['load_start']:.2f}, at end {m['load_end']:.2f}; server code `{m['code']}`"
        + (f" (commit {m['commit']})" if m.get("commit") else "")
        + f", storage {m['storage']}, server "
        "defaults (`--max-length 65536`, `--partial-budget` 32 MiB, `--max-per-ip 100`, `--window 256`, "
        "`--deadline 10`). Good client: 127.0.0.2, a fresh message every 20 ms on one connection, and "
        '`GET /healthz` every 100 ms; attackers 127.0.0.10-.40. "answered throughout": every message of '
        "the good client sent during the attack got `OK`, with no close, reset or reconnect. Worst stall: "
        "the longest time the good client went without any reply. Two-write client: a fresh connection "
        "from 127.0.0.3 sends one frame in two writes 50 ms apart, after the attacker left.",
        "",
        "| item | attack | RSS before / peak / after (MB) | ack p50 / p99 / max (ms) | worst stall (s) "
        "| /healthz worst (ms) | good client answered throughout | prompt again after leaving (s) "
        "| two-write client after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["attacks"]:
        if "good" not in r:
            lines.append(
                f"| {r['item']} | {r['name']} | did not run: {r.get('error', '?').splitlines()[-1]} "
                "| | | | | | |"
            )
            continue
        g = r["good"]
        lines.append(
            f"| {r['item']} | {r['name']} | "
            f"{r.get('rss_before_mb', 0):.0f} / {r.get('rss_peak_mb', 0):.0f} / "
            f"{r.get('rss_after_mb', 0):.0f} | {ms(g['p50_ms'])} / {ms(g['p99_ms'])} / {ms(g['max_ms'])} | "
            f"{g['worst_stall_s']:.2f} | {ms(r['healthz']['worst_ms'])}"
            + (
                f" ({sum(r['healthz']['failures'].values())} failed)"
                if r["healthz"]["failures"]
                else ""
            )
            + f" | {yes_no(g['answered_throughout'])} | "
            f"{recovered_text(r['extras'].get('recovered_after_leaving_s'))}"
            f" | {fresh_text(r['extras'].get('two_write_after'))} |"
        )
    for r in res["attacks"]:
        lines += ["", f"## {r['item']}. {r['name']}", "", r["what"] + ".", ""]
        if "good" in r:
            lines += detail_lines(r)
        else:
            lines.append(f"```\n{r.get('error', '')}\n```")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the selected attacks; print and write the results."""
    p = argparse.ArgumentParser(prog="bench/hostile.py", description=__doc__.splitlines()[0])
    p.add_argument(
        "--code",
        default=str(ROOT),
        help="source tree the server runs from (default: this checkout)",
    )
    p.add_argument(
        "--commit",
        help="the commit --code holds, for the report (found with git when DIR is a checkout)",
    )
    p.add_argument(
        "--label", default="current", help="names the results files (hostile-LABEL.md, .json)"
    )
    p.add_argument(
        "--only",
        help="comma list of attacks by name, name prefix or issue item: "
        + ", ".join(f"{a.name} ({a.item})" for a in ATTACKS),
    )
    p.add_argument(
        "--storage",
        default="sqlite",
        choices=["sqlite", "mysql", "mysql+redis"],
        help="the server's sinks (slowdb always uses MariaDB)",
    )
    p.add_argument(
        "--keep",
        help="copy each attack's server log and watcher events (watch.json) under this dir",
    )
    p.add_argument(
        "--baseline", type=float, default=3.0, help="seconds of watching before each attack"
    )
    p.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="seconds after the attacker leaves before the checks",
    )
    p.add_argument(
        "--recover-cap",
        type=float,
        default=30.0,
        help="after the attacker leaves, how long to wait for the server to answer a fresh client promptly",
    )
    p.add_argument(
        "--freeze-cap", type=float, default=100.0, help="longest wait for a frozen server's reply"
    )
    p.add_argument("--wedge-connections", type=int, default=1000)
    p.add_argument("--amplify-connections", type=int, default=400)
    p.add_argument("--amplify-hold", type=float, default=25.0)
    p.add_argument("--slowdb-connections", type=int, default=40)
    p.add_argument("--slowdb-hold", type=float, default=25.0, help="seconds the table lock is held")
    p.add_argument(
        "--slowdb-drain",
        type=float,
        default=40.0,
        help="longest wait for every reply after unlocking",
    )
    p.add_argument("--trickle-every", type=float, default=3.0)
    p.add_argument("--trickle-seconds", type=float, default=40.0)
    p.add_argument("--trickle-fill", type=int, default=1000)
    p.add_argument("--pages-parallel", type=int, default=20)
    opts = p.parse_args(argv)
    attacks = selected(opts.only)
    code = Path(opts.code).resolve()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if "mysql" in opts.storage or any(a.mysql for a in attacks):
        suite.ensure_mysql_account()
    RESULTS.mkdir(parents=True, exist_ok=True)
    commit = (
        opts.commit
        or subprocess.run(
            ["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    res: dict[str, Any] = {
        "meta": {
            "label": opts.label,
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_start": suite.load_average(),
            "code": str(code),
            "commit": commit,
            "storage": opts.storage,
            "options": vars(opts),
        },
        "attacks": [],
    }
    block = 800_000_000
    for attack in attacks:
        print(
            f"[hostile] {time.strftime('%H:%M:%S')} load {suite.load_average():.2f}: "
            f"{attack.item} {attack.name}",
            flush=True,
        )
        try:
            r = run_attack(attack, opts, code, block)
        except Exception:
            r = {
                "name": attack.name,
                "item": attack.item,
                "what": attack.what,
                "error": traceback.format_exc(),
            }
        block += 1_000_000
        res["attacks"].append(r)
        if "good" in r:
            g = r["good"]
            print(
                f"  RSS {r.get('rss_before_mb', 0):.0f}/{r.get('rss_peak_mb', 0):.0f}/"
                f"{r.get('rss_after_mb', 0):.0f} MB, stall {g['worst_stall_s']:.2f} s, "
                f"good {'PASS' if g['answered_throughout'] else 'FAIL'}, healthz worst "
                f"{ms(r['healthz']['worst_ms'])} ms, two-write "
                f"{fresh_text(r['extras'].get('two_write_after'))}, {r['wall_s']:.0f} s",
                flush=True,
            )
        else:
            print("  " + r["error"].strip().splitlines()[-1], flush=True)
    res["meta"]["load_end"] = suite.load_average()
    text = report(res)
    suffix = "" if opts.label == "current" else f"-{opts.label}"
    (RESULTS / f"hostile{suffix}.json").write_text(json.dumps(res, indent=1, default=str))
    (RESULTS / f"hostile{suffix}.md").write_text(text)
    print()
    print(text)
    print(f"[hostile] wrote {RESULTS}/hostile{suffix}.md, .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
