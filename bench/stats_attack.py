"""Attacks on the stats site (issue 13, items 14-16 and 18), measured from outside.

Runs a real ``eth server`` subprocess (SQLite, stats site on loopback, token
required) and attacks its stats site with raw sockets while a well-behaved
client on 127.0.0.2 sends netstring probes (``0:,``, one at a time) to the
ingest port and asks ``/healthz``. For each attack it reports the server's RSS
(before, peak, after), the descriptors it held, the request-body bytes it
spooled to disk, and the probes' round trips (p50, worst): the stall ingest saw.

    .venv/bin/python bench/stats_attack.py                  # this tree
    git archive <commit> eth_twisted | tar -x -C /tmp/before
    .venv/bin/python bench/stats_attack.py --code /tmp/before   # another tree, same machine

Attacks (``--only`` picks some): ``trickle`` (200 connections from 20
addresses, a header byte each second), ``bodies`` (4 POSTs declaring 64 MiB,
pushing it), ``pipeline`` (20 connections x 500 pipelined GETs, never
reading), ``pages`` (20 clients looping /api/messages?limit=200 over 200
stored 64 KiB payloads that JSON-escape sixfold), ``stats`` (8 clients looping
/api/stats of a record holding 5,000 addresses). A plain script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def spooled_bytes(pid: int) -> int:
    """Bytes in the unlinked files the server holds open (where twisted.web spools request bodies)."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith("(deleted)"):
                total += os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except OSError:
            pass
    return total


