"""Block produced -> row committed: push (newHeads) against polling at 1 s and 5 s, in one run.

    .venv/bin/python bench/heads.py [--blocks 300] [--block-time 1] [--idle-seconds 60]
                                    [--out bench/results/heads.md] [--keep DIR]

One anvil mines a block every ``--block-time`` seconds. Three relays follow it at once,
each its own ``eth server`` (SQLite in a temporary directory, ``--stats none``) and
``eth client --format json --stats none``: (a) ``--rpc ws://`` (the newHeads subscription;
``--interval 5`` is only its watchdog), (b) ``--rpc http:// --interval 1``, (c)
``--rpc http:// --interval 5``.

"Produced" is when this script's own WebSocket subscription to anvil receives the block's
newHeads push: the kernel's receive timestamp of the segment (``SO_TIMESTAMPNS``), so
this process's scheduling and GIL do not move it (the user-space delay after it is
reported as the subscriber's own overhead). On loopback anvil's push leaves about 0.1 ms
after the block is built (research HEADS.md 7.1), so produced is the push plus ~0.1 ms.
"Committed" is the first moment a read-only connection to each server's SQLite file sees
the row (a thread queries every ``--watch-ms``; the time taken is that query's start, so
the commit happened at most one watch interval earlier). ``received_at`` (the server's
receipt) gives a second column. Rows and blocks are matched by block hash.

Afterwards anvil's mining stops (``evm_setIntervalMining 0``) and the clients' CPU
(utime+stime from ``/proc/<pid>/stat``) is read over ``--idle-seconds``. Every process is
started and stopped by this script, by its pid; the temporary directory goes on exit.
Writes ``--out`` (markdown) and the same name with ``.json``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ETH = str(Path(sys.executable).parent / "eth")
ANVIL = os.environ.get("ETH_ANVIL") or str(
    ROOT / "node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; SCM_TIMESTAMPNS is the same
MODES = ("push", "poll-1s", "poll-5s")


# -- helpers -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_of(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run_ns(pid: int) -> int:
    """On-CPU nanoseconds of ``pid``'s live threads (``/proc/<pid>/task/*/schedstat``)."""
    total = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((t / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def pct(values: list[float], p: float) -> float | None:
    """The ``p``-th percentile (nearest rank, as bench/ws_latency.py), None when empty."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def summary(values_s: list[float]) -> dict[str, Any]:
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "p50": pct(ms, 50),
        "p90": pct(ms, 90),
        "p99": pct(ms, 99),
        "max": max(ms) if ms else None,
        "min": min(ms) if ms else None,
    }


def rpc(url: str, method: str, params: list[Any], timeout: float = 5.0) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        reply = json.loads(r.read())
    if "error" in reply:
        raise RuntimeError(f"{method}: {reply['error']}")
    return reply["result"]


class Proc:
    """A subprocess of ours logging to a file; stopped by its pid (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name, self.args, self.log = name, args, log
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for(self, ready: Any, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.alive():
                raise RuntimeError(f"{self.name} exited: {self.text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {timeout}s: {self.text()[-2000:]}")
            time.sleep(0.05)

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait()


# -- the benchmark's own newHeads subscriber -----------------------------------------


class HeadSubscriber(threading.Thread):
    """A blocking-socket WebSocket client (RFC 6455, the minimum) subscribed to newHeads.

    ``heads[hash] = (number, produced, user_time)``: ``produced`` is the kernel's receive
    timestamp of the segment that completed the push frame (time.time() when the kernel
    gives none), ``user_time`` the time.time() after ``recvmsg`` returned.
    """

    def __init__(self, port: int) -> None:
        super().__init__(name="heads-subscriber", daemon=True)
        self.port = port
        self.heads: dict[str, tuple[int, float, float]] = {}
        self.order: list[str] = []
        self.lock = threading.Lock()
        self.kernel_stamps = 0
        self.parse_s: list[float] = []
        self.error: BaseException | None = None
        self.subscribed = threading.Event()
        self.sock = socket.create_connection(("127.0.0.1", port), 5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise RuntimeError("anvil closed the WebSocket handshake")
            buf += chunk
        head, self.buf = buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"WebSocket handshake refused: {head[:200]!r}")
        self.send(
            json.dumps(
                {"jsonrpc": "2.0", "id": 1, "method": "eth_subscribe", "params": ["newHeads"]}
            ).encode()
        )
        self.sock.settimeout(None)

    def send(self, payload: bytes, opcode: int = 1) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def frames(self) -> Any:
        """Yield (opcode, payload, kernel_ts, user_ts) per complete frame."""
        buf = self.buf
        kts = uts = time.time()
        while True:
            while True:  # parse what is buffered
                if len(buf) < 2:
                    break
                b0, b1 = buf[0], buf[1]
                n, off = b1 & 0x7F, 2
                if n == 126:
                    if len(buf) < 4:
                        break
                    n, off = struct.unpack("!H", buf[2:4])[0], 4
                elif n == 127:
                    if len(buf) < 10:
                        break
                    n, off = struct.unpack("!Q", buf[2:10])[0], 10
                if b1 & 0x80:
                    off += 4  # a server never masks; skip it anyway
                if len(buf) < off + n:
                    break
                payload, buf = buf[off : off + n], buf[off + n :]
                yield b0 & 0x0F, payload, kts, uts
            data, anc, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(16))
            uts = time.time()
            if not data:
                return
            kts = uts
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= 16:
                    sec, nsec = struct.unpack("qq", raw[:16])
                    kts = sec + nsec / 1e9
                    self.kernel_stamps += 1
            buf += data

    def run(self) -> None:
        try:
            for opcode, payload, kts, uts in self.frames():
                if opcode == 9:  # ping
                    self.send(payload, 10)
                    continue
                if opcode == 8:
                    return
                if opcode != 1:
                    continue
                t0 = time.perf_counter()
                msg = json.loads(payload)
                if msg.get("id") == 1 and "result" in msg:
                    self.subscribed.set()
                    continue
                if msg.get("method") != "eth_subscription":
                    continue
                result = msg["params"]["result"]
                h, n = result["hash"].lower(), int(result["number"], 16)
                with self.lock:
                    if h not in self.heads:
                        self.heads[h] = (n, kts, uts)
                        self.order.append(h)
                self.parse_s.append(time.perf_counter() - t0)
        except OSError:
            pass  # closed on exit
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error = e

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# -- rows becoming visible -----------------------------------------------------------


class RowWatcher(threading.Thread):
    """Polls each server's SQLite file read-only; ``seen[mode][block_hash] = (visible, received_at)``."""

    def __init__(self, dbs: dict[str, Path], every: float) -> None:
        super().__init__(name="row-watcher", daemon=True)
        self.every = every
        self.conns = {
            m: sqlite3.connect(f"file:{p}?mode=ro", uri=True, check_same_thread=False)
            for m, p in dbs.items()
        }
        self.last_id = dict.fromkeys(dbs, 0)
        self.seen: dict[str, dict[str, tuple[float, float]]] = {m: {} for m in dbs}
        self.other_rows = dict.fromkeys(dbs, 0)
        self.queries = 0
        self.query_s: list[float] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                start = time.monotonic()
                for mode, conn in self.conns.items():
                    t0 = time.time()
                    p0 = time.perf_counter()
                    rows = conn.execute(
                        "SELECT id, block_hash, received_at, kind, payload FROM ethereum_data "
                        "WHERE id > ? ORDER BY id",
                        (self.last_id[mode],),
                    ).fetchall()
                    self.query_s.append(time.perf_counter() - p0)
                    self.queries += 1
                    with self.lock:
                        for rid, bh, received, kind, payload in rows:
                            self.last_id[mode] = max(self.last_id[mode], rid)
                            if bh is None:  # before migration 0002: the JSON payload's
                                try:
                                    bh = json.loads(payload).get("block_hash")
                                except ValueError:
                                    bh = None
                            if bh is None or kind not in (None, "block"):
                                self.other_rows[mode] += 1
                                continue
                            self.seen[mode].setdefault(bh.lower(), (t0, float(received)))
                left = self.every - (time.monotonic() - start)
                if left > 0:
                    time.sleep(left)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error = e
        finally:
            for conn in self.conns.values():
                conn.close()


# -- the run -------------------------------------------------------------------------


def log_problems(text: str) -> list[str]:
    """Lines of a log that show a traceback or an unhandled error."""
    bad = ("Traceback", "Unhandled", "CRITICAL", "[Failure instance")
    return [line for line in text.splitlines() if any(b in line for b in bad)]


def run(opts: argparse.Namespace, stack: ExitStack) -> dict[str, Any]:
    t_run = time.monotonic()
    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="ethbench-heads-"))
    stack.callback(shutil.rmtree, tmp, True)
    if opts.keep:
        keep = Path(opts.keep)
        stack.callback(lambda: shutil.copytree(tmp, keep, dirs_exist_ok=True))
    procs: list[Proc] = []

    def stop_all() -> None:
        for p in reversed(procs):  # clients, then servers, then anvil
            try:
                p.stop()
            except OSError:
                pass

    stack.callback(stop_all)

    def step(what: str) -> None:
        print(
            f"[heads] {time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}: {what}",
            flush=True,
        )

    aport = free_port()
    http = f"http://127.0.0.1:{aport}"
    anvil_args = [ANVIL, "--host", "127.0.0.1", "--port", str(aport), "--silent"]
    anvil_args += ["--block-time", str(opts.block_time)]
    anvil = Proc("anvil", anvil_args, tmp / "anvil.log")
    procs.append(anvil)

    def anvil_up() -> bool:
        try:
            return bool(rpc(http, "eth_chainId", [], 1))
        except OSError:
            return False

    anvil.wait_for(anvil_up)
    step(f"anvil on {aport}, a block every {opts.block_time} s")

    sub = HeadSubscriber(aport)
    stack.callback(sub.close)
    sub.start()
    if not sub.subscribed.wait(10):
        raise RuntimeError("the benchmark's own newHeads subscription got no answer")

    servers: dict[str, Proc] = {}
    ports: dict[str, int] = {}
    dbs: dict[str, Path] = {}
    for mode in MODES:
        ports[mode] = free_port()
        dbs[mode] = tmp / f"server-{mode}.sqlite3"
        args = [ETH, "server", "--port", str(ports[mode]), "--stats", "none"]
        args += ["--sqlite", str(dbs[mode])]
        servers[mode] = Proc(f"server {mode}", args, tmp / f"server-{mode}.log")
        procs.append(servers[mode])
    for s in servers.values():
        s.wait_for(lambda s=s: "Sinks ready" in s.text())
    step("servers ready")

    clients: dict[str, Proc] = {}
    rpc_of = {
        "push": (f"ws://127.0.0.1:{aport}", 5),
        "poll-1s": (http, 1),
        "poll-5s": (http, 5),
    }
    for mode in MODES:
        url, interval = rpc_of[mode]
        args = [ETH, "client", "--host", "127.0.0.1", "--port", str(ports[mode])]
        args += ["--rpc", url, "--interval", str(interval), "--format", "json"]
        args += ["--stats", "none", "--spool", str(tmp / f"spool-{mode}.sqlite3")]
        clients[mode] = Proc(f"client {mode}", args, tmp / f"client-{mode}.log")
        procs.append(clients[mode])
    clients["push"].wait_for(lambda: "subscribed to newHeads" in clients["push"].text(), 30)

    watcher = RowWatcher(dbs, opts.watch_ms / 1000)
    watcher.start()
    stack.callback(watcher.stop.set)
    step(f"clients started; warm-up {opts.warmup:.0f} s")
    time.sleep(opts.warmup)
    t_begin = time.time()
    cpu0 = {m: cpu_of(c.pid) for m, c in clients.items()}
    cpu0_t = time.monotonic()

    def measured() -> list[str]:
        with sub.lock:
            return [h for h in sub.order if sub.heads[h][1] >= t_begin][: opts.blocks]

    step(f"measuring {opts.blocks} blocks (about {opts.blocks * opts.block_time:.0f} s)")
    last_note = time.monotonic()
    while len(measured()) < opts.blocks:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited: {p.text()[-2000:]}")
        for t in (sub, watcher):
            if t.error:
                raise RuntimeError(f"{t.name} failed: {t.error!r}")
        if time.monotonic() - last_note > 60:
            last_note = time.monotonic()
            step(f"{len(measured())}/{opts.blocks} blocks")
        time.sleep(0.2)
    blocks = measured()
    cpu_active = {
        m: (cpu_of(c.pid) - cpu0[m]) / (time.monotonic() - cpu0_t) for m, c in clients.items()
    }
    # Wait for the slowest mode (a 5 s poll) to store the last measured block.
    deadline = time.monotonic() + opts.grace
    while time.monotonic() < deadline:
        with watcher.lock:
            if all(all(h in watcher.seen[m] for h in blocks) for m in MODES):
                break
        time.sleep(0.1)

    rpc(http, "evm_setIntervalMining", [0])
    head_at_stop = int(rpc(http, "eth_blockNumber", []), 16)
    step(f"mining stopped at block {head_at_stop}; idle CPU over {opts.idle_seconds:.0f} s")
    time.sleep(min(6.0, opts.idle_seconds))  # let the 5 s pollers see the last block
    idle0 = {m: cpu_of(c.pid) for m, c in clients.items()}
    idle0_ns = {m: run_ns(c.pid) for m, c in clients.items()}
    t0 = time.monotonic()
    time.sleep(opts.idle_seconds)
    idle_wall = time.monotonic() - t0
    idle = {m: (cpu_of(c.pid) - idle0[m]) / idle_wall for m, c in clients.items()}
    idle_sched = {m: (run_ns(c.pid) - idle0_ns[m]) / 1e9 / idle_wall for m, c in clients.items()}
    head_after_idle = int(rpc(http, "eth_blockNumber", []), 16)

    watcher.stop.set()
    watcher.join(5)
    alive = {p.name: p.alive() for p in procs}
    problems = {p.name: log_problems(p.text())[:20] for p in procs if p.name != "anvil"}
    warnings = {
        m: [ln for ln in c.text().splitlines() if "#warn]" in ln or "#error]" in ln][:20]
        for m, c in clients.items()
    }
    ws_log_tail = clients["push"].text().splitlines()[-30:]

    with sub.lock:
        heads = {h: sub.heads[h] for h in blocks}
    modes: dict[str, Any] = {}
    for mode in MODES:
        seen = watcher.seen[mode]
        committed, received, server_path, per_block = [], [], [], []
        for h in blocks:
            number, produced, _ = heads[h]
            if h not in seen:
                per_block.append({"number": number, "hash": h, "produced": produced})
                continue
            visible, recv = seen[h]
            committed.append(visible - produced)
            received.append(recv - produced)
            server_path.append(visible - recv)
            per_block.append(
                {
                    "number": number,
                    "hash": h,
                    "produced": produced,
                    "visible": visible,
                    "received_at": recv,
                }
            )
        modes[mode] = {
            "committed": summary(committed),
            "received": summary(received),
            "server_receipt_to_visible": summary(server_path),
            "missing": len(blocks) - len(committed),
            "other_rows": watcher.other_rows[mode],
            "client_cpu_active": cpu_active[mode],
            "client_cpu_idle": idle[mode],
            "client_cpu_idle_schedstat": idle_sched[mode],
            "client_warnings": warnings[mode],
            "blocks": per_block,
        }
    overhead = [u - k for (_, k, u) in heads.values()]
    push_p99 = modes["push"]["committed"]["p99"]
    poll_p99 = modes["poll-1s"]["committed"]["p99"]
    ratio = poll_p99 / push_p99 if push_p99 and poll_p99 else None
    return {
        "meta": {
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "anvil": subprocess.run([ANVIL, "--version"], capture_output=True, text=True)
            .stdout.splitlines()[0]
            .strip(),
            "blocks": opts.blocks,
            "block_time": opts.block_time,
            "watch_ms": opts.watch_ms,
            "warmup": opts.warmup,
            "idle_seconds": idle_wall,
            "load_start": load_start,
            "load_end": os.getloadavg(),
            "run_seconds": time.monotonic() - t_run,
            "bench_cpu": (os.times().user + os.times().system) / (time.monotonic() - t_run),
            "first_block": heads[blocks[0]][0] if blocks else None,
            "last_block": heads[blocks[-1]][0] if blocks else None,
            "head_at_stop": head_at_stop,
            "head_after_idle": head_after_idle,
        },
        "subscriber": {
            "pushes": len(sub.heads),
            "kernel_stamps": sub.kernel_stamps,
            "kernel_to_user": summary(overhead),
            "parse": summary(sub.parse_s),
        },
        "watcher": {"queries": watcher.queries, "query": summary(watcher.query_s)},
        "modes": modes,
        "ratio_poll1_over_push_p99": ratio,
        "goals": {
            "push_p99_under_50ms": push_p99 is not None and push_p99 < 50,
            "ratio_at_least_10x": ratio is not None and ratio >= 10,
            "ws_idle_cpu_under_1pct": idle["push"] < 0.01,
            "all_processes_alive": all(alive.values()),
            "no_tracebacks": not any(problems.values()),
            "no_missing_rows": all(modes[m]["missing"] == 0 for m in MODES),
            "mining_stopped": head_after_idle == head_at_stop,
        },
        "alive": alive,
        "log_problems": problems,
        "ws_client_log_tail": ws_log_tail,
    }


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def report(res: dict[str, Any]) -> str:
    m, modes, g = res["meta"], res["modes"], res["goals"]
    label = {
        "push": "push: `--rpc ws://` (newHeads; `--interval 5` watchdog)",
        "poll-1s": "poll: `--rpc http:// --interval 1`",
        "poll-5s": "poll: `--rpc http:// --interval 5`",
    }
    la0 = ", ".join(f"{x:.2f}" for x in m["load_start"])
    la1 = ", ".join(f"{x:.2f}" for x in m["load_end"])
    out = [
        "# Heads: block produced -> row committed",
        "",
        f"{m['when']}, {m['host']}, {m['cpus']} CPUs, kernel {m['kernel']}, Python {m['python']}, "
        f"{m['anvil']}. {m['blocks']} blocks ({m['first_block']}..{m['last_block']}) at "
        f"`--block-time {m['block_time']}`, three relays at once; rows watched every "
        f"{m['watch_ms']} ms. Load average {la0} at the start, {la1} at the end; the run took "
        f"{m['run_seconds'] / 60:.1f} min.",
        "",
        "Produced -> row visible in the server's SQLite file (after its commit), ms:",
        "",
        "| mode | n | missing | p50 | p90 | p99 | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in MODES:
        c = modes[k]["committed"]
        out.append(
            f"| {label[k]} | {c['n']} | {modes[k]['missing']} | {fmt(c['p50'])} | "
            f"{fmt(c['p90'])} | {fmt(c['p99'])} | {fmt(c['max'])} |"
        )
    out += [
        "",
        "Produced -> `received_at` (the server's receipt), and receipt -> visible (the server's "
        "batch and commit, plus up to one watch interval), ms:",
        "",
        "| mode | received p50 | p90 | p99 | max | receipt -> visible p50 | p99 | max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in MODES:
        r, s = modes[k]["received"], modes[k]["server_receipt_to_visible"]
        out.append(
            f"| {k} | {fmt(r['p50'])} | {fmt(r['p90'])} | {fmt(r['p99'])} | {fmt(r['max'])} | "
            f"{fmt(s['p50'])} | {fmt(s['p99'])} | {fmt(s['max'])} |"
        )
    ratio = res["ratio_poll1_over_push_p99"]
    yes = {True: "yes", False: "**no**"}
    push_p99 = modes["push"]["committed"]["p99"]
    out += [
        "",
        f"p99 ratio poll-1s / push: **{fmt(ratio)}x**.",
        "",
        "| goal | measured | met |",
        "|---|---|---|",
        f"| push p99 < 50 ms | {fmt(push_p99)} ms | {yes[g['push_p99_under_50ms']]} |",
        f"| >= 10x better than polling at 1 s (p99) | {fmt(ratio)}x | "
        f"{yes[g['ratio_at_least_10x']]} |",
        f"| idle ws client < 1% of a core ({m['idle_seconds']:.0f} s, mining stopped) | "
        f"{modes['push']['client_cpu_idle'] * 100:.2f}% | {yes[g['ws_idle_cpu_under_1pct']]} |",
        "",
        "Client CPU, % of one core: "
        + "; ".join(
            f"{k} {modes[k]['client_cpu_active'] * 100:.2f}% mining, "
            f"{modes[k]['client_cpu_idle'] * 100:.2f}% idle "
            f"({modes[k]['client_cpu_idle_schedstat'] * 100:.3f}% by schedstat)"
            for k in MODES
        )
        + f"; this script (subscriber and row watcher) {m['bench_cpu'] * 100:.1f}% over the run.",
        "",
    ]
    s, w = res["subscriber"], res["watcher"]
    ku = s["kernel_to_user"]
    checks = [
        f"processes alive at the end: {yes[g['all_processes_alive']]}",
        f"no tracebacks in the logs: {yes[g['no_tracebacks']]}",
        f"every measured block stored by every relay: {yes[g['no_missing_rows']]}",
        f"mining stopped during the idle window: {yes[g['mining_stopped']]} "
        f"(head {m['head_at_stop']} -> {m['head_after_idle']})",
    ]
    out += [
        "Checks: " + "; ".join(checks) + ".",
        "",
        f"The benchmark's own subscriber: {s['pushes']} pushes, {s['kernel_stamps']} kernel "
        f"receive timestamps; kernel -> user space p50 {fmt(ku['p50'], 3)} / p99 "
        f"{fmt(ku['p99'], 3)} / max {fmt(ku['max'], 3)} ms (not part of the numbers above: "
        f"produced is the kernel's stamp); JSON parse p50 {fmt(s['parse']['p50'], 3)} ms. "
        f"Row watcher: {w['queries']:,} queries, p50 {fmt(w['query']['p50'], 3)} / p99 "
        f"{fmt(w['query']['p99'], 3)} ms each.",
        "",
    ]
    for k in MODES:
        if modes[k]["client_warnings"]:
            lines = modes[k]["client_warnings"]
            out += [f"Warnings in the {k} client's log:", "", "```", *lines, "```", ""]
    for name, lines in res["log_problems"].items():
        if lines:
            out += [f"Problems in the {name} log:", "", "```", *lines, "```", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=300, help="blocks measured (default 300)")
    p.add_argument("--block-time", type=float, default=1.0, help="anvil --block-time (1)")
    p.add_argument("--idle-seconds", type=float, default=60.0, help="idle CPU window (60)")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring (10)")
    p.add_argument("--grace", type=float, default=20.0, help="seconds to wait for late rows")
    p.add_argument("--watch-ms", type=float, default=2.0, help="row poll interval (2 ms)")
    p.add_argument("--out", default=str(ROOT / "bench/results/heads.md"))
    p.add_argument("--keep", help="copy the logs and databases to this directory")
    opts = p.parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started in the background (SIG_IGN)
    try:
        with ExitStack() as stack:
            res = run(opts, stack)
    except KeyboardInterrupt as e:
        print(f"[heads] interrupted ({e}); every process stopped, temp dir removed")
        return 130
    text = report(res)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    print()
    print(text)
    print(f"[heads] wrote {out} and {out.with_suffix('.json')}")
    g = res["goals"]
    ok = g["all_processes_alive"] and g["no_tracebacks"] and g["no_missing_rows"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