class Server:
    """An ``eth server`` subprocess from ``code`` (or this tree) on free loopback ports."""

    def __init__(self, code: str | None, sqlite: str) -> None:
        self.port, self.web = free_port(), free_port()
        env = dict(os.environ, ETH_STATS_TOKEN=TOKEN)
        if code:
            env["PYTHONPATH"] = code
        # cwd: the data directory, so `python -c` does not import this tree instead of --code's.
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                (
                    "import sys\ntry:\n    from eth_twisted.cli.main import main\n"
                    "except ImportError:  # an older tree\n    from eth_twisted.cli import main\n"
                    "sys.exit(main())"
                ),
                "server",
                "--port",
                str(self.port),
                "--stats",
                f"tcp:{self.web}:interface=127.0.0.1",
                "--sqlite",
                sqlite,
            ],
            env=env,
            cwd=str(Path(sqlite).parent),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if http_get(self.web, "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def http_get(
    port: int, path: str, source: str = "127.0.0.2", timeout: float = 30.0
) -> tuple[int, int]:
    """A one-shot GET with the token; (status, body bytes), the body read and discarded."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    ) as s:
        s.sendall(
            f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        head, size = b"", 0
        while chunk := s.recv(1 << 20):
            if len(head) < 64:
                head += chunk[:64]
            size += len(chunk)
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, size


def netstring(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


class Probes:
    """A well-behaved client on 127.0.0.2: ingest probes one at a time, and /healthz every 0.1 s."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.rtts: list[float] = []
        self.health: list[tuple[int, float]] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._probe, daemon=True),
            threading.Thread(target=self._health, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _probe(self) -> None:
        with socket.create_connection(
            ("127.0.0.1", self.server.port), timeout=60, source_address=("127.0.0.2", 0)
        ) as s:
            while not self.stop.is_set():
                started = time.perf_counter()
                s.sendall(b"0:,")
                got = b""
                while not got.endswith(b","):
                    got += s.recv(4096)
                self.rtts.append(time.perf_counter() - started)
                self.stop.wait(0.02)

    def _health(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                status = http_get(self.server.web, "/healthz", timeout=30)[0]
            except OSError:
                status = 0
            self.health.append((status, time.perf_counter() - started))
            self.stop.wait(0.1)

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        rtts = sorted(self.rtts) or [0.0]
        health = [h for h in self.health]
        return {
            "probe_p50_ms": round(statistics.median(rtts) * 1000, 2),
            "probe_worst_ms": round(rtts[-1] * 1000, 1),
            "healthz_ok": sum(1 for s, _ in health if s == 200),
            "healthz_failed": sum(1 for s, _ in health if s != 200),
            "healthz_worst_ms": round(max((t for _, t in health), default=0.0) * 1000, 1),
        }


def measure(
    server: Server, attack: Callable[[Server], dict[str, Any]], settle: float = 3.0
) -> dict[str, Any]:
    """Run ``attack`` while sampling the server and the well-behaved client."""
    pid = server.proc.pid
    before = rss_kib(pid)
    samples: dict[str, int] = {"rss": before, "fds": fds(pid), "spooled": 0}
    fds_before = fds(pid)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples["rss"] = max(samples["rss"], rss_kib(pid))
            samples["fds"] = max(samples["fds"], fds(pid))
            samples["spooled"] = max(samples["spooled"], spooled_bytes(pid))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    probes = Probes(server)
    time.sleep(0.5)
    result = attack(server)
    time.sleep(0.5)
    result.update(probes.finish())
    done.set()
    sampler.join()
    time.sleep(settle)
    result.update(
        {
            "rss_before_mib": round(before / 1024, 1),
            "rss_peak_mib": round(samples["rss"] / 1024, 1),
            "rss_after_mib": round(rss_kib(pid) / 1024, 1),
            "fds_held_peak": samples["fds"] - fds_before,
            "spooled_peak_mib": round(samples["spooled"] / 2**20, 1),
        }
    )
    return result


# -- the attacks ---------------------------------------------------------------------------


def trickle(server: Server) -> dict[str, Any]:
    socks = []
    for i in range(200):
        try:
            s = socket.create_connection(
                ("127.0.0.1", server.web), timeout=5, source_address=(f"127.0.1.{1 + i % 20}", 0)
            )
            s.sendall(b"GET /healthz HTTP/1.1\r\n")
            s.setblocking(False)
            socks.append(s)
        except OSError:
            pass
    alive = set(socks)
    for _ in range(15):
        time.sleep(1.0)
        for s in list(alive):
            try:
                s.send(b"X")
                if s.recv(65536) == b"":
                    alive.discard(s)
            except BlockingIOError:
                pass
            except OSError:
                alive.discard(s)
    for s in socks:
        s.close()
    return {"connected": len(socks), "still_open_after_15s": len(alive)}


def bodies(server: Server) -> dict[str, Any]:
    sent = [0] * 4

    def one(i: int) -> None:
        try:
            with socket.create_connection(
                ("127.0.0.1", server.web), timeout=10, source_address=(f"127.0.2.{i + 1}", 0)
            ) as s:
                s.sendall(
                    b"POST /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
                    % (64 * 2**20)
                )
                chunk = b"x" * 65536
                for _ in range(1024):
                    s.sendall(chunk)
                    sent[i] += len(chunk)
                s.recv(4096)
        except OSError:
            pass

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return {"body_mib_sent": round(sum(sent) / 2**20, 1)}


def pipeline(server: Server) -> dict[str, Any]:
    one = b"GET /static/dashboard.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    socks = []
    for i in range(20):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.bind((f"127.0.3.{i + 1}", 0))
        s.connect(("127.0.0.1", server.web))
        s.sendall(one * 500)
        socks.append(s)
    time.sleep(5.0)
    for s in socks:
        s.close()
    return {"pipelined_requests": 20 * 500}


def store_escaped(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(b"".join(netstring(b"%08d" % i + b"\x01" * (64 * 1024 - 8)) for i in range(200)))
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass


def pages(server: Server) -> dict[str, Any]:
    sizes: list[int] = []
    failed: list[int] = []
    until = time.monotonic() + 10.0

    def loop(source: str) -> None:
        while time.monotonic() < until:
            try:
                status, size = http_get(server.web, "/api/messages?limit=200", source, timeout=60)
            except OSError:
                status, size = 0, 0
            if status == 200:
                sizes.append(size)
            else:
                failed.append(status)

    # 20 addresses: one each, so the per-address cap does not turn the load away.
    threads = [threading.Thread(target=loop, args=(f"127.0.4.{i + 1}",)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return {
        "pages_answered": len(sizes),
        "pages_failed": len(failed),
        "page_mib_max": round(max(sizes, default=0) / 2**20, 2),
    }


def seed_addresses(path: str) -> None:
    from eth_twisted.sinks.sql.migrations import migrate_sqlite

    migrate_sqlite(path)
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO ethereum_data (hash, payload, block_number, client_ip, client_id, received_at)"
            " VALUES (?, ?, NULL, ?, NULL, ?)",
            [
                (f"{i:064x}", b"x", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 1.7e9 + i)
                for i in range(5000)
            ],
        )


def stats(server: Server) -> dict[str, Any]:
    sizes: list[int] = []
    until = time.monotonic() + 10.0

    def loop() -> None:
        while time.monotonic() < until:
            sizes.append(http_get(server.web, "/api/stats", "127.0.0.3")[1])

    threads = [threading.Thread(target=loop) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return {"stats_answered": len(sizes), "stats_kib": round(max(sizes, default=0) / 1024, 1)}


ATTACKS = ("trickle", "bodies", "pipeline", "pages", "stats")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", help="run the server from this source tree")
    parser.add_argument("--only", default=",".join(ATTACKS))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            sqlite = str(Path(tmp) / f"{name}.sqlite3")
            if name == "stats":
                seed_addresses(sqlite)
            server = Server(args.code, sqlite)
            try:
                if name == "pages":
                    store_escaped(server)
                attack = {
                    "trickle": trickle,
                    "bodies": bodies,
                    "pipeline": pipeline,
                    "pages": pages,
                    "stats": stats,
                }[name]
                results[name] = measure(server, attack)
            finally:
                server.stop()
            print(name, json.dumps(results[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
